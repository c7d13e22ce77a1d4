//! The hostile-tenant suite: every known attack on the boundary between a
//! tenant and the host, run from inside a real cell or against the real
//! API as another tenant, each asserting that the boundary holds.
//!
//! The process tier is attacked from inside (a shared kernel is where a
//! cell meets the host); every tier is attacked through its document (host
//! paths, ports, egress) and the API (other tenants' cells, caps). The
//! container tier's in-cell attacks live in crates/cellhost-docker/tests/
//! hostile.rs, the VM tiers' in crates/cellhost-qemu/tests. Each test
//! names what it found open before the hardening that closed it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{ALICE, Addr, BOB, Daemon, as_tenant, tenant_daemon, wait_until};
use serde_json::{Value, json};

/// A process cell's document (image `host`), no resources: the policy's
/// defaults are all it gets.
fn cell(name: &str, command: &[&str]) -> Value {
    json!({
        "apiVersion": "cellhost.dev/v1", "kind": "Cell",
        "metadata": {"name": name},
        "spec": {"isolation": "process", "command": command,
                 "lifetime": {"ttlSeconds": 300}}
    })
}

/// A python3 script run in a cell.
fn py(name: &str, script: &str) -> Value {
    cell(name, &["/usr/bin/python3", "-c", script])
}

/// Run `doc` through the operator socket to its exit: (exit, log).
fn run_to_exit(d: &Daemon, doc: Value) -> (Value, String) {
    let id = d.create(doc);
    wait_until("the cell to exit", Duration::from_secs(60), || {
        d.call("GET", &format!("/v1/cells/{id}"), None).json()["observed"] == "exited"
    });
    let view = d.call("GET", &format!("/v1/cells/{id}"), None).json();
    let log = d.call("GET", &format!("/v1/cells/{id}/logs"), None);
    d.destroy_clean(&id);
    (
        view["exit"].clone(),
        String::from_utf8_lossy(&log.body).into_owned(),
    )
}

/// The last line of `log`, as JSON.
fn last_json(log: &str) -> Value {
    let line = log.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {log}"))
}

/// Run a python `script` in a process cell named `name` to its exit,
/// which must be 0; the JSON it printed last.
fn run_py(d: &Daemon, name: &str, script: &str) -> Value {
    let (exit, log) = run_to_exit(d, py(name, script));
    assert_eq!(exit["code"], 0, "{log}");
    last_json(&log)
}

/// The host pid of a running cell's first process.
fn init_pid(d: &Daemon, id: &str) -> i32 {
    let backend = d.backend();
    let id = cellhost_core::ids::CellId::parse(id).unwrap();
    backend.init_pid(&id).expect("init pid")
}

fn python_missing() -> bool {
    if Path::new("/usr/bin/python3").exists() {
        return false;
    }
    eprintln!("SKIP: /usr/bin/python3 (the attacks' language) is not installed");
    true
}

