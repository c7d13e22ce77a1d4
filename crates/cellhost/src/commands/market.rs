//! `cellhost market …`: the consumer's commands.
//!
//! Tokens, keys and passwords come from files (or stdin), never argv. The
//! consumer's Nostr key lives in a 0600 file, generated on first use: the
//! cells it rents belong to it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cellhost_access::client::PinnedClient;
use cellhost_core::ids::CellId;
use cellhost_market::consumer::{Consumer, Listing, OfferFilter, parse_pubkey, parse_request_id};
use cellhost_market::proto::{Reply, Request, SpawnRequest, VERSION};
use http_body_util::BodyExt;
use zeroize::Zeroizing;

use crate::cli::{MarketCommand, MarketOpt};
use crate::{EXIT_RUNTIME, EXIT_USAGE, exit_err};

/// Exit code of a request the provider refused.
pub const EXIT_REFUSED: u8 = 5;

fn identity_path(opt: &MarketOpt) -> anyhow::Result<PathBuf> {
    if let Some(p) = &opt.identity {
        return Ok(p.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| exit_err(EXIT_USAGE, "no --identity, XDG_CONFIG_HOME or HOME"))?;
    Ok(base.join("cellhost").join("nostr.key"))
}

async fn connect(opt: &MarketOpt) -> anyhow::Result<Consumer> {
    if opt.relays.is_empty() {
        return Err(exit_err(
            EXIT_USAGE,
            "--relay URL is required (or CELLHOST_MARKET_RELAYS)",
        ));
    }
    let keys = cellhost_market::keys::nostr_keys(&identity_path(opt)?)?;
    Ok(Consumer::connect(
        keys,
        &opt.relays,
        Duration::from_secs(opt.timeout.clamp(1, 600)),
    )
    .await?)
}

/// A secret file's text (`-`: stdin), trimmed of its final newline.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading the {what} from stdin"))?;
    } else {
        *text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the {what} from {}", path.display()))?;
    }
    let trimmed = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string());
    if trimmed.is_empty() {
        return Err(exit_err(
            EXIT_USAGE,
            format!("{}: the {what} is empty", path.display()),
        ));
    }
    Ok(trimmed)
}

