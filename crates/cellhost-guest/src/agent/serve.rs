//! Where the agent listens, and the per-connection loop.
//!
//! - AF_VSOCK (`--vsock-port`, default 5555): the host reaches it through
//!   vhost-vsock (qemu, AF_VSOCK on the host) or Firecracker's hybrid
//!   vsock (a unix socket on the host and `CONNECT <port>`).
//! - A virtio-serial port (`--virtio-port`, `/dev/virtio-ports/<name>`):
//!   one byte stream with no connections. qemu's chardev socket on the
//!   host is the other end; when no host client is attached reads return
//!   end-of-file, so the agent waits and reads again, dropping any partial
//!   line (a new host client starts clean).
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
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::{Agent, Control};
use crate::line::{Frame, LineReader};
use crate::proto::{self, ErrorCode, Failure, Response};

pub const MAX_CONNECTIONS: usize = 64;

/// Serve one stream until end-of-file, an I/O error, or `shutdown`.
pub fn serve_stream(agent: &Agent, reader: impl Read, writer: impl Write) -> io::Result<Control> {
    let mut lines = LineReader::new(reader, proto::MAX_REQUEST_LINE);
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

struct Slot<'a>(&'a AtomicUsize);
impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn spawn_conn<S>(agent: &Arc<Agent>, active: &Arc<AtomicUsize>, on_shutdown: &OnShutdown, stream: S)
where
    S: Read + Write + Send + 'static,
    for<'a> &'a S: Read + Write,
{
    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
        active.fetch_sub(1, Ordering::SeqCst);
        let busy = Response::failure(
            Value::Null,
            Failure::new(ErrorCode::Busy, "too many connections"),
        );
        let _ = (&stream).write_all(&busy.to_line());
        return;
    }
    let (agent, active, on_shutdown) = (agent.clone(), active.clone(), on_shutdown.clone());
    std::thread::spawn(move || {
        let _slot = Slot(&active);
        match serve_stream(&agent, &stream, &stream) {
            Ok(Control::Shutdown) => on_shutdown(),
            Ok(Control::Continue) => {}
            Err(e) => tracing::debug!("connection ended: {e}"),
        }
    });
}

/// Accept on a unix socket at `path` forever.
pub fn listen_unix(agent: Arc<Agent>, path: &Path, on_shutdown: OnShutdown) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!("listening on unix:{}", path.display());
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        match conn {
            Ok(s) => spawn_conn(&agent, &active, &on_shutdown, s),
            Err(e) => tracing::warn!("accept: {e}"),
        }
    }
    Ok(())
}

/// Bind AF_VSOCK `port` on any CID (fails fast when the guest has no
/// vsock transport).
pub fn bind_vsock(port: u32) -> io::Result<vsock::VsockListener> {
    vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
}

/// Accept on a bound vsock listener forever.
pub fn listen_vsock(
    agent: Arc<Agent>,
    listener: vsock::VsockListener,
    on_shutdown: OnShutdown,
) -> io::Result<()> {
    tracing::info!("listening on vsock port {}", listener.local_addr()?.port());
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        match conn {
            Ok(s) => spawn_conn(&agent, &active, &on_shutdown, s),
            Err(e) => tracing::warn!("vsock accept: {e}"),
        }
    }
    Ok(())
}

/// Serve a virtio-serial port (a character device) forever.
pub fn serve_virtio_port(
    agent: Arc<Agent>,
    path: &Path,
    on_shutdown: OnShutdown,
) -> io::Result<()> {
    tracing::info!("serving virtio-serial port {}", path.display());
    loop {
        let dev = OpenOptions::new().read(true).write(true).open(path)?;
        // End-of-file means no host client; wait and start over.
        match serve_stream(&agent, &dev, &dev) {
            Ok(Control::Shutdown) => on_shutdown(),
            Ok(Control::Continue) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                tracing::debug!("virtio port: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
