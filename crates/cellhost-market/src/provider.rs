//! The provider: sells this node's cells over Nostr for Cashu.
//!
//! Invariants (the request pipeline, crash settlement and threat model are
//! in `docs/market.md`):
//! - every request is claimed in the ledger before any work, so it runs at
//!   most once, across restarts; one a crash cut short is settled at the
//!   next start, never re-run;
//! - nothing is redeemed before every check that could refuse has passed;
//!   what is taken and not delivered is refunded in the reply, or recorded
//!   as `refund_owed`; a refund is made only on evidence that nothing was
//!   delivered;
//! - cells are owned by the tenant `nostr:<requester hex pubkey>`; a third
//!   party's request about a cell looks like one about a missing cell;
//! - only NIP-17 is read; requests older than `maxRequestAgeSeconds` are
//!   refused unpaid;
//! - tokens, refund tokens, volume keys, passwords and documents are never
//!   logged or put in the ledger.
//!
//! Design: `docs/market.md`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cdk::mint_url::MintUrl;
use cellhost_core::{SecretValue, VolumeKey};
use cellhost_spec::{Cell, Isolation, SecretRef, SecretSource};
use cellhost_supervisor::node::Reservation;
use cellhost_supervisor::{
    Caller, CellView, Confidential, CreateOptions, Supervisor, SupervisorError,
};
use nostr_sdk::nips::nip59::UnwrappedGift;
use nostr_sdk::prelude::*;
use zeroize::Zeroizing;

use crate::cashier::{Cashier, Checked};
use crate::config::{MarketConfig, TierConfig};
use crate::ledger::{Entry, Ledger, Outcome, Redeemed};
use crate::proto::{
    self, Access, ErrorCode, Heartbeat, Offer, OfferDetails, PaygressSpec, PortAccess, Refusal,
    Reply, Request, SpawnRequest, TenantApi, TierOffer,
};
use crate::{MarketError, keys};

/// How long a shutdown waits for requests under way.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Answers no relay took, published again per heartbeat (at most).
const RESEND_PER_BEAT: u32 = 16;

/// Owner name of cells rented by `pk`.
pub fn owner_of(pk: &PublicKey) -> String {
    format!("nostr:{}", pk.to_hex())
}

/// Files of the provider under `<state>/market/`.
#[derive(Debug, Clone)]
pub struct ProviderPaths {
    pub dir: PathBuf,
}

impl ProviderPaths {
    pub fn new(state_dir: &Path) -> ProviderPaths {
        ProviderPaths {
            dir: state_dir.join("market"),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("nostr.key")
    }
    pub fn seed(&self) -> PathBuf {
        self.dir.join("wallet.seed")
    }
    pub fn wallet(&self) -> PathBuf {
        self.dir.join("wallet.sqlite")
    }
    pub fn ledger(&self) -> PathBuf {
        self.dir.join("ledger.sqlite")
    }
}

pub struct Provider {
    sup: Arc<Supervisor>,
    cfg: MarketConfig,
    keys: Keys,
    client: Client,
    ledger: Ledger,
    cashier: Cashier,
    /// Template documents by tier, read at start.
    templates: Vec<(Isolation, Cell)>,
    /// The offer content last published.
    last_offer: Mutex<Option<String>>,
    /// Held by a spawn from its capacity check through create, and by a
    /// top-up from its lease check through extend: concurrent requests
    /// cannot all pass a check only one of them fits (and then all pay).
    provision: tokio::sync::Mutex<()>,
    /// Held while answers no relay took are published again (one pass at
    /// a time).
    resending: tokio::sync::Mutex<()>,
    /// The tenant API the offer names, when `serve` runs one.
    api: Option<TenantApi>,
}

impl Provider {
    /// Load keys and config-named templates; open the ledger and wallet.
    /// Contacts nobody.
    pub async fn open(
        sup: Arc<Supervisor>,
        cfg: MarketConfig,
        state_dir: &Path,
        api: Option<TenantApi>,
    ) -> Result<Arc<Provider>, MarketError> {
        check_against_policy(&cfg, sup.policy())?;
        let paths = ProviderPaths::new(state_dir);
        keys::private_dir(&paths.dir)?;
        let keys = keys::nostr_keys(&paths.key())?;
        let seed = keys::wallet_seed(&paths.seed())?;
        let cashier = Cashier::open(&paths.wallet(), &seed, &cfg.mints).await?;
        // Requests a crash cut short are settled by `run`, once relays can
        // carry the answers.
        let ledger = Ledger::open(&paths.ledger())?;
        let mut templates = Vec::new();
        for (i, t) in cfg.tiers.iter().enumerate() {
            if let Some(p) = &t.template {
                let text = std::fs::read_to_string(p).map_err(|e| MarketError::Io {
                    what: format!("tiers.{i}.template: reading {}", p.display()),
                    source: e,
                })?;
                let cell =
                    cellhost_spec::parse_and_validate(&text).map_err(|e| MarketError::Config {
                        field: format!("tiers.{i}.template"),
                        message: format!("{}: {e}", p.display()),
                    })?;
                if cell.metadata.labels.len() >= cellhost_spec::limits::MAX_LABELS {
                    return Err(MarketError::Config {
                        field: format!("tiers.{i}.template"),
                        message: format!(
                            "{}: at most {} labels: the provider adds {REQUEST_LABEL}",
                            p.display(),
                            cellhost_spec::limits::MAX_LABELS - 1
                        ),
                    });
                }
                if cell.spec.isolation != t.tier {
                    return Err(MarketError::Config {
                        field: format!("tiers.{i}.template"),
                        message: format!(
                            "{} is a {} document, for the {} tier",
                            p.display(),
                            cell.spec.isolation,
                            t.tier
                        ),
                    });
                }
                templates.push((t.tier, cell));
            }
        }
        let client = Client::new(keys.clone());
        Ok(Arc::new(Provider {
            sup,
            cfg,
            keys,
            client,
            ledger,
            cashier,
            templates,
            last_offer: Mutex::new(None),
            provision: tokio::sync::Mutex::new(()),
            resending: tokio::sync::Mutex::new(()),
            api,
        }))
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.public_key()
    }

