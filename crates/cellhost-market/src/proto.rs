//! The market's wire format: what goes in offers, heartbeats, requests and
//! replies. Pure data and parsing; nothing here touches the network.
//!
//! # Events
//!
//! | what      | kind  | tags                                   | content            |
//! |-----------|-------|----------------------------------------|--------------------|
//! | offer     | 38383 | `d`=[`OFFER_D`], `t`=cellhost, paygress | [`Offer`] JSON     |
//! | heartbeat | 38384 | `d`=[`HEARTBEAT_D`], `t`=cellhost       | [`Heartbeat`] JSON |
//! | request   | 14 in a NIP-59 gift wrap (1059), NIP-44 sealed | | [`Request`] JSON |
//! | reply     | 14 in a gift wrap, `e`=the request's rumor id   | | [`Reply`] JSON   |
//!
//! Both public kinds are addressable (NIP-01: 30000..40000), so a relay
//! keeps only the newest offer and heartbeat of each provider. 38383 and
//! 38384 are paygress's offer and heartbeat kinds, and the offer carries
//! paygress's field names where they mean the same thing (`provider_npub`,
//! `specs[].rate_msats_per_sec`, `whitelisted_mints`, ...), so its
//! discovery lists us; what only cellhost has sits under `cellhost`.
//!
//! # Hostile input
//!
//! Requests come from anyone. [`Request::parse`] bounds the size, refuses
//! unknown fields and ops, and names the field that is wrong; it never
//! panics (fuzzed in `tests/fuzz_proto.rs`).

use serde::{Deserialize, Serialize};

/// Offer event kind (paygress's `KIND_PROVIDER_OFFER`).
pub const OFFER_KIND: u16 = 38383;
/// Heartbeat event kind (paygress's `KIND_PROVIDER_HEARTBEAT`).
pub const HEARTBEAT_KIND: u16 = 38384;
/// `d` tag of the offer: one offer per provider key.
pub const OFFER_D: &str = "cellhost:offer:v1";
/// `d` tag of the heartbeat: the newest one replaces the last.
pub const HEARTBEAT_D: &str = "cellhost:heartbeat:v1";
/// `t` tag every cellhost offer carries (consumers filter on it).
pub const TOPIC: &str = "cellhost";
/// Protocol version in every request and reply.
pub const VERSION: u32 = 1;
/// Largest request content accepted. NIP-44 encrypts at most 65 535 bytes,
/// padded up in steps, and the gift wrap encrypts the seal, which holds
/// the encrypted rumor in base64: a rumor over 40 960 bytes cannot be sent
/// at all. A document plus a token fit in this easily.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;

/// The offer's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The signer's npub; a consumer drops an offer whose signer differs.
    pub provider_npub: String,
    /// The node's name.
    pub hostname: String,
    /// The tiers on offer (`process`, `container`, `vm`, `microvm`).
    pub capabilities: Vec<String>,
    /// One entry per tier, in paygress's shape.
    pub specs: Vec<PaygressSpec>,
    /// Mint URLs whose tokens are accepted.
    pub whitelisted_mints: Vec<String>,
    /// Successful spawns since this provider's market first ran.
    pub total_jobs_completed: u64,
    pub cellhost: OfferDetails,
}

/// paygress's `PodSpec`: the fields its CLI lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaygressSpec {
    pub id: String,
    pub name: String,
    pub description: String,
    pub cpu_millicores: u64,
    pub memory_mb: u64,
    pub rate_msats_per_sec: u64,
}

/// What only cellhost offers carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfferDetails {
    pub version: u32,
    /// The Cashu unit prices are paid in (`sat`).
    pub unit: String,
    /// Heartbeats come this often; a consumer calls a provider live while
    /// its newest heartbeat is younger than three of these.
    pub heartbeat_seconds: u64,
    /// Relays the provider reads requests from.
    pub relays: Vec<String>,
    /// Address consumers reach published ports on.
    pub host: String,
    pub tiers: Vec<TierOffer>,
    /// The tenant API, where the provider serves one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<TenantApi>,
}

/// Where a consumer's NIP-98 signed requests go, and the certificate it
/// pins there. The offer is signed by the provider's key, so the pin
/// needs no CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantApi {
    /// `https://host:port`.
    pub url: String,
    /// SHA-256 of the server certificate's DER, 64 lowercase hex digits.
    pub tls_sha256: String,
}

