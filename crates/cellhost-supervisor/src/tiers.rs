//! Backend assembly: the one place that turns the operator's settings
//! (state dir, policy, bridge, volume engine) into the tiers' backends.
//! `cellhost run`, `cellhost serve` and the benchmarks build tiers here,
//! so a tier is configured the same way wherever it runs.
//!
//! To add a tier: implement `cellhost_core::Backend` in its own crate,
//! then give [`TierSettings::backend`] (one cell's tier) and
//! [`TierSettings::backends`] (every tier this host can run) an arm.
//!
//! The VM tiers' KVM verdict comes from a probe boot, cached per kernel
//! digest ([`vm_probe`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cellhost_core::Backend;
use cellhost_host::probe::{Accel, HostReport};
use cellhost_image::ImageStore;
use cellhost_policy::Policy;
use cellhost_spec::Isolation;
use cellhost_volume::EngineChoice;

/// A line of progress a tier reports while it works (an image pull).
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Where bridged cells attach.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    pub bridge: String,
    /// Its first address is the bridge's (the cells' gateway); cells
    /// lease the rest.
    pub subnet: cellhost_net::Subnet,
    /// Where bridged cells' ports are published from outside; `None`:
    /// every host address.
    pub publish: Option<std::net::Ipv4Addr>,
}

impl Default for BridgeSettings {
    fn default() -> BridgeSettings {
        BridgeSettings {
            bridge: cellhost_net::DEFAULT_BRIDGE.into(),
            subnet: cellhost_net::DEFAULT_SUBNET
                .parse()
                .expect("the default subnet parses"),
            publish: None,
        }
    }
}

/// Everything the tiers are built from.
#[derive(Clone)]
pub struct TierSettings {
    pub state_dir: PathBuf,
    /// The cellhost binary: per-cell shims (`__shim`, `__exec`) and the
    /// vmm shim (`__vmm`) run it.
    pub exe: PathBuf,
    pub volume_engine: EngineChoice,
    pub bridge: BridgeSettings,
    pub policy: Arc<Policy>,
    /// Where containers and VMs publish ports (`serve --publish-address`);
    /// `None`: each tier's default (every address).
    pub publish_address: Option<String>,
    /// Containers restart with the engine unless stopped (`serve`).
    pub container_restart_unless_stopped: bool,
    /// Where a tier's progress lines go; `None`: nowhere.
    pub progress: Option<Progress>,
}

/// A tier this host cannot run.
#[derive(Debug, thiserror::Error)]
#[error("the {tier} tier cannot run here: {detail}")]
pub struct Unavailable {
    pub tier: Isolation,
    pub detail: String,
}

impl TierSettings {
    /// Settings for `state_dir` under `policy`, run by `exe`, with every
    /// other setting at its default.
    pub fn new(state_dir: &Path, exe: PathBuf, policy: Arc<Policy>) -> TierSettings {
        TierSettings {
            state_dir: state_dir.to_path_buf(),
            exe,
            volume_engine: EngineChoice::Auto,
            bridge: BridgeSettings::default(),
            policy,
            publish_address: None,
            container_restart_unless_stopped: false,
            progress: None,
        }
    }

    /// The backend of one tier, for a cell of that tier. The VM tiers are
    /// probed first ([`vm_probe`]); the others fail at create when the
    /// host lacks something, naming it.
    pub fn backend(&self, isolation: Isolation) -> Result<Arc<dyn Backend>, Unavailable> {
        match isolation {
            Isolation::Process => Ok(self.process()),
            Isolation::Container => Ok(self.container()),
            tier @ (Isolation::Vm | Isolation::Microvm) => {
                let status = vm_probe(&self.state_dir).tier(tier);
                if !status.ok {
                    return Err(Unavailable {
                        tier,
                        detail: status.detail,
                    });
                }
                Ok(self.qemu(tier, status.accel))
            }
        }
    }

    /// Every tier this host can run, from one probe; the others with why
    /// not.
    pub fn backends(&self) -> (Vec<Arc<dyn Backend>>, Vec<Unavailable>) {
        let report = vm_probe(&self.state_dir);
        let (mut ok, mut not) = (Vec::new(), Vec::new());
        for tier in [
            Isolation::Process,
            Isolation::Container,
            Isolation::Vm,
            Isolation::Microvm,
        ] {
            let status = report.tier(tier);
            if !status.ok {
                not.push(Unavailable {
                    tier,
                    detail: status.detail,
                });
                continue;
            }
            ok.push(match tier {
                Isolation::Process => self.process(),
                Isolation::Container => self.container(),
                _ => self.qemu(tier, status.accel),
            });
        }
        (ok, not)
    }

    fn process(&self) -> Arc<dyn Backend> {
        let shim = cellhost_process::ShimCommand {
            program: self.exe.clone(),
            args: vec![cellhost_process::SHIM_SUBCOMMAND.into()],
        };
        let mut cfg = cellhost_process::ProcessConfig::new(self.state_dir.join("process"), shim);
        cfg.volume_engine = self.volume_engine;
        cfg.network = Some(self.net_config());
        cfg.log_cap_bytes = self.policy.log_bytes;
        cfg.net_raw = self.policy.net_raw;
        Arc::new(cellhost_process::ProcessBackend::new(cfg))
    }

