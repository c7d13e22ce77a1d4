//! Where the agent listens, and the per-connection loop.
//!
//! - AF_VSOCK (`--vsock-port`, default 5555): the host reaches it through
//!   vhost-vsock (qemu, AF_VSOCK on the host) or Firecracker's hybrid
//!   vsock (a unix socket on the host and `CONNECT <port>`). Only the host
//!   (CID 2) may connect: with a loopback transport in the guest, a local
//!   user could otherwise drive the agent.
//! - A virtio-serial port (`--virtio-port NAME`): one byte stream with no
//!   connections. NAME is found as `/dev/virtio-ports/NAME` (udev's link)
//!   or through `/sys/class/virtio-ports/*/name` (a bare initramfs has only
//!   `/dev/vportNpM`); the port is retried until it appears. qemu's chardev
//!   socket on the host is the other end; when no host client is attached
//!   reads return end-of-file, so the agent waits and reads again, dropping
//!   any partial line (a new host client starts clean).
//! - A unix socket path (`--unix`): tests and process cells. The socket is
//!   made 0600.
//! - stdin/stdout (`--stdio`): one connection, ends at end-of-file; tests
//!   run the agent on a socketpair this way.
//!
//! Each connection gets a thread; at most [`MAX_CONNECTIONS`] at once (one
//! more is told `busy` and closed). Responses go out in request order.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{Agent, Control, Slot};
use crate::line::{Frame, LineReader};
use crate::proto::{self, ErrorCode, Failure, Response};

pub const MAX_CONNECTIONS: usize = 32;

/// Serve one stream until end-of-file, an I/O error, or `shutdown`.
pub fn serve_stream(agent: &Agent, reader: impl Read, writer: impl Write) -> io::Result<Control> {
    serve_lines(
        agent,
        LineReader::new(reader, proto::MAX_REQUEST_LINE),
        writer,
    )
}

/// [`serve_stream`] over a framer the caller set up (cap, end-of-file
/// behaviour).
pub fn serve_lines(
    agent: &Agent,
    mut lines: LineReader<impl Read>,
    writer: impl Write,
) -> io::Result<Control> {
    let mut out = BufWriter::new(writer);
    while let Some(frame) = lines.next_frame()? {
        let (resp, control) = match frame {
            Frame::Line(l) if l.iter().all(u8::is_ascii_whitespace) => continue,
            Frame::Line(l) => agent.handle_line(l),
            Frame::TooLong { len } => (
                Response::failure(
                    Value::Null,
                    Failure::new(
                        ErrorCode::LineTooLong,
                        format!(
                            "request line of {len} bytes is over the {} byte cap",
                            proto::MAX_REQUEST_LINE
                        ),
                    ),
                ),
                Control::Continue,
            ),
        };
        out.write_all(&resp.to_line())?;
        out.flush()?;
        if control == Control::Shutdown {
            return Ok(Control::Shutdown);
        }
    }
    Ok(Control::Continue)
}

/// What to do once some connection asked for `shutdown`.
pub type OnShutdown = Arc<dyn Fn() + Send + Sync>;

fn spawn_conn<S>(agent: &Arc<Agent>, active: &Arc<AtomicUsize>, on_shutdown: &OnShutdown, stream: S)
where
    S: Read + Write + Send + Sync + 'static,
    for<'a> &'a S: Read + Write,
{
    let busy = |stream: &S, why: &str| {
        let r = Response::failure(Value::Null, Failure::new(ErrorCode::Busy, why));
        let _ = (&*stream).write_all(&r.to_line());
    };
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        busy(&stream, "too many connections");
        return;
    }
    let stream = Arc::new(stream);
    let (agent, slot, on_shutdown, conn) = (
        agent.clone(),
        active.clone(),
        on_shutdown.clone(),
        stream.clone(),
    );
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .spawn(move || {
            let _slot = Slot(&slot);
            match serve_stream(&agent, &*conn, &*conn) {
                Ok(Control::Shutdown) => on_shutdown(),
                Ok(Control::Continue) => {}
                Err(e) => tracing::debug!("connection ended: {e}"),
            }
        });
    if let Err(e) = spawned {
        active.fetch_sub(1, Ordering::SeqCst);
        busy(&stream, &format!("cannot start a thread: {e}"));
    }
}

/// Accept forever, a thread per connection; `accept` answers `None` for a
/// peer it refused.
fn accept_loop<S>(
    agent: Arc<Agent>,
    on_shutdown: OnShutdown,
    mut accept: impl FnMut() -> io::Result<Option<S>>,
) where
    S: Read + Write + Send + Sync + 'static,
    for<'a> &'a S: Read + Write,
{
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        match accept() {
            Ok(Some(s)) => spawn_conn(&agent, &active, &on_shutdown, s),
            Ok(None) => {}
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Bind a unix socket at `path` (0600; a stale socket there is replaced).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::other(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accept on a bound unix listener forever.
pub fn listen_unix(agent: Arc<Agent>, listener: UnixListener, on_shutdown: OnShutdown) {
    accept_loop(agent, on_shutdown, || {
        listener.accept().map(|(s, _)| Some(s))
    });
}

/// Bind AF_VSOCK `port` on any CID (fails fast when the guest has no
/// vsock transport).
pub fn bind_vsock(port: u32) -> io::Result<vsock::VsockListener> {
    vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
}

/// Accept on a bound vsock listener forever; only the host's CID.
pub fn listen_vsock(agent: Arc<Agent>, listener: vsock::VsockListener, on_shutdown: OnShutdown) {
    accept_loop(agent, on_shutdown, || {
        let (s, peer) = listener.accept()?;
        if peer.cid() == vsock::VMADDR_CID_HOST {
            Ok(Some(s))
        } else {
            tracing::warn!("vsock: refused a connection from CID {}", peer.cid());
            Ok(None)
        }
    });
}

/// Where a virtio-serial port named `name` is: a path as given,
/// `/dev/virtio-ports/<name>` (udev), or the `/dev/vportNpM` whose
/// `/sys/class/virtio-ports/vportNpM/name` says `name`.
pub fn find_virtio_port(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let link = Path::new("/dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find_map(|e| {
            let n = std::fs::read_to_string(e.path().join("name")).ok()?;
            (n.trim_end() == name).then(|| Path::new("/dev").join(e.file_name()))
        })
}

/// Serve a virtio-serial port forever: wait for it to appear, then read
/// and answer; at end-of-file (no host client) wait and read again.
pub fn serve_virtio_port(agent: Arc<Agent>, name: &str, on_shutdown: OnShutdown) {
    let mut announced = false;
    loop {
        let dev = find_virtio_port(name).map(|p| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map(|f| (p, f))
        });
        let (path, dev) = match dev {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::debug!("virtio port {name}: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            None => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !announced {
            tracing::info!("serving virtio-serial port {name} ({})", path.display());
            announced = true;
        }
        let lines = LineReader::new(&dev, proto::MAX_REQUEST_LINE).drop_partial_at_eof(true);
        match serve_lines(&agent, lines, &dev) {
            Ok(Control::Shutdown) => on_shutdown(),
            Ok(Control::Continue) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                tracing::debug!("virtio port {name}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
