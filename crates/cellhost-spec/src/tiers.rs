//! The tier matrix: what each isolation tier refuses of a document that
//! [`crate::validate`] accepts. Pure; each refusal names its field.
//!
//! The supervisor's admission runs it (so the API, the market before it
//! takes payment, and `cellhost run` refuse alike, with the field), and
//! each backend runs it again at create, so a tier never receives a
//! document it cannot honour. To teach a tier a new refusal, add it here.

use crate::types::{Cell, Isolation, NetworkMode};
use crate::validate::{FieldError, ValidationErrors};

/// What `isolation` refuses of `cell`, every problem at once.
pub fn validate_for(isolation: Isolation, cell: &Cell) -> Result<(), ValidationErrors> {
    let spec = &cell.spec;
    let mut errs = Vec::new();
    let mut refuse = |path: &str, message: String| errs.push(FieldError::new(path, message));
    let bridged = spec.network.mode == NetworkMode::Bridged;
    let ports_need_bridge = match isolation {
        Isolation::Process | Isolation::Container | Isolation::Microvm => true,
        // A VM without a bridge publishes through qemu's user networking.
        Isolation::Vm => false,
    };
    if ports_need_bridge && !spec.ports.is_empty() && !bridged {
        refuse(
            "spec.ports",
            format!(
                "a {isolation} cell publishes ports only with spec.network.mode: bridged \
                 (mode none is loopback only)"
            ),
        );
    }
    match isolation {
        Isolation::Process => {
            if spec.volume.as_ref().is_some_and(|v| !v.encrypted) {
                refuse(
                    "spec.volume.encrypted",
                    "the process tier has encrypted volumes only (set encrypted: true)".into(),
                );
            }
        }
        Isolation::Container => {
            if !spec.network.egress.is_empty() {
                refuse(
                    "spec.network.egress",
                    "the container tier denies all egress of bridged cells; allow-lists are \
                     not supported there"
                        .into(),
                );
            }
        }
        Isolation::Vm | Isolation::Microvm => {
            // Limits a guest kernel sets for itself: refused, not ignored.
            if spec.resources.pids.is_some() {
                refuse(
                    "spec.resources.pids",
                    format!(
                        "not applicable to {isolation} cells (the guest kernel has its own limits)"
                    ),
                );
            }
            if !spec.resources.ulimits.is_empty() {
                refuse(
                    "spec.resources.ulimits",
                    format!("not applicable to {isolation} cells (set them inside the guest)"),
                );
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors { errors: errs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(spec: serde_json::Value) -> Cell {
        let mut doc = serde_json::json!({
            "apiVersion": "cellhost.dev/v1",
            "kind": "Cell",
            "metadata": { "name": "t" },
            "spec": { "isolation": "process", "command": ["/bin/true"] }
        });
        for (k, v) in spec.as_object().unwrap() {
            doc["spec"][k] = v.clone();
        }
        let c: Cell = serde_json::from_value(doc).unwrap();
        crate::validate(&c).unwrap();
        c
    }

    const ALL: [Isolation; 4] = [
        Isolation::Process,
        Isolation::Container,
        Isolation::Vm,
        Isolation::Microvm,
    ];

    /// Each rule, against every tier: (document, the tiers that refuse it,
    /// the field they name).
    #[test]
    fn the_matrix() {
        let rows = [
            (
                serde_json::json!({ "ports": [{ "container": 80, "host": 18080 }] }),
                &[Isolation::Process, Isolation::Container, Isolation::Microvm][..],
                "spec.ports",
            ),
            (
                serde_json::json!({ "volume": { "path": "/data", "sizeGiB": 1 } }),
                &[Isolation::Process][..],
                "spec.volume.encrypted",
            ),
            (
                serde_json::json!({ "network": { "mode": "bridged", "egress": [{ "cidr": "192.0.2.0/24", "port": 443 }] } }),
                &[Isolation::Container][..],
                "spec.network.egress",
            ),
            (
                serde_json::json!({ "resources": { "pids": 64 } }),
                &[Isolation::Vm, Isolation::Microvm][..],
                "spec.resources.pids",
            ),
            (
                serde_json::json!({ "resources": { "ulimits": [{ "name": "nofile", "soft": 64, "hard": 64 }] } }),
                &[Isolation::Vm, Isolation::Microvm][..],
                "spec.resources.ulimits",
            ),
        ];
        for (spec, refusing, field) in rows {
            let c = cell(spec.clone());
            for tier in ALL {
                let got = validate_for(tier, &c);
                if refusing.contains(&tier) {
                    let errs = got.expect_err(&format!("{tier} took {spec}"));
                    assert_eq!(errs.errors.len(), 1, "{errs}");
                    assert_eq!(errs.errors[0].path, field, "{tier}: {errs}");
                } else {
                    assert!(got.is_ok(), "{tier} refused {spec}: {got:?}");
                }
            }
        }
        // Bridged ports are fine everywhere.
        let c = cell(serde_json::json!({
            "ports": [{ "container": 80, "host": 18080 }],
            "network": { "mode": "bridged" }
        }));
        for tier in ALL {
            assert!(validate_for(tier, &c).is_ok(), "{tier}");
        }
    }
}
