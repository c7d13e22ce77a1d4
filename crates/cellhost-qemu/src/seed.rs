//! The cloud-init NoCloud seed of a `vm` cell, built in memory.
//!
//! NoCloud reads `meta-data` and `user-data` from a filesystem labelled
//! `cidata`. `user-data` is `#cloud-config` written as JSON (JSON is
//! YAML): hostname, the workload's env as `/etc/cellhost/env`, secrets as
//! `/run/secrets/<name>` (0600, base64), `ssh_authorized_keys` and a
//! password from the secrets of those names, and the command as `runcmd`.
//! A bridged cell's seed adds `network-config` (version 2): the NIC by its
//! MAC, named eth0, with the leased address, the default route and the
//! declared resolvers; cloud-init applies it before the first boot's
//! networking.
//!
//! # Threat model
//!
//! The seed carries secrets, so it never touches the host's disk: the
//! two files are memfds, `genisoimage` (the tool is the interface to
//! ISO 9660 + Rock Ridge + Joliet) reads them through `/proc/<pid>/fd/<n>`
//! and writes the image to a pipe, and the image goes into a third memfd
//! that qemu opens the same way while the backend holds it. When qemu
//! exits, the memory is gone.

use std::ffi::OsStr;
use std::io::{Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use base64::Engine;
use cellhost_core::{BackendError, CreateRequest};
use serde_json::{Value, json};

/// Secrets with these names configure access instead of becoming files.
pub const SSH_KEYS_SECRET: &str = "ssh_authorized_keys";
pub const PASSWORD_SECRET: &str = "password";

/// `meta-data` for a cell.
pub fn meta_data(req: &CreateRequest) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        req.id,
        hostname(&req.cell.metadata.name)
    )
}

/// `network-config` (version 2, YAML) for a bridged cell's tap NIC.
pub fn network_config(a: &cellhost_net::Attachment, dns: &[String]) -> String {
    let mut s = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    set-name: eth0\n    addresses:\n      - {ip}/{prefix}\n    routes:\n      - to: default\n        via: {gw}\n",
        mac = a.mac,
        ip = a.address,
        prefix = a.prefix,
        gw = a.gateway,
    );
    if !dns.is_empty() {
        s.push_str(&format!(
            "    nameservers:\n      addresses: [{}]\n",
            dns.join(", ")
        ));
    }
    s
}

/// A DNS label from the cell's name.
fn hostname(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let h = h.trim_matches('-').to_string();
    if h.is_empty() { "cell".into() } else { h }
}

/// `user-data` for a cell (holds secret values: keep it in memory).
pub fn user_data(req: &CreateRequest) -> zeroize::Zeroizing<String> {
    let spec = &req.cell.spec;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut files = Vec::new();
    let env: String = spec.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    files.push(json!({
        "path": "/etc/cellhost/env", "permissions": "0600", "encoding": "b64",
        "content": b64.encode(env.as_bytes()),
    }));
    let mut cfg = json!({ "hostname": hostname(&req.cell.metadata.name) });
    for s in &req.secrets {
        match s.name.as_str() {
            SSH_KEYS_SECRET => {
                let keys: Vec<String> = String::from_utf8_lossy(&s.value)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
                cfg["ssh_authorized_keys"] = json!(keys);
            }
            PASSWORD_SECRET => {
                cfg["password"] = json!(String::from_utf8_lossy(&s.value).trim_end().to_string());
                cfg["chpasswd"] = json!({ "expire": false });
                cfg["ssh_pwauth"] = Value::Bool(true);
            }
            _ => files.push(json!({
                "path": format!("/run/secrets/{}", s.name), "permissions": "0600",
                "encoding": "b64", "content": b64.encode(&s.value[..]),
            })),
        }
    }
    cfg["write_files"] = Value::Array(files);
    cfg["runcmd"] = json!([spec.command]);
    zeroize::Zeroizing::new(format!("#cloud-config\n{cfg}\n"))
}

/// An anonymous memory file holding `data`, rewound.
pub fn memfd(name: &str, data: &[u8]) -> Result<std::fs::File, BackendError> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    let fd: OwnedFd =
        nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| BackendError::io("memfd_create", e.into()))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data)
        .and_then(|_| f.rewind())
        .map_err(|e| BackendError::io("writing a memfd", e))?;
    Ok(f)
}

/// The path another process opens our descriptor by.
pub fn proc_path(f: &std::fs::File) -> String {
    format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())
}

