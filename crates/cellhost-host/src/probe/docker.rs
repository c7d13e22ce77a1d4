//! The Docker engine: `/_ping`, `/version` and `/info` over its unix
//! socket, with a deadline. A small HTTP/1.0 client, not bollard: the
//! probe is synchronous and runs before any async runtime exists (and
//! in the shim-free `doctor`); three read-only GETs do not justify one.

use super::*;

/// The unix socket to probe: the option, else `DOCKER_HOST`, else default.
pub(super) fn docker_socket(opts: &ProbeOptions) -> Result<PathBuf, String> {
    if let Some(p) = &opts.docker_socket {
        return Ok(p.clone());
    }
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => match h.strip_prefix("unix://") {
            Some(p) => Ok(PathBuf::from(p)),
            None => Err(format!(
                "DOCKER_HOST={h} is not a unix:// socket; only unix sockets are probed"
            )),
        },
        _ => Ok(PathBuf::from("/var/run/docker.sock")),
    }
}

/// The rows the docker check gives, in [`KEYS`] order.
pub(super) const DOCKER_KEYS: [&str; 3] = ["docker", "docker.userns", "docker.storage-opt"];

/// `docker`, then what `GET /info` says: `docker.userns` (is the engine
/// run with `--userns-remap`?) and `docker.storage-opt` (does it enforce a
/// container's `storage_opt size`, the container tier's first way to
/// enforce `diskGiB`?).
pub(super) fn check_docker(opts: &ProbeOptions) -> Vec<Capability> {
    let path = match docker_socket(opts) {
        Ok(p) => p,
        Err(why) => return docker_unchecked(Capability::new("docker", false, why)),
    };
    let engine = probe_docker(&path);
    if !engine.ok {
        return docker_unchecked(engine);
    }
    let info = http_get(&path, "GET /info HTTP/1.0\r\n\r\n").and_then(|(status, body)| {
        if !status_ok(&status) {
            return Err(DockerError::Status {
                path: path.display().to_string(),
                what: "/info",
                status,
            });
        }
        serde_json::from_str::<serde_json::Value>(&body).map_err(|e| DockerError::Body {
            path: path.display().to_string(),
            why: format!("GET /info: not JSON: {e}"),
        })
    });
    match info {
        Ok(info) => {
            let mounts = cellhost_os::mountinfo::read_self().unwrap_or_default();
            vec![
                engine,
                docker_userns(&info),
                docker_storage_opt(&info, &mounts),
            ]
        }
        Err(e) => vec![
            engine,
            Capability::new("docker.userns", false, e.to_string()),
            Capability::new("docker.storage-opt", false, e.to_string()),
        ],
    }
}

/// The engine row and the two `/info` rows as not checked.
pub(super) fn docker_unchecked(engine: Capability) -> Vec<Capability> {
    let why = format!("not checked: {}", engine.detail);
    vec![
        engine,
        Capability::new("docker.userns", false, why.clone()),
        Capability::new("docker.storage-opt", false, why),
    ]
}

