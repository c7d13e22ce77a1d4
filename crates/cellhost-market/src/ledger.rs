//! The provider's ledger of requests (`<state>/market/ledger.sqlite`):
//! replay protection, money taken, and outcomes.
//!
//! Invariants (schema, lifecycle and threat model in `docs/market.md`):
//! - `id` is the request's rumor id, recomputed here, never taken from the
//!   wire;
//! - a request is claimed (one insert) before any work on it; a row with no
//!   outcome is never re-run: the provider settles it
//!   ([`Ledger::unfinished`]);
//! - money taken is written ([`Ledger::redeemed`]) the moment the swap
//!   returns, before the cell is made or the lease extended; the outcome and
//!   the answer are written in one statement ([`Ledger::conclude`]);
//! - columns added after the first version are added to an older file at
//!   open (its answers count as sent);
//! - rows hold no token, key, password or document.
//!
//! Design: `docs/market.md`.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use crate::MarketError;

pub struct Ledger {
    conn: Mutex<Connection>,
}

/// One request as the ledger remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub sender: String,
    pub op: String,
    pub outcome: Option<String>,
    pub cell: Option<String>,
    pub paid_msat: Option<u64>,
    pub seconds: Option<u64>,
    /// The answer as sent: a gift wrap only the requester can open.
    pub reply: Option<String>,
    /// What was redeemed, from which mint, before the work was done.
    pub redeemed: Option<Redeemed>,
}

/// Money a request brought in, written before the work it pays for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub mint: String,
    pub msat: u64,
    /// Seconds it buys.
    pub seconds: u64,
    /// Top-ups: the cell.
    pub cell: Option<String>,
}

/// Times an answer no relay took is published again before it is left in
/// the ledger (where a repeat of the request still finds it).
pub const MAX_REPLY_TRIES: u32 = 10;

/// What became of one request.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    /// `ok` or an error code.
    pub code: &'a str,
    pub cell: Option<&'a str>,
    pub paid_msat: Option<u64>,
    pub seconds: Option<u64>,
}

/// Every column after `id`, `sender`, `op`, `received_at`, with its type:
/// the first version's and those added since, so an older file is brought
/// up to date at open.
const LATER_COLUMNS: &[(&str, &str)] = &[
    ("outcome", "TEXT"),
    ("cell", "TEXT"),
    ("paid_msat", "INTEGER"),
    ("seconds", "INTEGER"),
    ("reply", "TEXT"),
    ("mint", "TEXT"),
    ("taken_msat", "INTEGER"),
    ("taken_seconds", "INTEGER"),
    ("taken_cell", "TEXT"),
    ("reply_sent", "INTEGER NOT NULL DEFAULT 0"),
    ("reply_tries", "INTEGER NOT NULL DEFAULT 0"),
];

impl Ledger {
    pub fn open(path: &Path) -> Result<Ledger, MarketError> {
        if let Some(dir) = path.parent() {
            crate::keys::private_dir(dir)?;
        }
        let conn = cellhost_store::open_private_db(path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS requests (
                id TEXT PRIMARY KEY,
                sender TEXT NOT NULL,
                op TEXT NOT NULL,
                received_at INTEGER NOT NULL
            );",
        )?;
        let have: Vec<String> = {
            let mut st = conn.prepare("SELECT name FROM pragma_table_info('requests')")?;
            st.query_map([], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?
        };
        for (name, ty) in LATER_COLUMNS {
            if !have.iter().any(|h| h == name) {
                conn.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {name} {ty}"))?;
                if *name == "reply_sent" {
                    // What an older version answered is not sent again.
                    conn.execute_batch("UPDATE requests SET reply_sent = 1")?;
                }
            }
        }
        conn.execute_batch(
            "CREATE INDEX IF NOT EXISTS requests_cell ON requests(cell);
             CREATE INDEX IF NOT EXISTS requests_unsent ON requests(reply_tries, received_at)
                 WHERE reply IS NOT NULL AND reply_sent = 0;",
        )?;
        Ok(Ledger {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claim request `id`: true the first time, false for a replay.
    pub fn claim(&self, id: &str, sender: &str, op: &str) -> Result<bool, MarketError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO requests (id, sender, op, received_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, sender, op, now as i64],
        )?;
        Ok(n == 1)
    }

    /// Write down the money request `id` brought in, before the work.
    pub fn redeemed(&self, id: &str, r: &Redeemed) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET mint = ?2, taken_msat = ?3, taken_seconds = ?4, taken_cell = ?5
                 WHERE id = ?1",
            params![id, r.mint, r.msat as i64, r.seconds as i64, r.cell],
        )?;
        Ok(())
    }

