//! NIP-98 HTTP auth: a request signed by the caller's Nostr key.
//!
//! The `Authorization: Nostr <base64 event>` header carries a kind-27235
//! event whose `u` tag is the request's absolute URL, whose `method` tag is
//! its method and, when the request has a body, whose `payload` tag is the
//! body's SHA-256. [`Verifier::verify`] returns the signer's key, the
//! tenant's identity, or an [`AuthError`] with a stable code.
//!
//! Invariants:
//! - every check runs before the event id is remembered, and an event id
//!   is accepted once: a replay within its window is refused;
//! - `created_at` must lie within [`WINDOW`] of the server's clock either
//!   way, so an id need be remembered only for twice that; the memory is
//!   bounded ([`MAX_REMEMBERED`]) and refuses (fails closed) when full;
//! - the header is bounded before anything is decoded; nothing in it can
//!   panic the verifier (fuzzed in `tests/fuzz_nip98.rs`).
//!
//! Not the `nostr` crate's own `nip98` module: its method type has no
//! DELETE, which the API uses. Its verifier and signer are the interop
//! reference in this module's tests.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nostr::secp256k1::rand::{Rng, rngs::OsRng};
use nostr::{Event, EventBuilder, JsonUtil, Keys, Kind, PublicKey, Tag, TagKind, Timestamp, Url};
use sha2::{Digest, Sha256};

use crate::AccessError;

/// How far `created_at` may be from the server's clock, either way.
pub const WINDOW: u64 = 60;
/// Most event ids remembered at once. Each one took a valid signature and
/// lives for `2 × WINDOW`; when all are taken, new requests are refused.
pub const MAX_REMEMBERED: usize = 100_000;
/// Largest header value looked at (a real one is well under 1 KiB).
pub const MAX_HEADER: usize = 8 * 1024;
/// The scheme word of the header.
pub const SCHEME: &str = "Nostr";

/// Why a signed request was refused. [`AuthError::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the Authorization header is not `Nostr <base64 event>`: {0}")]
    Malformed(String),
    #[error("the auth event is kind {0}, not 27235")]
    WrongKind(u16),
    #[error("the auth event's id or signature is not valid")]
    BadSignature,
    #[error("the auth event was signed {skew} s from the server's clock (at most {WINDOW} s)")]
    Expired { skew: i64 },
    #[error("the auth event's `u` tag {signed:?} is not this request's URL {request:?}")]
    UrlMismatch { signed: String, request: String },
    #[error("the auth event's `method` tag {signed:?} is not this request's method {request}")]
    MethodMismatch { signed: String, request: String },
    #[error("{0}")]
    PayloadMismatch(&'static str),
    #[error("this auth event was used before; sign each request anew")]
    Replayed,
    #[error("too many signed requests in the last {} s; try again shortly", 2 * WINDOW)]
    Busy,
}

impl AuthError {
    /// The stable machine-readable code of the API's 401 (503 for `Busy`).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "auth_malformed",
            AuthError::WrongKind(_) => "auth_wrong_kind",
            AuthError::BadSignature => "auth_bad_signature",
            AuthError::Expired { .. } => "auth_expired",
            AuthError::UrlMismatch { .. } => "auth_url_mismatch",
            AuthError::MethodMismatch { .. } => "auth_method_mismatch",
            AuthError::PayloadMismatch(_) => "auth_payload_mismatch",
            AuthError::Replayed => "auth_replayed",
            AuthError::Busy => "auth_busy",
        }
    }
}

/// The part of a request the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// Path and query, as sent (`/v1/cells/abc?follow=true`).
    pub path_and_query: &'a str,
    pub body: &'a [u8],
}

/// Checks signed requests addressed to one base URL.
pub struct Verifier {
    base: String,
    capacity: usize,
    seen: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    ids: HashSet<[u8; 32]>,
    /// (forget at, id), in acceptance order: the clock only moves on.
    order: VecDeque<(u64, [u8; 32])>,
}

