//! The market end to end, on real protocols on loopback, no mocks of either
//! side:
//!
//! - a real Nostr relay (rust-nostr's `LocalRelay`) on 127.0.0.1, in this
//!   process;
//! - a real Cashu mint (cdk's `Mint` with its fake Lightning backend, which
//!   marks invoices paid at once; served by cdk-axum) on 127.0.0.1, issuing
//!   real blind-signed tokens;
//! - the real `cellhost serve --market` binary with the process tier, and
//!   the real `cellhost market …` consumer commands (or the consumer
//!   library, where a test must craft what the CLI would never send).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cdk::Amount;
use cdk::nuts::{CurrencyUnit, PaymentMethod};
use cdk::wallet::{ReceiveOptions, SendOptions, Wallet};
use cellhost_market::consumer::{Consumer, OfferFilter};
use cellhost_market::ledger::Ledger;
use cellhost_market::proto::{ErrorCode, Reply, Request, SpawnRequest, VERSION};
use nostr_relay_builder::{LocalRelay, RelayBuilder};
use nostr_sdk::prelude::*;
use serde_json::Value;

// ------------------------------------------------------------ the mint

/// A Cashu mint on 127.0.0.1 that counts the HTTP requests it serves.
struct Mint {
    url: String,
    hits: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Mint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start_mint() -> Mint {
    use cdk::mint::{MintBuilder, MintMeltLimits};
    let db = Arc::new(cdk_sqlite::mint::memory::empty().await.unwrap());
    let mut builder = MintBuilder::new(db.clone());
    let fake = cdk_fake_wallet::FakeWallet::new(
        cdk::types::FeeReserve {
            min_fee_reserve: 1.into(),
            percent_fee_reserve: 1.0,
        },
        Default::default(),
        Default::default(),
        0,
        CurrencyUnit::Sat,
    );
    builder
        .add_payment_processor(
            CurrencyUnit::Sat,
            PaymentMethod::BOLT11,
            MintMeltLimits::new(1, 1_000_000),
            Arc::new(fake),
        )
        .await
        .unwrap();
    let builder = builder
        .with_name("cellhost test mint".into())
        .with_description("fake Lightning, loopback only".into())
        .with_supported_websockets(cdk::nuts::nut17::SupportedMethods::default_bolt11(
            CurrencyUnit::Sat,
        ));
    let mut seed = [0u8; 64];
    cellhost_core::ids::fill_random(&mut seed);
    let mint = Arc::new(builder.build_with_seed(db, &seed).await.unwrap());
    mint.start().await.unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let router = cdk_axum::create_mint_router(mint, vec!["bolt11".into()])
        .await
        .unwrap()
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    next.run(req).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Mint { url, hits, server }
}

/// A wallet at `mint` on an in-memory store.
async fn wallet(mint: &str) -> Wallet {
    let store = Arc::new(cdk_sqlite::wallet::memory::empty().await.unwrap());
    let mut seed = [0u8; 64];
    cellhost_core::ids::fill_random(&mut seed);
    Wallet::new(mint, CurrencyUnit::Sat, store, seed, None).unwrap()
}

/// A fresh token worth `sat`: minted (the fake backend pays the invoice),
/// then sent out of the wallet.
async fn token(mint: &str, sat: u64) -> String {
    let w = wallet(mint).await;
    let quote = w
        .mint_quote(PaymentMethod::BOLT11, Some(Amount::from(sat)), None, None)
        .await
        .unwrap();
    w.wait_and_mint_quote(quote, Default::default(), None, Duration::from_secs(30))
        .await
        .unwrap();
    let send = w
        .prepare_send(Amount::from(sat), SendOptions::default())
        .await
        .unwrap();
    send.confirm(None).await.unwrap().to_string()
}

/// Redeem `token` into a fresh wallet: the sat it was worth.
async fn redeem(mint: &str, token: &str) -> Result<u64, cdk::Error> {
    wallet(mint)
        .await
        .receive(token, ReceiveOptions::default())
        .await
        .map(u64::from)
}

// ------------------------------------------------------------ the relay

async fn start_relay() -> (LocalRelay, String) {
    // rust-nostr's relay picks a random port, checks that it is free, then
    // binds it: a socket of a test running alongside can take the port in
    // between (EADDRINUSE). Pick again then.
    let mut last = None;
    for _ in 0..10 {
        let relay = LocalRelay::new(RelayBuilder::default().addr(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        match relay.run().await {
            Ok(()) => {
                let url = relay.url().await.to_string();
                return (relay, url);
            }
            Err(e) => last = Some(e),
        }
    }
    panic!("no relay in 10 tries: {last:?}");
}

// ------------------------------------------------------------ the provider

/// 1 sat a second for a process cell of up to 0.5 CPU and 64 MiB.
const PRICE_MSAT: u64 = 1000;
const MIN_SECONDS: u64 = 5;
const MAX_SECONDS: u64 = 600;

struct Provider {
    child: Option<Child>,
    state: common::StateDir,
    socket: PathBuf,
    log: PathBuf,
    cfg: PathBuf,
    extra: Vec<String>,
    /// `FAILPOINTS` for the daemon (the binary the tests run is built with
    /// the market's failpoints; each one kills the daemon like `kill -9`).
    failpoint: Option<String>,
}

impl Provider {
    fn start(relay: &str, mint: &str) -> Provider {
        Provider::start_with(relay, mint, &[])
    }

    fn start_with(relay: &str, mint: &str, extra: &[&str]) -> Provider {
        Provider::launch(relay, mint, extra, None)
    }

    /// Start armed with `failpoint` (see [`Provider::failpoint`]).
    fn armed(relay: &str, mint: &str, failpoint: &str) -> Provider {
        Provider::launch(relay, mint, &[], Some(failpoint))
    }

    fn launch(relay: &str, mint: &str, extra: &[&str], failpoint: Option<&str>) -> Provider {
        let state = common::state_dir();
        let cfg = state.path().join("market.yaml");
        std::fs::write(
            &cfg,
            format!(
                "relays: [{relay}]\nmints: [{mint}]\nhost: 127.0.0.1\nheartbeatSeconds: 1\n\
                 tiers:\n  - tier: process\n    priceMsatPerSecond: {PRICE_MSAT}\n    cpus: 0.5\n    \
                 memoryMiB: 64\n    minSeconds: {MIN_SECONDS}\n    maxSeconds: {MAX_SECONDS}\n"
            ),
        )
        .unwrap();
        let mut p = Provider {
            child: None,
            socket: state.path().join("api.sock"),
            log: state.path().join("serve.log"),
            state,
            cfg,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            failpoint: failpoint.map(str::to_string),
        };
        let log = std::fs::File::create(&p.log).unwrap();
        p.child = Some(
            p.command(log)
                .spawn()
                .expect("spawn cellhost serve --market"),
        );
        p
    }

    fn command(&self, log: std::fs::File) -> std::process::Command {
        let mut c = common::serve_command(&self.state_dir(), &self.socket);
        c.arg("--market")
            .arg(&self.cfg)
            .args(&self.extra)
            .stderr(log);
        if let Some(f) = &self.failpoint {
            c.env("FAILPOINTS", f);
        }
        c
    }

    /// Start the daemon again, armed with `failpoint` (or not), after it
    /// died; the same state dir, the log appended.
    fn respawn(&mut self, failpoint: Option<&str>) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.failpoint = failpoint.map(str::to_string);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(self.command(log).spawn().unwrap());
        let until = Instant::now() + Duration::from_secs(30);
        while !self.api().arg("ls").output().unwrap().status.success() {
            assert!(Instant::now() < until, "no API in 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the daemon to die at its failpoint: by SIGKILL.
    fn crashed(&mut self) {
        let child = self.child.as_mut().unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < until,
                "the daemon did not reach failpoint {:?}; log:\n{}",
                self.failpoint,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}; log:\n{}", self.log());
    }

    /// `cellhost --api unix:<socket>`, ready for a command.
    fn api(&self) -> std::process::Command {
        let mut c = std::process::Command::new(common::cellhost_bin());
        c.arg("--api")
            .arg(format!("unix:{}", self.socket.display()));
        c
    }

    /// SIGTERM the daemon (it finishes requests under way) and start it
    /// again on the same state dir.
    fn restart(&mut self) {
        common::terminate(self.child.take().unwrap());
        let failpoint = self.failpoint.take();
        self.respawn(failpoint.as_deref());
    }

    fn state_dir(&self) -> PathBuf {
        self.state.path().join("state")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `cellhost --api unix:<socket> <args> --json`, parsed.
    fn operator(&self, args: &[&str]) -> Value {
        let out = self.api().arg("--json").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The event log (one CloudEvent a line).
    fn events(&self) -> Vec<Value> {
        let out = self.api().arg("events").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn cells(&self) -> Vec<Value> {
        self.operator(&["ls"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn ledger(&self) -> Ledger {
        Ledger::open(&self.state_dir().join("market/ledger.sqlite")).unwrap()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            for cell in self.cells() {
                if let Some(id) = cell["id"].as_str() {
                    let _ = self.api().args(["rm", id]).output();
                }
            }
            common::terminate(c);
        }
    }
}

// ------------------------------------------------------------ consumers

async fn consumer(relay: &str) -> Consumer {
    Consumer::connect(
        Keys::generate(),
        &[relay.to_string()],
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// Wait until `c` sees a live offer from `provider` (heartbeats every 1 s).
async fn wait_live_offer(c: &Consumer, p: &Provider) -> PublicKey {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let list = c.offers(&OfferFilter::default()).await.unwrap();
        if let Some(l) = list.iter().find(|l| l.live) {
            return PublicKey::from_hex(&l.provider).unwrap();
        }
        assert!(
            Instant::now() < until,
            "no live offer in 30 s; provider log:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn spawn_req(token: String, document: Option<&str>) -> Request {
    Request::Spawn(SpawnRequest {
        cellhost: VERSION,
        tier: "process".into(),
        document: document.map(str::to_string),
        token,
        volume_key: None,
        ssh_key: None,
        password: None,
    })
}

const SLEEPER: &str = "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: { name: rented }\n\
                       spec:\n  isolation: process\n  command: [/bin/sleep, '600']\n  \
                       resources: { cpus: 0.25, memoryMiB: 32, pids: 16 }\n";

/// `cellhost market <args>` as a consumer with key file `identity`.
async fn market_cli(relay: &str, identity: &Path, args: &[&str]) -> (i32, Value, String) {
    let out = tokio::process::Command::new(common::cellhost_bin())
        .arg("market")
        .args(args)
        .arg("--relay")
        .arg(relay)
        .arg("--identity")
        .arg(identity)
        .args(["--timeout", "60", "--json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}); stderr: {stderr}"));
    (out.status.code().unwrap_or(-1), v, stderr)
}

/// `cellhost market rent` of a process cell.
async fn rent_cli(
    relay: &str,
    identity: &Path,
    npub: &str,
    token: &Path,
    doc: &Path,
) -> (i32, Value, String) {
    let (token, doc) = (token.to_str().unwrap(), doc.to_str().unwrap());
    let args = [
        "rent",
        npub,
        "--tier",
        "process",
        "--token-file",
        token,
        "--doc",
        doc,
    ];
    market_cli(relay, identity, &args).await
}

fn rfc3339_ms(s: &str) -> u128 {
    humantime::parse_rfc3339(s)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

// ------------------------------------------------------------ tests

/// Offer → discover → mint a token → rent a process cell → it runs →
/// top-up moves expires_at by exactly what it paid for → the lease ends →
/// the cell is destroyed. All through the `cellhost market` commands.
#[test]
fn rent_top_up_and_lease_end_through_the_cli() {
    require_process_tier!();
    let rt = common::rt_multi();
    rt.block_on(async {
        let mint = start_mint().await;
        let (_relay, relay) = start_relay().await;
        // The node's capacity is one offered cell (0.5 CPU): renting a
        // smaller one leaves no room for another of the offered size.
        let cpus = std::thread::available_parallelism().unwrap().get() as f64;
        let overcommit = format!("{}", 0.5 / cpus);
        let p = Provider::start_with(&relay, &mint.url, &["--cpu-overcommit", &overcommit]);
        let dir = tempfile::tempdir().unwrap();
        let me = dir.path().join("me.key");

        // Discover: the CLI lists the offer, signed by the key it names,
        // live by its heartbeat, with the real tier and price.
        let until = Instant::now() + Duration::from_secs(30);
        let listing = loop {
            let (code, v, err) = market_cli(&relay, &me, &["offers", "--tier", "process"]).await;
            assert_eq!(code, 0, "{err}");
            if let Some(l) = v
                .as_array()
                .and_then(|a| a.iter().find(|l| l["live"] == true))
            {
                break l.clone();
            }
            assert!(Instant::now() < until, "no live offer; log:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let npub = listing["npub"].as_str().unwrap().to_string();
        let tier = &listing["offer"]["cellhost"]["tiers"][0];
        assert_eq!(tier["tier"], "process");
        assert_eq!(tier["isolation"], "shared-kernel");
        assert_eq!(tier["priceMsatPerSecond"], PRICE_MSAT);
        assert_eq!(tier["available"], true);
        assert_eq!(listing["offer"]["whitelisted_mints"][0], mint.url);
        assert_eq!(
            listing["offer"]["specs"][0]["rate_msats_per_sec"],
            PRICE_MSAT
        );
        // The key file was made 0600 on first use.
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&me).unwrap());
        assert_eq!(mode & 0o777, 0o600);
        // Too expensive a filter finds nothing.
        let (_, v, _) = market_cli(&relay, &me, &["offers", "--max-price", "999"]).await;
        assert_eq!(v.as_array().map(Vec::len), Some(0), "{v}");

        // Rent for 20 s (20 sat at 1 sat/s).
        let doc = dir.path().join("cell.yaml");
        std::fs::write(&doc, SLEEPER).unwrap();
        let tok = dir.path().join("t1");
        std::fs::write(&tok, token(&mint.url, 20).await).unwrap();
        let (code, reply, err) = rent_cli(&relay, &me, &npub, &tok, &doc).await;
        assert_eq!(code, 0, "{reply} {err}\nlog:\n{}", p.log());
        assert_eq!(reply["ok"], true);
        assert_eq!(
            (reply["paidMsat"].as_u64(), reply["seconds"].as_u64()),
            (Some(20_000), Some(20))
        );
        let id = reply["cell"]["id"].as_str().unwrap().to_string();
        assert_eq!(reply["cell"]["host"], "127.0.0.1");
        assert_eq!(reply["cell"]["state"], "running");
        assert!(reply["cell"]["expiresInSeconds"].as_u64().unwrap() <= 20);

        // The offer is republished with the tier full, and the heartbeat
        // shows the node's real free capacity; a second rent is refused
        // before redemption.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v, _) = market_cli(&relay, &me, &["offers"]).await;
            let l = &v[0];
            let full = l["offer"]["cellhost"]["tiers"][0]["available"] == false;
            let free = l["heartbeat"]["freeCpus"].as_f64().unwrap_or(-1.0);
            // A heartbeat sent while the create ran already shows the
            // room taken but no cell running yet: wait for a later one.
            let running = l["heartbeat"]["runningCells"] == 1;
            if full && (free - 0.25).abs() < 1e-6 && running {
                break;
            }
            assert!(Instant::now() < until, "offer not republished as full: {l}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let t = token(&mint.url, 10).await;
        let tok_full = dir.path().join("t-full");
        std::fs::write(&tok_full, &t).unwrap();
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, SLEEPER.replace("cpus: 0.25", "cpus: 0.5")).unwrap();
        let (code, reply, _) = rent_cli(&relay, &me, &npub, &tok_full, &big).await;
        assert_eq!(
            (code, reply["error"]["code"].as_str()),
            (5, Some("no_capacity")),
            "{reply}"
        );
        assert_eq!(redeem(&mint.url, &t).await.unwrap(), 10);

        // The daemon runs it, owned by the consumer's key, with the offer's
        // size filled in and the paid lease.
        let v = p.operator(&["inspect", &id]);
        assert_eq!(v["observed"], "running");
        let me_hex =
            Keys::new(SecretKey::parse(std::fs::read_to_string(&me).unwrap().trim()).unwrap())
                .public_key()
                .to_hex();
        assert_eq!(v["owner"], format!("nostr:{me_hex}"));
        assert_eq!(v["document"]["spec"]["lifetime"]["ttlSeconds"], 20);
        assert_eq!(v["document"]["spec"]["resources"]["memoryMiB"], 32);
        let before = rfc3339_ms(v["expiresAt"].as_str().unwrap());

        // Top up 6 s: expires_at moves by exactly 6000 ms.
        let tok2 = dir.path().join("t2");
        std::fs::write(&tok2, token(&mint.url, 6).await).unwrap();
        let (code, reply, err) = market_cli(
            &relay,
            &me,
            &["topup", &npub, &id, "--token-file", tok2.to_str().unwrap()],
        )
        .await;
        assert_eq!(code, 0, "{reply} {err}");
        assert_eq!(
            (reply["paidMsat"].as_u64(), reply["seconds"].as_u64()),
            (Some(6_000), Some(6))
        );
        let v = p.operator(&["inspect", &id]);
        let after = rfc3339_ms(v["expiresAt"].as_str().unwrap());
        assert_eq!(after - before, 6000);
        assert_eq!(
            rfc3339_ms(reply["cell"]["expiresAt"].as_str().unwrap()),
            after
        );

        // Status answers for the owner.
        let (code, reply, _) = market_cli(&relay, &me, &["status", &npub, &id]).await;
        assert_eq!(
            (code, reply["cell"]["state"].as_str()),
            (0, Some("running"))
        );

        // The lease ends on its own: the daemon's reaper destroys the cell.
        let until = Instant::now() + Duration::from_secs(40);
        while p.cells().iter().any(|c| c["id"] == id.as_str()) {
            assert!(Instant::now() < until, "cell outlived its lease");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let events = p.events();
        let kinds: Vec<&str> = events
            .iter()
            .filter(|e| e["subject"] == id.as_str())
            .filter_map(|e| e["type"].as_str())
            .collect();
        assert!(kinds.contains(&"cellhost.cell.extended"), "{kinds:?}");
        assert!(kinds.contains(&"cellhost.cell.destroyed"), "{kinds:?}");
        // A top-up for a cell whose lease ended (and which is gone) is
        // refused before redemption: the token stays the consumer's.
        let late = token(&mint.url, 6).await;
        std::fs::write(&tok2, &late).unwrap();
        let (code, reply, _) = market_cli(
            &relay,
            &me,
            &["topup", &npub, &id, "--token-file", tok2.to_str().unwrap()],
        )
        .await;
        assert_eq!(code, 5);
        assert_eq!(reply["error"]["code"], "not_found");
        assert_eq!(redeem(&mint.url, &late).await.unwrap(), 6);

        // Room again: the offer says so.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v, _) = market_cli(&relay, &me, &["offers", "--tier", "process"]).await;
            if v.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
            assert!(Instant::now() < until, "offer not republished as available");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // The ledger has each request once, with its outcome; no token.
        let entries = p.ledger().entries().unwrap();
        let outcomes: Vec<(&str, Option<&str>)> = entries
            .iter()
            .map(|e| (e.op.as_str(), e.outcome.as_deref()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("spawn", Some("ok")),
                ("spawn", Some("no_capacity")),
                ("topup", Some("ok")),
                ("status", Some("ok")),
                ("topup", Some("not_found"))
            ]
        );
        for f in ["ledger.sqlite", "ledger.sqlite-wal"] {
            let db = std::fs::read(p.state_dir().join("market").join(f)).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&db).contains("cashu"),
                "a token reached {f}"
            );
        }
        assert!(!p.log().contains("cashuB"), "a token reached the log");
        // What each request cost the provider, for the record.
        for l in p
            .log()
            .lines()
            .filter(|l| l.contains(" ms") && l.contains("market: "))
        {
            eprintln!("{l}");
        }
    });
}

/// Every refusal that must take nothing, the refund when provisioning
/// fails after redemption, replays, third parties and hostile DMs.
#[test]
fn refusals_take_nothing_failures_refund_and_replays_do_nothing() {
    require_process_tier!();
    let rt = common::rt_multi();
    rt.block_on(async {
        let mint = start_mint().await;
        let other_mint = start_mint().await;
        let (_relay, relay) = start_relay().await;
        let mut p = Provider::start(&relay, &mint.url);
        let alice = consumer(&relay).await;
        let pk = wait_live_offer(&alice, &p).await;
        let relays = [relay.clone()];

        // A spent token is refused (by the mint, at redemption) and no cell
        // is made.
        let spent = token(&mint.url, 10).await;
        assert_eq!(redeem(&mint.url, &spent).await.unwrap(), 10);
        let r = alice
            .request(pk, &relays, &spawn_req(spent, Some(SLEEPER)), TIMEOUT)
            .await
            .unwrap();
        assert_eq!(code(&r), Some(ErrorCode::TokenSpent), "{r:?}");
        assert!(p.cells().is_empty());

        // A token from a mint not on the list is refused without the
        // provider ever contacting that mint.
        let foreign = token(&other_mint.url, 10).await;
        let hits = other_mint.hits.load(Ordering::SeqCst);
        let r = alice
            .request(
                pk,
                &relays,
                &spawn_req(foreign.clone(), Some(SLEEPER)),
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(code(&r), Some(ErrorCode::MintNotAccepted), "{r:?}");
        assert_eq!(
            other_mint.hits.load(Ordering::SeqCst),
            hits,
            "the provider contacted the foreign mint"
        );
        assert_eq!(
            redeem(&other_mint.url, &foreign).await.unwrap(),
            10,
            "the foreign token was spent"
        );

        // Refusals before redemption leave the token spendable: too little
        // for the minimum, a document too big for the offer, a bad one.
        for (sat, doc, want) in [
            (
                MIN_SECONDS - 1,
                SLEEPER.to_string(),
                ErrorCode::AmountTooSmall,
            ),
            (
                MAX_SECONDS + 1,
                SLEEPER.to_string(),
                ErrorCode::AmountTooLarge,
            ),
            (
                10,
                SLEEPER.replace("memoryMiB: 32", "memoryMiB: 128"),
                ErrorCode::ExceedsOffer,
            ),
            (
                10,
                SLEEPER.replace("command", "comand"),
                ErrorCode::InvalidDocument,
            ),
            (
                10,
                SLEEPER.replace("process", "vm"),
                ErrorCode::InvalidDocument,
            ),
            // The operator's policy, asked before the token: a host path
            // as the image (the spec refuses it), a privileged port, an
            // egress rule to the cloud's metadata service.
            (
                10,
                SLEEPER.replace("command:", "image: /var/lib/cellhost\n  command:"),
                ErrorCode::InvalidDocument,
            ),
            (
                10,
                SLEEPER.replace(
                    "command:",
                    "network: { mode: bridged }\n  ports: [ { container: 80, host: 80 } ]\n  command:",
                ),
                ErrorCode::PolicyRefused,
            ),
            (
                10,
                SLEEPER.replace(
                    "command:",
                    "network: { mode: bridged, egress: [ { cidr: 169.254.169.254/32 } ] }\n  command:",
                ),
                ErrorCode::PolicyRefused,
            ),
        ] {
            let t = token(&mint.url, sat).await;
            let r = alice
                .request(pk, &relays, &spawn_req(t.clone(), Some(&doc)), TIMEOUT)
                .await
                .unwrap();
            assert_eq!(code(&r), Some(want), "{r:?}");
            assert!(r.error.as_ref().unwrap().field.is_some(), "{r:?}");
            assert_eq!(
                redeem(&mint.url, &t).await.unwrap(),
                sat,
                "{want:?} took the token"
            );
        }
        assert!(p.cells().is_empty());

        // Provisioning fails after redemption (an image the provider's store
        // does not hold: only the backend finds out): the reply refunds it all,
        // and the refund redeems at the mint for the full amount.
        let paid = token(&mint.url, 10).await;
        let missing = SLEEPER.replace(
            "command:",
            "image: no-such-image\n  command:",
        );
        let r = alice
            .request(
                pk,
                &relays,
                &spawn_req(paid.clone(), Some(&missing)),
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(code(&r), Some(ErrorCode::ProvisionFailed), "{r:?}");
        assert!(matches!(
            redeem(&mint.url, &paid).await,
            Err(cdk::Error::TokenAlreadySpent)
        ));
        let refund = r.refund.clone().expect("a refund token");
        assert_eq!(redeem(&mint.url, &refund).await.unwrap(), 10);
        assert!(p.cells().is_empty());

        // A replayed request creates nothing: the same rumor in a new gift
        // wrap gets no second answer and no second cell.
        // It also brings credentials: they reach the cell as secrets, and
        // neither the daemon's store nor the logs see them.
        let mut req = spawn_req(token(&mint.url, 30).await, Some(SLEEPER));
        if let Request::Spawn(s) = &mut req {
            s.password = Some("correct-horse-battery-staple".into());
            s.ssh_key = Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIcellhosttest alice".into());
        }
        let rumor = EventBuilder::private_msg_rumor(pk, req.to_json()).build(alice.public_key());
        let rid = rumor.id.unwrap_or_else(|| rumor.clone().id());
        alice.send_rumor(pk, &relays, rumor.clone()).await.unwrap();
        let first = alice.wait_reply(pk, rid, TIMEOUT).await.unwrap();
        assert!(first.ok, "{first:?}");
        let cell = first.cell.clone().unwrap().id;
        assert_eq!(
            first.cell.as_ref().unwrap().credentials,
            ["ssh_authorized_keys", "password"]
        );
        let out = p.operator(&["exec", &cell, "--", "/bin/cat", "/run/secrets/password"]);
        assert_eq!(out["stdout"], "correct-horse-battery-staple", "{out}");
        let db = std::fs::read(p.state_dir().join("cellhost.db")).unwrap();
        let wal = std::fs::read(p.state_dir().join("cellhost.db-wal")).unwrap_or_default();
        for bytes in [&db, &wal] {
            let text = String::from_utf8_lossy(bytes);
            assert!(
                !text.contains("correct-horse") && !text.contains("cashuB"),
                "a secret reached the store"
            );
        }
        alice.send_rumor(pk, &relays, rumor.clone()).await.unwrap();
        // Its one reply is on the relay; a second would be a new event.
        let n_replies = count_replies(&alice, pk, rid).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(count_replies(&alice, pk, rid).await, n_replies);
        assert_eq!(n_replies, 1);
        assert_eq!(p.cells().len(), 1);
        assert_eq!(
            p.ledger()
                .get(&rid.to_hex())
                .unwrap()
                .unwrap()
                .outcome
                .as_deref(),
            Some("ok")
        );
        assert!(
            p.log().contains("seen before; not run again"),
            "{}",
            p.log()
        );
        // And after a restart of the daemon: the ledger remembers.
        p.restart();
        wait_live_offer(&alice, &p).await;
        alice.send_rumor(pk, &relays, rumor.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(count_replies(&alice, pk, rid).await, 1);
        assert_eq!(p.cells().len(), 1);

        // A request signed an hour ago (a provider that was down, relays
        // that kept it) is refused unpaid.
        let t = token(&mint.url, 10).await;
        let old =
            EventBuilder::private_msg_rumor(pk, spawn_req(t.clone(), Some(SLEEPER)).to_json())
                .custom_created_at(Timestamp::from(Timestamp::now().as_secs() - 3600))
                .build(alice.public_key());
        let old_id = old.id.unwrap_or_else(|| old.clone().id());
        alice.send_rumor(pk, &relays, old).await.unwrap();
        let r = alice.wait_reply(pk, old_id, TIMEOUT).await.unwrap();
        assert_eq!(code(&r), Some(ErrorCode::StaleRequest), "{r:?}");
        assert_eq!(redeem(&mint.url, &t).await.unwrap(), 10);

        // An offer naming the provider but signed by another key is not
        // listed.
        let mallory = consumer(&relay).await;
        let mut forged = alice.offer_of(pk).await.unwrap().offer;
        forged.cellhost.tiers[0].price_msat_per_second = 1;
        mallory
            .client()
            .send_event_builder(
                EventBuilder::new(Kind::Custom(38383), serde_json::to_string(&forged).unwrap())
                    .tags([
                        Tag::identifier("cellhost:offer:v1"),
                        Tag::hashtag("cellhost"),
                    ]),
            )
            .await
            .unwrap();
        let list = alice.offers(&OfferFilter::default()).await.unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].provider, pk.to_hex());
        assert_eq!(
            list[0].offer.cellhost.tiers[0].price_msat_per_second,
            PRICE_MSAT
        );

        // A third party can neither see, stop nor top up alice's cell, and
        // its top-up token is not taken.
        for req in [
            Request::Status {
                cellhost: VERSION,
                cell: cell.clone(),
            },
            Request::Stop {
                cellhost: VERSION,
                cell: cell.clone(),
            },
        ] {
            let r = mallory.request(pk, &relays, &req, TIMEOUT).await.unwrap();
            assert_eq!(code(&r), Some(ErrorCode::NotFound), "{r:?}");
        }
        let t = token(&mint.url, 10).await;
        let r = mallory
            .request(
                pk,
                &relays,
                &Request::Topup {
                    cellhost: VERSION,
                    cell: cell.clone(),
                    token: t.clone(),
                },
                TIMEOUT,
            )
            .await
            .unwrap();
        assert_eq!(code(&r), Some(ErrorCode::NotFound), "{r:?}");
        assert_eq!(redeem(&mint.url, &t).await.unwrap(), 10);
        let v = p.operator(&["inspect", &cell]);
        assert_eq!(v["observed"], "running");
        assert_eq!(v["document"]["spec"]["lifetime"]["ttlSeconds"], 30);

        // Hostile DMs: garbage in well-formed gift wraps (answered with a
        // code), and garbage gift wraps (dropped); the provider lives on.
        let fuzz = hostile_contents();
        let n = fuzz.len();
        for (i, content) in fuzz.into_iter().enumerate() {
            let r = mallory
                .request_raw(
                    pk,
                    &relays,
                    content,
                    if i < 4 { TIMEOUT } else { Duration::ZERO },
                )
                .await;
            if i < 4 {
                let r = r.unwrap();
                assert!(!r.ok && r.error.is_some(), "{r:?}");
            }
        }
        for _ in 0..20 {
            let junk = EventBuilder::new(Kind::GiftWrap, random_text(200))
                .tag(Tag::public_key(pk))
                .sign_with_keys(&Keys::generate())
                .unwrap();
            mallory.client().send_event(&junk).await.unwrap();
        }
        // Still serving, and still right: alice stops her cell.
        let r = alice
            .request(
                pk,
                &relays,
                &Request::Stop {
                    cellhost: VERSION,
                    cell: cell.clone(),
                },
                TIMEOUT,
            )
            .await
            .unwrap();
        assert!(r.ok, "{r:?} after {n} hostile DMs; log:\n{}", p.log());
        assert_eq!(r.cell.unwrap().state, "destroyed");
        assert!(p.cells().is_empty());
        assert!(!p.log().contains("panicked"), "{}", p.log());
    });
}

/// A crash mid-request is settled at the next start, never lost. The
/// daemon is killed (by the failpoints of the test build, as `kill -9`
/// would) at five points: a spawn's token redeemed, no cell yet; the cell
/// made, no answer yet; a top-up's token redeemed, no extension yet; the
/// extension made, no answer yet; a spawn about to redeem. Restarted, it
/// answers each: a refund for what it did not deliver (redeemable for the
/// full amount), the cell or extension for what it did, `interrupted`
/// when nothing was taken (the token still spendable). The consumer's
/// `rent` waits through the crash; `market reply` fetches an answer later.
#[test]
fn a_crash_mid_request_is_settled_at_the_next_start() {
    require_process_tier!();
    let rt = common::rt_multi();
    rt.block_on(async {
        let mint = start_mint().await;
        let (_relay, relay) = start_relay().await;
        let mut p = Provider::armed(&relay, &mint.url, "market-spawn-redeemed=return");
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("alice.key");
        let keys = cellhost_market::keys::nostr_keys(&identity).unwrap();
        let alice = Consumer::connect(keys, std::slice::from_ref(&relay), Duration::from_secs(5))
            .await
            .unwrap();
        let pk = wait_live_offer(&alice, &p).await;
        let npub = pk.to_bech32().unwrap();
        let relays = [relay.clone()];
        let send = |req: Request| {
            let alice = &alice;
            let relays = &relays;
            async move {
                match alice
                    .request_raw(pk, relays, req.to_json(), Duration::ZERO)
                    .await
                {
                    Err(cellhost_market::MarketError::NoReply { request, .. }) => request,
                    other => panic!("{other:?}"),
                }
            }
        };

        // 1. Killed after the spawn's token was redeemed, before the cell.
        let t1 = token(&mint.url, 10).await;
        let rid = send(spawn_req(t1.clone(), Some(SLEEPER))).await;
        p.crashed();
        let e = p.ledger().get(&rid).unwrap().unwrap();
        assert_eq!(e.outcome, None, "{e:?}");
        let taken = e.redeemed.clone().expect("the redemption is on record");
        assert_eq!((taken.msat, taken.seconds), (10_000, 10), "{e:?}");
        assert!(
            matches!(
                redeem(&mint.url, &t1).await,
                Err(cdk::Error::TokenAlreadySpent)
            ),
            "the token was not taken"
        );
        p.respawn(None);
        let (exit, v, err) = market_cli(&relay, &identity, &["reply", &npub, &rid]).await;
        assert_eq!(exit, 5, "{v} {err}");
        assert_eq!(v["error"]["code"], "provision_failed", "{v}");
        assert_eq!(v["paidMsat"], 10_000, "{v}");
        let refund = v["refund"].as_str().expect("a refund token");
        assert_eq!(redeem(&mint.url, refund).await.unwrap(), 10);
        let e = p.ledger().get(&rid).unwrap().unwrap();
        assert_eq!(e.outcome.as_deref(), Some("provision_failed"), "{e:?}");

        // 2. Killed after the cell was made, before the answer: `rent`
        //    waits through the crash and gets the cell (a lease long
        //    enough for the steps below on a loaded machine).
        p.respawn(Some("market-spawn-created=return"));
        let (tf, df) = (dir.path().join("t2"), dir.path().join("doc.yaml"));
        std::fs::write(&tf, token(&mint.url, 300).await).unwrap();
        std::fs::write(&df, SLEEPER).unwrap();
        let rent = {
            let (relay, identity, npub) = (relay.clone(), identity.clone(), npub.clone());
            tokio::spawn(async move { rent_cli(&relay, &identity, &npub, &tf, &df).await })
        };
        p.crashed();
        let cut = p
            .ledger()
            .entries()
            .unwrap()
            .into_iter()
            .find(|e| e.outcome.is_none())
            .expect("the spawn is unfinished");
        let rid = cut.id.clone();
        p.respawn(None);
        let (exit, v, err) = rent.await.unwrap();
        assert_eq!(exit, 0, "{v} {err}");
        assert_eq!(
            (v["paidMsat"].as_u64(), v["seconds"].as_u64()),
            (Some(300_000), Some(300)),
            "{v}"
        );
        let id = v["cell"]["id"].as_str().unwrap().to_string();
        let cells = p.cells();
        assert_eq!(cells.len(), 1, "{cells:?}");
        assert_eq!(cells[0]["id"], id.as_str());
        assert_eq!(
            cells[0]["owner"],
            format!("nostr:{}", alice.public_key().to_hex())
        );
        assert_eq!(
            cells[0]["document"]["metadata"]["labels"]["market.cellhost.dev/request"],
            rid.as_str()
        );
        let e = p.ledger().get(&rid).unwrap().unwrap();
        assert_eq!(
            (e.outcome.as_deref(), e.cell.as_deref()),
            (Some("ok"), Some(id.as_str()))
        );
        // The answer is on the relay for later, too.
        let (exit, again, _) = market_cli(&relay, &identity, &["reply", &npub, &rid]).await;
        assert_eq!((exit, &again["cell"]["id"]), (0, &v["cell"]["id"]));

        // 3. Killed after a top-up's token was redeemed, before the extend.
        p.respawn(Some("market-topup-redeemed=return"));
        let before = lease_end(&p, &id);
        let topup = |token: String| Request::Topup {
            cellhost: VERSION,
            cell: id.clone(),
            token,
        };
        let rid = send(topup(token(&mint.url, 6).await)).await;
        p.crashed();
        let e = p.ledger().get(&rid).unwrap().unwrap();
        let taken = e.redeemed.clone().expect("the redemption is on record");
        assert_eq!(
            (taken.msat, taken.seconds, taken.cell.as_deref()),
            (6000, 6, Some(id.as_str())),
            "{e:?}"
        );
        let r = settled(&mut p, &alice, pk, &rid).await;
        assert_eq!(code(&r), Some(ErrorCode::ProvisionFailed), "{r:?}");
        let refund = r.refund.as_deref().expect("a refund token");
        assert_eq!(redeem(&mint.url, refund).await.unwrap(), 6);

        // 4. Killed after the extend, before the answer: delivered (the
        //    cell's event log holds the extension), not refunded.
        p.respawn(Some("market-topup-extended=return"));
        let rid = send(topup(token(&mint.url, 7).await)).await;
        let r = settled(&mut p, &alice, pk, &rid).await;
        assert!(r.ok, "{r:?}");
        assert_eq!((r.refund.as_deref(), r.seconds), (None, Some(7)), "{r:?}");
        assert_eq!(lease_end(&p, &id), before + 7000);
        assert_eq!(rfc3339_ms(&r.cell.unwrap().expires_at), before + 7000);
        let tagged: Vec<Value> = p
            .events()
            .into_iter()
            .filter(|e| e["type"] == "cellhost.cell.extended")
            .map(|e| e["data"]["request"].clone())
            .collect();
        assert_eq!(tagged, [Value::from(rid.as_str())], "{tagged:?}");

        // 5. Killed before the token was redeemed: answered `interrupted`,
        //    the token still the consumer's.
        p.respawn(Some("market-before-redeem=return"));
        let t5 = token(&mint.url, 10).await;
        let rid = send(spawn_req(t5.clone(), Some(SLEEPER))).await;
        let r = settled(&mut p, &alice, pk, &rid).await;
        assert_eq!(code(&r), Some(ErrorCode::Interrupted), "{r:?}");
        assert_eq!(redeem(&mint.url, &t5).await.unwrap(), 10);
        assert_eq!(p.cells().len(), 1, "{:?}", p.cells());

        let log = p.log();
        assert_eq!(
            log.matches("cut short by a crash after").count(),
            4,
            "{log}"
        );
        assert_eq!(log.matches("with no payment on record").count(), 1, "{log}");
        alice.shutdown().await;
    });
}

/// The daemon died at its failpoint: start it unarmed and wait for the
/// answer to `rid` the restart settles.
async fn settled(p: &mut Provider, c: &Consumer, provider: PublicKey, rid: &str) -> Reply {
    p.crashed();
    p.respawn(None);
    c.wait_reply(provider, EventId::from_hex(rid).unwrap(), TIMEOUT)
        .await
        .unwrap()
}

/// The end of cell `id`'s lease as the operator sees it, unix ms.
fn lease_end(p: &Provider, id: &str) -> u128 {
    rfc3339_ms(p.operator(&["inspect", id])["expiresAt"].as_str().unwrap())
}

fn code(r: &Reply) -> Option<ErrorCode> {
    r.error.as_ref().map(|e| e.code)
}

/// Replies to `rid` from `provider` stored on the relay.
async fn count_replies(c: &Consumer, provider: PublicKey, rid: EventId) -> usize {
    let evs = c
        .client()
        .fetch_events(
            Filter::new().kind(Kind::GiftWrap).pubkey(c.public_key()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let mut n = 0;
    for ev in evs.iter() {
        if let Ok(g) = nostr_sdk::nips::nip59::UnwrappedGift::from_gift_wrap(c.keys(), ev).await
            && g.sender == provider
            && serde_json::from_str::<Reply>(&g.rumor.content).is_ok_and(|r| r.re == rid.to_hex())
        {
            n += 1;
        }
    }
    n
}

/// Request contents no honest client sends.
fn hostile_contents() -> Vec<String> {
    let mut v = vec![
        "not json at all".to_string(),
        r#"{"op":"spawn","tier":"process","token":"cashuBnotatoken"}"#.to_string(),
        r#"{"op":"spawn","tier":"process","token":"x","document":"spec: [unclosed"}"#.to_string(),
        // Over the provider's cap, under what NIP-44 can carry.
        format!(r#"{{"op":"stop","cell":"{}"}}"#, "A".repeat(36_000)),
        r#"{"op":"format-c"}"#.to_string(),
        r#"{"op":"topup","cell":"../../etc","token":"cashuA"}"#.to_string(),
        r#"{"op":"status","cell":"x","cellhost":99}"#.to_string(),
        r#"{"op":"spawn","tier":"process","token":"t","volumeKey":"zz","document":"{}"}"#
            .to_string(),
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".repeat(100),
        r#"{"op":"spawn","tier":"process","token":"cashuB"}"#.to_string(),
        String::new(),
    ];
    for i in 0..20 {
        v.push(random_text(1 + i * 37));
    }
    v
}

fn random_text(n: usize) -> String {
    let mut b = vec![0u8; n];
    cellhost_core::ids::fill_random(&mut b);
    String::from_utf8_lossy(&b).to_string()
}

// ------------------------------------------------------------ tenant API

/// One request a stranger tries: what it is, method, path and query,
/// body, Authorization header, and the status and code it must get.
type Attempt = (
    &'static str,
    &'static str,
    String,
    Vec<u8>,
    Option<String>,
    u16,
    &'static str,
);

/// The local address a `market port-forward` child prints on stderr.
async fn forwarding_address(child: &mut tokio::process::Child) -> std::net::SocketAddr {
    use tokio::io::AsyncBufReadExt;
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let read = async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if let Some(rest) = l.strip_prefix("forwarding ") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            eprintln!("port-forward: {l}");
        }
        panic!("port-forward ended without forwarding");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("port-forward started in 60 s")
}

/// An HTTP/1.0 GET of `path` on `addr`: the whole response.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: cell\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("a response in 30 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// `cellhost market SUB --relay R --identity I ARGS…`, output as is.
async fn market_raw(
    relay: &str,
    identity: &Path,
    sub: &str,
    args: &[&str],
) -> std::process::Output {
    tokio::process::Command::new(common::cellhost_bin())
        .args(["market", sub, "--relay", relay, "--identity"])
        .arg(identity)
        .args(["--timeout", "30"])
        .args(args)
        .output()
        .await
        .unwrap()
}

/// A renter reaches the cell it paid for through the provider's tenant
/// API: found through the signed offer, the certificate pinned from it,
/// every request signed by the renter's key (NIP-98). Then what an
/// attacker tries: another key, a replay, a stale or misaddressed
/// signature, a body swapped under its signature, no signature at all.
#[test]
fn a_renter_reaches_its_cell_through_the_signed_tenant_api() {
    use cellhost_access::client::PinnedClient;
    use cellhost_access::nip98::{now, sign};
    use hyper::header::{AUTHORIZATION, HeaderValue};

    require_process_tier!();
    let rt = common::rt_multi();
    rt.block_on(async {
        let mint = start_mint().await;
        let (_relay, relay) = start_relay().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let p = Provider::start_with(&relay, &mint.url, &["--tenant-listen", &listen]);
        let dir = tempfile::tempdir().unwrap();
        let me = dir.path().join("me.key");
        let c = consumer(&relay).await;
        let provider = wait_live_offer(&c, &p).await;
        let npub = provider.to_bech32().unwrap();

        // The offer names the API and the fingerprint of the certificate
        // the daemon made in <state>/tls/.
        let offer = c.offer_of(provider).await.unwrap().offer;
        let api = offer.cellhost.api.expect("the offer names the tenant API");
        let url = format!("https://{listen}");
        assert_eq!(api.url, url);
        let der = std::fs::read(p.state_dir().join("tls/cert.der")).unwrap();
        assert_eq!(
            api.tls_sha256,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&der))
        );

        // Rent a cell that says hello and stays up.
        let doc = dir.path().join("cell.yaml");
        std::fs::write(
            &doc,
            SLEEPER.replace(
                "command: [/bin/sleep, '600']",
                "command: [/bin/sh, -c, 'echo hello-from-the-cell; echo forty-two > /tmp/index.html; \
                 exec busybox httpd -f -p 127.0.0.1:8080 -h /tmp']",
            ),
        )
        .unwrap();
        let tok = dir.path().join("t1");
        std::fs::write(&tok, token(&mint.url, 120).await).unwrap();
        let (code, reply, err) = rent_cli(&relay, &me, &npub, &tok, &doc).await;
        assert_eq!(code, 0, "{reply} {err}\nlog:\n{}", p.log());
        let id = reply["cell"]["id"].as_str().unwrap().to_string();
        assert_eq!(reply["cell"]["api"], format!("{url}/v1/cells/{id}"));

        // inspect, logs, exec: the renter's key signs; the CLI pins.
        let out = market_raw(&relay, &me, "inspect", &[&npub, &id]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let view: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(view["id"], id.as_str());
        assert_eq!(view["observed"], "running");
        let mut logs = String::new();
        let until = Instant::now() + Duration::from_secs(10);
        while !logs.contains("hello-from-the-cell") {
            assert!(Instant::now() < until, "no hello in the logs: {logs:?}");
            let out = market_raw(&relay, &me, "logs", &[&npub, &id]).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            logs = String::from_utf8_lossy(&out.stdout).to_string();
        }
        let out = market_raw(
            &relay,
            &me,
            "exec",
            &[&npub, &id, "--", "/bin/sh", "-c", "echo $((6*7)); exit 3"],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

        // Another key's signature on my cell: not found, as if missing.
        let other = dir.path().join("other.key");
        let out = market_raw(&relay, &other, "inspect", &[&npub, &id]).await;
        assert_eq!(out.status.code(), Some(5));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Port forwarding: the cell's HTTP server listens on the cell's own
        // loopback only; a local port reaches it through the API.
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let probe = ["--", "busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/"];
            let out = market_raw(&relay, &me, "exec", &[&[npub.as_str(), id.as_str()][..], &probe[..]].concat()).await;
            if String::from_utf8_lossy(&out.stdout).contains("forty-two") {
                break;
            }
            assert!(Instant::now() < until, "httpd never answered in the cell");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut fwd = tokio::process::Command::new(common::cellhost_bin())
            .args(["market", "port-forward", "--relay", &relay, "--identity"])
            .arg(&me)
            .args([&npub, &id, "127.0.0.1:0:8080"])
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let local = forwarding_address(&mut fwd).await;
        for _ in 0..3 {
            let page = http_get(local, "/index.html").await;
            assert!(page.starts_with("HTTP/1.") && page.contains("forty-two"), "{page}");
        }
        fwd.kill().await.unwrap();

        // A port the cell does not listen on, which the host does: the
        // connection is made inside the cell, so the host's service is
        // never reached.
        let host_service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        host_service.set_nonblocking(true).unwrap();
        let hp = host_service.local_addr().unwrap().port().to_string();
        let out = market_raw(&relay, &me, "port-forward", &[&npub, &id, &format!("0:{hp}")]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{err}");
        assert!(err.contains("port_closed"), "{err}");
        assert_eq!(
            host_service.accept().map(|_| ()).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the host's own service was reached from the tenant API"
        );
        // Another key cannot forward into my cell.
        let other_fwd = market_raw(&relay, &other, "port-forward", &[&npub, &id, "0:8080"]).await;
        assert_eq!(other_fwd.status.code(), Some(5));
        assert!(String::from_utf8_lossy(&other_fwd.stderr).contains("not found"));

        // By hand: the same pinned TLS, headers signed by the test.
        let keys = cellhost_market::keys::nostr_keys(&me).unwrap();
        let pin = api.tls_sha256.parse().unwrap();
        let raw = PinnedClient::new(&url, pin, None).unwrap();
        let path = format!("/v1/cells/{id}");
        let send = |method: &'static str, pq: String, body: Vec<u8>, auth: Option<String>| {
            let raw = &raw;
            async move {
                let h: Vec<_> = auth
                    .map(|a| (AUTHORIZATION, HeaderValue::from_str(&a).unwrap()))
                    .into_iter()
                    .collect();
                let r = raw.send(method, &pq, body, &h).await.unwrap();
                let status = r.status().as_u16();
                let body = http_body_util::BodyExt::collect(r.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let v = serde_json::from_slice::<Value>(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                (status, v)
            }
        };
        let signed = |method: &str, pq: &str, body: &[u8], at: u64| {
            sign(&keys, method, &format!("{url}{pq}"), body, at).unwrap()
        };

        let h = signed("GET", &path, b"", now());
        let (status, v) = send("GET", path.clone(), vec![], Some(h.clone())).await;
        assert_eq!((status, v["id"].as_str()), (200, Some(id.as_str())), "{v}");
        // The same signed request again: a replay.
        let (status, v) = send("GET", path.clone(), vec![], Some(h)).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (401, Some("auth_replayed")),
            "{v}"
        );
        // Signed two minutes ago.
        // What a stranger tries, each with the code it must get.
        let exec = format!("{path}/exec");
        let harmless = br#"{"argv":["true"]}"#;
        let evil = br#"{"argv":["/bin/sh","-c","echo swapped"]}"#.to_vec();
        let stranger = Keys::generate();
        let extend = format!("{path}/extend");
        let extend_body = br#"{"seconds":3600}"#;
        // (what, method, path and query, body, Authorization, status, code)
        let cases: Vec<Attempt> = vec![
            (
                "signed two minutes ago",
                "GET",
                path.clone(),
                vec![],
                Some(signed("GET", &path, b"", now() - 120)),
                401,
                "auth_expired",
            ),
            (
                "signed for another path",
                "GET",
                path.clone(),
                vec![],
                Some(signed("GET", "/v1/cells", b"", now())),
                401,
                "auth_url_mismatch",
            ),
            (
                "a GET's signature on a DELETE",
                "DELETE",
                path.clone(),
                vec![],
                Some(signed("GET", &path, b"", now())),
                401,
                "auth_method_mismatch",
            ),
            (
                "a body swapped under its signature",
                "POST",
                exec.clone(),
                evil,
                Some(signed("POST", &exec, harmless, now())),
                401,
                "auth_payload_mismatch",
            ),
            (
                "a free cell: the renter's own key creates one",
                "POST",
                "/v1/cells".into(),
                SLEEPER.as_bytes().to_vec(),
                Some(signed("POST", "/v1/cells", SLEEPER.as_bytes(), now())),
                403,
                "payment_required",
            ),
            (
                "free time: the renter's own key extends its lease",
                "POST",
                extend.clone(),
                extend_body.to_vec(),
                Some(signed("POST", &extend, extend_body, now())),
                403,
                "payment_required",
            ),
            (
                "no signature",
                "GET",
                path.clone(),
                vec![],
                None,
                401,
                "unauthorized",
            ),
            (
                "a bearer token nobody issued",
                "GET",
                path.clone(),
                vec![],
                Some("Bearer 0123456789abcdef0123".into()),
                401,
                "unauthorized",
            ),
            (
                "another key, signed right",
                "DELETE",
                path.clone(),
                vec![],
                Some(sign(&stranger, "DELETE", &format!("{url}{path}"), b"", now()).unwrap()),
                404,
                "not_found",
            ),
        ];
        for (what, method, pq, body, auth, want, code) in cases {
            let (status, v) = send(method, pq, body, auth).await;
            assert_eq!(
                (status, v["code"].as_str()),
                (want, Some(code)),
                "{what}: {v}"
            );
        }
        // The cell is untouched by all of that.
        let h = signed("GET", &path, b"", now());
        let (status, v) = send("GET", path.clone(), vec![], Some(h)).await;
        assert_eq!(
            (status, v["observed"].as_str()),
            (200, Some("running")),
            "{v}"
        );
        // The renter may end it through the API.
        let h = signed("DELETE", &path, b"", now());
        let (status, v) = send("DELETE", path.clone(), vec![], Some(h)).await;
        assert_eq!(status, 200, "{v}");
        let out = market_raw(&relay, &me, "inspect", &[&npub, &id]).await;
        assert_eq!(out.status.code(), Some(5));
        c.shutdown().await;
    });
}