    /// Connect, publish, and serve requests until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        for r in &self.cfg.relays {
            if let Err(e) = self.client.add_relay(r.as_str()).await {
                tracing::warn!("market: relay {r}: {e}");
            }
        }
        self.client.connect().await;
        // The receiver exists before the subscription, so nothing is missed.
        let mut notes = self.client.notifications();
        // Gift wraps are backdated up to two days (NIP-59); anything older
        // than that plus the request age limit is stale anyway, so a
        // restart does not read the whole history again.
        let horizon = 2 * 86_400 + self.cfg.max_request_age_seconds;
        let inbox = Filter::new()
            .kind(Kind::GiftWrap)
            .pubkey(self.public_key())
            .since(Timestamp::from(
                Timestamp::now().as_secs().saturating_sub(horizon),
            ));
        if let Err(e) = self.client.subscribe(inbox, None).await {
            tracing::error!("market: subscribing to requests: {e}");
        }
        tracing::info!(
            "market: provider {} on {} relay(s)",
            keys::npub(&self.public_key()),
            self.cfg.relays.len()
        );
        self.cashier.recover().await;
        self.client
            .wait_for_connection(Duration::from_secs(5))
            .await;
        let mut in_flight = tokio::task::JoinSet::new();
        // Requests a crash cut short, read before any new one is claimed;
        // settled beside the new ones (their ids differ, and a repeat of
        // one finds its claim and runs nothing).
        match self.ledger.unfinished() {
            Ok(cut) if !cut.is_empty() => {
                let me = self.clone();
                let stop = shutdown.clone();
                in_flight.spawn(async move { me.settle(cut, stop).await });
            }
            Ok(_) => {}
            Err(e) => tracing::error!("market: ledger: {e}; requests cut short are not settled"),
        }
        let mut beat = tokio::time::interval(Duration::from_secs(self.cfg.heartbeat_seconds));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|v| *v).await; } => break,
                _ = beat.tick() => {
                    // One look at tiers and capacity serves both events.
                    let offer = self.offer();
                    self.publish_offer_if_changed(&offer).await;
                    self.publish_heartbeat(&offer).await;
                    let me = self.clone();
                    in_flight.spawn(async move { me.resend_unsent().await });
                }
                n = notes.recv() => match n {
                    Ok(RelayPoolNotification::Event { event, .. }) if event.kind == Kind::GiftWrap => {
                        let me = self.clone();
                        in_flight.spawn(async move { me.handle_wrap(*event).await });
                        while in_flight.try_join_next().is_some() {}
                    }
                    Ok(RelayPoolNotification::Shutdown) => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("market: {n} relay notifications dropped (overloaded)");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        // Requests under way finish (a redeemed token becomes a cell or a
        // refund, and its reply goes out) before the relays are let go.
        if !in_flight.is_empty() {
            tracing::info!(
                "market: waiting for {} request(s) under way",
                in_flight.len()
            );
            let drain = async { while in_flight.join_next().await.is_some() {} };
            if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
                tracing::error!(
                    "market: requests still under way after {SHUTDOWN_GRACE:?}; cut short"
                );
            }
        }
        self.client.shutdown().await;
    }

    // ------------------------------------------------------------ publish

    /// The offer as it stands now.
    pub fn offer(&self) -> Offer {
        let running = self.sup.tiers();
        let (capacity, reserved) = (self.sup.capacity(), self.sup.reserved());
        let room = |t: &TierConfig| {
            let want = Reservation {
                cpus: t.cpus,
                memory_bytes: t.memory_mib << 20,
                disk_bytes: t.disk_gib.unwrap_or(0) << 30,
            };
            capacity.admit(reserved, want).is_ok()
        };
        let tiers: Vec<TierOffer> = self
            .cfg
            .tiers
            .iter()
            .map(|t| TierOffer {
                tier: t.tier.to_string(),
                isolation: proto::isolation_level(t.tier).to_string(),
                cpus: t.cpus,
                memory_mib: t.memory_mib,
                disk_gib: t.disk_gib,
                price_msat_per_second: t.price_msat_per_second,
                min_seconds: t.min_seconds,
                max_seconds: t.max_seconds,
                available: running.contains(&t.tier) && room(t),
            })
            .collect();
        Offer {
            provider_npub: keys::npub(&self.public_key()),
            hostname: self.sup.node_name().to_string(),
            capabilities: self
                .cfg
                .tiers
                .iter()
                .filter(|t| running.contains(&t.tier))
                .map(|t| t.tier.to_string())
                .collect(),
            specs: self
                .cfg
                .tiers
                .iter()
                .map(|t| PaygressSpec {
                    id: t.tier.to_string(),
                    name: t.tier.to_string(),
                    description: format!(
                        "{} cell ({}): {} CPU, {} MiB",
                        t.tier,
                        proto::isolation_level(t.tier),
                        t.cpus,
                        t.memory_mib
                    ),
                    cpu_millicores: (t.cpus * 1000.0).round() as u64,
                    memory_mb: t.memory_mib,
                    rate_msats_per_sec: t.price_msat_per_second,
                })
                .collect(),
            whitelisted_mints: self.cfg.mints.clone(),
            // Filled in when published: it alone does not warrant a new event.
            total_jobs_completed: 0,
            cellhost: OfferDetails {
                version: proto::VERSION,
                unit: self.cfg.unit.clone(),
                heartbeat_seconds: self.cfg.heartbeat_seconds,
                relays: self.cfg.relays.clone(),
                host: self.cfg.host.clone(),
                tiers,
                api: self.api.clone(),
            },
        }
    }

    async fn publish_offer_if_changed(&self, offer: &Offer) {
        let key = serde_json::to_string(offer).unwrap_or_default();
        if self
            .last_offer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(&key)
        {
            return;
        }
        let content = serde_json::to_string(&Offer {
            total_jobs_completed: self.ledger.jobs_completed().unwrap_or(0),
            ..offer.clone()
        })
        .unwrap_or_default();
        let ev = EventBuilder::new(Kind::Custom(proto::OFFER_KIND), content).tags([
            Tag::identifier(proto::OFFER_D),
            Tag::hashtag(proto::TOPIC),
            Tag::hashtag("paygress"),
            Tag::hashtag("compute"),
        ]);
        match self.client.send_event_builder(ev).await {
            Ok(out) if !out.success.is_empty() => {
                tracing::info!("market: offer published ({})", out.val);
                *self.last_offer.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
            }
            Ok(out) => tracing::warn!("market: no relay took the offer: {:?}", out.failed),
            Err(e) => tracing::warn!("market: publishing the offer: {e}"),
        }
    }

    async fn publish_heartbeat(&self, offer: &Offer) {
        // The daemon's own figures (`GET /v1/node` shows the same), without
        // its host sampling: no sysinfo refresh or disk scan per tick.
        let running_cells = match self.sup.cell_counts().await {
            Ok(c) => c.running as u64,
            Err(e) => {
                tracing::warn!("market: cell counts: {e}");
                return;
            }
        };
        let free = self.sup.capacity().free(self.sup.reserved());
        let (free_cpus, free_memory_mib) = (free.cpus, free.memory_bytes >> 20);
        let hb = Heartbeat {
            version: proto::VERSION,
            at: Timestamp::now().as_secs(),
            free_cpus,
            free_memory_mib,
            running_cells,
            available_tiers: offer
                .cellhost
                .tiers
                .iter()
                .filter(|t| t.available)
                .map(|t| t.tier.clone())
                .collect(),
        };
        let ev = EventBuilder::new(
            Kind::Custom(proto::HEARTBEAT_KIND),
            serde_json::to_string(&hb).unwrap_or_default(),
        )
        .tags([
            Tag::identifier(proto::HEARTBEAT_D),
            Tag::hashtag(proto::TOPIC),
        ]);
        if let Err(e) = self.client.send_event_builder(ev).await {
            tracing::warn!("market: heartbeat: {e}");
        }
    }

    // ------------------------------------------------------------ requests

    async fn handle_wrap(&self, wrap: Event) {
        // Relays check signatures, but we do not trust relays.
        if wrap.verify().is_err() {
            tracing::debug!("market: dropping a gift wrap with a bad signature");
            return;
        }
        let UnwrappedGift { sender, mut rumor } =
            match UnwrappedGift::from_gift_wrap(&self.keys, &wrap).await {
                Ok(g) => g,
                Err(e) => {
                    // Nobody to answer: the sender is inside what failed.
                    tracing::debug!("market: dropping an unreadable gift wrap {}: {e}", wrap.id);
                    return;
                }
            };
        if rumor.kind != Kind::PrivateDirectMessage {
            tracing::debug!("market: ignoring a kind {} rumor", rumor.kind);
            return;
        }
        // The id the sender claims is not checked by unwrap: compute it.
        rumor.id = None;
        let rid = rumor.id();
        let rid_hex = rid.to_hex();
        let op_hint = serde_json::from_str::<serde_json::Value>(&rumor.content)
            .ok()
            .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string))
            .filter(|o| ["spawn", "topup", "status", "stop"].contains(&o.as_str()))
            .unwrap_or_else(|| "unknown".into());
        match self.ledger.claim(&rid_hex, &sender.to_hex(), &op_hint) {
            Ok(true) => {}
            Ok(false) => {
                // Nothing runs again. The answer, if one was made, is sent
                // again as the very same event (the consumer may have missed
                // it); only to the sender who asked.
                let again = match self.ledger.get(&rid_hex) {
                    Ok(Some(e)) if e.sender == sender.to_hex() => e.reply,
                    _ => None,
                };
                let resent = match again {
                    Some(json) => self.republish(&rid_hex, &json).await,
                    None => false,
                };
                tracing::info!(
                    "market: request {rid_hex} seen before; not run again{}",
                    if resent { ", its answer resent" } else { "" }
                );
                return;
            }
            Err(e) => {
                tracing::error!("market: ledger: {e}; request {rid_hex} not served");
                return;
            }
        }
        let owner = owner_of(&sender);
        let t0 = std::time::Instant::now();
        let age = Timestamp::now().as_secs() as i64 - rumor.created_at.as_secs() as i64;
        let max_age = self.cfg.max_request_age_seconds as i64;
        let (reply, outcome_cell) = match Request::parse(&rumor.content) {
            _ if age > max_age || age < -max_age => {
                let why = Refusal::new(
                    ErrorCode::StaleRequest,
                    format!("signed {age} s from now; requests count for {max_age} s"),
                );
                (Reply::refused(&rid_hex, &op_hint, why), None)
            }
            Err(why) => (Reply::refused(&rid_hex, &op_hint, why), None),
            Ok(req) => {
                let op = req.op();
                let r = self.serve(&owner, &rid_hex, req).await;
                let cell = r.cell.as_ref().map(|c| c.id.clone());
                debug_assert_eq!(r.op, op);
                (r, cell)
            }
        };
        self.conclude(sender, rid, &reply, outcome_cell.as_deref(), t0)
            .await;
    }

    /// Log, record the outcome of request `rid` and answer it.
    async fn conclude(
        &self,
        sender: PublicKey,
        rid: EventId,
        reply: &Reply,
        cell: Option<&str>,
        t0: std::time::Instant,
    ) {
        let code = match &reply.error {
            None => "ok",
            // Paid, not delivered, not refunded: the ledger says what is owed.
            Some(e) if e.code == ErrorCode::ProvisionFailed && reply.refund.is_none() => {
                "refund_owed"
            }
            Some(e) => e.code.as_str(),
        };
        tracing::info!(
            "market: {} from {} → {code}{} in {} ms",
            reply.op,
            keys::npub(&sender),
            cell.map(|c| format!(" (cell {c})")).unwrap_or_default(),
            t0.elapsed().as_millis()
        );
        let rid_hex = rid.to_hex();
        let wrap = self.wrap(sender, rid, reply).await;
        let outcome = Outcome {
            code,
            cell,
            paid_msat: reply.paid_msat,
            seconds: reply.seconds,
        };
        let json = wrap.as_ref().map(|w| w.as_json());
        if let Err(e) = self.ledger.conclude(&rid_hex, &outcome, json.as_deref()) {
            tracing::error!("market: ledger: {e}");
        }
        if let Some(w) = &wrap {
            self.publish(&rid_hex, w).await;
        }
    }

    /// Settle the requests a crash cut short (see the ledger's notes), after
    /// the supervisor's first reconcile (rows then say what the host holds).
    /// A request that took money gets what it paid for if that was done,
    /// else a refund of all of it; either way the answer it never got. One
    /// with no payment on record gets an `interrupted` answer. A refund is
    /// made only on evidence that nothing was delivered: a row that cannot
    /// be judged yet (a supervisor error, a cell still between states) is
    /// tried again every heartbeat interval until it can, or until shutdown
    /// (then at the next start).
    async fn settle(&self, mut rows: Vec<Entry>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        tokio::select! {
            _ = self.sup.reconciled() => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        loop {
            let mut later = Vec::new();
            for e in rows {
                if *shutdown.borrow() {
                    return;
                }
                if let Some(e) = self.settle_one(e).await {
                    later.push(e);
                }
            }
            if later.is_empty() {
                return;
            }
            rows = later;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(self.cfg.heartbeat_seconds)) => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
        }
    }

    /// Settle one request; gives it back when it cannot be judged yet.
    async fn settle_one(&self, e: Entry) -> Option<Entry> {
        let t0 = std::time::Instant::now();
        let (Ok(sender), Ok(rid)) = (PublicKey::from_hex(&e.sender), EventId::from_hex(&e.id))
        else {
            tracing::error!("market: ledger row {} is garbled; not settled", e.id);
            return None;
        };
        let Some(paid) = &e.redeemed else {
            tracing::warn!(
                "market: {} request {} from {} was cut short by a crash with no payment on record; answered `interrupted`",
                e.op,
                e.id,
                keys::npub(&sender)
            );
            let why = if matches!(e.op.as_str(), "spawn" | "topup") {
                format!(
                    "the provider restarted while serving this request, before any payment was recorded: \
                     if your token is unspent, send the request again; if the mint says it is spent, \
                     ask the provider, citing request {}",
                    e.id
                )
            } else {
                "the provider restarted while serving this request; send it again".to_string()
            };
            let reply = Reply::refused(&e.id, &e.op, Refusal::new(ErrorCode::Interrupted, why));
            self.conclude(sender, rid, &reply, None, t0).await;
            return None;
        };
        let caller = Caller::tenant(owner_of(&sender));
        let reply = match self.delivered(&caller, &e, paid).await {
            Verdict::Undecided(why) => {
                tracing::warn!(
                    "market: {} request {} took {} msat and was cut short; not settled yet: {why}",
                    e.op,
                    e.id,
                    paid.msat
                );
                return Some(e);
            }
            Verdict::Delivered(reply) => *reply,
            Verdict::NotDelivered => {
                let what = if e.op == "spawn" {
                    "the cell was made"
                } else {
                    "the lease was extended"
                };
                let why = format!("the provider restarted before {what}");
                match crate::config::mint_url(&paid.mint) {
                    Some(mint) => {
                        self.refund(&e.id, &e.op, &mint, paid.msat / 1000, why)
                            .await
                    }
                    None => {
                        let why = format!(
                            "{why}; the refund failed: the ledger names mint {:?}; ask the provider, citing request {}",
                            paid.mint, e.id
                        );
                        let mut r = Reply::refused(
                            &e.id,
                            &e.op,
                            Refusal::new(ErrorCode::ProvisionFailed, why),
                        );
                        r.paid_msat = Some(paid.msat);
                        r
                    }
                }
            }
        };
        tracing::warn!(
            "market: settling {} request {} cut short by a crash after {} msat were taken",
            e.op,
            e.id,
            paid.msat
        );
        let cell = reply.cell.as_ref().map(|c| c.id.clone());
        self.conclude(sender, rid, &reply, cell.as_deref(), t0)
            .await;
        None
    }

    /// Was what request `e` paid for (`paid`) delivered? A spawn: the cell
    /// carrying its request id exists, its create finished and its lease
    /// runs (a consumer never told where the cell is could not use it: a
    /// cell gone or whose lease ran out while the provider was down counts
    /// as not delivered). A top-up: the cell's event log holds the
    /// extension made for this request.
    async fn delivered(&self, caller: &Caller, e: &Entry, paid: &Redeemed) -> Verdict {
        let paid_reply =
            |v: &CellView| self.paid(&e.id, &e.op, v, credentials_of(v), paid.msat, paid.seconds);
        match e.op.as_str() {
            "spawn" => {
                let cells = match self.sup.list(caller).await {
                    Ok(c) => c,
                    Err(err) => return Verdict::Undecided(err.to_string()),
                };
                let label = |v: &&CellView| {
                    v.document
                        .metadata
                        .labels
                        .get(REQUEST_LABEL)
                        .map(String::as_str)
                        == Some(e.id.as_str())
                };
                let Some(v) = cells.iter().find(label) else {
                    return Verdict::NotDelivered;
                };
                if v.desired == "destroyed" || v.expires_in_seconds == 0 {
                    Verdict::NotDelivered
                } else if matches!(v.observed.as_str(), "created" | "running" | "exited") {
                    Verdict::Delivered(Box::new(paid_reply(v)))
                } else {
                    Verdict::Undecided(format!("its cell {} is {}", v.id, v.observed))
                }
            }
            "topup" => {
                let Some(id) = &paid.cell else {
                    return Verdict::NotDelivered;
                };
                match self.sup.extended_for(caller, id, &e.id).await {
                    Err(err) => return Verdict::Undecided(err.to_string()),
                    Ok(false) => return Verdict::NotDelivered,
                    Ok(true) => {}
                }
                match self.sup.get(caller, id).await {
                    Ok(v) => Verdict::Delivered(Box::new(paid_reply(&v))),
                    // Extended, then reaped at the lease's end: delivered.
                    Err(SupervisorError::NotFound(_)) => {
                        let mut r = Reply::ok(&e.id, &e.op);
                        r.paid_msat = Some(paid.msat);
                        r.seconds = Some(paid.seconds);
                        Verdict::Delivered(Box::new(r))
                    }
                    Err(err) => Verdict::Undecided(err.to_string()),
                }
            }
            _ => Verdict::NotDelivered,
        }
    }

    /// `reply` gift-wrapped to `to` (tagged `e` = the request), or `None`
    /// (logged) when it cannot be.
    async fn wrap(&self, to: PublicKey, rid: EventId, reply: &Reply) -> Option<Event> {
        let rumor = EventBuilder::private_msg_rumor(to, reply.to_json())
            .tag(Tag::event(rid))
            .build(self.public_key());
        match EventBuilder::gift_wrap(&self.keys, &to, rumor, []).await {
            Ok(w) => Some(w),
            Err(e) => {
                let carried = if reply.refund.is_some() {
                    " (it carries a refund)"
                } else {
                    ""
                };
                tracing::error!("market: wrapping the reply to {rid}{carried}: {e}");
                None
            }
        }
    }

    /// Publish the answer to request `rid` (a gift wrap only its requester
    /// can open); on a relay's acceptance mark it sent. One no relay took is
    /// published again at the next heartbeats.
    async fn publish(&self, rid: &str, wrap: &Event) -> bool {
        match self.client.send_event(wrap).await {
            Ok(out) if !out.success.is_empty() => {
                if let Err(e) = self.ledger.sent(rid) {
                    tracing::error!("market: ledger: {e}");
                }
                true
            }
            Ok(out) => {
                tracing::warn!(
                    "market: no relay took the reply to {rid}: {:?}; sent again at the next heartbeat",
                    out.failed
                );
                false
            }
            Err(e) => {
                tracing::warn!(
                    "market: the reply to {rid} was not sent: {e}; sent again at the next heartbeat"
                );
                false
            }
        }
    }

    /// Publish again the answers no relay took (a few per heartbeat; one
    /// pass at a time).
    async fn resend_unsent(&self) {
        let Ok(_one) = self.resending.try_lock() else {
            return;
        };
        let pending = match self.ledger.unsent(RESEND_PER_BEAT) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("market: ledger: {e}");
                return;
            }
        };
        for (rid, json) in pending {
            if !self.republish(&rid, &json).await
                && let Err(e) = self.ledger.tried(&rid)
            {
                tracing::error!("market: ledger: {e}");
            }
        }
    }

    /// [`Provider::publish`] of an answer kept in the ledger (JSON).
    async fn republish(&self, rid: &str, json: &str) -> bool {
        match Event::from_json(json) {
            Ok(ev) => self.publish(rid, &ev).await,
            Err(e) => {
                tracing::error!("market: the kept reply to {rid} is garbled: {e}");
                false
            }
        }
    }

    /// Run one parsed request for `owner`. Never panics on its input.
    pub async fn serve(&self, owner: &str, rid: &str, req: Request) -> Reply {
        let op = req.op();
        let r = match req {
            Request::Spawn(s) => self.spawn(owner, rid, s).await,
            Request::Topup { cell, token, .. } => self.topup(owner, rid, &cell, &token).await,
            Request::Status { cell, .. } => self.status(owner, rid, &cell).await,
            Request::Stop { cell, .. } => self.stop(owner, rid, &cell).await,
        };
        r.unwrap_or_else(|why| Reply::refused(rid, op, why))
    }

    async fn spawn(&self, owner: &str, rid: &str, req: SpawnRequest) -> Result<Reply, Refusal> {
        // 1. The tier: on offer and running here.
        let tier = Isolation::parse(&req.tier).ok_or_else(|| {
            Refusal::field(
                ErrorCode::TierUnavailable,
                "tier",
                format!("no tier {:?}", req.tier),
            )
        })?;
        let Some(offer) = self.cfg.tier(tier) else {
            return Err(Refusal::field(
                ErrorCode::TierUnavailable,
                "tier",
                format!("the {tier} tier is not on offer here"),
            ));
        };
        if !self.sup.tiers().contains(&tier) {
            return Err(Refusal::field(
                ErrorCode::TierUnavailable,
                "tier",
                format!("the {tier} tier is not running on this host now"),
            ));
        }
        // 2. The document.
        let mut cell = match (
            &req.document,
            self.templates.iter().find(|(t, _)| *t == tier),
        ) {
            (Some(d), _) => cellhost_spec::parse_and_validate(d).map_err(|e| {
                let fe = e.field_errors();
                let field = fe
                    .first()
                    .map(|f| format!("document.{}", f.path))
                    .unwrap_or_else(|| "document".into());
                Refusal::field(ErrorCode::InvalidDocument, field, e.to_string())
            })?,
            // Parsed and validated at start.
            (None, Some((_, t))) => t.clone(),
            (None, None) => {
                return Err(Refusal::field(
                    ErrorCode::InvalidDocument,
                    "document",
                    format!("this provider has no template for the {tier} tier; send a document"),
                ));
            }
        };
        if cell.spec.isolation != tier {
            return Err(Refusal::field(
                ErrorCode::InvalidDocument,
                "document.spec.isolation",
                format!(
                    "is {}, but the request rents the {tier} tier",
                    cell.spec.isolation
                ),
            ));
        }
        fit_to_offer(&mut cell, offer)?;
        // The request that made the cell: how a restart after a crash finds
        // it (the provider's label replaces one the document may carry).
        cell.metadata.labels.shift_remove(REQUEST_LABEL);
        if cell.metadata.labels.len() >= cellhost_spec::limits::MAX_LABELS {
            return Err(Refusal::field(
                ErrorCode::InvalidDocument,
                "document.metadata.labels",
                format!(
                    "at most {} labels: the provider adds {REQUEST_LABEL}",
                    cellhost_spec::limits::MAX_LABELS - 1
                ),
            ));
        }
        cell.metadata
            .labels
            .insert(REQUEST_LABEL.to_string(), rid.to_string());
        // 3. Secrets, credentials, the volume key.
        let mut secrets = cellhost_supervisor::supervisor::take_inline_secrets(&mut cell)
            .map_err(|e| invalid_document(&e))?;
        let mut credentials = Vec::new();
        for (name, value) in [
            ("ssh_authorized_keys", req.ssh_key.as_ref()),
            ("password", req.password.as_ref()),
        ] {
            let Some(v) = value else { continue };
            if cell.spec.secrets.iter().any(|s| s.name == name) {
                return Err(Refusal::field(
                    ErrorCode::InvalidDocument,
                    "document.spec.secrets",
                    format!("names {name}, which the request's credential fills"),
                ));
            }
            cell.spec.secrets.push(SecretRef {
                name: name.to_string(),
                from: SecretSource::Value(String::new()),
            });
            secrets.push(SecretValue {
                name: name.to_string(),
                value: Zeroizing::new(v.clone().into_bytes()),
            });
            credentials.push(name.to_string());
        }
        let encrypted = cell.spec.volume.as_ref().is_some_and(|v| v.encrypted);
        let volume_key =
            match (&req.volume_key, encrypted) {
                (Some(k), true) => Some(VolumeKey::parse(k.as_bytes()).map_err(|e| {
                    Refusal::field(ErrorCode::BadRequest, "volumeKey", e.to_string())
                })?),
                (None, true) => {
                    return Err(Refusal::field(
                        ErrorCode::BadRequest,
                        "volumeKey",
                        "the document's volume is encrypted: send its key",
                    ));
                }
                (Some(_), false) => {
                    return Err(Refusal::field(
                        ErrorCode::BadRequest,
                        "volumeKey",
                        "the document has no encrypted volume",
                    ));
                }
                (None, false) => None,
            };
        // 4. Room on the node. Held to the create: no other spawn passes
        //    this check on the same room.
        let _provision = self.provision.lock().await;
        let caller = Caller::tenant(owner);
        self.sup
            .admits(&caller, &cell)
            .map_err(refusal_of_admission)?;
        // 5. The token, offline, and what it buys.
        let checked = self.cashier.check(&req.token)?;
        let seconds = seconds_for(checked.amount_msat(), offer)?;
        // Ports: the supervisor's allocator gives each a host port of
        // `portRange` at create (the reply names them); that one is free
        // now is checked before the token is taken (no other spawn runs
        // while `provision` is held).
        for p in cell.spec.ports.iter_mut() {
            p.host = 0;
        }
        self.sup
            .check_ports(&cell, Some(self.port_range()))
            .await
            .map_err(|e| Refusal::new(ErrorCode::NoCapacity, e.public_message()))?;

        // 6. Redeem. Every refusal above took nothing.
        let (received, paid_msat, seconds) = self
            .take(rid, &req.token, &checked, offer, seconds, None)
            .await?;
        fail::fail_point!("market-spawn-redeemed", |_| crash());
        if seconds < offer.min_seconds {
            // The mint's fee took it under the minimum.
            return Ok(self
                .refund(
                    rid,
                    "spawn",
                    &checked.mint,
                    received,
                    format!(
                        "after the mint's fee the token pays {paid_msat} msat, less than the {} s minimum",
                        offer.min_seconds
                    ),
                )
                .await);
        }
        cell.spec.lifetime.ttl_seconds = Some(seconds);
        let confidential = Confidential {
            secrets,
            volume_key,
        };
        let opts = CreateOptions {
            start: true,
            host_ports: Some(self.port_range()),
        };
        let made = self
            .sup
            .create_with(&caller, cell, confidential, opts)
            .await;
        fail::fail_point!("market-spawn-created", |_| crash());
        match made {
            Ok(view) => Ok(self.paid(rid, "spawn", &view, credentials, paid_msat, seconds)),
            Err(e) => Ok(self
                .refund(rid, "spawn", &checked.mint, received, {
                    // The consumer reads this: no host detail.
                    tracing::warn!(request = rid, "spawn: {e}");
                    format!("the cell could not be made: {}", e.public_message())
                })
                .await),
        }
    }

    async fn topup(&self, owner: &str, rid: &str, id: &str, token: &str) -> Result<Reply, Refusal> {
        let caller = Caller::tenant(owner);
        // Held to the extend: two top-ups cannot both fit under maxSeconds.
        let _provision = self.provision.lock().await;
        let view = self.visible(&caller, id).await?;
        if view.expires_in_seconds == 0 || view.desired == "destroyed" {
            return Err(Refusal::field(
                ErrorCode::LeaseEnded,
                "cell",
                format!("the lease of {} has ended", view.id),
            ));
        }
        let tier = Isolation::parse(&view.isolation)
            .ok_or_else(|| Refusal::new(ErrorCode::Internal, "the cell's tier is unknown"))?;
        let Some(offer) = self.cfg.tier(tier) else {
            return Err(Refusal::field(
                ErrorCode::TierUnavailable,
                "cell",
                format!("the {tier} tier is no longer on offer"),
            ));
        };
        let checked = self.cashier.check(token)?;
        let seconds = checked.amount_msat() / offer.price_msat_per_second;
        if seconds == 0 {
            return Err(Refusal::field(
                ErrorCode::AmountTooSmall,
                "token",
                format!(
                    "{} msat buys less than a second at {} msat/s",
                    checked.amount_msat(),
                    offer.price_msat_per_second
                ),
            ));
        }
        let total = view.expires_in_seconds.saturating_add(seconds);
        if total > offer.max_seconds {
            return Err(Refusal::field(
                ErrorCode::AmountTooLarge,
                "token",
                format!(
                    "{seconds} s more would leave {total} s on the lease; at most {} s",
                    offer.max_seconds
                ),
            ));
        }
        let (received, paid_msat, seconds) = self
            .take(rid, token, &checked, offer, seconds, Some(&view))
            .await?;
        fail::fail_point!("market-topup-redeemed", |_| crash());
        if seconds == 0 {
            return Ok(self
                .refund(
                    rid,
                    "topup",
                    &checked.mint,
                    received,
                    "the mint's fee left less than a second".into(),
                )
                .await);
        }
        let extended = self
            .sup
            .extend_for(&caller, &view.id, seconds, Some(rid))
            .await;
        fail::fail_point!("market-topup-extended", |_| crash());
        match extended {
            Ok(v) => Ok(self.paid(rid, "topup", &v, credentials_of(&v), paid_msat, seconds)),
            Err(e) => Ok(self
                .refund(rid, "topup", &checked.mint, received, {
                    // The consumer reads this: no host detail.
                    tracing::warn!(request = rid, "topup: {e}");
                    format!("the lease could not be extended: {}", e.public_message())
                })
                .await),
        }
    }

    async fn status(&self, owner: &str, rid: &str, id: &str) -> Result<Reply, Refusal> {
        let view = self.visible(&Caller::tenant(owner), id).await?;
        let mut reply = Reply::ok(rid, "status");
        reply.cell = Some(self.access(&view, credentials_of(&view)));
        Ok(reply)
    }

    async fn stop(&self, owner: &str, rid: &str, id: &str) -> Result<Reply, Refusal> {
        let caller = Caller::tenant(owner);
        let view = self.visible(&caller, id).await?;
        let report = self
            .sup
            .destroy(&caller, &view.id)
            .await
            .map_err(|e| match e {
                SupervisorError::NotFound(_) => not_found(id),
                other => Refusal::new(ErrorCode::Internal, other.public_message()),
            })?;
        let mut reply = Reply::ok(rid, "stop");
        let mut access = self.access(&view, credentials_of(&view));
        access.state = if report.is_clean() {
            "destroyed"
        } else {
            "destroying"
        }
        .into();
        access.expires_in_seconds = 0;
        reply.cell = Some(access);
        Ok(reply)
    }

    async fn visible(&self, caller: &Caller, id: &str) -> Result<CellView, Refusal> {
        self.sup.get(caller, id).await.map_err(|e| match e {
            SupervisorError::NotFound(_) | SupervisorError::Invalid { .. } => not_found(id),
            other => Refusal::new(ErrorCode::Internal, other.public_message()),
        })
    }

    /// The answer to a paid request that was delivered.
    fn paid(
        &self,
        rid: &str,
        op: &str,
        view: &CellView,
        credentials: Vec<String>,
        paid_msat: u64,
        seconds: u64,
    ) -> Reply {
        let mut reply = Reply::ok(rid, op);
        reply.cell = Some(self.access(view, credentials));
        reply.paid_msat = Some(paid_msat);
        reply.seconds = Some(seconds);
        reply
    }

    /// Redeem `token` for request `rid` and write down what it brought
    /// before the work it pays for (for a top-up, with the lease end that
    /// `seconds` more on `topup_of` makes). Returns (sat received, msat
    /// paid, seconds bought): a mint's fee can make them less than the
    /// token's face value.
    async fn take(
        &self,
        rid: &str,
        token: &str,
        checked: &Checked,
        offer: &TierConfig,
        seconds: u64,
        topup_of: Option<&CellView>,
    ) -> Result<(u64, u64, u64), Refusal> {
        fail::fail_point!("market-before-redeem", |_| crash());
        let received = self.cashier.redeem(token, checked).await?;
        let paid_msat = received.saturating_mul(1000);
        let seconds = (paid_msat / offer.price_msat_per_second).min(seconds);
        let r = Redeemed {
            mint: checked.mint.to_string(),
            msat: paid_msat,
            seconds,
            cell: topup_of.map(|v| v.id.clone()),
        };
        if let Err(e) = self.ledger.redeemed(rid, &r) {
            // The work goes on and its answer is written as usual; only a
            // crash before that answer would now go unsettled.
            tracing::error!(
                "market: ledger: {e}; {paid_msat} msat taken for {rid} are not on record until it ends"
            );
        }
        Ok((received, paid_msat, seconds))
    }

    /// A refund of `received_sat` taken at `mint`, as a reply.
    async fn refund(
        &self,
        rid: &str,
        op: &str,
        mint: &MintUrl,
        received_sat: u64,
        why: String,
    ) -> Reply {
        let mut reply = Reply::refused(rid, op, Refusal::new(ErrorCode::ProvisionFailed, why));
        // What was taken, refunded or owed: the ledger records it either way.
        reply.paid_msat = Some(received_sat.saturating_mul(1000));
        match self.cashier.refund(mint, received_sat).await {
            Ok(token) => {
                reply.refund = Some(token);
            }
            Err(e) => {
                tracing::error!("market: refund of {received_sat} sat for {rid} failed: {e}");
                if let Some(err) = reply.error.as_mut() {
                    err.message.push_str(&format!(
                        "; the refund of {received_sat} sat failed ({e}); ask the provider, citing request {rid}"
                    ));
                }
            }
        }
        reply
    }

    fn access(&self, view: &CellView, credentials: Vec<String>) -> Access {
        Access {
            id: view.id.clone(),
            tier: view.isolation.clone(),
            state: view.observed.clone(),
            host: self.cfg.host.clone(),
            ports: view
                .document
                .spec
                .ports
                .iter()
                .map(|p| PortAccess {
                    port: p.container,
                    host_port: p.host,
                    protocol: p.protocol.as_str().to_string(),
                })
                .collect(),
            expires_at: view.expires_at.clone(),
            expires_in_seconds: view.expires_in_seconds,
            credentials,
            api: self
                .api
                .as_ref()
                .map(|a| format!("{}/v1/cells/{}", a.url, view.id)),
            exit: view
                .exit
                .as_ref()
                .and_then(|e| serde_json::to_value(e).ok()),
        }
    }

    /// The market's host ports (`portRange`, inside the policy's).
    fn port_range(&self) -> std::ops::RangeInclusive<u16> {
        let (lo, hi) = self.cfg.port_range;
        let clamp = |p: u32| u16::try_from(p).unwrap_or(u16::MAX);
        clamp(lo)..=clamp(hi)
    }
}