/// One tier on offer: what a cell gets and what a second of it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TierOffer {
    /// `process` | `container` | `vm` | `microvm`.
    pub tier: String,
    /// `shared-kernel` | `container` | `dedicated-vm` | `microvm`.
    pub isolation: String,
    pub cpus: f64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    #[serde(rename = "diskGiB", default, skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    pub price_msat_per_second: u64,
    pub min_seconds: u64,
    pub max_seconds: u64,
    /// The tier runs here and the node has room for one more such cell.
    pub available: bool,
}

/// The heartbeat's content: the node's free capacity now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    pub version: u32,
    /// Unix seconds.
    pub at: u64,
    pub free_cpus: f64,
    #[serde(rename = "freeMemoryMiB")]
    pub free_memory_mib: u64,
    pub running_cells: u64,
    /// Tiers with room for one more cell of their offered size.
    pub available_tiers: Vec<String>,
}

/// The isolation level a tier gives, as offers name it.
pub fn isolation_level(tier: cellhost_spec::Isolation) -> &'static str {
    use cellhost_spec::Isolation::*;
    match tier {
        Process => "shared-kernel",
        Container => "container",
        Vm => "dedicated-vm",
        Microvm => "microvm",
    }
}

/// A consumer's request (the rumor's content). `Debug` shows no token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Rent a cell.
    Spawn(SpawnRequest),
    /// Pay for more time on a cell this key owns.
    Topup {
        #[serde(default = "version")]
        cellhost: u32,
        cell: String,
        token: String,
    },
    /// Show a cell this key owns.
    Status {
        #[serde(default = "version")]
        cellhost: u32,
        cell: String,
    },
    /// Destroy a cell this key owns now (unused time is not refunded).
    Stop {
        #[serde(default = "version")]
        cellhost: u32,
        cell: String,
    },
}

fn version() -> u32 {
    VERSION
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Spawn(s) => s.fmt(f),
            Request::Topup { cell, .. } => f
                .debug_struct("Topup")
                .field("cell", cell)
                .finish_non_exhaustive(),
            Request::Status { cell, .. } => f.debug_struct("Status").field("cell", cell).finish(),
            Request::Stop { cell, .. } => f.debug_struct("Stop").field("cell", cell).finish(),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpawnRequest {
    #[serde(default = "version")]
    pub cellhost: u32,
    /// The tier to rent (must be on offer).
    pub tier: String,
    /// A cell document (YAML or JSON text). Absent: the provider's template
    /// for the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
    /// A Cashu token (`cashuA…`/`cashuB…`) from a mint on offer.
    pub token: String,
    /// 64 hex digits: the key of the document's encrypted volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_key: Option<String>,
    /// Installed as the secret `ssh_authorized_keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
    /// Installed as the secret `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for SpawnRequest {
    /// Never prints the token, key or password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpawnRequest")
            .field("tier", &self.tier)
            .field("document", &self.document.as_ref().map(|d| d.len()))
            .field("volume_key", &self.volume_key.is_some())
            .field("ssh_key", &self.ssh_key.is_some())
            .field("password", &self.password.is_some())
            .finish_non_exhaustive()
    }
}

impl Request {
    /// Parse a request's content. Errors name the field.
    pub fn parse(content: &str) -> Result<Request, Refusal> {
        if content.len() > MAX_REQUEST_BYTES {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "the request is {} bytes; at most {MAX_REQUEST_BYTES}",
                    content.len()
                ),
            ));
        }
        let v: serde_json::Value = serde_json::from_str(content)
            .map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("not JSON: {e}")))?;
        let Some(op) = v.get("op") else {
            return Err(Refusal::field(ErrorCode::BadRequest, "op", "missing"));
        };
        match op.as_str() {
            Some("spawn" | "topup" | "status" | "stop") => {}
            _ => {
                return Err(Refusal::field(
                    ErrorCode::UnknownOp,
                    "op",
                    "expected spawn, topup, status or stop",
                ));
            }
        }
        let req: Request = serde_json::from_value(v)
            .map_err(|e| Refusal::new(ErrorCode::BadRequest, e.to_string()))?;
        if req.version() != VERSION {
            return Err(Refusal::field(
                ErrorCode::BadRequest,
                "cellhost",
                format!(
                    "protocol version {} is not spoken here (this is {VERSION})",
                    req.version()
                ),
            ));
        }
        Ok(req)
    }

    pub fn version(&self) -> u32 {
        match self {
            Request::Spawn(s) => s.cellhost,
            Request::Topup { cellhost, .. }
            | Request::Status { cellhost, .. }
            | Request::Stop { cellhost, .. } => *cellhost,
        }
    }

    pub fn op(&self) -> &'static str {
        match self {
            Request::Spawn(_) => "spawn",
            Request::Topup { .. } => "topup",
            Request::Status { .. } => "status",
            Request::Stop { .. } => "stop",
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a request serializes")
    }
}