#[test]
fn devices_cannot_be_made_or_opened() {
    require_process_tier!();
    if python_missing() {
        return;
    }
    // A loop device the test makes stands in for a tenant's, or the host's,
    // disk: a cell that could mknod and open it reads and writes whatever
    // filesystem lies on it. (Before: the device cgroup allowed `a *:* rwm`
    // and cells kept CAP_MKNOD; mknod and open both worked.)
    let disk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(disk.path(), vec![0x5au8; 1 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(disk.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loopdev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let rdev = std::fs::metadata(&loopdev).unwrap().rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));

    let d = Daemon::start(&[]);
    let script = format!(
        r#"
import os, stat, errno, json
res = {{}}
for name, kind, dev in [("loop", stat.S_IFBLK, os.makedev({major}, {minor})),
                        ("kmsg", stat.S_IFCHR, os.makedev(1, 11)),
                        ("mem", stat.S_IFCHR, os.makedev(1, 1)),
                        ("kvm", stat.S_IFCHR, os.makedev(10, 232))]:
    for where in ("/tmp", "/dev", "/dev/shm"):
        try:
            os.mknod(f"{{where}}/x-{{name}}", kind | 0o600, dev)
            res[f"mknod {{where}} {{name}}"] = "made"
            try:
                open(f"{{where}}/x-{{name}}", "rb").read(1)
                res[f"open {{where}} {{name}}"] = "read"
            except OSError as e:
                res[f"open {{where}} {{name}}"] = errno.errorcode[e.errno]
        except OSError as e:
            res[f"mknod {{where}} {{name}}"] = errno.errorcode[e.errno]
for p in ["/dev/kvm", "/dev/kmsg", "/dev/mem", "{loopdev}", "/dev/vda", "/dev/sda"]:
    try:
        open(p, "rb").read(1)
        res[p] = "read"
    except OSError as e:
        res[p] = errno.errorcode[e.errno]
print(json.dumps(res))
"#
    );
    let res = run_py(&d, "devices", &script);
    for (k, v) in res.as_object().unwrap() {
        if k.starts_with("mknod") {
            assert_eq!(v, "EPERM", "{k}: {res}");
        } else {
            assert!(
                v == "ENOENT" || v == "EPERM" || v == "EACCES",
                "{k} opened: {res}"
            );
        }
    }
    // And from the host: the cell's device cgroup allows only the standard
    // nodes, not everything.
    let id = d.create(cell("devlist", &["/bin/sleep", "60"]));
    let backend = d.backend();
    let cid = cellhost_core::ids::CellId::parse(&id).unwrap();
    let cg = backend.cgroups(&cid).unwrap();
    if let Some(dir) = cg
        .dirs
        .iter()
        .find(|p| p.to_string_lossy().contains("/devices/"))
    {
        let list = std::fs::read_to_string(dir.join("devices.list")).unwrap();
        assert!(!list.contains("a *:* rwm"), "{list}");
        assert!(list.contains("c 1:3 rwm"), "{list}");
        // `b *:* m` (mknod, which needs CAP_MKNOD the cell lacks) may be
        // listed; reading or writing a block device never is.
        assert!(
            !list.lines().any(|l| l.starts_with("b ")
                && (l.ends_with('r') || l.contains(" r") || l.contains('w'))),
            "{list}"
        );
    }
    d.destroy_clean(&id);
}

#[test]
fn images_never_name_a_host_path() {
    require_process_tier!();
    let (d, tcp, _tok) = tenant_daemon(&[]);
    let state = d.state.display().to_string();
    let tries = [
        ("process", state.as_str()),
        ("process", "/var/lib/cellhost"),
        ("process", "/"),
        ("process", ".."),
        ("process", "../../etc"),
        ("process", "host/../.."),
        ("process", "./host"),
        ("container", "/var/lib/docker"),
        ("container", "../busybox"),
        ("vm", "/var/lib/cellhost/images/x/disk"),
        ("microvm", "../deb"),
    ];
    for (tier, image) in tries {
        let doc = json!({
            "apiVersion": "cellhost.dev/v1", "kind": "Cell",
            "metadata": {"name": "paths"},
            "spec": {"isolation": tier, "image": image, "command": ["/bin/true"]}
        });
        for (who, r) in [
            (
                "tenant",
                as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&doc)),
            ),
            ("operator", d.call("POST", "/v1/cells", Some(doc.clone()))),
        ] {
            assert!(
                r.status == 400 || r.status == 403,
                "{who} {tier} {image}: {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.json()["field"], "spec.image", "{who} {tier} {image}");
        }
    }
    assert!(d.cells().is_empty());
    // The operator's own `run` too: import it first.
    let dir = common::state_dir();
    let doc = dir.path().join("c.yaml");
    std::fs::write(
        &doc,
        "apiVersion: cellhost.dev/v1\nkind: Cell\nmetadata: {name: p}\nspec:\n  isolation: process\n  image: /\n  command: [/bin/true]\n",
    )
    .unwrap();
    let out = common::cellhost(dir.path())
        .arg("run")
        .arg(&doc)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.image"));
}

/// Print, as JSON, each mount point of the cell a new file could be made
/// under, and whether a host program could be changed.
const WRITE_EVERY_MOUNT: &str = r#"
import os, json
points = []
for line in open("/proc/self/mountinfo"):
    f = line.split()
    points.append(f[4].replace("\\040", " "))