/// What settling finds of a paid request a crash cut short.
enum Verdict {
    /// Done: the answer it should have had.
    Delivered(Box<Reply>),
    NotDelivered,
    /// Cannot be told now (why); tried again later.
    Undecided(String),
}

/// The label on a market cell naming the spawn request that made it.
pub const REQUEST_LABEL: &str = "market.cellhost.dev/request";

/// What a failpoint does to test crash recovery: die as `kill -9` would,
/// with no destructor, flush or shutdown (builds with the `failpoints`
/// feature only; see the market tests).
#[cfg(feature = "failpoints")]
fn crash<T>() -> Result<T, Refusal> {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    Err(Refusal::new(
        ErrorCode::Internal,
        "failpoint: SIGKILL failed",
    ))
}

fn not_found(id: &str) -> Refusal {
    Refusal::field(
        ErrorCode::NotFound,
        "cell",
        format!("no cell {id} for this key"),
    )
}

fn invalid_document(e: &SupervisorError) -> Refusal {
    match e {
        SupervisorError::Invalid { field, message } => Refusal::field(
            ErrorCode::InvalidDocument,
            format!("document.{}", field.as_deref().unwrap_or("")),
            message.clone(),
        ),
        other => Refusal::new(ErrorCode::InvalidDocument, other.public_message()),
    }
}

