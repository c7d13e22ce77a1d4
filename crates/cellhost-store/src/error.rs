//! Errors of the state store.

use std::path::PathBuf;

use cellhost_core::ids::CellId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem step of [`Store::open`](crate::Store::open) failed
    /// (creating the state dir, creating or checking the db file).
    #[error("state store: {context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// SQLite refused (busy past the timeout, disk full, I/O error...).
    #[error("state store: sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),

    /// A stored row does not decode. Names the row and the column, so an
    /// operator can look at it with `sqlite3`; never a panic, and one bad
    /// row does not hide the others (see
    /// [`Store::list_lenient`](crate::Store::list_lenient)).
    #[error("state store: cell {id}: column {column} is corrupt: {detail}")]
    Corrupt {
        /// The row's cell id as stored (may itself be the corrupt part).
        id: String,
        /// `table.column`, e.g. `cells.handle`, `events.data`.
        column: &'static str,
        detail: String,
    },

    #[error("state store: cell {0} not found")]
    NotFound(CellId),

    #[error("state store: cell {0} already exists")]
    AlreadyExists(CellId),

    /// The file's `user_version` is not one this build knows: written by a
    /// newer cellhost (refuse rather than misread it) or damaged.
    #[error(
        "state store: schema version {found} is not one this cellhost knows \
         (0..={supported}); was the file written by a newer cellhost?"
    )]
    SchemaVersion { found: i64, supported: i64 },

    /// The caller passed something the store will not record (a handle
    /// for another cell, a name that disagrees with the document...).
    #[error("state store: invalid: {0}")]
    Invalid(String),

    /// A value could not be encoded as JSON for storage.
    #[error("state store: cannot encode {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// SQLite would not put the file in WAL mode (e.g. a filesystem without
    /// shared-memory support). Multi-process readers need WAL; refuse.
    #[error("state store: journal_mode is {0:?}, WAL is required")]
    NotWal(String),
}

impl StoreError {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            context,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        id: impl Into<String>,
        column: &'static str,
        detail: impl std::fmt::Display,
    ) -> Self {
        StoreError::Corrupt {
            id: id.into(),
            column,
            detail: detail.to_string(),
        }
    }
}
