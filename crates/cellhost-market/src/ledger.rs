//! The provider's ledger of requests: replay protection and outcomes.
//!
//! # Layout on the host
//!
//! `<state>/market/ledger.sqlite` (0600, WAL), one table:
//! `requests(id PK, sender, op, received_at, outcome, cell, paid_msat, seconds,
//! reply, mint, redeemed_msat, expect_expires_ms)`.
//! `id` is the request's rumor id (the inner, signed-by-nobody kind-14
//! event's id, recomputed here, never taken from the wire): the gift wrap
//! around it changes on every send, the rumor does not.
//!
//! # Lifecycle and idempotency
//!
//! A request is *claimed* (row inserted, one statement) before any work on
//! it; a second delivery of the same rumor finds the row and is ignored,
//! across restarts too. The outcome is written when the work ends.
//!
//! Money taken is written down the moment the mint's swap returns
//! ([`Ledger::redeemed`]: the mint, the amount, the seconds it buys, and for
//! a top-up the lease end the extend will set), before the cell is made or
//! the lease extended. A row with no outcome is a request cut short by a
//! crash; it is never re-run. At the next start the provider settles it
//! ([`Ledger::unfinished`]): with `redeemed_msat` set, the consumer gets
//! what was paid for (the cell exists, the lease was extended) or a refund;
//! without, nothing was taken, or the crash came during the swap itself
//! (the cashier's recovery finds that money; the row says `interrupted`).
//!
//! # Threat model
//!
//! Rows hold no token, key, password or document: only who asked for what,
//! the stable outcome code (`refund_owed` marks money taken and neither
//! delivered nor refunded), the cell id, amounts, and the answer as sent:
//! a NIP-59 gift wrap sealed to the requester with a throwaway key, which
//! this provider cannot open again (so a refund in it stays the
//! requester's alone).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

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
    /// Top-ups: the cell and the lease end (unix ms) the extend sets.
    pub cell: Option<String>,
    pub expect_expires_ms: Option<i64>,
}

/// What became of one request.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    /// `ok` or an error code.
    pub code: &'a str,
    pub cell: Option<&'a str>,
    pub paid_msat: Option<u64>,
    pub seconds: Option<u64>,
}

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
                received_at INTEGER NOT NULL,
                outcome TEXT,
                cell TEXT,
                paid_msat INTEGER,
                seconds INTEGER,
                reply TEXT,
                mint TEXT,
                redeemed_msat INTEGER,
                expect_expires_ms INTEGER
            );
            CREATE INDEX IF NOT EXISTS requests_cell ON requests(cell);",
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

    pub fn finish(&self, id: &str, o: &Outcome<'_>) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET outcome = ?2, cell = ?3, paid_msat = ?4, seconds = ?5 WHERE id = ?1",
            params![
                id,
                o.code,
                o.cell,
                o.paid_msat.map(|v| v as i64),
                o.seconds.map(|v| v as i64)
            ],
        )?;
        Ok(())
    }

    /// Write down the money request `id` brought in, before the work.
    pub fn redeemed(&self, id: &str, r: &Redeemed) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET mint = ?2, redeemed_msat = ?3, seconds = ?4, cell = ?5,
                 expect_expires_ms = ?6 WHERE id = ?1",
            params![
                id,
                r.mint,
                r.msat as i64,
                r.seconds as i64,
                r.cell,
                r.expect_expires_ms
            ],
        )?;
        Ok(())
    }

    /// Requests a crash cut short (claimed, no outcome), oldest first.
    pub fn unfinished(&self) -> Result<Vec<Entry>, MarketError> {
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM requests WHERE outcome IS NULL ORDER BY received_at, rowid"
        ))?;
        let rows = st.query_map([], entry)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Keep the answer to request `id` (its gift wrap, as JSON).
    pub fn set_reply(&self, id: &str, wrap: &str) -> Result<(), MarketError> {
        self.conn().execute(
            "UPDATE requests SET reply = ?2 WHERE id = ?1",
            params![id, wrap],
        )?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<Entry>, MarketError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM requests WHERE id = ?1"),
                params![id],
                entry,
            )
            .optional()?)
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
        let conn = self.conn();
        let mut st = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM requests ORDER BY received_at, rowid"
        ))?;
        let rows = st.query_map([], entry)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

const COLUMNS: &str = "id, sender, op, outcome, cell, paid_msat, seconds, reply, mint, redeemed_msat, expect_expires_ms";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        id: r.get(0)?,
        sender: r.get(1)?,
        op: r.get(2)?,
        outcome: r.get(3)?,
        cell: r.get(4)?,
        paid_msat: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        seconds: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        reply: r.get(7)?,
        redeemed: match (r.get::<_, Option<String>>(8)?, r.get::<_, Option<i64>>(9)?) {
            (Some(mint), Some(msat)) => Some(Redeemed {
                mint,
                msat: msat as u64,
                seconds: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                cell: r.get(4)?,
                expect_expires_ms: r.get(10)?,
            }),
            _ => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_claimed_once_even_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("market/ledger.sqlite");
        let l = Ledger::open(&p).unwrap();
        assert!(l.claim("aa", "pk", "spawn").unwrap());
        assert!(!l.claim("aa", "pk", "spawn").unwrap());
        l.finish(
            "aa",
            &Outcome {
                code: "ok",
                cell: Some("c1"),
                paid_msat: Some(60_000),
                seconds: Some(60),
            },
        )
        .unwrap();
        drop(l);
        let l = Ledger::open(&p).unwrap();
        assert!(!l.claim("aa", "pk", "spawn").unwrap());
        let e = l.get("aa").unwrap().unwrap();
        assert_eq!(e.outcome.as_deref(), Some("ok"));
        assert_eq!((e.paid_msat, e.seconds), (Some(60_000), Some(60)));
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
            expect_expires_ms: Some(1_700_000_006_000),
        };
        l.redeemed("b", &taken).unwrap();
        l.finish(
            "c",
            &Outcome {
                code: "ok",
                ..Outcome::default()
            },
        )
        .unwrap();
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
        l.finish(
            "b",
            &Outcome {
                code: "provision_failed",
                paid_msat: Some(6000),
                ..Outcome::default()
            },
        )
        .unwrap();
        assert_eq!(l.unfinished().unwrap().len(), 1);
    }
}