/// `SecurityOptions` holds `name=userns` when dockerd runs with
/// `--userns-remap`.
pub(super) fn docker_userns(info: &serde_json::Value) -> Capability {
    let on = info["SecurityOptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str())
        .any(|o| o.split(',').any(|kv| kv == "name=userns"));
    if on {
        Capability::new(
            "docker.userns",
            true,
            "dockerd runs with --userns-remap: a container's root is an unprivileged host uid",
        )
    } else {
        Capability::new(
            "docker.userns",
            false,
            "dockerd runs without --userns-remap: a container's root is the host's uid 0 (confined by namespaces, capabilities, seccomp)",
        )
    }
}

/// Whether the engine's storage driver enforces `storage_opt size`:
/// zfs and devicemapper do, btrfs not reliably; overlay2 only on xfs mounted with
/// `prjquota` (looked up in this process's mount table for the engine's
/// data root, so a local engine). Otherwise the container tier enforces
/// `diskGiB` with a read-only root and a per-cell ext4 (scratch).
pub(super) fn docker_storage_opt(info: &serde_json::Value, mounts: &[MountEntry]) -> Capability {
    let scratch = "diskGiB is a read-only root plus a per-cell ext4 (scratch)";
    let driver = info["Driver"].as_str().unwrap_or("");
    let status = |key: &str| {
        info["DriverStatus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pair| pair.as_array())
            .find(|pair| pair.first().and_then(|k| k.as_str()) == Some(key))
            .and_then(|pair| pair.get(1)?.as_str())
            .map(str::to_string)
    };
    let (ok, detail) = match driver {
        // Its qgroups stop enforcing every limit, running containers'
        // too, whenever the kernel marks their accounting inconsistent
        // (seen in ordinary operation here): see cellhost-docker's disk.
        "btrfs" => (
            false,
            format!(
                "storage driver btrfs: its qgroups stop enforcing limits whenever their accounting turns inconsistent, so {scratch}"
            ),
        ),
        "zfs" | "devicemapper" => (
            true,
            format!(
                "storage driver {driver} enforces storage_opt size: diskGiB caps the writable layer"
            ),
        ),
        "overlay2" => {
            let backing = status("Backing Filesystem").unwrap_or_else(|| "?".into());
            let root = info["DockerRootDir"].as_str().unwrap_or("/var/lib/docker");
            let mount = cellhost_os::mountinfo::holding(mounts, Path::new(root));
            let prjquota = mount.is_some_and(|m| {
                m.fs_type == "xfs"
                    && m.super_options
                        .split(',')
                        .any(|o| o == "prjquota" || o == "pquota")
            });
            if backing == "xfs" && prjquota {
                (
                    true,
                    format!(
                        "overlay2 on xfs with prjquota ({root}): diskGiB caps the writable layer"
                    ),
                )
            } else if backing == "xfs" {
                (
                    false,
                    format!("overlay2 on xfs without prjquota ({root}): {scratch}"),
                )
            } else {
                (
                    false,
                    format!("overlay2 on {backing}, not xfs with prjquota: {scratch}"),
                )
            }
        }
        "" => (
            false,
            format!("the engine names no storage driver: {scratch}"),
        ),
        other => (
            false,
            format!("storage driver {other} does not enforce storage_opt size: {scratch}"),
        ),
    };
    Capability::new("docker.storage-opt", ok, detail)
}

#[derive(Debug, thiserror::Error)]
pub(super) enum DockerError {
    #[error("no socket at {0}")]
    NoSocket(String),
    #[error("{0} refuses connections (dockerd not running?)")]
    Refused(String),
    #[error("{0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("{0}: {1}")]
    Io(String, io::Error),
    #[error("{path}: GET {what} answered {status:?}")]
    Status {
        path: String,
        what: &'static str,
        status: String,
    },
    #[error("{path}: GET /version: {why}")]
    Body { path: String, why: String },
}

pub(super) fn docker_io(path: &Path, e: io::Error) -> DockerError {
    let p = path.display().to_string();
    match e.kind() {
        io::ErrorKind::NotFound => DockerError::NoSocket(p),
        io::ErrorKind::ConnectionRefused => DockerError::Refused(p),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            DockerError::Timeout(p, DOCKER_TIMEOUT)
        }
        _ => DockerError::Io(p, e),
    }
}

pub(super) fn probe_docker(path: &Path) -> Capability {
    match docker_version(path) {
        Ok((version, api)) => Capability::new(
            "docker",
            true,
            format!(
                "dockerd {version} (API {api}) answers at {}",
                path.display()
            ),
        ),
        Err(e) => Capability::new("docker", false, e.to_string()),
    }
}

/// `GET /_ping` then `GET /version`; the daemon's Version and ApiVersion.
pub(super) fn docker_version(path: &Path) -> Result<(String, String), DockerError> {
    let p = || path.display().to_string();
    let (status, body) = http_get(path, "GET /_ping HTTP/1.0\r\n\r\n")?;
    if !status_ok(&status) || body.trim() != "OK" {
        return Err(DockerError::Status {
            path: p(),
            what: "/_ping",
            status,
        });
    }
    let (status, body) = http_get(path, "GET /version HTTP/1.0\r\n\r\n")?;
    if !status_ok(&status) {
        return Err(DockerError::Status {
            path: p(),
            what: "/version",
            status,
        });
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| DockerError::Body {
        path: p(),
        why: format!("not JSON: {e}"),
    })?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let version = field("Version").ok_or_else(|| DockerError::Body {
        path: p(),
        why: "no Version field".to_string(),
    })?;
    Ok((version, field("ApiVersion").unwrap_or_else(|| "?".into())))
}

pub(super) fn status_ok(status_line: &str) -> bool {
    let mut w = status_line.split_whitespace();
    w.next().is_some_and(|h| h.starts_with("HTTP/")) && w.next() == Some("200")
}

/// Send one HTTP/1.0 request; return the status line and the body.
pub(super) fn http_get(path: &Path, request: &str) -> Result<(String, String), DockerError> {
    let mut stream = connect_unix(path, DOCKER_TIMEOUT).map_err(|e| docker_io(path, e))?;
    let io_err = |e| docker_io(path, e);
    stream
        .set_read_timeout(Some(DOCKER_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(DOCKER_TIMEOUT))
        .map_err(io_err)?;
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut raw = Vec::new();
    // HTTP/1.0: the server closes the connection after the response.
    stream
        .take(MAX_HTTP)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").trim().to_string();
    Ok((status, body.to_string()))
}

/// Connect a unix stream socket; the kernel gives up after `timeout` when
/// the listener's backlog is full (SO_SNDTIMEO bounds a blocking connect).
pub(super) fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: tv outlives the call and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: addr is a valid sockaddr_un and len does not exceed it.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