    /// Request `id` ended with `o`; `reply` is its answer (the gift wrap,
    /// as JSON), not yet sent. One statement: an answer on record is an
    /// outcome on record.
    pub fn conclude(
        &self,
        id: &str,
        o: &Outcome<'_>,
        reply: Option<&str>,
    ) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET outcome = ?2, cell = ?3, paid_msat = ?4, seconds = ?5,
                 reply = ?6, reply_sent = 0 WHERE id = ?1",
            params![
                id,
                o.code,
                o.cell,
                o.paid_msat.map(|v| v as i64),
                o.seconds.map(|v| v as i64),
                reply
            ],
        )?;
        Ok(())
    }

    /// A relay took the answer to request `id`.
    pub fn sent(&self, id: &str) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET reply_sent = 1 WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    /// Publishing the answer to request `id` failed once more.
    pub fn tried(&self, id: &str) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET reply_tries = reply_tries + 1 WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    /// Up to `limit` answers no relay has taken yet and tried fewer than
    /// [`MAX_REPLY_TRIES`] times, least tried and oldest first: (request id,
    /// gift wrap JSON).
    pub fn unsent(&self, limit: u32) -> Result<Vec<(String, String)>, MarketError> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, reply FROM requests
             WHERE reply IS NOT NULL AND reply_sent = 0 AND reply_tries < ?2
             ORDER BY reply_tries, received_at LIMIT ?1",
        )?;
        let rows = st.query_map(params![limit, MAX_REPLY_TRIES], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Requests a crash cut short (claimed, no outcome), oldest first.
    pub fn unfinished(&self) -> Result<Vec<Entry>, MarketError> {
        self.select("WHERE outcome IS NULL ORDER BY received_at, rowid", [])
    }

    pub fn get(&self, id: &str) -> Result<Option<Entry>, MarketError> {
        Ok(self.select("WHERE id = ?1", params![id])?.pop())
    }

    /// Spawns that gave a consumer a cell.
    pub fn jobs_completed(&self) -> Result<u64, MarketError> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM requests WHERE op = 'spawn' AND outcome = 'ok'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Every request seen, oldest first (for tests and `inspect`).
    pub fn entries(&self) -> Result<Vec<Entry>, MarketError> {
        self.select("ORDER BY received_at, rowid", [])
    }

    fn select(&self, rest: &str, p: impl rusqlite::Params) -> Result<Vec<Entry>, MarketError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!("SELECT {COLUMNS} FROM requests {rest}"))?;
        let rows = st.query_map(p, entry)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

