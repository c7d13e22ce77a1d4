//! How a consumer reaches the cells it paid for, with no account: its
//! Nostr key signs each request (NIP-98, [`nip98`]), and the provider's
//! self-signed certificate is pinned by the fingerprint its signed offer
//! carries ([`tls`]). [`client`] is the consumer's side of both.
//!
//! Design and threat model: `docs/access.md`.

pub mod client;
pub mod nip98;
pub mod tls;

pub use nostr::{Keys, PublicKey};
pub use tls::Fingerprint;

/// What can go wrong setting up or using tenant access.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error("not a SHA-256 fingerprint (64 hex digits): {0:?}")]
    InvalidFingerprint(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is mode {mode:o}: a TLS key must be readable by its owner only")]
    KeyMode { path: String, mode: u32 },
    #[error("making the TLS certificate: {0}")]
    CertGen(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "certificate mismatch: the provider's offer pins {expected}, the server presented {presented}"
    )]
    CertificateMismatch {
        expected: Fingerprint,
        presented: Fingerprint,
    },
    #[error("connecting to {0}")]
    Connect(String),
    #[error("HTTP: {0}")]
    Http(#[source] hyper::Error),
    #[error("reading the response: {0}")]
    Body(String),
    #[error("signing the request: {0}")]
    Sign(String),
    #[error("the tenant API answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("WebSocket: {0}")]
    WebSocket(String),
}