/// Stable error codes of replies. Clients match on these, never on text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, a missing or mistyped field, an unknown version.
    BadRequest,
    UnknownOp,
    /// The tier is not on offer or not running here.
    TierUnavailable,
    /// The cell document is invalid (the field is named).
    InvalidDocument,
    /// The document asks for more than the tier offers.
    ExceedsOffer,
    /// The node has no room now.
    NoCapacity,
    /// The operator's policy does not allow what the document asks (the
    /// field is named).
    PolicyRefused,
    /// This key holds the most cells one tenant may.
    TooManyCells,
    /// The token's mint is not on the offer's list (it was not contacted).
    MintNotAccepted,
    /// The token does not parse, is empty, or is in another unit.
    TokenInvalid,
    /// The token pays for less than the tier's minimum.
    AmountTooSmall,
    /// The token pays for more than the tier's maximum lease.
    AmountTooLarge,
    /// The mint says the token is already spent.
    TokenSpent,
    /// The mint could not be reached or refused the swap for another reason.
    MintError,
    /// Paid, but the cell could not be made: the reply carries a refund.
    ProvisionFailed,
    /// No such cell for this key (someone else's looks the same).
    NotFound,
    /// The cell's lease has ended.
    LeaseEnded,
    /// The request was signed too long ago (or in the future): a consumer
    /// who has given up on it must not be charged when it turns up.
    StaleRequest,
    /// The provider restarted while serving the request, before any
    /// payment was recorded: nothing was delivered; send it again.
    Interrupted,
    Internal,
    /// A code this build does not know (from a newer provider): the
    /// message still says what happened.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::TierUnavailable => "tier_unavailable",
            ErrorCode::InvalidDocument => "invalid_document",
            ErrorCode::ExceedsOffer => "exceeds_offer",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::PolicyRefused => "policy_refused",
            ErrorCode::TooManyCells => "too_many_cells",
            ErrorCode::MintNotAccepted => "mint_not_accepted",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::AmountTooSmall => "amount_too_small",
            ErrorCode::AmountTooLarge => "amount_too_large",
            ErrorCode::TokenSpent => "token_spent",
            ErrorCode::MintError => "mint_error",
            ErrorCode::ProvisionFailed => "provision_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::LeaseEnded => "lease_ended",
            ErrorCode::StaleRequest => "stale_request",
            ErrorCode::Interrupted => "interrupted",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was refused: a stable code, the field when one is to
/// blame, and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct Refusal {
    pub code: ErrorCode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            field: None,
            message: message.into(),
        }
    }

    pub fn field(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// A provider's answer to one request.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub cellhost: u32,
    /// The request's rumor id (hex).
    pub re: String,
    pub op: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<Access>,
    /// What the accepted token paid, in msat (spawn, topup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paid_msat: Option<u64>,
    /// Seconds the payment bought (spawn, topup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Refusal>,
    /// A token for everything taken, when a paid request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refund: Option<String>,
}

impl std::fmt::Debug for Reply {
    /// Never prints the refund token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("re", &self.re)
            .field("op", &self.op)
            .field("ok", &self.ok)
            .field("cell", &self.cell)
            .field("paid_msat", &self.paid_msat)
            .field("seconds", &self.seconds)
            .field("error", &self.error)
            .field("refund", &self.refund.is_some())
            .finish()
    }
}

