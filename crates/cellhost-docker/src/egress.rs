//! Deny-by-default egress for bridged containers.
//!
//! # Layout on the host
//!
//! One engine network, `cellhost` (bridge interface `cellhost0`, inter-
//! container traffic off), shared by every bridged cell of every instance,
//! and four iptables rules that make it a one-way street:
//!
//! ```text
//! filter DOCKER-USER: -i cellhost0 -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN
//! filter DOCKER-USER: -i cellhost0 -j DROP          (cells -> anywhere but the host)
//! filter INPUT:       -i cellhost0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
//! filter INPUT:       -i cellhost0 -j DROP          (cells -> the host's own services)
//! ```
//!
//! Published ports still work: inbound connections arrive on the host's
//! interfaces (DNAT, or docker-proxy for loopback) and the cell's replies
//! are ESTABLISHED. The document's `network.egress` allow-list is not
//! implemented for this tier yet; a non-empty list is refused at create
//! rather than silently widened or narrowed.
//!
//! # Lifecycle and idempotency
//!
//! `ensure` runs before every bridged create: it creates the network if it
//! is missing and inserts each rule that `iptables -C` does not find (a
//! dockerd restart keeps DOCKER-USER; a reboot loses both, and the next
//! create puts them back). Nothing is removed at cell teardown: the rules
//! name only the cellhost bridge and do nothing without it.
//!
//! # Threat model
//!
//! A cell must not use the provider as an open relay, nor reach the
//! host's own services (the API, sshd) through the bridge gateway. iptables
//! is shelled out to because it is the interface dockerd itself programs
//! (same binary, same backend, rules in the chain dockerd reserves for
//! users); its argv holds only interface names.

use std::collections::HashMap;
use std::process::Command;

use bollard::Docker;
use bollard::models::NetworkCreateRequest;
use cellhost_core::BackendError;

use crate::{engine_err, is_status};

/// The bridge interface of the cellhost network.
pub const BRIDGE: &str = "cellhost0";

/// The rules, in the order they must sit at the top of their chain.
fn rules() -> [(&'static str, Vec<&'static str>); 4] {
    let est = [
        "-i",
        BRIDGE,
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
    ];
    let mut fwd_est = est.to_vec();
    fwd_est.extend(["-j", "RETURN"]);
    let mut in_est = est.to_vec();
    in_est.extend(["-j", "ACCEPT"]);
    [
        ("DOCKER-USER", fwd_est),
        ("DOCKER-USER", vec!["-i", BRIDGE, "-j", "DROP"]),
        ("INPUT", in_est),
        ("INPUT", vec!["-i", BRIDGE, "-j", "DROP"]),
    ]
}

fn iptables(args: &[&str]) -> Result<bool, BackendError> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| BackendError::MissingCapability {
            capability: "iptables".into(),
            detail: format!("running iptables for the bridged-cell egress guard: {e}"),
        })?;
    match out.status.code() {
        Some(0) => Ok(true),
        // -C: "rule does not exist" is 1.
        Some(1) if args.first() == Some(&"-C") => Ok(false),
        _ => Err(BackendError::engine(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Insert every missing rule at its place in its chain, so the list above
/// is the head of each chain even when only some rules were lost.
fn ensure_rules() -> Result<(), BackendError> {
    let rules = rules();
    for (i, (chain, rule)) in rules.iter().enumerate() {
        let mut check = vec!["-C", chain];
        check.extend(rule);
        if iptables(&check)? {
            continue;
        }
        // 1 + the rules of this chain listed (and so ensured) before it.
        let at = 1 + rules[..i].iter().filter(|(c, _)| c == chain).count();
        let at = at.to_string();
        let mut insert = vec!["-I", chain, &at];
        insert.extend(rule);
        iptables(&insert)?;
    }
    Ok(())
}

/// The rules are host-global: one check-and-insert at a time in this
/// process, so two bridged creates never insert a rule twice.
static RULES_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Make sure the network exists and the guard is in place.
pub async fn ensure(docker: &Docker, network: &str) -> Result<(), BackendError> {
    match docker.inspect_network(network, None).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) => {
            let req = NetworkCreateRequest {
                name: network.to_string(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(
                    "cellhost.network".to_string(),
                    "bridged".to_string(),
                )])),
                options: Some(HashMap::from([
                    (
                        "com.docker.network.bridge.name".to_string(),
                        BRIDGE.to_string(),
                    ),
                    (
                        "com.docker.network.bridge.enable_icc".to_string(),
                        "false".to_string(),
                    ),
                ])),
                ..Default::default()
            };
            match docker.create_network(req).await {
                Ok(_) => {}
                // Another create made it meanwhile.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(engine_err(&format!("creating network {network}"), e)),
            }
        }
        Err(e) => return Err(engine_err(&format!("inspecting network {network}"), e)),
    }
    let _one_at_a_time = RULES_LOCK.lock().await;
    tokio::task::spawn_blocking(ensure_rules)
        .await
        .map_err(|e| BackendError::engine_from("egress guard task", e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_before_drop_in_each_chain() {
        let r = rules();
        assert_eq!(r[0].0, "DOCKER-USER");
        assert!(r[0].1.contains(&"RELATED,ESTABLISHED"));
        assert_eq!(r[1].1.last(), Some(&"DROP"));
        assert_eq!(r[2].0, "INPUT");
        assert_eq!(r[3].1.last(), Some(&"DROP"));
        assert!(r.iter().all(|(_, rule)| rule[..2] == ["-i", BRIDGE]));
    }
}