/// Names of the credentials a cell was given (its secrets the market adds).
fn credentials_of(view: &CellView) -> Vec<String> {
    view.document
        .spec
        .secrets
        .iter()
        .filter(|s| s.name == "ssh_authorized_keys" || s.name == "password")
        .map(|s| s.name.clone())
        .collect()
}

/// The seconds `amount_msat` buys on `offer`, within its bounds.
pub fn seconds_for(amount_msat: u64, offer: &TierConfig) -> Result<u64, Refusal> {
    let seconds = amount_msat / offer.price_msat_per_second;
    if seconds < offer.min_seconds {
        return Err(Refusal::field(
            ErrorCode::AmountTooSmall,
            "token",
            format!(
                "{amount_msat} msat buys {seconds} s at {} msat/s; the {} tier's minimum is {} s ({} msat)",
                offer.price_msat_per_second,
                offer.tier,
                offer.min_seconds,
                offer
                    .min_seconds
                    .saturating_mul(offer.price_msat_per_second)
            ),
        ));
    }
    if seconds > offer.max_seconds {
        return Err(Refusal::field(
            ErrorCode::AmountTooLarge,
            "token",
            format!(
                "{amount_msat} msat buys {seconds} s; the {} tier's longest lease is {} s",
                offer.tier, offer.max_seconds
            ),
        ));
    }
    Ok(seconds)
}