writable = []
for p in sorted(set(points)):
    probe = os.path.join(p, ".cellhost-probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
        writable.append(p)
    except OSError:
        pass
changed = []
for p in ["/usr/bin/env", "/bin/sh", "/etc/passwd", "/etc/hosts"]:
    try:
        open(p, "ab").close()
        changed.append(p)
    except OSError:
        pass
print(json.dumps({"mounts": len(set(points)), "writable": writable, "changed": changed}))
"#;

#[test]
fn only_the_cells_own_tmpfs_mounts_take_writes() {
    require_process_tier!();
    if python_missing() {
        return;
    }
    // Before: the root was remounted read-only at its top only, so mounts
    // under it stayed writable.
    let d = Daemon::start(&[]);
    let res = run_py(&d, "writes", WRITE_EVERY_MOUNT);
    assert!(res["mounts"].as_u64().unwrap() >= 10, "{res}");
    let own = ["/dev", "/dev/shm", "/dev/mqueue", "/tmp", "/run"];
    for w in res["writable"].as_array().unwrap() {
        assert!(
            own.contains(&w.as_str().unwrap()),
            "{w} took a write: {res}"
        );
    }
    assert_eq!(res["changed"], json!([]), "{res}");
}

#[test]
fn a_document_without_resources_still_gets_the_policys_limits() {
    require_process_tier!();
    // Before: a document without `resources` ran unlimited.
    let d = Daemon::start(&[]);
    // A fork bomb: stopped at the policy's default pids (256).
    let id = d.create(cell("bomb", &["/bin/sh", "-c", "b() { b & b & wait; }; b"]));
    let view = d.call("GET", &format!("/v1/cells/{id}"), None).json();
    assert_eq!(view["document"]["spec"]["resources"]["pids"], 256, "{view}");
    let cid = cellhost_core::ids::CellId::parse(&id).unwrap();
    let cg = d.backend().cgroups(&cid).unwrap();
    let pids_dir = cg
        .dirs
        .iter()
        .find(|p| p.to_string_lossy().contains("/pids/"))
        .cloned()
        .or_else(|| cg.procs.clone())
        .unwrap();
    // The bomb grows to the limit (RLIMIT_NPROC and pids.max are both the
    // policy's 256; whichever refuses a fork first) and no further. The
    // kernel's own count (pids.current): a union of cgroup.procs lists
    // read one after another can count a process that exited alongside
    // the one that replaced it (262 seen).
    let current = || -> usize {
        std::fs::read_to_string(pids_dir.join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until("the bomb to grow", Duration::from_secs(30), || {
        current() >= 200
    });
    let mut peak = 0usize;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        peak = peak.max(current());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!((200..=256).contains(&peak), "peak {peak} processes");
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "256"
    );
    let log = d.call("GET", &format!("/v1/cells/{id}/logs"), None);
    let log = String::from_utf8_lossy(&log.body);
    let events = std::fs::read_to_string(pids_dir.join("pids.events")).unwrap_or_default();
    assert!(
        log.contains("fork") || !events.contains("max 0"),
        "no fork was refused: {events} {log}"
    );
    d.destroy_clean(&id);
    // A memory hog: OOM-killed at the default 256 MiB.
    let (exit, log) = run_to_exit(
        &d,
        cell(
            "hog",
            &[
                "/usr/bin/python3",
                "-c",
                "b = []\nwhile True: b.append(bytearray(16 << 20))",
            ],
        ),
    );
    assert_eq!(exit["signal"], 9, "{exit} {log}");
    assert_eq!(exit["oom_killed"], true, "{exit}");
    // The host still makes cells.
    let (exit, _) = run_to_exit(&d, cell("after", &["/bin/true"]));
    assert_eq!(exit["code"], 0);
}

#[test]
fn privileged_and_out_of_range_ports_are_refused() {
    require_process_tier!();
    // Before: a tenant could publish on 80 and 443.
    let (d, tcp, _tok) = tenant_daemon(&[]);
    for port in [22, 80, 443, 1023, 32768, 65000] {
        let mut doc = cell("ports", &["/bin/true"]);
        doc["spec"]["network"] = json!({"mode": "bridged"});
        doc["spec"]["ports"] = json!([{"container": 8080, "host": port}]);
        let r = as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&doc));
        assert_eq!(
            r.status,
            403,
            "{port}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "policy");
        assert_eq!(r.json()["field"], "spec.ports.0.host");
    }
    assert!(d.cells().is_empty());
}

#[test]
fn egress_rules_cannot_name_the_host_loopback_or_metadata() {
    require_process_tier!();
    // Before: a tenant wrote its own egress rules, the provider's own
    // addresses and the cloud's metadata service included.
    let (d, tcp, _tok) = tenant_daemon(&[]);
    let host_addr = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address.and_then(|a| a.as_sockaddr_in().map(|v| v.ip())))
        .find(|a| !a.is_loopback())
        .map(|a| a.to_string());
    let mut cidrs = vec![
        "169.254.169.254/32".to_string(),
        "169.254.0.0/16".into(),
        "127.0.0.1/32".into(),
        "10.47.0.1/32".into(), // the default bridge's gateway
        "10.47.3.0/24".into(), // other cells
        "224.0.0.0/4".into(),
    ];
    cidrs.extend(host_addr.map(|a| format!("{a}/32")));
    for cidr in cidrs {
        let mut doc = cell("egress", &["/bin/true"]);
        doc["spec"]["network"] = json!({"mode": "bridged", "egress": [{"cidr": cidr}]});
        let r = as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&doc));
        assert!(
            r.status == 403 || r.status == 400,
            "{cidr}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["field"], "spec.network.egress.0.cidr", "{cidr}");
    }
    // Resolvers are the operator's to list, and it lists none by default.
    let mut doc = cell("dns", &["/bin/true"]);
    doc["spec"]["network"] = json!({"mode": "bridged", "dns": ["8.8.8.8"]});
    let r = as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&doc));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["field"], "spec.network.dns.0");
    assert!(d.cells().is_empty());
}

#[test]
fn the_cells_root_is_an_unprivileged_stranger_on_the_host() {
    require_process_tier!();
    // Before: no user namespace; uid 0 in a cell was uid 0 on the host, and
    // an exec into a cell ran in the host's user namespace.
    let d = Daemon::start(&[]);
    let id = d.create(cell(
        "uid",
        &["/bin/sh", "-c", "echo made > /tmp/f; sleep 120"],
    ));
    let pid = init_pid(&d, &id);
    wait_until("the cell's file", Duration::from_secs(10), || {
        Path::new(&format!("/proc/{pid}/root/tmp/f")).exists()
    });
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    let f: Vec<u64> = map.split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(f[0], 0, "{map}");
    assert!(
        f[1] >= 1 << 20,
        "the cell's root maps onto host uid {}",
        f[1]
    );
    assert_eq!(f[2], 65_536, "{map}");
    let owner = std::fs::metadata(format!("/proc/{pid}/root/tmp/f"))
        .unwrap()
        .uid();
    assert_eq!(
        u64::from(owner),
        f[1],
        "a file the cell's root made is host uid {owner}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == f[1].to_string()),
        "{uid}"
    );
    // An exec runs in the same user namespace, as the same host uid.
    let r = d.call(
        "POST",
        &format!("/v1/cells/{id}/exec"),
        Some(json!({"argv": ["/bin/cat", "/proc/self/uid_map", "/proc/self/status"]})),
    );
    assert_eq!(r.status, 200);
    let out = r.json()["stdout"].as_str().unwrap().to_string();
    assert!(
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(map.split_whitespace()),
        "{out}"
    );
    // (Inside, its ids read as 0: /proc shows ids as the reader's user
    // namespace maps them.)
    let exec_uid = out.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        exec_uid.split_whitespace().skip(1).all(|u| u == "0"),
        "{exec_uid}"
    );
    // Another cell has another range.
    let other = d.create(cell("uid2", &["/bin/sleep", "60"]));
    let pid2 = init_pid(&d, &other);
    let map2 = std::fs::read_to_string(format!("/proc/{pid2}/uid_map")).unwrap();
    assert_ne!(map, map2);
    d.destroy_clean(&id);
    d.destroy_clean(&other);
}