    fn container(&self) -> Arc<dyn Backend> {
        Arc::new(cellhost_docker::DockerBackend::new(self.docker_config()))
    }

    fn qemu(&self, tier: Isolation, accel: Option<Accel>) -> Arc<dyn Backend> {
        Arc::new(cellhost_qemu::QemuBackend::new(
            self.qemu_config(tier, accel),
        ))
    }

    /// The container tier's config (its own subdir of the state dir).
    pub fn docker_config(&self) -> cellhost_docker::DockerConfig {
        let mut cfg = cellhost_docker::DockerConfig::new(self.state_dir.join("docker"));
        cfg.volume_engine = self.volume_engine;
        cfg.policy.log_max_bytes = self.policy.log_bytes;
        cfg.policy.pull = self.policy.images.pull;
        cfg.policy.restart_unless_stopped = self.container_restart_unless_stopped;
        if let Some(a) = &self.publish_address {
            cfg.policy.publish_address = a.clone();
        }
        cfg.progress = self.progress.clone();
        cfg
    }

    /// The vm or microvm tier's config, with the probe's accelerator (TCG
    /// when it found none).
    pub fn qemu_config(&self, tier: Isolation, accel: Option<Accel>) -> cellhost_qemu::QemuConfig {
        let mut cfg = cellhost_qemu::QemuConfig::new(tier, &self.state_dir, self.exe.clone());
        cfg.accel = accel.unwrap_or(Accel::Tcg);
        cfg.network = Some(self.net_config());
        if let Some(a) = &self.publish_address {
            cfg.publish_address = a.clone();
        }
        cfg
    }

    /// Where bridged cells attach, with the policy's denied networks (what
    /// no egress rule reaches: see cellhost-policy's `egress.deny`).
    pub fn net_config(&self) -> cellhost_net::NetConfig {
        let b = &self.bridge;
        let bridge = cellhost_policy::Net::new(b.subnet.network(), b.subnet.prefix());
        // Host addresses are the input hook's business (only resolvers
        // pass); these are what routing would carry off the host.
        let facts = cellhost_policy::HostFacts {
            addresses: Vec::new(),
            bridge: Some(bridge),
            // Connected networks change (an engine makes a bridge): the
            // network crate reads them at each attach instead.
            connected: Vec::new(),
        };
        cellhost_net::NetConfig {
            bridge: b.bridge.clone(),
            subnet: b.subnet,
            store_dir: self.state_dir.clone(),
            publish: b.publish,
            deny: self
                .policy
                .denied_nets(&facts)
                .into_iter()
                .map(|n| (n.addr(), n.prefix()))
                .collect(),
            deny_connected: self.policy.egress.deny_connected,
        }
    }
}

/// The host probe for the VM tiers: with a probe boot under KVM of a
/// kernel from the image store (when /dev/kvm exists), so the tiers get
/// KVM only where a guest kernel really boots on it, TCG otherwise. The
/// verdict is cached per kernel digest in `<state>/images/kvm-probe.json`:
/// a failing boot can take the whole deadline (8 s; the guest hangs at
/// once under KVM here), and only the first start should pay it.
pub fn vm_probe(state_dir: &Path) -> HostReport {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Cached {
        digest: String,
        ok: bool,
        detail: String,
    }
    // The manifest already holds the kernel's digest: no rehashing.
    let (kernel, digest) = store_kernel(state_dir).unzip();
    let cache = ImageStore::of_state_dir(state_dir)
        .root()
        .join("kvm-probe.json");
    let cached: Option<Cached> = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|c: &Cached| Some(&c.digest) == digest.as_ref());
    let kvm_dev = Path::new("/dev/kvm").exists();
    let mut report = cellhost_host::probe::probe(&cellhost_host::probe::ProbeOptions {
        kvm_boot: kvm_dev && kernel.is_some() && cached.is_none(),
        probe_kernel: kernel,
        // A kernel that boots under KVM reaches its root mount in about a
        // second; a slower answer means TCG, the safe side.
        kvm_boot_deadline: std::time::Duration::from_secs(8),
        ..Default::default()
    });
    let Some(kvm) = report.capabilities.iter_mut().find(|c| c.name == "kvm") else {
        return report;
    };
    match (cached, digest) {
        (Some(c), _) if kvm_dev => {
            kvm.ok = c.ok;
            kvm.detail = format!("{} (cached probe boot)", c.detail);
        }
        (None, Some(digest)) if kvm_dev => {
            let c = Cached {
                digest,
                ok: kvm.ok,
                detail: kvm.detail.clone(),
            };
            if let Ok(b) = serde_json::to_vec(&c) {
                let _ = std::fs::write(&cache, b);
            }
        }
        _ => {}
    }
    report
}

/// A kernel of the image store (the first image that has one), with its
/// digest from the manifest.
pub fn store_kernel(state_dir: &Path) -> Option<(PathBuf, String)> {
    let store = ImageStore::of_state_dir(state_dir);
    store.list().ok()?.into_iter().find_map(|m| {
        let k = m.kernel.as_ref()?;
        let digest = m.digests.get(k)?.clone();
        Some((store.root().join(&m.name).join(k), digest))
    })
}
