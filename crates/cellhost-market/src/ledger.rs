//! The provider's ledger of requests: replay protection and outcomes.
//!
//! # Layout on the host
//!
//! `<state>/market/ledger.sqlite` (0600, WAL), one table:
//! `requests(id PK, sender, op, received_at, outcome, cell, paid_msat, seconds,
//! reply)`.
//! `id` is the request's rumor id (the inner, signed-by-nobody kind-14
//! event's id, recomputed here, never taken from the wire): the gift wrap
//! around it changes on every send, the rumor does not.
//!
//! # Lifecycle and idempotency
//!
//! A request is *claimed* (row inserted, one statement) before any work on
//! it; a second delivery of the same rumor finds the row and is ignored,
//! across restarts too. The outcome is written when the work ends. A row
//! with no outcome is a request cut short by a crash: it is not re-run
//! (its token may have been redeemed; see the provider's notes).
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
        let conn = Connection::open(path)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| MarketError::Io {
                what: format!("chmod 600 {}", path.display()),
                source: e,
            })?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
                reply TEXT
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

    /// Mark requests a crash cut short (claimed, no outcome) as
    /// `interrupted`; returns them. Their token may have been redeemed.
    pub fn mark_interrupted(&self) -> Result<Vec<Entry>, MarketError> {
        let cut = {
            let conn = self.conn();
            let mut st = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM requests WHERE outcome IS NULL"
            ))?;
            st.query_map([], entry)?.collect::<Result<Vec<_>, _>>()?
        };
        self.conn().execute(
            "UPDATE requests SET outcome = 'interrupted' WHERE outcome IS NULL",
            [],
        )?;
        Ok(cut)
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

const COLUMNS: &str = "id, sender, op, outcome, cell, paid_msat, seconds, reply";

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
}