#[test]
fn proc_sys_and_sys_are_read_only_and_other_processes_out_of_reach() {
    require_process_tier!();
    if python_missing() {
        return;
    }
    let d = Daemon::start(&[]);
    let script = r#"
import os, json, ctypes, errno
res = {}
for p in ["/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches", "/proc/sysrq-trigger",
          "/proc/sys/kernel/core_pattern", "/sys/kernel/uevent_helper", "/sys/power/state",
          "/sys/fs/cgroup/cgroup.procs", "/proc/self/oom_score_adj"]:
    try:
        with open(p, "w") as f:
            f.write("1")
        res[p] = "written"
    except OSError as e:
        res[p] = errno.errorcode[e.errno]
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    os.pause() if hasattr(os, "pause") else None
    os._exit(0)
r = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
res["ptrace"] = "attached" if r == 0 else errno.errorcode[ctypes.get_errno()]
os.kill(pid, 9)
os.waitpid(pid, 0)
res["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
res["pid1"] = open("/proc/1/cmdline").read().split("\0")[0]
res["cgroup"] = open("/proc/self/cgroup").read()
res["block"] = os.listdir("/sys/block")
print(json.dumps(res))
"#;
    let res = run_py(&d, "procsys", script);
    for (k, v) in res.as_object().unwrap() {
        if k.starts_with('/') && k != "/proc/self/oom_score_adj" {
            assert_ne!(v, "written", "{k}: {res}");
        }
    }
    // ptrace is not on the seccomp allow-list.
    assert_eq!(res["ptrace"], "EPERM", "{res}");
    // Only the cell's own processes are visible; its pid 1 is its own.
    let pids = res["pids"].as_array().unwrap();
    assert!(pids.len() <= 4, "{res}");
    assert_eq!(res["pid1"], "/usr/bin/python3");
    // Its own cgroup namespace: no host path of the hierarchy.
    assert!(
        !res["cgroup"].as_str().unwrap().contains("cellhost"),
        "{res}"
    );
    assert_eq!(res["block"], json!([]), "{res}");
}

#[test]
fn a_joining_exec_is_never_the_host_binary_to_the_cell() {
    require_process_tier!();
    if python_missing() {
        return;
    }
    // runc's CVE-2019-5736: a process in the container opens
    // /proc/<joining pid>/exe and overwrites the runtime on the host. Here a
    // watcher in the cell tries it on every process it sees, for write and
    // through an O_PATH descriptor, while the host runs execs into it.
    let bin = common::cellhost_bin();
    let digest = |p: &Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    let before = digest(&bin);
    let d = Daemon::start(&[]);
    let watcher = r#"
import os, json, time, errno
tried = opened = exe_seen = 0
me = os.getpid()
end = time.time() + 8
while time.time() < end:
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) in (1, me):
            continue
        try:
            target = os.readlink(f"/proc/{p}/exe")
            if "cellhost" in target:
                exe_seen += 1
        except OSError:
            pass
        for how in ("w", "path"):
            tried += 1
            try:
                if how == "w":
                    fd = os.open(f"/proc/{p}/exe", os.O_WRONLY)
                else:
                    pfd = os.open(f"/proc/{p}/exe", os.O_PATH)
                    try:
                        fd = os.open(f"/proc/self/fd/{pfd}", os.O_WRONLY)
                    finally:
                        os.close(pfd)
                os.close(fd)
                opened += 1
            except OSError:
                pass
print(json.dumps({"tried": tried, "opened": opened, "exe_seen": exe_seen}), flush=True)
time.sleep(300)
"#;
    let id = d.create(py("watcher", watcher));
    let until = Instant::now() + Duration::from_secs(7);
    let mut execs = 0;
    while Instant::now() < until {
        let r = d.call(
            "POST",
            &format!("/v1/cells/{id}/exec"),
            Some(json!({"argv": ["/bin/sleep", "0.05"]})),
        );
        if r.status != 200 {
            let log = d.call("GET", &format!("/v1/cells/{id}/logs"), None);
            let view = d.call("GET", &format!("/v1/cells/{id}"), None);
            panic!(
                "exec {execs}: {} {}\ncell: {}\nlog: {}",
                r.status,
                String::from_utf8_lossy(&r.body),
                String::from_utf8_lossy(&view.body),
                String::from_utf8_lossy(&log.body)
            );
        }
        execs += 1;
    }
    wait_until("the watcher's report", Duration::from_secs(30), || {
        let log = d.call("GET", &format!("/v1/cells/{id}/logs"), None);
        String::from_utf8_lossy(&log.body).contains("tried")
    });
    let log = d.call("GET", &format!("/v1/cells/{id}/logs"), None);
    let res = last_json(&String::from_utf8_lossy(&log.body));
    d.destroy_clean(&id);
    eprintln!("{execs} execs, watcher: {res}");
    assert!(execs >= 10, "{execs} execs");
    assert!(res["tried"].as_u64().unwrap() > 0, "{res}");
    assert_eq!(res["opened"], 0, "{res}");
    assert_eq!(digest(&bin), before, "the cellhost binary changed");
}