impl Reply {
    pub fn ok(re: &str, op: &str) -> Reply {
        Reply {
            cellhost: VERSION,
            re: re.to_string(),
            op: op.to_string(),
            ok: true,
            cell: None,
            paid_msat: None,
            seconds: None,
            error: None,
            refund: None,
        }
    }

    pub fn refused(re: &str, op: &str, why: Refusal) -> Reply {
        Reply {
            ok: false,
            error: Some(why),
            ..Reply::ok(re, op)
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a reply serializes")
    }
}

/// How to reach a cell, and until when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Access {
    pub id: String,
    pub tier: String,
    /// creating | created | running | exited | destroying | gone | failed.
    pub state: String,
    /// Address the published ports answer on.
    pub host: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortAccess>,
    /// RFC 3339: the lease's end.
    pub expires_at: String,
    pub expires_in_seconds: u64,
    /// Names of the secrets installed from the request (`ssh_authorized_keys`,
    /// `password`): the consumer knows their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub credentials: Vec<String>,
    /// The cell's exit, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<serde_json::Value>,
    /// The cell in the tenant API (sign requests with the renting key;
    /// pin the offer's `api.tlsSha256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortAccess {
    /// The port inside the cell.
    pub port: u32,
    /// The port on `host`.
    pub host_port: u32,
    pub protocol: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_refusals_name_the_field() {
        let r = Request::parse(r#"{"op":"status","cell":"abc"}"#).unwrap();
        assert_eq!(
            r,
            Request::Status {
                cellhost: 1,
                cell: "abc".into()
            }
        );
        let r = Request::parse(r#"{"op":"spawn","tier":"process","token":"cashuBx"}"#).unwrap();
        assert!(matches!(r, Request::Spawn(ref s) if s.tier == "process" && s.document.is_none()));

        let e = Request::parse("nope").unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = Request::parse(r#"{"cell":"x"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::BadRequest, Some("op"))
        );
        let e = Request::parse(r#"{"op":"reboot"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::UnknownOp, Some("op"))
        );
        let e = Request::parse(r#"{"op":"topup","cell":"x"}"#).unwrap_err();
        assert!(e.message.contains("token"), "{e}");
        let e = Request::parse(r#"{"op":"stop","cell":"x","extra":1}"#).unwrap_err();
        assert!(e.message.contains("extra"), "{e}");
        let e = Request::parse(r#"{"op":"stop","cell":"x","cellhost":2}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cellhost"));
        let big = format!(
            r#"{{"op":"stop","cell":"{}"}}"#,
            "x".repeat(MAX_REQUEST_BYTES)
        );
        assert_eq!(
            Request::parse(&big).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn debug_output_never_shows_tokens_or_passwords() {
        let r = Request::parse(
            r#"{"op":"spawn","tier":"process","token":"cashuBsecret","password":"hunter2","volumeKey":"ab"}"#,
        )
        .unwrap();
        let d = format!("{r:?}");
        assert!(!d.contains("cashuBsecret") && !d.contains("hunter2"), "{d}");
        let t = Request::parse(r#"{"op":"topup","cell":"c","token":"cashuBsecret"}"#).unwrap();
        assert!(!format!("{t:?}").contains("cashuBsecret"));
        let mut reply =
            Reply::refused("re", "spawn", Refusal::new(ErrorCode::ProvisionFailed, "x"));
        reply.refund = Some("cashuBrefund".into());
        assert!(!format!("{reply:?}").contains("cashuBrefund"));
        // The wire form does carry it (to the requester only).
        assert!(reply.to_json().contains("cashuBrefund"));
    }

    #[test]
    fn error_codes_are_stable_strings() {
        for (c, s) in [
            (ErrorCode::TokenSpent, "token_spent"),
            (ErrorCode::MintNotAccepted, "mint_not_accepted"),
            (ErrorCode::ProvisionFailed, "provision_failed"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::Interrupted, "interrupted"),
        ] {
            assert_eq!(c.as_str(), s);
            assert_eq!(serde_json::to_value(c).unwrap(), s);
        }
        // A newer provider's code still parses, as Unknown.
        let r: Refusal =
            serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!((r.code, r.message.as_str()), (ErrorCode::Unknown, "m"));
    }
}