pub async fn market(cmd: MarketCommand, json: bool) -> anyhow::Result<u8> {
    match cmd {
        MarketCommand::Offers {
            opt,
            tier,
            max_price,
        } => {
            let c = connect(&opt).await?;
            let list = c
                .offers(&OfferFilter {
                    tier,
                    max_price_msat: max_price,
                    provider: None,
                })
                .await?;
            c.shutdown().await;
            print_offers(&list, json)?;
            Ok(0)
        }
        MarketCommand::Rent {
            opt,
            offer,
            tier,
            token_file,
            doc,
            volume_key_file,
            ssh_key_file,
            password_file,
        } => {
            let token = read_secret(&token_file, "token")?;
            let document = match &doc {
                Some(f) => {
                    let bytes = crate::commands::remote::inline_document(f, json)?;
                    Some(String::from_utf8(bytes.to_vec()).context("the document is not UTF-8")?)
                }
                None => None,
            };
            let volume_key = match &volume_key_file {
                Some(f) => Some(crate::commands::run::read_volume_key(f)?.passphrase()),
                None => None,
            };
            let ssh_key = ssh_key_file
                .as_deref()
                .map(|f| read_secret(f, "SSH key"))
                .transpose()?;
            let password = password_file
                .as_deref()
                .map(|f| read_secret(f, "password"))
                .transpose()?;
            let req = Request::Spawn(SpawnRequest {
                cellhost: VERSION,
                tier,
                document,
                token: token.to_string(),
                volume_key: volume_key.map(|k| k.to_string()),
                ssh_key: ssh_key.map(|k| k.to_string()),
                password: password.map(|p| p.to_string()),
            });
            send(&opt, &offer, req, json).await
        }
        MarketCommand::Topup {
            opt,
            offer,
            cell,
            token_file,
        } => {
            let token = read_secret(&token_file, "token")?;
            let req = Request::Topup {
                cellhost: VERSION,
                cell,
                token: token.to_string(),
            };
            send(&opt, &offer, req, json).await
        }
        MarketCommand::Status { opt, offer, cell } => {
            send(
                &opt,
                &offer,
                Request::Status {
                    cellhost: VERSION,
                    cell,
                },
                json,
            )
            .await
        }
        MarketCommand::Stop { opt, offer, cell } => {
            send(
                &opt,
                &offer,
                Request::Stop {
                    cellhost: VERSION,
                    cell,
                },
                json,
            )
            .await
        }
        MarketCommand::Inspect { opt, offer, cell } => {
            let api = TenantApi::open(&opt, &offer, &cell).await?;
            let (status, body) = api
                .client
                .call("GET", &api.path(""), vec![], 1 << 20)
                .await?;
            let view = api.answer(status, &body)?;
            println!("{}", serde_json::to_string_pretty(&view)?);
            Ok(0)
        }
        MarketCommand::Logs {
            opt,
            offer,
            cell,
            follow,
        } => {
            let api = TenantApi::open(&opt, &offer, &cell).await?;
            let q = if follow { "/logs?follow=true" } else { "/logs" };
            let r = api.client.send("GET", &api.path(q), vec![], &[]).await?;
            let status = r.status().as_u16();
            let mut body = r.into_body();
            if status != 200 {
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                api.answer(status, &bytes)?;
                return Ok(EXIT_REFUSED);
            }
            let mut out = std::io::stdout().lock();
            while let Some(frame) = body.frame().await {
                let frame = frame.context("reading the log")?;
                if let Some(d) = frame.data_ref() {
                    out.write_all(d)?;
                    out.flush()?;
                }
            }
            Ok(0)
        }
        MarketCommand::Exec {
            opt,
            offer,
            cell,
            exec_timeout,
            argv,
        } => {
            let api = TenantApi::open(&opt, &offer, &cell).await?;
            let body = serde_json::json!({
                "argv": argv,
                "timeoutMs": exec_timeout.clamp(1, 3600) * 1000,
            });
            let (status, bytes) = api
                .client
                .call(
                    "POST",
                    &api.path("/exec"),
                    serde_json::to_vec(&body)?,
                    16 << 20,
                )
                .await?;
            let out = api.answer(status, &bytes)?;
            print!("{}", out["stdout"].as_str().unwrap_or_default());
            eprint!("{}", out["stderr"].as_str().unwrap_or_default());
            let code = out["exitCode"].as_i64().unwrap_or(1);
            Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
        }
        MarketCommand::PortForward {
            opt,
            offer,
            cell,
            forward,
        } => {
            let (local, port) = parse_forward(&forward)?;
            let api = TenantApi::open(&opt, &offer, &cell).await?;
            let listener = tokio::net::TcpListener::bind(local)
                .await
                .with_context(|| format!("binding {local}"))?;
            // Fail now, not at the first connection, when the cell or the
            // port cannot be reached.
            let path = api.path(&format!("/ports/{port}"));
            match api.client.websocket(&path).await {
                Ok(ws) => drop(ws),
                Err(e) => return Err(api.refusal(e)),
            }
            eprintln!(
                "forwarding {} → cell {} port {port} (Ctrl-C to stop)",
                listener.local_addr()?,
                api.cell
            );
            let api = std::sync::Arc::new(api);
            loop {
                let (tcp, peer) = tokio::select! {
                    a = listener.accept() => a?,
                    _ = tokio::signal::ctrl_c() => return Ok(0),
                };
                let (api, path) = (api.clone(), path.clone());
                tokio::spawn(async move {
                    match api.client.websocket(&path).await {
                        Ok(ws) => cellhost_access::client::pump_tcp(ws, tcp).await,
                        Err(e) => eprintln!("{peer}: {:#}", api.refusal(e)),
                    }
                });
            }
        }
        MarketCommand::Reply {
            opt,
            offer,
            request,
        } => {
            let provider = parse_pubkey(&offer).map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?;
            let rid =
                parse_request_id(&request).map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?;
            let c = connect(&opt).await?;
            let reply = c
                .wait_reply(provider, rid, Duration::from_secs(opt.timeout))
                .await;
            c.shutdown().await;
            finish(reply?, json)
        }
    }
}

/// One rented cell in its provider's tenant API.
struct TenantApi {
    client: PinnedClient,
    cell: String,
}

impl TenantApi {
    /// Find `offer`'s signed offer, and a client pinned to the certificate
    /// it names, signing with the consumer's key.
    async fn open(opt: &MarketOpt, offer: &str, cell: &str) -> anyhow::Result<TenantApi> {
        let cell = CellId::parse(cell)
            .map_err(|e| exit_err(EXIT_USAGE, format!("cell {cell:?}: {e}")))?
            .to_string();
        let provider = parse_pubkey(offer).map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?;
        let c = connect(opt).await?;
        let listing = c.offer_of(provider).await;
        let keys = c.keys().clone();
        c.shutdown().await;
        let listing = listing?;
        let Some(api) = listing.offer.cellhost.api else {
            return Err(exit_err(
                EXIT_RUNTIME,
                format!(
                    "{} serves no tenant API (its offer names none)",
                    listing.npub
                ),
            ));
        };
        let pin = api
            .tls_sha256
            .parse()
            .map_err(|e| exit_err(EXIT_RUNTIME, format!("the offer's api.tlsSha256: {e}")))?;
        Ok(TenantApi {
            client: PinnedClient::new(&api.url, pin, Some(keys))?,
            cell,
        })
    }

    fn path(&self, rest: &str) -> String {
        format!("/v1/cells/{}{rest}", self.cell)
    }

