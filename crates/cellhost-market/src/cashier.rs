//! Payment: check a Cashu token without contacting anyone, redeem it at its
//! mint (a swap into the provider's wallet), and pay refunds.
//!
//! # Layout on the host
//!
//! `<state>/market/wallet.sqlite` (cdk's wallet db: the provider's proofs,
//! one store for every accepted mint) and `<state>/market/wallet.seed`
//! (see `keys`). Both 0600 in a 0700 dir.
//!
//! # Lifecycle
//!
//! [`Cashier::check`] parses the token, and refuses a mint not on the
//! offer's list, another unit, or an empty token, all offline: a token
//! from a mint we do not accept is never sent anywhere. [`Cashier::redeem`]
//! is the swap: after it the consumer's proofs are spent and new ones are
//! ours. [`Cashier::refund`] makes a token for an amount out of our proofs
//! at one mint (a swap again when change is needed).
//!
//! # Threat model
//!
//! Tokens are bearer money. They are never logged, stored outside the
//! wallet db, or put in argv; a refund token goes only into the reply to
//! the consumer who paid. A hostile token string is parsed by cdk (base64,
//! CBOR/JSON) under the request's size cap; parse failures are refusals,
//! never panics (fuzzed with the request parser).

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use cdk::Amount;
use cdk::mint_url::MintUrl;
use cdk::nuts::{CurrencyUnit, Token};
use cdk::wallet::{ReceiveOptions, SendOptions, Wallet};
use zeroize::Zeroizing;

use crate::MarketError;
use crate::proto::{ErrorCode, Refusal};

/// A token that passed every offline check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub mint: MintUrl,
    /// Face value in sat.
    pub amount_sat: u64,
}

impl Checked {
    pub fn amount_msat(&self) -> u64 {
        self.amount_sat.saturating_mul(1000)
    }
}

pub struct Cashier {
    /// One wallet per accepted mint, sharing one store.
    wallets: HashMap<MintUrl, Wallet>,
    /// Per mint: a redemption or refund is the only money movement at its
    /// mint while it runs, so a balance difference is that operation's.
    locks: HashMap<MintUrl, tokio::sync::Mutex<()>>,
}

impl Cashier {
    /// Wallets for `mints` on the db at `db_path`. Contacts no mint.
    pub async fn open(
        db_path: &Path,
        seed: &Zeroizing<[u8; 64]>,
        mints: &[String],
    ) -> Result<Cashier, MarketError> {
        if let Some(dir) = db_path.parent() {
            crate::keys::private_dir(dir)?;
        }
        let store = cdk_sqlite::WalletSqliteDatabase::new(db_path.to_path_buf())
            .await
            .map_err(|e| MarketError::Wallet(format!("opening {}: {e}", db_path.display())))?;
        std::fs::set_permissions(db_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| MarketError::Io {
                what: format!("chmod 600 {}", db_path.display()),
                source: e,
            })?;
        Self::with_store(Arc::new(store), seed, mints)
    }

    /// Wallets on an in-memory db (tests, consumers' one-off wallets).
    pub async fn in_memory(
        seed: &Zeroizing<[u8; 64]>,
        mints: &[String],
    ) -> Result<Cashier, MarketError> {
        let store = cdk_sqlite::wallet::memory::empty()
            .await
            .map_err(|e| MarketError::Wallet(e.to_string()))?;
        Self::with_store(Arc::new(store), seed, mints)
    }

    fn with_store(
        store: Arc<cdk_sqlite::WalletSqliteDatabase>,
        seed: &Zeroizing<[u8; 64]>,
        mints: &[String],
    ) -> Result<Cashier, MarketError> {
        let mut wallets = HashMap::new();
        let mut locks = HashMap::new();
        for m in mints {
            let url =
                MintUrl::from_str(m).map_err(|e| MarketError::Wallet(format!("mint {m}: {e}")))?;
            let w = Wallet::new(
                &url.to_string(),
                CurrencyUnit::Sat,
                store.clone(),
                **seed,
                None,
            )
            .map_err(|e| MarketError::Wallet(format!("mint {m}: {e}")))?;
            locks.insert(url.clone(), tokio::sync::Mutex::new(()));
            wallets.insert(url, w);
        }
        Ok(Cashier { wallets, locks })
    }

