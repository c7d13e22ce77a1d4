//! The consumer's HTTPS client: trusts exactly the certificate the
//! provider's signed offer pins, and signs every request (NIP-98) with
//! the consumer's key.
//!
//! Invariants: no request leaves before the handshake has proved the
//! pinned certificate's key; a mismatch is reported with both
//! fingerprints; the key signs only a request about to be sent to the
//! pinned server (one signature per request: the server refuses a
//! replay).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use nostr::{Keys, Url};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::AccessError;
use crate::tls::{Fingerprint, pinned_client_config};

/// Longest a connection (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A WebSocket to the tenant API, over the pinned TLS connection.
pub type PinnedSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A client of one tenant API.
pub struct PinnedClient {
    base: String,
    addr: Vec<SocketAddr>,
    server_name: ServerName<'static>,
    authority: String,
    pin: Fingerprint,
    seen: Arc<Mutex<Option<Fingerprint>>>,
    config: Arc<ClientConfig>,
    signer: Option<Keys>,
}

impl PinnedClient {
    /// A client of `base_url` (`https://host:port`) pinned to `pin`,
    /// signing with `signer` when given.
    pub fn new(
        base_url: &str,
        pin: Fingerprint,
        signer: Option<Keys>,
    ) -> Result<PinnedClient, AccessError> {
        let bad = |why: String| AccessError::InvalidUrl(format!("{base_url}: {why}"));
        let u = Url::parse(base_url).map_err(|e| bad(e.to_string()))?;
        if u.scheme() != "https" {
            return Err(bad("the tenant API is https".into()));
        }
        let host = u.host_str().ok_or_else(|| bad("no host".into()))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(bare.to_string()).map_err(|e| bad(format!("host {host}: {e}")))?;
        let addr: Vec<SocketAddr> = (bare, u.port().unwrap_or(443))
            .to_socket_addrs()
            .map_err(|e| bad(format!("resolving {host}: {e}")))?
            .collect();
        let authority = match u.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let seen = Arc::new(Mutex::new(None));
        Ok(PinnedClient {
            base: base_url.trim_end_matches('/').to_string(),
            addr,
            server_name,
            authority,
            pin,
            config: pinned_client_config(pin, seen.clone())?,
            seen,
            signer,
        })
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The NIP-98 header of one request about to be sent, when signing.
    fn authorization(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Option<String>, AccessError> {
        let Some(keys) = &self.signer else {
            return Ok(None);
        };
        let url = format!("{}{path_and_query}", self.base);
        crate::nip98::sign(keys, method, &url, body, crate::nip98::now())
            .map(Some)
            .map_err(|e| AccessError::Sign(e.to_string()))
    }

    /// Send one request; the response body streams.
    pub async fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Vec<u8>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<hyper::Response<Incoming>, AccessError> {
        let tls = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(AccessError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("tenant API connection: {e}");
            }
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, &self.authority);
        if let Some(auth) = self.authorization(method, path_and_query, &body)? {
            req = req.header(AUTHORIZATION, auth);
        }
        if !body.is_empty() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AccessError::InvalidUrl(format!("{path_and_query}: {e}")))?;
        sender.send_request(req).await.map_err(AccessError::Http)
    }

    /// Send one request and read its whole body (at most `limit` bytes).
    pub async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<(u16, Bytes), AccessError> {
        let r = self.send(method, path_and_query, body, &[]).await?;
        let status = r.status().as_u16();
        let body = Limited::new(r.into_body(), limit)
            .collect()
            .await
            .map_err(|e| AccessError::Body(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// Open a WebSocket at `path_and_query` (a GET, signed like any
    /// request). A refusal before the upgrade is
    /// [`AccessError::Refused`] with the API's status and JSON body.
    pub async fn websocket(&self, path_and_query: &str) -> Result<PinnedSocket, AccessError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = self.connect().await?;
        let ws_url = format!("wss://{}{path_and_query}", self.authority);
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| AccessError::InvalidUrl(format!("{ws_url}: {e}")))?;
        if let Some(auth) = self.authorization("GET", path_and_query, b"")? {
            let v = HeaderValue::from_str(&auth).map_err(|e| AccessError::Sign(e.to_string()))?;
            req.headers_mut().insert(AUTHORIZATION, v);
        }
        match tokio_tungstenite::client_async(req, tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(AccessError::Refused {
                status: r.status().as_u16(),
                body: String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
                    .chars()
                    .take(4096)
                    .collect(),
            }),
            Err(e) => Err(AccessError::WebSocket(e.to_string())),
        }
    }

    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, AccessError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr[..]))
            .await
            .map_err(|_| AccessError::Connect(format!("{}: timed out", self.base)))?
            .map_err(|e| AccessError::Connect(format!("{}: {e}", self.base)))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.config.clone());
        let handshake = tls.connect(self.server_name.clone(), tcp);
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                let seen = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
                match seen {
                    Some(presented) if presented != self.pin => {
                        Err(AccessError::CertificateMismatch {
                            expected: self.pin,
                            presented,
                        })
                    }
                    _ => Err(AccessError::Connect(format!("{}: TLS: {e}", self.base))),
                }
            }
            Err(_) => Err(AccessError::Connect(format!(
                "{}: the TLS handshake timed out",
                self.base
            ))),
        }
    }
}

/// Carry `tcp` over `ws` (binary messages both ways) until the cell's
/// side closes, or the local side has closed and the cell has answered:
/// the consumer's end of a port stream.
pub async fn pump_tcp(ws: PinnedSocket, tcp: TcpStream) {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut to_cell, mut from_cell) = ws.split();
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if to_cell.send(Message::Binary(chunk)).await.is_err() {
                return;
            }
        }
        let _ = to_cell.send(Message::Close(None)).await;
    };
    let down = async move {
        while let Some(Ok(msg)) = from_cell.next().await {
            let more = match msg {
                Message::Binary(b) => wr.write_all(&b).await.is_ok(),
                Message::Close(_) => false,
                _ => true,
            };
            if !more {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    tokio::pin!(down);
    tokio::select! {
        () = up => down.await,
        () = &mut down => {}
    }
}