    /// A refused WebSocket as [`TenantApi::answer`] words it.
    fn refusal(&self, e: cellhost_access::AccessError) -> anyhow::Error {
        match e {
            cellhost_access::AccessError::Refused { status, body } => {
                match self.answer(status, body.as_bytes()) {
                    Err(e) => e,
                    Ok(_) => anyhow::anyhow!("the provider answered {status}"),
                }
            }
            e => e.into(),
        }
    }

    /// The JSON of a 200, or an error that says what went wrong.
    fn answer(&self, status: u16, body: &[u8]) -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        if status == 200 {
            return Ok(v);
        }
        let said = v["error"].as_str().unwrap_or("no reason given");
        let code = v["code"].as_str().unwrap_or("");
        let why = match status {
            404 => format!(
                "cell {} not found: it is not yours, or its lease ended",
                self.cell
            ),
            401 => format!("the provider refused the signature ({code}): {said}"),
            _ => format!("the provider answered {status} ({code}): {said}"),
        };
        Err(exit_err(EXIT_REFUSED, why))
    }
}

/// `[ADDR:]LOCAL:CELL` → (local address, cell port).
fn parse_forward(s: &str) -> anyhow::Result<(std::net::SocketAddr, u16)> {
    let bad = || {
        exit_err(
            EXIT_USAGE,
            format!("{s:?}: expected [LOCAL_ADDR:]LOCAL_PORT:CELL_PORT"),
        )
    };
    let (local, cell) = s.rsplit_once(':').ok_or_else(bad)?;
    let cell: u16 = cell.parse().ok().filter(|p| *p != 0).ok_or_else(bad)?;
    let local = match local.parse::<u16>() {
        Ok(p) => std::net::SocketAddr::from(([127, 0, 0, 1], p)),
        Err(_) => local.parse().map_err(|_| bad())?,
    };
    Ok((local, cell))
}

/// Print `reply`; the exit code says whether it was a refusal.
fn finish(reply: Reply, json: bool) -> anyhow::Result<u8> {
    print_reply(&reply, json)?;
    Ok(if reply.ok { 0 } else { EXIT_REFUSED })
}

async fn send(opt: &MarketOpt, offer: &str, req: Request, json: bool) -> anyhow::Result<u8> {
    let provider = parse_pubkey(offer).map_err(|e| exit_err(EXIT_USAGE, e.to_string()))?;
    let c = connect(opt).await?;
    let listing = c.offer_of(provider).await?;
    if let Request::Spawn(s) = &req
        && !listing
            .offer
            .cellhost
            .tiers
            .iter()
            .any(|t| t.tier == s.tier)
    {
        c.shutdown().await;
        return Err(exit_err(
            EXIT_USAGE,
            format!(
                "{} offers no {} tier (it offers: {})",
                listing.npub,
                s.tier,
                listing.offer.capabilities.join(", ")
            ),
        ));
    }
    let reply = c
        .request(
            provider,
            &listing.offer.cellhost.relays,
            &req,
            Duration::from_secs(opt.timeout),
        )
        .await;
    c.shutdown().await;
    finish(reply?, json)
}

fn print_offers(list: &[Listing], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no offers");
        return Ok(());
    }
    for l in list {
        let age = l
            .heartbeat_age_seconds
            .map(|a| format!("heartbeat {a} s ago"))
            .unwrap_or_else(|| "no heartbeat".into());
        println!(
            "{}  {}  {}  ({age})",
            l.npub,
            l.offer.hostname,
            if l.live { "live" } else { "not live" }
        );
        for t in &l.offer.cellhost.tiers {
            println!(
                "  {:<9} {:<14} {:>5} CPU {:>6} MiB  {:>6} msat/s  {}..{} s  {}",
                t.tier,
                t.isolation,
                t.cpus,
                t.memory_mib,
                t.price_msat_per_second,
                t.min_seconds,
                t.max_seconds,
                if t.available { "available" } else { "full" }
            );
        }
        println!("  mints: {}", l.offer.whitelisted_mints.join(", "));
    }
    Ok(())
}

fn print_reply(r: &Reply, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", r.to_json());
        return Ok(());
    }
    if let Some(e) = &r.error {
        eprintln!("refused: {e}");
    }
    if let Some(c) = &r.cell {
        println!("cell     {} ({}, {})", c.id, c.tier, c.state);
        println!("host     {}", c.host);
        for p in &c.ports {
            println!(
                "port     {}:{} → {}/{}",
                c.host, p.host_port, p.port, p.protocol
            );
        }
        if !c.credentials.is_empty() {
            println!("login    with your {}", c.credentials.join(", "));
        }
        println!(
            "expires  {} ({} s left)",
            c.expires_at, c.expires_in_seconds
        );
    }
    if let (Some(m), Some(s)) = (r.paid_msat, r.seconds) {
        println!("paid     {m} msat for {s} s");
    }
    if let Some(t) = &r.refund {
        eprintln!("refund: the token below is yours; redeem it at the mint");
        println!("{t}");
    }
    if !r.ok && r.error.is_none() {
        return Err(exit_err(
            EXIT_RUNTIME,
            "the provider refused without a reason",
        ));
    }
    Ok(())
}