/// Build the seed ISO in a memfd (with `network-config` for a bridged
/// cell's attachment).
pub fn build(
    genisoimage: &Path,
    req: &CreateRequest,
    net: Option<&cellhost_net::Attachment>,
) -> Result<std::fs::File, BackendError> {
    let user = memfd("user-data", user_data(req).as_bytes())?;
    let meta = memfd("meta-data", meta_data(req).as_bytes())?;
    let network = net
        .map(|a| {
            memfd(
                "network-config",
                network_config(a, &req.cell.spec.network.dns).as_bytes(),
            )
        })
        .transpose()?;
    let user_arg = format!("user-data={}", proc_path(&user));
    let meta_arg = format!("meta-data={}", proc_path(&meta));
    let network_arg = network
        .as_ref()
        .map(|n| format!("network-config={}", proc_path(n)));
    let mut args: Vec<&OsStr> = [
        "-quiet",
        "-volid",
        "cidata",
        "-joliet",
        "-rock",
        // The inputs are /proc/<pid>/fd links: store their content.
        "-follow-links",
        "-graft-points",
        &user_arg,
        &meta_arg,
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    args.extend(network_arg.as_deref().map(OsStr::new));
    // The shared runner drains stdout (the image) and stderr on threads of
    // their own: neither pipe can fill and stall the other.
    let mut iso = cellhost_host::tool::output(genisoimage, &args, None)
        .map_err(|e| BackendError::engine_from("genisoimage", e))?;
    if iso.len() < 32 * 1024 {
        zeroize::Zeroize::zeroize(&mut iso);
        return Err(BackendError::engine(format!(
            "genisoimage: wrote {} bytes, not an image",
            iso.len()
        )));
    }
    let f = memfd("cidata.iso", &iso);
    zeroize::Zeroize::zeroize(&mut iso);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellhost_core::SecretValue;

    fn req() -> CreateRequest {
        let cell = cellhost_spec::parse_and_validate(
            "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: Web_Box}\nspec:\n  isolation: vm\n  image: base\n  command: [/bin/sh, -c, 'echo hi']\n  env: {A: '1'}\n",
        )
        .unwrap();
        let mut r = CreateRequest::new(cellhost_core::ids::CellId::random(), cell);
        r.secrets = vec![
            SecretValue {
                name: "tok".into(),
                value: b"s3cret".to_vec().into(),
            },
            SecretValue {
                name: SSH_KEYS_SECRET.into(),
                value: b"ssh-ed25519 AAAA k\n# c\n".to_vec().into(),
            },
        ];
        r
    }

    #[test]
    fn user_data_is_cloud_config_json() {
        let r = req();
        let ud = user_data(&r);
        let body = ud.strip_prefix("#cloud-config\n").unwrap();
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["hostname"], "web-box");
        assert_eq!(v["runcmd"][0], json!(["/bin/sh", "-c", "echo hi"]));
        assert_eq!(v["ssh_authorized_keys"], json!(["ssh-ed25519 AAAA k"]));
        let files = v["write_files"].as_array().unwrap();
        let tok = files
            .iter()
            .find(|f| f["path"] == "/run/secrets/tok")
            .unwrap();
        assert_eq!(tok["permissions"], "0600");
        assert_eq!(
            tok["content"],
            base64::engine::general_purpose::STANDARD.encode("s3cret")
        );
        assert!(meta_data(&r).contains(&format!("instance-id: {}", r.id)));
    }

    #[test]
    fn network_config_names_the_mac_address_route_and_resolvers() {
        let a = cellhost_net::Attachment {
            netns: None,
            address: "10.47.0.9".parse().unwrap(),
            gateway: "10.47.0.1".parse().unwrap(),
            prefix: 16,
            bridge: "cellhost-br0".into(),
            link: "chv0123456789ab".into(),
            table: "cellhost_0123456789ab".into(),
            mac: "02:01:23:45:67:89".into(),
        };
        let c = network_config(&a, &["10.0.0.53".into()]);
        assert!(c.starts_with("version: 2\nethernets:\n  eth0:\n"), "{c}");
        for want in [
            "      macaddress: \"02:01:23:45:67:89\"\n",
            "      - 10.47.0.9/16\n",
            "      - to: default\n        via: 10.47.0.1\n",
            "      addresses: [10.0.0.53]\n",
        ] {
            assert!(c.contains(want), "{want:?} in {c}");
        }
        assert!(!network_config(&a, &[]).contains("nameservers"));
    }
}