#[test]
fn no_host_path_of_the_state_dir_shows_in_a_cells_mounts() {
    require_process_tier!();
    // Before: the cell's mountinfo showed <state>/process/host-root, and a
    // rootfs dir's host path.
    let d = Daemon::start(&[]);
    common::busybox_image(&d.state, "bb");
    for image in ["host", "bb"] {
        let mut doc = cell(
            "mounts",
            &["/bin/cat", "/proc/self/mountinfo", "/proc/self/mounts"],
        );
        doc["spec"]["image"] = json!(image);
        let (exit, log) = run_to_exit(&d, doc);
        assert_eq!(exit["code"], 0, "{image}: {log}");
        assert!(log.lines().count() > 10, "{log}");
        let state = d.state.canonicalize().unwrap();
        for needle in [
            state.to_string_lossy().as_ref(),
            d.state.to_string_lossy().as_ref(),
            "/cells/",
            "/images/",
            "cellhost-daemon-",
        ] {
            assert!(!log.contains(needle), "{image}: {needle} in\n{log}");
        }
    }
}

#[test]
fn tenants_cannot_touch_each_others_cells() {
    require_process_tier!();
    let (d, tcp, _tok) = tenant_daemon(&[]);
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        "/v1/cells",
        Some(&cell("mine", &["/bin/sleep", "60"])),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    for (method, path, body) in [
        ("GET", format!("/v1/cells/{id}"), None),
        ("GET", format!("/v1/cells/{id}/logs"), None),
        ("GET", format!("/v1/cells/{id}/logs?follow=true"), None),
        (
            "POST",
            format!("/v1/cells/{id}/exec"),
            Some(json!({"argv": ["/bin/true"]})),
        ),
        ("POST", format!("/v1/cells/{id}/stop"), None),
        ("POST", format!("/v1/cells/{id}/start"), None),
        (
            "POST",
            format!("/v1/cells/{id}/extend"),
            Some(json!({"seconds": 60})),
        ),
        ("DELETE", format!("/v1/cells/{id}"), None),
    ] {
        let r = as_tenant(&tcp, BOB, method, &path, body.as_ref());
        assert_eq!(
            r.status,
            404,
            "bob {method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let list = as_tenant(&tcp, BOB, "GET", "/v1/cells", None);
    assert_eq!(list.json(), json!([]));
    let events = as_tenant(&tcp, BOB, "GET", "/v1/events?limit=1000", None);
    assert!(!String::from_utf8_lossy(&events.body).contains(&id));
    // Metrics are the operator's.
    assert_eq!(as_tenant(&tcp, BOB, "GET", "/metrics", None).status, 403);
    // Alice's cell runs on.
    let r = as_tenant(&tcp, ALICE, "GET", &format!("/v1/cells/{id}"), None);
    assert_eq!(r.json()["observed"], "running");
    d.destroy_clean(&id);
}

#[test]
fn streams_requests_and_cells_are_capped_per_tenant() {
    require_process_tier!();
    // Before: unlimited log-follow streams, requests and cells per tenant.
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "tenants: { maxCells: 2, maxStreams: 2, requestsPerSecond: 2, burst: 12 }\n",
    )
    .unwrap();
    let (d, tcp, _tok) = tenant_daemon(&["--policy", policy.path().to_str().unwrap()]);
    let Addr::Tcp(addr) = tcp.clone() else {
        unreachable!()
    };
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        "/v1/cells",
        Some(&cell("a", &["/bin/sleep", "60"])),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    // Two follow streams held open; the third is refused, Bob's is not.
    let follow = |token: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "GET /v1/cells/{id}/logs?follow=true HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        (s, String::from_utf8_lossy(&head).into_owned())
    };
    let (s1, h1) = follow(ALICE);
    let (_s2, h2) = follow(ALICE);
    assert!(h1.ends_with("200") && h2.ends_with("200"), "{h1} {h2}");
    let (_s3, h3) = follow(ALICE);
    assert!(h3.ends_with("429"), "{h3}");
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        &format!("/v1/cells/{id}/exec"),
        Some(&json!({"argv": ["/bin/true"]})),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "too_many_streams");
    drop(s1);
    wait_until("a stream slot to free", Duration::from_secs(10), || {
        follow(ALICE).1.ends_with("200")
    });
    // Cells: Alice holds at most two.
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        "/v1/cells",
        Some(&cell("b", &["/bin/sleep", "60"])),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        "/v1/cells",
        Some(&cell("c", &["/bin/sleep", "60"])),
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "too_many_cells");
    // Rate: Bob's burst runs out, with Retry-After; Alice's is her own.
    let mut limited = None;
    for _ in 0..40 {
        let r = as_tenant(&tcp, BOB, "GET", "/v1/cells", None);
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("40 requests in a burst of 12 at 2/s");
    assert_eq!(r.json()["code"], "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    // The operator is never limited.
    for _ in 0..30 {
        assert_eq!(d.call("GET", "/v1/cells", None).status, 200);
    }
    d.destroy_all();
}

#[test]
fn tenants_see_only_what_the_market_publishes_of_the_node() {
    require_process_tier!();
    // Before: /v1/node showed tenants the host's CPUs, memory, disk, kernel
    // and every reservation.
    let (d, tcp, _tok) = tenant_daemon(&[]);
    let r = as_tenant(&tcp, ALICE, "GET", "/v1/node", None);
    assert_eq!(r.status, 200);
    let mut keys: Vec<String> = r.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["free", "name", "runningCells", "tiers"],
        "{}",
        r.json()
    );
    // The operator still sees everything.
    let op = d.call("GET", "/v1/node", None).json();
    assert!(op["cpu"]["logical"].as_u64().unwrap() >= 1);
}