const COLUMNS: &str = "id, sender, op, outcome, cell, paid_msat, seconds, reply, \
                       mint, taken_msat, taken_seconds, taken_cell";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let u64_of = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.map(|v| v as u64));
    Ok(Entry {
        id: r.get(0)?,
        sender: r.get(1)?,
        op: r.get(2)?,
        outcome: r.get(3)?,
        cell: r.get(4)?,
        paid_msat: u64_of(5)?,
        seconds: u64_of(6)?,
        reply: r.get(7)?,
        redeemed: match (r.get::<_, Option<String>>(8)?, u64_of(9)?) {
            (Some(mint), Some(msat)) => Some(Redeemed {
                mint,
                msat,
                seconds: u64_of(10)?.unwrap_or(0),
                cell: r.get(11)?,
            }),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Outcome<'static> {
        Outcome {
            code: "ok",
            cell: Some("c1"),
            paid_msat: Some(60_000),
            seconds: Some(60),
        }
    }

    #[test]
    fn a_request_is_claimed_once_even_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("market/ledger.sqlite");
        let l = Ledger::open(&p).unwrap();
        assert!(l.claim("aa", "pk", "spawn").unwrap());
        assert!(!l.claim("aa", "pk", "spawn").unwrap());
        l.conclude("aa", &ok(), Some("{wrap}")).unwrap();
        drop(l);
        let l = Ledger::open(&p).unwrap();
        assert!(!l.claim("aa", "pk", "spawn").unwrap());
        let e = l.get("aa").unwrap().unwrap();
        assert_eq!(e.outcome.as_deref(), Some("ok"));
        assert_eq!((e.paid_msat, e.seconds), (Some(60_000), Some(60)));
        assert_eq!(e.reply.as_deref(), Some("{wrap}"));
        assert_eq!(l.jobs_completed().unwrap(), 1);
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&p).unwrap());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn money_taken_is_on_record_until_the_request_ends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ledger.sqlite");
        let l = Ledger::open(&p).unwrap();
        for id in ["a", "b", "c"] {
            assert!(l.claim(id, "pk", "topup").unwrap());
        }
        let taken = Redeemed {
            mint: "http://127.0.0.1:1".into(),
            msat: 6000,
            seconds: 6,
            cell: Some("c1".into()),
        };
        l.redeemed("b", &taken).unwrap();
        l.conclude("c", &ok(), None).unwrap();
        drop(l);
        // After a crash: a and b are unfinished, only b took money.
        let l = Ledger::open(&p).unwrap();
        let cut = l.unfinished().unwrap();
        assert_eq!(
            cut.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(cut[0].redeemed, None);
        assert_eq!(cut[1].redeemed.as_ref(), Some(&taken));
        // The outcome does not overwrite what was taken.
        let refunded = Outcome {
            code: "provision_failed",
            paid_msat: Some(6000),
            ..Outcome::default()
        };
        l.conclude("b", &refunded, Some("{refund}")).unwrap();
        assert_eq!(l.unfinished().unwrap().len(), 1);
        assert_eq!(l.get("b").unwrap().unwrap().redeemed, Some(taken));
    }

    #[test]
    fn answers_no_relay_took_are_listed_until_sent() {
        let d = tempfile::tempdir().unwrap();
        let l = Ledger::open(&d.path().join("ledger.sqlite")).unwrap();
        for id in ["a", "b", "c"] {
            l.claim(id, "pk", "status").unwrap();
        }
        l.conclude("a", &ok(), Some("{a}")).unwrap();
        l.conclude("b", &ok(), Some("{b}")).unwrap();
        l.conclude("c", &ok(), None).unwrap();
        let pending = |l: &Ledger| l.unsent(10).unwrap();
        assert_eq!(
            pending(&l),
            [
                ("a".to_string(), "{a}".to_string()),
                ("b".into(), "{b}".into())
            ]
        );
        assert_eq!(l.unsent(1).unwrap().len(), 1);
        l.sent("a").unwrap();
        assert_eq!(pending(&l), [("b".to_string(), "{b}".to_string())]);
        // Tried the most often goes last, and is given up on at the cap.
        l.claim("d", "pk", "status").unwrap();
        l.conclude("d", &ok(), Some("{d}")).unwrap();
        l.tried("b").unwrap();
        assert_eq!(pending(&l)[0].0, "d");
        for _ in 1..MAX_REPLY_TRIES {
            l.tried("b").unwrap();
        }
        assert_eq!(pending(&l), [("d".to_string(), "{d}".to_string())]);
    }

    #[test]
    fn a_first_version_ledger_gets_the_new_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ledger.sqlite");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "CREATE TABLE requests (id TEXT PRIMARY KEY, sender TEXT NOT NULL,
                     op TEXT NOT NULL, received_at INTEGER NOT NULL, outcome TEXT, cell TEXT,
                     paid_msat INTEGER, seconds INTEGER, reply TEXT);
                 INSERT INTO requests VALUES ('old', 'pk', 'spawn', 1, 'ok', 'c0', 5000, 5, '{old}');",
            )
            .unwrap();
        }
        let l = Ledger::open(&p).unwrap();
        let e = l.get("old").unwrap().unwrap();
        assert_eq!((e.outcome.as_deref(), e.redeemed), (Some("ok"), None));
        // Its answer counts as sent, and stays so across a reopen.
        assert!(l.unsent(10).unwrap().is_empty());
        drop(l);
        let l = Ledger::open(&p).unwrap();
        assert!(l.unsent(10).unwrap().is_empty());
        assert!(l.claim("new", "pk", "spawn").unwrap());
        l.redeemed(
            "new",
            &Redeemed {
                mint: "http://m".into(),
                msat: 1000,
                seconds: 1,
                cell: None,
            },
        )
        .unwrap();
        assert_eq!(
            l.unfinished().unwrap()[0].redeemed.as_ref().unwrap().msat,
            1000
        );
    }
}
