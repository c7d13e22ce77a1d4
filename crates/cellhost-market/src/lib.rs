//! cellhost's market front: a consumer with only a Nostr key and a Cashu
//! token rents a cell. No account, no signup.
//!
//! - [`proto`]: offers, heartbeats, requests and replies on the wire.
//! - [`config`]: the provider's prices and tier sizes.
//! - [`keys`]: the provider's (and a consumer's) Nostr key and the
//!   provider's wallet seed, 0600 files generated on first use.
//! - [`ledger`]: which requests were seen (replay protection) and what
//!   became of them; never a token.
//! - [`cashier`]: validate a token offline, redeem it (swap), refund.
//! - [`provider`]: the loop `cellhost serve --market` runs.
//! - [`consumer`]: what `cellhost market …` runs.
//!
//! The provider's order of work for a paid request is the point of this
//! crate: every check that can refuse a request runs before the token is
//! redeemed, and anything that fails after redemption is answered with a
//! refund token for everything taken (less a mint fee, if any).

pub mod cashier;
pub mod config;
pub mod consumer;
pub mod keys;
pub mod ledger;
pub mod proto;
pub mod provider;

pub use config::MarketConfig;

#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    #[error("market config: {field}: {message}")]
    Config { field: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: mode {mode:o} lets others read it; chmod 600 it")]
    Permissions { path: String, mode: u32 },
    #[error("{path}: {message}")]
    BadKeyFile { path: String, message: String },
    #[error("ledger: {0}")]
    Ledger(#[from] rusqlite::Error),
    #[error("ledger: {0}")]
    LedgerFile(#[from] cellhost_store::StoreError),
    #[error("nostr: {0}")]
    Nostr(String),
    #[error("wallet: {0}")]
    Wallet(String),
    /// The request went out; no answer came in time. The provider may
    /// still act on it (and keeps its answer for a repeat of the request).
    #[error(
        "no reply from the provider within {seconds} s to request {request}; `cellhost market reply <offer> {request}` waits for it later"
    )]
    NoReply { seconds: u64, request: String },
}

/// Arm the failpoints named in the `FAILPOINTS` environment variable (the
/// `fail` crate's syntax: `market-spawn-created=return`). A no-op unless
/// built with the `failpoints` feature, which the cellhost crate turns on
/// for builds that include its tests (`cargo test`, `clippy --all-targets`:
/// the `cellhost` binary those leave in the target dir has them); `cargo
/// build` and `cargo install` of cellhost leave it off. The provider's
/// failpoints kill the process as `kill -9` would, to test that requests
/// cut short are settled at the next start. Armed, it says so on stderr.
pub fn arm_failpoints() {
    #[cfg(feature = "failpoints")]
    if let Ok(f) = std::env::var("FAILPOINTS") {
        eprintln!("cellhost: TEST BUILD: failpoints armed: {f}");
        std::mem::forget(fail::FailScenario::setup());
    }
}

impl MarketError {
    pub(crate) fn nostr(e: impl std::fmt::Display) -> MarketError {
        MarketError::Nostr(e.to_string())
    }
}
