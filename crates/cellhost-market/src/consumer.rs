//! The consumer side: discover offers, send a request, wait for its reply.
//!
//! A consumer is a Nostr key and nothing else. Offers are taken only when
//! their signature verifies and the key that signed them is the one the
//! offer names; a provider is *live* while its newest heartbeat is younger
//! than three heartbeat intervals. Requests go out NIP-17 (kind 14 rumor,
//! NIP-44 seal, NIP-59 gift wrap) to the provider's relays; the reply is
//! the gift wrap to us, from the provider, whose `re` is our rumor's id.

use std::time::Duration;

use nostr_sdk::nips::nip59::UnwrappedGift;
use nostr_sdk::prelude::*;

use crate::MarketError;
use crate::proto::{self, Heartbeat, Offer, Reply, Request};

/// One provider's offer as discovered.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    pub provider: String,
    pub npub: String,
    /// Unix seconds the offer was signed.
    pub published_at: u64,
    pub offer: Offer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<Heartbeat>,
    /// Seconds since the newest heartbeat was signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_seconds: Option<u64>,
    pub live: bool,
}

/// Which offers to keep.
#[derive(Debug, Clone, Default)]
pub struct OfferFilter {
    /// Only providers offering this tier (available now).
    pub tier: Option<String>,
    /// Only tiers priced at most this, msat per second.
    pub max_price_msat: Option<u64>,
    /// Only this provider.
    pub provider: Option<PublicKey>,
}

pub struct Consumer {
    keys: Keys,
    client: Client,
    wait: Duration,
}

/// Parse `npub1…` or 64 hex digits.
pub fn parse_pubkey(s: &str) -> Result<PublicKey, MarketError> {
    PublicKey::parse(s.trim()).map_err(|_| {
        MarketError::Nostr(format!(
            "{s:?} is not a public key (npub1… or 64 hex digits)"
        ))
    })
}

/// Parse a request id (64 hex digits, as a timed-out request prints it).
pub fn parse_request_id(s: &str) -> Result<EventId, MarketError> {
    EventId::from_hex(s.trim())
        .map_err(|_| MarketError::Nostr(format!("{s:?} is not a request id (64 hex digits)")))
}

impl Consumer {
    /// Connect to `relays` (waits up to `wait` for them).
    pub async fn connect(
        keys: Keys,
        relays: &[String],
        wait: Duration,
    ) -> Result<Consumer, MarketError> {
        if relays.is_empty() {
            return Err(MarketError::Nostr("no relay given (--relay URL)".into()));
        }
        let client = Client::new(keys.clone());
        for r in relays {
            client
                .add_relay(r.as_str())
                .await
                .map_err(|e| MarketError::Nostr(format!("relay {r}: {e}")))?;
        }
        client.try_connect(wait).await;
        Ok(Consumer { keys, client, wait })
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.public_key()
    }

    /// Offers on the relays, verified, with their liveness, filtered.
    pub async fn offers(&self, f: &OfferFilter) -> Result<Vec<Listing>, MarketError> {
        let mut filter = Filter::new()
            .kind(Kind::Custom(proto::OFFER_KIND))
            .hashtag(proto::TOPIC);
        if let Some(p) = f.provider {
            filter = filter.author(p);
        }
        let events = self
            .client
            .fetch_events(filter, self.wait)
            .await
            .map_err(MarketError::nostr)?;
        let mut out = Vec::new();
        for ev in events.iter() {
            if ev.verify().is_err() {
                tracing::warn!("dropping offer {}: bad signature", ev.id);
                continue;
            }
            let Ok(offer) = serde_json::from_str::<Offer>(&ev.content) else {
                tracing::debug!("dropping offer {}: not a cellhost offer", ev.id);
                continue;
            };
            if parse_pubkey(&offer.provider_npub).ok() != Some(ev.pubkey) {
                tracing::warn!(
                    "dropping offer {}: it names {} but {} signed it",
                    ev.id,
                    offer.provider_npub,
                    crate::keys::npub(&ev.pubkey)
                );
                continue;
            }
            if let Some(t) = &f.tier
                && !offer
                    .cellhost
                    .tiers
                    .iter()
                    .any(|o| &o.tier == t && o.available)
            {
                continue;
            }
            if let Some(max) = f.max_price_msat
                && !offer.cellhost.tiers.iter().any(|o| {
                    o.price_msat_per_second <= max && f.tier.as_ref().is_none_or(|t| &o.tier == t)
                })
            {
                continue;
            }
            out.push(Listing {
                provider: ev.pubkey.to_hex(),
                npub: crate::keys::npub(&ev.pubkey),
                published_at: ev.created_at.as_secs(),
                offer,
                heartbeat: None,
                heartbeat_age_seconds: None,
                live: false,
            });
        }
        if out.is_empty() {
            return Ok(out);
        }
        let authors: Vec<PublicKey> = out
            .iter()
            .filter_map(|l| parse_pubkey(&l.provider).ok())
            .collect();
        let beats = self
            .client
            .fetch_events(
                Filter::new()
                    .kind(Kind::Custom(proto::HEARTBEAT_KIND))
                    .authors(authors)
                    .identifier(proto::HEARTBEAT_D),
                self.wait,
            )
            .await
            .map_err(MarketError::nostr)?;
        let now = Timestamp::now().as_secs();
        for l in &mut out {
            let newest = beats
                .iter()
                .filter(|e| e.pubkey.to_hex() == l.provider && e.verify().is_ok())
                .max_by_key(|e| e.created_at);
            if let Some(e) = newest
                && let Ok(hb) = serde_json::from_str::<Heartbeat>(&e.content)
            {
                let age = now.saturating_sub(e.created_at.as_secs());
                l.live = age <= l.offer.cellhost.heartbeat_seconds.clamp(1, 3600) * 3;
                l.heartbeat_age_seconds = Some(age);
                l.heartbeat = Some(hb);
            }
        }
        out.sort_by_key(|l| {
            (
                !l.live,
                l.offer
                    .cellhost
                    .tiers
                    .iter()
                    .map(|t| t.price_msat_per_second)
                    .min(),
            )
        });
        Ok(out)
    }

