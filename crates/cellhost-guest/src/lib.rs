//! The guest channel: how cellhost talks to an agent inside a VM.
//!
//! - [`proto`]: the NDJSON protocol (types shared by both ends, limits,
//!   validation rules).
//! - [`mod@line`]: a capped line reader both ends frame with.
//! - [`agent`]: the in-guest agent behind the `cellhost-agent` binary:
//!   ping, env and secrets, exec, files, status, shutdown; PID 1 duties.
//! - [`client`]: the host side, over a unix socket, qemu virtio-serial,
//!   Firecracker's hybrid vsock or AF_VSOCK, with retries and timeouts.
//!
//! The crate is blocking and runtime-free so the agent links statically
//! into any initramfs (`-C target-feature=+crt-static`).

pub mod agent;
pub mod client;
pub mod line;
pub mod proto;

pub use client::{Client, ClientError, ConnectOptions, Endpoint};
pub use proto::{ErrorCode, ExecReply, ExecRequest, PROTOCOL_VERSION};
