//! The provider's market config: relays, accepted mints, and per tier the
//! size of a cell and the price of a second of it.
//!
//! ```yaml
//! relays: [wss://relay.example]
//! mints: [https://mint.example]
//! host: 203.0.113.7          # where consumers reach published ports
//! heartbeatSeconds: 60
//! portRange: [20000, 29999]  # host ports for cells' spec.ports
//! maxRequestAgeSeconds: 600  # older requests are refused unpaid
//! tiers:
//!   - tier: process
//!     priceMsatPerSecond: 10
//!     cpus: 0.5
//!     memoryMiB: 256
//!     minSeconds: 60
//!     maxSeconds: 86400
//!     template: /etc/cellhost/market/process.yaml   # optional
//! ```
//!
//! Read with the same strict parser as cell documents: unknown keys,
//! duplicate keys and wrong types are errors that name the field.

use std::path::{Path, PathBuf};

use cellhost_spec::Isolation;
use serde::Deserialize;

use crate::MarketError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MarketConfig {
    /// Relays to publish on and read requests from (ws:// or wss://).
    pub relays: Vec<String>,
    /// Mint URLs whose tokens are accepted. A token from any other mint is
    /// refused without contacting it.
    pub mints: Vec<String>,
    /// Address consumers reach published ports on.
    pub host: String,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
    /// Host ports handed to cells' `spec.ports` (the document's own `host`
    /// values are replaced: a consumer cannot know which are free).
    #[serde(default = "default_port_range")]
    pub port_range: (u32, u32),
    /// A request signed longer ago than this (or this far in the future)
    /// is refused unpaid: relays hand stored requests to a provider that
    /// was down, and a consumer who gave up must not be charged.
    #[serde(default = "default_max_age")]
    pub max_request_age_seconds: u64,
    /// The Cashu unit; only `sat` for now.
    #[serde(default = "default_unit")]
    pub unit: String,
    pub tiers: Vec<TierConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TierConfig {
    pub tier: Isolation,
    pub price_msat_per_second: u64,
    /// The most a cell of this tier gets; documents may ask for less.
    pub cpus: f64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    #[serde(rename = "diskGiB", default)]
    pub disk_gib: Option<u64>,
    #[serde(default = "default_min")]
    pub min_seconds: u64,
    #[serde(default = "default_max")]
    pub max_seconds: u64,
    /// A cell document used when a request brings none (a relative path is
    /// taken from the config file's directory).
    #[serde(default)]
    pub template: Option<PathBuf>,
}

fn default_heartbeat() -> u64 {
    60
}
fn default_port_range() -> (u32, u32) {
    (20000, 29999)
}
fn default_max_age() -> u64 {
    600
}
fn default_unit() -> String {
    "sat".into()
}
fn default_min() -> u64 {
    60
}
fn default_max() -> u64 {
    24 * 3600
}

impl MarketConfig {
    pub fn load(path: &Path) -> Result<MarketConfig, MarketError> {
        let text = std::fs::read_to_string(path).map_err(|e| MarketError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            MarketError::Config { field, message } => MarketError::Config {
                field: format!("{}: {field}", path.display()),
                message,
            },
            other => other,
        })?;
        // Templates are named relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for t in &mut cfg.tiers {
            if let Some(p) = &mut t.template
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<MarketConfig, MarketError> {
        let cfg: MarketConfig = cellhost_spec::parse_as(text).map_err(|e| {
            let field = e.path().unwrap_or("").to_string();
            let full = e.to_string();
            let message = full
                .strip_prefix(&format!("{field}: "))
                .unwrap_or(&full)
                .to_string();
            MarketError::Config { field, message }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), MarketError> {
        let bad = |field: String, message: &str| {
            Err(MarketError::Config {
                field,
                message: message.to_string(),
            })
        };
        if self.relays.is_empty() {
            return bad("relays".into(), "at least one relay");
        }
        for (i, r) in self.relays.iter().enumerate() {
            if !(r.starts_with("ws://") || r.starts_with("wss://"))
                || nostr_sdk::RelayUrl::parse(r).is_err()
            {
                return bad(format!("relays.{i}"), "expected a ws:// or wss:// URL");
            }
        }
        if self.mints.is_empty() {
            return bad("mints".into(), "at least one mint");
        }
        for (i, m) in self.mints.iter().enumerate() {
            if mint_url(m).is_none() {
                return bad(format!("mints.{i}"), "expected an http:// or https:// URL");
            }
        }
        if self.host.trim().is_empty() {
            return bad("host".into(), "must not be empty");
        }
        if !(1..=3600).contains(&self.heartbeat_seconds) {
            return bad("heartbeatSeconds".into(), "must be 1..=3600");
        }
        let (lo, hi) = self.port_range;
        if lo == 0 || hi > 65535 || lo > hi {
            return bad("portRange".into(), "expected [low, high] within 1..=65535");
        }
        if !(10..=86_400).contains(&self.max_request_age_seconds) {
            return bad("maxRequestAgeSeconds".into(), "must be 10..=86400");
        }
        if self.unit != "sat" {
            return bad("unit".into(), "only `sat` is supported");
        }
        if self.tiers.is_empty() {
            return bad("tiers".into(), "offer at least one tier");
        }
        for (i, t) in self.tiers.iter().enumerate() {
            let f = |name: &str| format!("tiers.{i}.{name}");
            if self.tiers[..i].iter().any(|o| o.tier == t.tier) {
                return bad(f("tier"), "offered twice");
            }
            if t.price_msat_per_second == 0 {
                return bad(f("priceMsatPerSecond"), "must be > 0");
            }
            if !(t.cpus.is_finite() && t.cpus >= 0.01 && t.cpus <= 1024.0) {
                return bad(f("cpus"), "must be 0.01..=1024");
            }
            if !(16..=1_048_576).contains(&t.memory_mib) {
                return bad(f("memoryMiB"), "must be 16..=1048576");
            }
            if t.disk_gib == Some(0) {
                return bad(f("diskGiB"), "must be >= 1");
            }
            if t.min_seconds == 0 {
                return bad(f("minSeconds"), "must be > 0");
            }
            if t.max_seconds < t.min_seconds {
                return bad(f("maxSeconds"), "must be >= minSeconds");
            }
            if t.max_seconds > cellhost_supervisor::supervisor::MAX_EXTEND_SECONDS {
                return bad(f("maxSeconds"), "must be at most 366 days");
            }
        }
        Ok(())
    }

    pub fn tier(&self, t: Isolation) -> Option<&TierConfig> {
        self.tiers.iter().find(|c| c.tier == t)
    }
}

/// Parse a mint URL without panicking on hostile input (cdk's normal form:
/// no trailing slash, lower-case host, which the cashier's per-mint
/// wallets are keyed by).
pub fn mint_url(s: &str) -> Option<cdk::mint_url::MintUrl> {
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "relays: [ws://127.0.0.1:7777]\nmints: [http://127.0.0.1:3338/]\nhost: 127.0.0.1\nheartbeatSeconds: 2\ntiers:\n  - tier: process\n    priceMsatPerSecond: 1000\n    cpus: 0.5\n    memoryMiB: 128\n";

    #[test]
    fn a_good_config_parses_with_defaults() {
        let c = MarketConfig::parse(GOOD).unwrap();
        assert_eq!(c.heartbeat_seconds, 2);
        let t = c.tier(Isolation::Process).unwrap();
        assert_eq!((t.min_seconds, t.max_seconds), (60, 86400));
        let listed = mint_url(&c.mints[0]).unwrap();
        assert_eq!(mint_url("http://127.0.0.1:3338"), Some(listed.clone()));
        assert_ne!(mint_url("http://127.0.0.1:3339"), Some(listed));
        assert_eq!(mint_url("not a url"), None);
    }

    #[test]
    fn the_example_config_loads_with_its_template_beside_it() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/market.yaml");
        let c = MarketConfig::load(&p).unwrap();
        let t = c
            .tier(Isolation::Process)
            .unwrap()
            .template
            .clone()
            .unwrap();
        assert!(t.is_file(), "{}", t.display());
    }

    #[test]
    fn errors_name_the_field() {
        for (edit, field) in [
            (GOOD.replace("ws://", "http://"), "relays.0"),
            (GOOD.replace("http://127.0.0.1:3338/", "ftp://x"), "mints.0"),
            (
                GOOD.replace("priceMsatPerSecond: 1000", "priceMsatPerSecond: 0"),
                "tiers.0.priceMsatPerSecond",
            ),
            (
                GOOD.replace("memoryMiB: 128", "memoryMiB: 1"),
                "tiers.0.memoryMiB",
            ),
            (
                GOOD.replace("cpus: 0.5", "cpus: 0.5\n    maxSeconds: 1"),
                "tiers.0.maxSeconds",
            ),
            (
                GOOD.replace("heartbeatSeconds: 2", "heartbeatSeconds: 0"),
                "heartbeatSeconds",
            ),
            (
                GOOD.replace("tier: process", "tier: mainframe"),
                "tiers.0.tier",
            ),
            (GOOD.replace("host:", "hots:"), "hots"),
        ] {
            let e = MarketConfig::parse(&edit).unwrap_err();
            let MarketError::Config { field: got, .. } = &e else {
                panic!("{e}")
            };
            assert!(
                got.contains(field) || e.to_string().contains(field),
                "{field}: {e}"
            );
        }
        let twice = format!(
            "{GOOD}  - tier: process\n    priceMsatPerSecond: 1\n    cpus: 1\n    memoryMiB: 64\n"
        );
        let e = MarketConfig::parse(&twice).unwrap_err();
        assert!(e.to_string().contains("tiers.1.tier"), "{e}");
    }
}