    /// The offer of one provider.
    pub async fn offer_of(&self, provider: PublicKey) -> Result<Listing, MarketError> {
        self.offers(&OfferFilter {
            provider: Some(provider),
            ..Default::default()
        })
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| {
            MarketError::Nostr(format!(
                "no offer from {} on these relays",
                crate::keys::npub(&provider)
            ))
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client (tests publish raw events with it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Send `req` to `provider` (also on `relays`, the offer's) and wait
    /// up to `timeout` for its reply.
    pub async fn request(
        &self,
        provider: PublicKey,
        relays: &[String],
        req: &Request,
        timeout: Duration,
    ) -> Result<Reply, MarketError> {
        self.request_raw(provider, relays, req.to_json(), timeout)
            .await
    }

    /// Send any content as a request; a zero `timeout` does not wait (and
    /// returns [`MarketError::NoReply`]).
    pub async fn request_raw(
        &self,
        provider: PublicKey,
        relays: &[String],
        content: String,
        timeout: Duration,
    ) -> Result<Reply, MarketError> {
        let rumor = EventBuilder::private_msg_rumor(provider, content).build(self.public_key());
        let rid = rumor.id.unwrap_or_else(|| {
            let mut r = rumor.clone();
            r.id()
        });
        self.send_rumor(provider, relays, rumor).await?;
        if timeout.is_zero() {
            return Err(MarketError::NoReply {
                seconds: 0,
                request: rid.to_hex(),
            });
        }
        self.wait_reply(provider, rid, timeout).await
    }

    /// Wrap and send an already built rumor (tests replay one with this).
    pub async fn send_rumor(
        &self,
        provider: PublicKey,
        relays: &[String],
        rumor: UnsignedEvent,
    ) -> Result<EventId, MarketError> {
        for r in relays {
            if let Err(e) = self.client.add_relay(r.as_str()).await {
                tracing::warn!("provider relay {r}: {e}");
            }
        }
        self.client.try_connect(self.wait).await;
        let wrap = EventBuilder::gift_wrap(&self.keys, &provider, rumor, [])
            .await
            .map_err(MarketError::nostr)?;
        let out = self
            .client
            .send_event(&wrap)
            .await
            .map_err(MarketError::nostr)?;
        if out.success.is_empty() {
            return Err(MarketError::Nostr(format!(
                "no relay took the request: {:?}",
                out.failed
            )));
        }
        Ok(wrap.id)
    }

    /// The provider's reply to rumor `rid`.
    pub async fn wait_reply(
        &self,
        provider: PublicKey,
        rid: EventId,
        timeout: Duration,
    ) -> Result<Reply, MarketError> {
        // Listening first (new events only, one subscription however
        // often this is called), then asking for what is stored: a reply
        // published in between is in one or the other.
        let mut notes = self.client.notifications();
        let inbox = Filter::new().kind(Kind::GiftWrap).pubkey(self.public_key());
        self.client
            .subscribe_with_id(
                SubscriptionId::new("cellhost-replies"),
                inbox.clone().limit(0),
                None,
            )
            .await
            .map_err(MarketError::nostr)?;
        let stored = self
            .client
            .fetch_events(inbox, self.wait)
            .await
            .map_err(MarketError::nostr)?;
        for ev in stored.iter() {
            if let Some(r) = self.reply_in(ev, provider, rid).await {
                return Ok(r);
            }
        }
        let wait = async {
            loop {
                match notes.recv().await {
                    Ok(RelayPoolNotification::Event { event, .. })
                        if event.kind == Kind::GiftWrap =>
                    {
                        if let Some(r) = self.reply_in(&event, provider, rid).await {
                            return Ok(r);
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(MarketError::Nostr("the relay connection closed".into()));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| MarketError::NoReply {
                seconds: timeout.as_secs(),
                request: rid.to_hex(),
            })?
    }

    async fn reply_in(&self, ev: &Event, provider: PublicKey, rid: EventId) -> Option<Reply> {
        let UnwrappedGift { sender, rumor } =
            UnwrappedGift::from_gift_wrap(&self.keys, ev).await.ok()?;
        if sender != provider || rumor.kind != Kind::PrivateDirectMessage {
            return None;
        }
        let reply: Reply = serde_json::from_str(&rumor.content).ok()?;
        (reply.re == rid.to_hex()).then_some(reply)
    }

    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }
}