/// Fill unset sizes from the offer and refuse what exceeds it.
pub fn fit_to_offer(cell: &mut Cell, offer: &TierConfig) -> Result<(), Refusal> {
    let r = &mut cell.spec.resources;
    let over = |field: &str, msg: String| {
        Err(Refusal::field(
            ErrorCode::ExceedsOffer,
            format!("document.spec.{field}"),
            msg,
        ))
    };
    match r.cpus {
        Some(c) if c > offer.cpus + 1e-9 => {
            return over(
                "resources.cpus",
                format!("{c} > the offer's {}", offer.cpus),
            );
        }
        None => r.cpus = Some(offer.cpus),
        _ => {}
    }
    match r.memory_mib {
        Some(m) if m > offer.memory_mib => {
            return over(
                "resources.memoryMiB",
                format!("{m} > the offer's {}", offer.memory_mib),
            );
        }
        None => r.memory_mib = Some(offer.memory_mib),
        _ => {}
    }
    match (r.disk_gib, offer.disk_gib) {
        (Some(d), Some(o)) if d > o => {
            return over("resources.diskGiB", format!("{d} > the offer's {o}"));
        }
        (Some(_), None) => return over("resources.diskGiB", "this tier offers no disk".into()),
        (None, Some(o)) if cell.spec.isolation != Isolation::Process => r.disk_gib = Some(o),
        _ => {}
    }
    if let Some(v) = &cell.spec.volume {
        match offer.disk_gib {
            Some(o) if v.size_gib <= o => {}
            Some(o) => {
                return over(
                    "volume.sizeGiB",
                    format!("{} > the offer's {o}", v.size_gib),
                );
            }
            None => return over("volume", "this tier offers no disk".into()),
        }
    }
    Ok(())
}