#[test]
fn raw_sockets_are_refused_unless_the_policy_allows_them() {
    require_process_tier!();
    if python_missing() {
        return;
    }
    // Before: cells kept CAP_NET_RAW.
    let d = Daemon::start(&[]);
    let script = r#"
import socket, json, errno
res = {}
for name, args in [("raw", (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
                   ("packet", (socket.AF_PACKET, socket.SOCK_RAW, 0))]:
    try:
        socket.socket(*args).close()
        res[name] = "open"
    except OSError as e:
        res[name] = errno.errorcode[e.errno]
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
res["net_raw"] = bool(int(caps, 16) & (1 << 13))
res["mknod"] = bool(int(caps, 16) & (1 << 27))
print(json.dumps(res))
"#;
    let res = run_py(&d, "raw", script);
    assert_eq!(res["raw"], "EPERM", "{res}");
    assert_eq!(res["packet"], "EPERM", "{res}");
    assert_eq!(res["net_raw"], false);
    assert_eq!(res["mknod"], false);
}

#[test]
fn limits_are_the_policys_never_the_callers() {
    require_process_tier!();
    // Before: RLIMIT_NOFILE came from whoever started cellhost. Start the
    // daemon with other limits (lower than the test's own: raising a hard
    // limit needs CAP_SYS_RESOURCE, which not every root here has); cells
    // get the policy's default, or exactly what their document asks.
    for inherited in [16_384u64, 2048] {
        let d = Daemon::start_with_nofile(&[], inherited);
        let (exit, log) = run_to_exit(
            &d,
            cell("nofile", &["/bin/sh", "-c", "ulimit -n; ulimit -Hn"]),
        );
        assert_eq!(exit["code"], 0, "{log}");
        assert_eq!(log, "1024\n1024\n", "inherited {inherited}");
        let mut doc = cell("asks", &["/bin/sh", "-c", "ulimit -n; ulimit -Hn"]);
        doc["spec"]["resources"] =
            json!({"ulimits": [{"name": "nofile", "soft": 1500, "hard": 2000}]});
        let (exit, log) = run_to_exit(&d, doc);
        assert_eq!(exit["code"], 0, "{log}");
        assert_eq!(log, "1500\n2000\n", "inherited {inherited}");
        // An exec runs under its cell's limits too (libcontainer 0.7.0
        // gave it oci-spec's default and the daemon's process limit).
        let id = d.create(cell("execlimits", &["/bin/sleep", "60"]));
        let r = d.call(
            "POST",
            &format!("/v1/cells/{id}/exec"),
            Some(json!({"argv": ["/bin/cat", "/proc/self/limits"]})),
        );
        let limits = r.json()["stdout"].as_str().unwrap().to_string();
        let row = |name: &str| {
            limits
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| {
                    l.split_whitespace()
                        .rev()
                        .skip(1)
                        .take(2)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        assert_eq!(row("Max open files"), ["1024", "1024"], "{limits}");
        assert_eq!(row("Max processes"), ["256", "256"], "{limits}");
        d.destroy_clean(&id);
    }
    // A document asking for more than the policy's maximum is refused.
    let d = Daemon::start(&[]);
    let mut doc = cell("many", &["/bin/true"]);
    doc["spec"]["resources"] =
        json!({"ulimits": [{"name": "nofile", "soft": 1024, "hard": 1048576}]});
    let r = d.call("POST", "/v1/cells", Some(doc));
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["field"], "spec.resources.ulimits.0");
}

#[test]
fn leases_and_disk_stay_inside_the_policy() {
    require_process_tier!();
    // Before: three extends of a year each ran a lease to three years; a
    // volume could ask for 64 TiB.
    let (d, tcp, _tok) = tenant_daemon(&[]);
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        "/v1/cells",
        Some(&cell("lease", &["/bin/sleep", "60"])),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        &format!("/v1/cells/{id}/extend"),
        Some(&json!({"seconds": 31_622_400})),
    );
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "policy");
    // Within the policy's week it extends, and no further.
    let r = as_tenant(
        &tcp,
        ALICE,
        "POST",
        &format!("/v1/cells/{id}/extend"),
        Some(&json!({"seconds": 86_400})),
    );
    assert_eq!(r.status, 200);
    for _ in 0..10 {
        let r = as_tenant(
            &tcp,
            ALICE,
            "POST",
            &format!("/v1/cells/{id}/extend"),
            Some(&json!({"seconds": 86_400})),
        );
        if r.status == 403 {
            break;
        }
    }
    let left =
        as_tenant(&tcp, ALICE, "GET", &format!("/v1/cells/{id}"), None).json()["expiresInSeconds"]
            .as_u64()
            .unwrap();
    assert!(left <= 604_800, "{left} s");
    d.destroy_clean(&id);
    // A volume no larger than a cell's disk.
    let mut doc = cell("vol", &["/bin/true"]);
    doc["spec"]["volume"] = json!({"path": "/data", "sizeGiB": 65536, "encrypted": true});
    let r = as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&doc));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["field"], "spec.volume.sizeGiB");
    // And what all cells may be promised is bounded by the disk itself.
    let node = d.call("GET", "/v1/node", None).json();
    assert!(
        node["capacity"]["diskBytes"].as_u64().unwrap() > 0,
        "{node}"
    );
}