    /// Every offline check of `token`: it parses, its mint is accepted, its
    /// unit is sat, and it is worth something.
    pub fn check(&self, token: &str) -> Result<Checked, Refusal> {
        let bad = |m: String| Refusal::field(ErrorCode::TokenInvalid, "token", m);
        let t =
            Token::from_str(token.trim()).map_err(|e| bad(format!("not a Cashu token: {e}")))?;
        let mint = t
            .mint_url()
            .map_err(|e| bad(format!("no single mint: {e}")))?;
        if !self.wallets.contains_key(&mint) {
            return Err(Refusal::field(
                ErrorCode::MintNotAccepted,
                "token",
                format!("mint {mint} is not accepted here; see the offer's whitelisted_mints"),
            ));
        }
        match t.unit() {
            None | Some(CurrencyUnit::Sat) => {}
            Some(u) => return Err(bad(format!("unit {u} is not accepted; pay in sat"))),
        }
        let amount = t.value().map_err(|e| bad(format!("amount: {e}")))?;
        let amount_sat = u64::from(amount);
        if amount_sat == 0 {
            return Err(bad("the token is worth nothing".into()));
        }
        Ok(Checked { mint, amount_sat })
    }

    /// Swap `token` (already [`Cashier::check`]ed) into our wallet. Returns
    /// the sat received (the face value less any mint fee).
    ///
    /// A swap can fail after the mint took the token (its answer lost on
    /// the way back, a local db error); cdk then leaves the operation open.
    /// So an error is not taken at its word: open operations are resumed
    /// and the balance compared with before, and money that did arrive
    /// counts as received (used or refunded like any other).
    pub async fn redeem(&self, token: &str, checked: &Checked) -> Result<u64, Refusal> {
        let w = self.wallet(&checked.mint)?;
        let _only = self.lock(&checked.mint).await;
        let before = w.total_balance().await.map(u64::from).ok();
        match w.receive(token.trim(), ReceiveOptions::default()).await {
            Ok(a) => Ok(u64::from(a)),
            Err(cdk::Error::TokenAlreadySpent) => Err(Refusal::field(
                ErrorCode::TokenSpent,
                "token",
                "the mint says this token is already spent",
            )),
            Err(e) => {
                if let Err(r) = w.recover_incomplete_sagas().await {
                    tracing::warn!(
                        "market: resuming wallet operations at {}: {r}",
                        checked.mint
                    );
                }
                let after = w.total_balance().await.map(u64::from).ok();
                match (before, after) {
                    (Some(b), Some(a)) if a > b => {
                        tracing::warn!("market: the swap failed ({e}) yet {} sat arrived", a - b);
                        Ok(a - b)
                    }
                    _ => Err(Refusal::field(
                        ErrorCode::MintError,
                        "token",
                        format!("the mint did not take the token: {e}"),
                    )),
                }
            }
        }
    }

    /// Resume wallet operations a crash left open, at every mint that
    /// answers. Errors are logged: a mint that is down now is tried again
    /// at the next failed redemption or start.
    pub async fn recover(&self) {
        for (url, w) in &self.wallets {
            let _only = self.lock(url).await;
            match w.recover_incomplete_sagas().await {
                Ok(r) if !r.is_empty() => tracing::info!(
                    "market: wallet at {url}: {} recovered, {} rolled back, {} pending, {} failed",
                    r.recovered,
                    r.compensated,
                    r.skipped,
                    r.failed
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("market: wallet at {url}: recovery: {e}"),
            }
        }
    }

    async fn lock(&self, mint: &MintUrl) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.locks.get(mint) {
            Some(l) => Some(l.lock().await),
            None => None,
        }
    }

    /// A token worth `amount_sat` at `mint`, out of our proofs.
    pub async fn refund(&self, mint: &MintUrl, amount_sat: u64) -> Result<String, MarketError> {
        let w = self
            .wallet(mint)
            .map_err(|r| MarketError::Wallet(r.message))?;
        let _only = self.lock(mint).await;
        let prepared = w
            .prepare_send(Amount::from(amount_sat), SendOptions::default())
            .await
            .map_err(|e| {
                MarketError::Wallet(format!("preparing a refund of {amount_sat} sat: {e}"))
            })?;
        let token = prepared.confirm(None).await.map_err(|e| {
            MarketError::Wallet(format!("sending a refund of {amount_sat} sat: {e}"))
        })?;
        Ok(token.to_string())
    }

    fn wallet(&self, mint: &MintUrl) -> Result<&Wallet, Refusal> {
        self.wallets.get(mint).ok_or_else(|| {
            Refusal::field(
                ErrorCode::MintNotAccepted,
                "token",
                format!("mint {mint} is not accepted"),
            )
        })
    }
}