impl Remembered {
    fn prune(&mut self, now: u64) {
        while let Some(&(until, id)) = self.order.front() {
            if until > now {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
    }
}

impl Verifier {
    /// A verifier for requests to `base_url` (`https://host:port`, no
    /// path): a signed `u` must be this plus the request's path and query.
    pub fn new(base_url: &str) -> Result<Verifier, AccessError> {
        let bad = |why: &str| AccessError::InvalidUrl(format!("{base_url}: {why}"));
        let u = Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        if u.scheme() != "https" && u.scheme() != "http" {
            return Err(bad("the scheme must be https"));
        }
        if u.path() != "/" || u.query().is_some() || u.host_str().is_none() {
            return Err(bad("expected scheme://host[:port] with no path"));
        }
        Ok(Verifier {
            base: base_url.trim_end_matches('/').to_string(),
            capacity: MAX_REMEMBERED,
            seen: Mutex::new(Remembered::default()),
        })
    }

    /// Remember at most `capacity` ids (default [`MAX_REMEMBERED`]).
    pub fn with_capacity(mut self, capacity: usize) -> Verifier {
        self.capacity = capacity;
        self
    }

    /// The base URL signed requests must name.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The base URL's host, without brackets (a name for the certificate).
    pub fn host(&self) -> String {
        Url::parse(&self.base)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
            .unwrap_or_default()
    }

    /// The signer of `header` for `req`, checked at `now` (unix seconds).
    pub fn verify(
        &self,
        header: &str,
        req: SignedRequest<'_>,
        now: u64,
    ) -> Result<PublicKey, AuthError> {
        let event = decode(header)?;
        if event.kind != Kind::HttpAuth {
            return Err(AuthError::WrongKind(event.kind.as_u16()));
        }
        event.verify().map_err(|_| AuthError::BadSignature)?;
        // In i128: a signed `created_at` may be any u64.
        let skew = i128::from(now) - i128::from(event.created_at.as_secs());
        if skew.unsigned_abs() > u128::from(WINDOW) {
            let skew = i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX });
            return Err(AuthError::Expired { skew });
        }
        let request_url = format!("{}{}", self.base, req.path_and_query);
        let signed_url = tag(&event, "u").unwrap_or_default();
        if !same_url(signed_url, &request_url) {
            return Err(AuthError::UrlMismatch {
                signed: clip(signed_url),
                request: request_url,
            });
        }
        let signed_method = tag(&event, "method").unwrap_or_default();
        if !signed_method.eq_ignore_ascii_case(req.method) {
            return Err(AuthError::MethodMismatch {
                signed: clip(signed_method),
                request: req.method.to_string(),
            });
        }
        match tag(&event, "payload") {
            Some(p) => {
                let want = hex::encode(Sha256::digest(req.body));
                if !p.eq_ignore_ascii_case(&want) {
                    return Err(AuthError::PayloadMismatch(
                        "the auth event's `payload` tag is not the SHA-256 of this body",
                    ));
                }
            }
            None if !req.body.is_empty() => {
                return Err(AuthError::PayloadMismatch(
                    "a request with a body must sign its SHA-256 in a `payload` tag",
                ));
            }
            None => {}
        }
        self.remember(event.id.to_bytes(), now)?;
        Ok(event.pubkey)
    }

    fn remember(&self, id: [u8; 32], now: u64) -> Result<(), AuthError> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.prune(now);
        if seen.ids.contains(&id) {
            return Err(AuthError::Replayed);
        }
        if seen.ids.len() >= self.capacity {
            return Err(AuthError::Busy);
        }
        seen.ids.insert(id);
        // Valid at most until created_at + WINDOW <= now + 2 × WINDOW.
        seen.order.push_back((now + 2 * WINDOW + 1, id));
        Ok(())
    }
}

fn decode(header: &str) -> Result<Event, AuthError> {
    if header.len() > MAX_HEADER {
        return Err(AuthError::Malformed(format!(
            "longer than {MAX_HEADER} bytes"
        )));
    }
    let Some((scheme, b64)) = header.trim().split_once(' ') else {
        return Err(AuthError::Malformed("no scheme".into()));
    };
    if scheme != SCHEME {
        return Err(AuthError::Malformed(format!(
            "the scheme is not `{SCHEME}`"
        )));
    }
    let json = BASE64
        .decode(b64.trim())
        .map_err(|e| AuthError::Malformed(format!("base64: {e}")))?;
    Event::from_json(&json).map_err(|e| AuthError::Malformed(format!("event: {e}")))
}

/// The first value of the first tag named `name`.
fn tag<'e>(event: &'e Event, name: &str) -> Option<&'e str> {
    event.tags.iter().find_map(|t| match t.as_slice() {
        [k, v, ..] if k == name => Some(v.as_str()),
        _ => None,
    })
}

/// URLs compared after parsing (scheme and host case, default ports).
fn same_url(signed: &str, request: &str) -> bool {
    match (Url::parse(signed), Url::parse(request)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A tenant's text in an error, bounded.
fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

/// The `Authorization` header value for a request, signed by `keys` at
/// `at` (unix seconds; [`now`] for a live request). A random `nonce` tag
/// makes each signature its own event, so repeating a request within
/// one second is not taken for a replay. (A signer without one, such as
/// rust-nostr's or nostr-tools', must wait a second to repeat a request.)
pub fn sign(
    keys: &Keys,
    method: &str,
    url: &str,
    body: &[u8],
    at: u64,
) -> Result<String, nostr::event::builder::Error> {
    let named = |k: &str, v: String| Tag::custom(TagKind::custom(k.to_string()), [v]);
    // Two identical requests in one second would otherwise be one event
    // id, and the second refused as a replay. Verifiers ignore the tag.
    let nonce: [u8; 16] = OsRng.r#gen();
    let mut tags = vec![
        named("u", url.to_string()),
        named("method", method.to_ascii_uppercase()),
        named("nonce", hex::encode(nonce)),
    ];
    if !body.is_empty() {
        tags.push(named("payload", hex::encode(Sha256::digest(body))));
    }
    let event = EventBuilder::new(Kind::HttpAuth, "")
        .tags(tags)
        .custom_created_at(Timestamp::from(at))
        .sign_with_keys(keys)?;
    Ok(format!("{SCHEME} {}", BASE64.encode(event.as_json())))
}

/// Unix seconds now.
pub fn now() -> u64 {
    Timestamp::now().as_secs()
}