/// A container on the engine's default bridge (another tenant's, or the
/// operator's own), listening on `port`: its address, removed on drop.
struct Neighbour(String, std::net::Ipv4Addr);

impl Neighbour {
    fn start(port: u16) -> Option<Neighbour> {
        if !common::docker_ready() {
            return None;
        }
        let out = std::process::Command::new("docker")
            .args([
                "run",
                "-d",
                "--rm",
                "--network",
                "bridge",
                common::DOCKER_TEST_IMAGE,
            ])
            .args(["httpd", "-f", "-p", &port.to_string(), "-h", "/etc"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ip = std::process::Command::new("docker")
            .args(["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &id])
            .output()
            .unwrap();
        let ip = String::from_utf8_lossy(&ip.stdout).trim().parse().unwrap();
        Some(Neighbour(id, ip))
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn a_broad_egress_rule_reaches_neither_the_host_nor_its_neighbours() {
    require_process_tier!();
    if python_missing() || cellhost_host::probe::which("nft").is_none() {
        eprintln!("SKIP: python3 or nft not installed (scripts/test installs it)");
        return;
    }
    // Before: with `egress: [{cidr: 0.0.0.0/0}]` a process cell reached
    // every port of containers on the engine's bridges (an iptables accept
    // for the cellhost bridge ran before Docker's isolation), and a /32 rule
    // to the host's broadcast address reached its UDP services.
    let tcp = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let (tport, uport) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let uplink = nix::ifaddrs::getifaddrs()
        .unwrap()
        .find(|i| {
            i.address
                .and_then(|a| a.as_sockaddr_in().map(|v| !v.ip().is_loopback()))
                .unwrap_or(false)
                && i.broadcast.is_some()
                && !i.interface_name.starts_with("docker")
                && !i.interface_name.starts_with("ch")
        })
        .map(|i| {
            (
                i.address.unwrap().as_sockaddr_in().unwrap().ip(),
                i.broadcast.unwrap().as_sockaddr_in().unwrap().ip(),
            )
        });
    let Some((host_ip, broadcast)) = uplink else {
        eprintln!("SKIP: no IPv4 interface with a broadcast address");
        return;
    };
    let neighbour = Neighbour::start(5432);
    if neighbour.is_none() {
        eprintln!("(no docker engine: the container neighbour is left out)");
    }
    let tag = cellhost_core::ids::CellId::random().as_str()[..6].to_string();
    let n = 16 + u8::from_str_radix(&tag[..2], 16).unwrap() % 234;
    // A bridge of its own per daemon (a bridge serves one store).
    let bridge = |k: u8| format!("chho{k}{tag}");
    let subnet = |k: u8| format!("10.252.{}.0/24", n + k);
    let gateway = format!("10.252.{n}.1");
    let gone = |k: u8| {
        cellhost_net::RemoveBridgeOnDrop(cellhost_net::NetConfig {
            bridge: bridge(k),
            subnet: subnet(k).parse().unwrap(),
            store_dir: std::path::PathBuf::from("/nonexistent"),
            publish: None,
            deny: Vec::new(),
            deny_connected: false,
        })
    };
    let _bridges_gone = (gone(0), gone(1));
    let script = |targets: &[(String, u16)]| {
        format!(
            r#"
import socket, json
res = {{}}
for host, port in {targets:?}:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        res[f"tcp {{host}}:{{port}}"] = "connected"
    except OSError as e:
        res[f"tcp {{host}}:{{port}}"] = type(e).__name__
    s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for host in ["{broadcast}", "{gateway}", "{host_ip}"]:
    try:
        u.sendto(b"cell was here", (host, {uport}))
        res[f"udp {{host}}"] = "sent"
    except OSError as e:
        res[f"udp {{host}}"] = type(e).__name__
print(json.dumps(res))
"#
        )
    };
    let mut targets = vec![(gateway.clone(), tport), (host_ip.to_string(), tport)];
    if let Some(nb) = &neighbour {
        targets.push((nb.1.to_string(), 5432));
    }
    let mut doc = py("broad", &script(&targets));
    doc["spec"]["network"] = json!({"mode": "bridged", "egress": [{"cidr": "0.0.0.0/0"}]});

    // Under the default policy: nothing of the host or its neighbours.
    let d = Daemon::start(&["--bridge", &bridge(0), "--bridge-subnet", &subnet(0)]);
    let (exit, log) = run_to_exit(&d, doc.clone());
    assert_eq!(exit["code"], 0, "{log}");
    let res = last_json(&log);
    for (k, v) in res.as_object().unwrap() {
        assert_ne!(v, "connected", "{k}: {res}");
    }
    assert!(
        tcp.accept().is_err(),
        "a cell's connection reached the host's TCP service"
    );
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "a cell's datagram reached the host's UDP service"
    );
    drop(d);

    // The control: an operator who opens its private ranges and its LAN
    // lets the cell reach the neighbour, so the refusal above was the
    // policy's deny, not a network that was never there. The host itself
    // stays closed even then (the cell's input chain takes no rule).
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        "egress: { deny: [], denyConnected: false }\n",
    )
    .unwrap();
    let d = Daemon::start(&[
        "--bridge",
        &bridge(1),
        "--bridge-subnet",
        &subnet(1),
        "--policy",
        policy.path().to_str().unwrap(),
    ]);
    let (exit, log) = run_to_exit(&d, doc);
    assert_eq!(exit["code"], 0, "{log}");
    let res = last_json(&log);
    if let Some(nb) = &neighbour {
        assert_eq!(res[format!("tcp {}:5432", nb.1)], "connected", "{res}");
    }
    assert!(
        tcp.accept().is_err(),
        "reached the host's TCP service: {res}"
    );
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "reached the host's UDP service: {res}"
    );
}

#[test]
fn a_published_port_is_one_cells_across_every_tier() {
    require_process_tier!();
    if cellhost_host::probe::which("nft").is_none() {
        eprintln!("SKIP: nft not installed (scripts/test installs it)");
        return;
    }
    // Before: a container could publish the port a bridged process cell
    // published; the process cell's DNAT won, and the container's clients
    // talked to the other tenant.
    let tag = cellhost_core::ids::CellId::random().as_str()[..6].to_string();
    let n = 16 + u8::from_str_radix(&tag[..2], 16).unwrap() % 235;
    let bridge = format!("chpt{tag}");
    let subnet = format!("10.251.{n}.0/24");
    let _gone = cellhost_net::RemoveBridgeOnDrop(cellhost_net::NetConfig {
        bridge: bridge.clone(),
        subnet: subnet.parse().unwrap(),
        store_dir: std::path::PathBuf::from("/nonexistent"),
        publish: None,
        deny: Vec::new(),
        deny_connected: false,
    });
    let (d, tcp, _tok) = tenant_daemon(&["--bridge", &bridge, "--bridge-subnet", &subnet]);
    let port = common::free_port();
    let mut alice = cell("pub", &["/bin/sleep", "60"]);
    alice["spec"]["network"] = json!({"mode": "bridged"});
    alice["spec"]["ports"] = json!([{"container": 8000, "host": port}]);
    let r = as_tenant(&tcp, ALICE, "POST", "/v1/cells", Some(&alice));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let mut tiers = vec!["process"];
    if common::docker_ready() {
        tiers.push("container");
    }
    for tier in tiers {
        let mut bob = json!({
            "apiVersion": "cellhost.dev/v1", "kind": "Cell",
            "metadata": {"name": "steal"},
            "spec": {"isolation": tier, "command": ["/bin/sleep", "60"],
                     "network": {"mode": "bridged"},
                     "ports": [{"container": 8000, "host": port}]}
        });
        if tier == "container" {
            bob["spec"]["image"] = json!(common::DOCKER_TEST_IMAGE);
        }
        let r = as_tenant(&tcp, BOB, "POST", "/v1/cells", Some(&bob));
        assert_eq!(
            r.status,
            409,
            "{tier}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], "port_taken");
        assert_eq!(r.json()["field"], "spec.ports.0.host");
    }
    // Any port (host 0), twice: the one allocator gives Bob ports no cell
    // holds, and his cell an address of its own on the bridge.
    let mut any = alice.clone();
    any["spec"]["ports"] = json!([{"container": 8000, "host": 0}, {"container": 8001}]);
    let r = as_tenant(&tcp, BOB, "POST", "/v1/cells", Some(&any));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let bob = r.json()["id"].as_str().unwrap().to_string();
    let got: Vec<u64> = r.json()["document"]["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host"].as_u64().unwrap())
        .collect();
    assert_eq!(got.len(), 2);
    assert!(
        got[0] != got[1] && !got.contains(&u64::from(port)),
        "{got:?}"
    );
    assert!(got.iter().all(|p| (10_000..=32_767).contains(p)), "{got:?}");
    let address = |id: &str| {
        let v = as_tenant(
            &tcp,
            if id == bob { BOB } else { ALICE },
            "GET",
            &format!("/v1/cells/{id}"),
            None,
        )
        .json();
        v["tierDetails"]["network"]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let (a_addr, b_addr) = (address(&id), address(&bob));
    assert!(
        !a_addr.is_empty() && a_addr != b_addr,
        "{a_addr} vs {b_addr}"
    );
    d.destroy_clean(&bob);
    d.destroy_clean(&id);
    // Free again once its cell is gone.
    let r = as_tenant(&tcp, BOB, "POST", "/v1/cells", Some(&alice));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    d.destroy_all();
}