/// The market sells within the operator's policy: no tier larger than
/// its maximums, no lease longer than it allows, ports inside its range.
/// A config that would sell more fails at start, naming the field, rather
/// than refuse a consumer after payment.
fn check_against_policy(
    cfg: &MarketConfig,
    policy: &cellhost_policy::Policy,
) -> Result<(), MarketError> {
    let bad = |field: String, message: String| Err(MarketError::Config { field, message });
    let m = &policy.resources.maximums;
    for (i, t) in cfg.tiers.iter().enumerate() {
        if !policy.offers(t.tier) {
            return bad(
                format!("tiers.{i}.tier"),
                format!(
                    "the policy does not offer the {} tier (policy: tiers)",
                    t.tier
                ),
            );
        }
        if t.cpus > m.cpus + 1e-9 {
            return bad(
                format!("tiers.{i}.cpus"),
                format!(
                    "{} > the policy's maximum {} (policy: resources.maximums.cpus)",
                    t.cpus, m.cpus
                ),
            );
        }
        if t.memory_mib > m.memory_mib {
            return bad(
                format!("tiers.{i}.memoryMiB"),
                format!(
                    "{} > the policy's maximum {} (policy: resources.maximums.memoryMiB)",
                    t.memory_mib, m.memory_mib
                ),
            );
        }
        if t.disk_gib.is_some_and(|d| d > m.disk_gib) {
            return bad(
                format!("tiers.{i}.diskGiB"),
                format!(
                    "> the policy's maximum {} (policy: resources.maximums.diskGiB)",
                    m.disk_gib
                ),
            );
        }
        if t.max_seconds > policy.lease.max_seconds {
            return bad(
                format!("tiers.{i}.maxSeconds"),
                format!(
                    "{} > the policy's longest lease {} (policy: lease.maxSeconds)",
                    t.max_seconds, policy.lease.max_seconds
                ),
            );
        }
    }
    let (lo, hi) = cfg.port_range;
    if lo < u32::from(policy.ports.min) || hi > u32::from(policy.ports.max) {
        return bad(
            "portRange".into(),
            format!(
                "[{lo}, {hi}] is not inside the policy's ports {}-{} (policy: ports)",
                policy.ports.min, policy.ports.max
            ),
        );
    }
    Ok(())
}

