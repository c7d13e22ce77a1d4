//! A small HTTP/1.1 client for the daemon's API, over its unix socket or
//! TCP (hyper). One connection per request: the CLI makes one or two.

use std::path::PathBuf;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::{EXIT_INVALID, EXIT_RUNTIME, exit_err};

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Target {
    Unix(PathBuf),
    /// `host:port`
    Tcp(String),
}

impl Target {
    /// `unix:/path`, `tcp:host:port`, or a bare path.
    pub fn parse(s: &str) -> anyhow::Result<Target> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Target::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            Ok(Target::Tcp(a.to_string()))
        } else if s.starts_with('/') {
            Ok(Target::Unix(PathBuf::from(s)))
        } else {
            Err(exit_err(
                crate::EXIT_USAGE,
                format!("--api {s:?}: expected unix:/path or tcp:host:port"),
            ))
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp(a) => format!("tcp:{a}"),
        }
    }
}

pub struct Client {
    target: Target,
    token: Option<Zeroizing<String>>,
}

impl Client {
    pub fn new(target: Target, token: Option<Zeroizing<String>>) -> Client {
        Client { target, token }
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let no_daemon = |e: std::io::Error| {
            exit_err(
                EXIT_RUNTIME,
                format!(
                    "no daemon answers on {} ({e}); start it with `cellhost serve`",
                    self.target.describe()
                ),
            )
        };
        macro_rules! handshake {
            ($stream:expr) => {{
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new($stream))
                    .await
                    .context("HTTP handshake with the daemon")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                send
            }};
        }
        Ok(match &self.target {
            Target::Unix(p) => handshake!(
                tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(no_daemon)?
            ),
            Target::Tcp(a) => {
                handshake!(tokio::net::TcpStream::connect(a).await.map_err(no_daemon)?)
            }
        })
    }

    /// Send one request; the response body is left to the caller.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<Response<Incoming>> {
        self.send_with(method, path, body, None).await
    }

    /// [`Client::send`] with an encrypted volume's key in its header
    /// (marked sensitive, so hyper never logs it).
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        volume_key: Option<&cellhost_core::VolumeKey>,
    ) -> anyhow::Result<Response<Incoming>> {
        let mut sender = self.connect().await?;
        let host = match &self.target {
            Target::Unix(_) => "localhost".to_string(),
            Target::Tcp(a) => a.clone(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(t) = &self.token {
            req = req.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", t.as_str()),
            );
        }
        if let Some(k) = volume_key {
            let mut v = hyper::header::HeaderValue::from_str(&k.passphrase())?;
            v.set_sensitive(true);
            req = req.header(cellhost_supervisor::api::VOLUME_KEY_HEADER, v);
        }
        let req = match body {
            Some((ct, data)) => req
                .header(hyper::header::CONTENT_TYPE, ct)
                .body(Full::new(Bytes::from(data)))?,
            None => req.body(Full::new(Bytes::new()))?,
        };
        sender
            .send_request(req)
            .await
            .context("talking to the daemon")
    }

    /// Send and decode a JSON answer; an error answer becomes an error with
    /// the daemon's message (exit 3 for invalid input).
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> anyhow::Result<T> {
        self.json_with(method, path, body, None).await
    }

    /// [`Client::json`] with a volume key header (see [`Client::send_with`]).
    pub async fn json_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        volume_key: Option<&cellhost_core::VolumeKey>,
    ) -> anyhow::Result<T> {
        let resp = self.send_with(method, path, body, volume_key).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).context("decoding the daemon's answer")
    }
}

/// The daemon's error as a CLI error.
pub fn api_error(status: StatusCode, body: &[u8]) -> anyhow::Error {
    match serde_json::from_slice::<cellhost_supervisor::api::ApiError>(body) {
        Ok(e) => exit_err(
            if e.code == "invalid" {
                EXIT_INVALID
            } else {
                EXIT_RUNTIME
            },
            e.error,
        ),
        Err(_) => exit_err(
            EXIT_RUNTIME,
            format!(
                "daemon answered {status}: {}",
                String::from_utf8_lossy(body)
            ),
        ),
    }
}