/// What the supervisor's pre-check refused, as the market's codes: every
/// one before the token is redeemed.
fn refusal_of_admission(e: SupervisorError) -> Refusal {
    match &e {
        SupervisorError::Policy(p) => match p.first() {
            Some(r) => Refusal::field(
                ErrorCode::PolicyRefused,
                r.field.trim_start_matches("spec."),
                format!("{} (policy: {})", r.message, r.rule),
            ),
            None => Refusal::new(ErrorCode::PolicyRefused, e.to_string()),
        },
        SupervisorError::TooMany { .. } => Refusal::new(ErrorCode::TooManyCells, e.to_string()),
        SupervisorError::Unavailable(_) => Refusal::new(ErrorCode::TierUnavailable, e.to_string()),
        _ => Refusal::new(ErrorCode::NoCapacity, e.public_message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> TierConfig {
        TierConfig {
            tier: Isolation::Process,
            price_msat_per_second: 1000,
            cpus: 0.5,
            memory_mib: 128,
            disk_gib: None,
            min_seconds: 60,
            max_seconds: 3600,
            template: None,
        }
    }

    #[test]
    fn amount_buys_whole_seconds_within_bounds() {
        let o = offer();
        assert_eq!(seconds_for(60_000, &o).unwrap(), 60);
        assert_eq!(seconds_for(60_999, &o).unwrap(), 60);
        assert_eq!(
            seconds_for(59_999, &o).unwrap_err().code,
            ErrorCode::AmountTooSmall
        );
        assert_eq!(
            seconds_for(3_601_000, &o).unwrap_err().code,
            ErrorCode::AmountTooLarge
        );
    }

    #[test]
    fn documents_get_the_offers_size_and_may_not_exceed_it() {
        let doc = |extra: &str| {
            cellhost_spec::parse_and_validate(&format!(
                "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {{ name: t }}\nspec:\n  isolation: process\n  command: [/bin/true]\n{extra}"
            ))
            .unwrap()
        };
        let mut c = doc("");
        fit_to_offer(&mut c, &offer()).unwrap();
        assert_eq!(c.spec.resources.cpus, Some(0.5));
        assert_eq!(c.spec.resources.memory_mib, Some(128));
        let mut c = doc("  resources: { memoryMiB: 256 }\n");
        let e = fit_to_offer(&mut c, &offer()).unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (
                ErrorCode::ExceedsOffer,
                Some("document.spec.resources.memoryMiB")
            )
        );
        let mut c = doc("  volume: { path: /data, sizeGiB: 1 }\n");
        assert_eq!(
            fit_to_offer(&mut c, &offer()).unwrap_err().field.as_deref(),
            Some("document.spec.volume")
        );
    }
}
