//! The HTTP API (axum): REST + JSON over a unix socket (operator) and,
//! optionally, for tenants: TCP with bearer tokens, and TLS where a
//! tenant is a Nostr key that signs each request (NIP-98).
//!
//! # Layout on the host
//!
//! ```text
//! /run/cellhost/            0700 (created by `cellhost serve` when missing)
//!   api.sock                0600  every request is the operator
//! tcp:127.0.0.1:7070        optional; `Authorization: Bearer <token>`
//! https://HOST:PORT         optional; `Authorization: Nostr <event>`
//!                           (or Bearer); the certificate is pinned by
//!                           the fingerprint the market's offer carries
//! ```
//!
//! # Threat model
//!
//! The socket's mode is the operator's authentication: whoever can connect
//! is root-equivalent for cells. TCP and TLS callers are tenants: no
//! token or signature → 401 (a bad signature: 401 with its own `code`,
//! see `cellhost_access::nip98`); a tenant sees and touches only the
//! cells it owns (any other id → 404,
//! indistinguishable from a missing one). `/healthz` and `/openapi.json`
//! are public. Bodies are capped at [`BODY_LIMIT`]; a malformed body,
//! query or document is a 400 JSON error naming the field, never a panic.
//! Documents may carry only inline `value` secrets (see the supervisor's
//! docs); their values go to the backend and are redacted before storing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cellhost_access::nip98::{self, AuthError, SignedRequest, Verifier};
use cellhost_core::{ExecRequest, VolumeKey};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::error::SupervisorError;
use crate::events::CloudEvent;
use crate::limits::{StreamGuard, TenantLimits};
use crate::node::{NodeStatus, NodeView, TenantNodeStatus};
use crate::supervisor::{Caller, CellView, Confidential, Supervisor};
use crate::tokens::Tokens;

/// Largest request body accepted (a document is capped at 1 MiB by the
/// parser too).
pub const BODY_LIMIT: usize = 1 << 20;

/// Most bytes of log one non-following `logs` call returns.
pub const LOG_PAGE_LIMIT: usize = 8 << 20;

/// Most bytes of stdout (and of stderr) an exec returns.
pub const EXEC_OUTPUT_LIMIT: usize = 4 << 20;

/// `{ "error": "...", "code": "not_found", "field": "spec.cpus" }`
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: String,
    /// Stable machine-readable code.
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error response.
pub struct ApiFailure {
    status: StatusCode,
    body: ApiError,
}

impl ApiFailure {
    fn new(status: StatusCode, code: &str, error: impl Into<String>) -> Self {
        ApiFailure {
            status,
            body: ApiError {
                error: error.into(),
                code: code.into(),
                field: None,
            },
        }
    }

    fn bad_request(field: Option<&str>, error: impl Into<String>) -> Self {
        let mut f = ApiFailure::new(StatusCode::BAD_REQUEST, "invalid", error);
        f.body.field = field.map(str::to_string);
        f
    }
}

impl From<SupervisorError> for ApiFailure {
    fn from(e: SupervisorError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        // A caller may be a hostile tenant: the host's own failures reach
        // it as a fixed sentence and a reference into the operator's log.
        let error = if e.is_redacted() {
            let id = cellhost_core::ids::CellId::random();
            let reference = &id.as_str()[..8];
            tracing::error!(reference, "api: {e}");
            format!(
                "{} (ref {reference} in the operator's log)",
                e.public_message()
            )
        } else {
            if status.is_server_error() {
                tracing::error!("api: {e}");
            }
            e.to_string()
        };
        ApiFailure {
            status,
            body: ApiError {
                error,
                code: e.code().to_string(),
                field: e.field().map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rej) => Err(body_rejected(rej.status(), rej.body_text())),
        }
    }
}

/// A body axum would not take. Too large stays 413; every other body
/// problem (syntax, wrong types, missing Content-Type) is the client's: 400.
fn body_rejected(status: StatusCode, text: String) -> ApiFailure {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiFailure::new(status, "too_large", text)
    } else {
        ApiFailure::bad_request(None, text)
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|rej| ApiFailure::bad_request(None, rej.body_text()))
}

#[derive(Clone)]
struct AppState {
    sup: Arc<Supervisor>,
    /// Per-tenant caps (the tenants' router); `None` for the operator.
    limits: Option<Arc<TenantLimits>>,
}

impl AppState {
    /// Open a stream for `caller`, or 429 when it has the most it may.
    fn stream(&self, caller: &Caller) -> ApiResult<Option<StreamGuard>> {
        let Some(l) = &self.limits else {
            return Ok(None);
        };
        if caller.operator {
            return Ok(None);
        }
        l.stream(&caller.owner).map(Some).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "this tenant has the most streams open it may (policy: tenants.maxStreams); close one",
            )
        })
    }
}

/// The router with every route; `caller` decides who the requests are.
fn routes(sup: Arc<Supervisor>, limits: Option<Arc<TenantLimits>>) -> Router<()> {
    Router::new()
        .route("/v1/cells", post(create_cell).get(list_cells))
        .route("/v1/cells/{id}", get(get_cell).delete(delete_cell))
        .route("/v1/cells/{id}/start", post(start_cell))
        .route("/v1/cells/{id}/stop", post(stop_cell))
        .route("/v1/cells/{id}/extend", post(extend_cell))
        .route("/v1/cells/{id}/exec", post(exec_cell))
        .route("/v1/cells/{id}/logs", get(cell_logs))
        .route("/v1/cells/{id}/ports/{port}", get(port_stream))
        .route("/v1/events", get(events))
        .route("/v1/node", get(node))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(AppState { sup, limits })
}

/// The operator's router (unix socket): every request is the operator.
pub fn operator_router(sup: Arc<Supervisor>) -> Router<()> {
    routes(sup, None).layer(Extension(Caller::operator()))
}

/// The tenants' router (TCP or TLS): a bearer token or a NIP-98
/// signature decides the caller, and the policy's per-tenant caps apply
/// (see `limits`).
pub fn tenant_router(sup: Arc<Supervisor>, auth: TenantAuth) -> Router<()> {
    let limits = TenantLimits::new(sup.policy().tenants);
    routes(sup, Some(limits.clone()))
        .layer(middleware::from_fn_with_state(limits, rate_limit))
        .layer(middleware::from_fn_with_state(Arc::new(auth), authenticate))
}

/// Take one request from the caller's bucket, or answer 429 with
/// `Retry-After`.
async fn rate_limit(State(limits): State<Arc<TenantLimits>>, req: Request, next: Next) -> Response {
    let Some(caller) = req.extensions().get::<Caller>() else {
        return next.run(req).await; // public routes
    };
    if caller.operator {
        return next.run(req).await;
    }
    match limits.request(&caller.owner) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let mut r = ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this tenant (policy: tenants.requestsPerSecond)",
            )
            .into_response();
            let secs = wait.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

/// Who may call the tenants' router: bearer tokens the operator issued,
/// NIP-98 requests signed by a Nostr key (the tenant `nostr:<hex>`), or
/// both.
#[derive(Default)]
pub struct TenantAuth {
    pub tokens: Option<Arc<Tokens>>,
    pub nostr: Option<Arc<Verifier>>,
}

/// The tenant a NIP-98 signer is: the owner the market gives the cells it
/// sells to the same key.
pub fn nostr_owner(key: &cellhost_access::PublicKey) -> String {
    format!("nostr:{}", key.to_hex())
}

async fn authenticate(State(auth): State<Arc<TenantAuth>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/openapi.json" {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if let (Some(verifier), Some(_)) = (&auth.nostr, header.strip_prefix("Nostr ")) {
        // The signature covers the body: read it (capped) before routing,
        // and hand the same bytes on.
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return ApiFailure::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("bodies are capped at {BODY_LIMIT} bytes"),
                )
                .into_response();
            }
        };
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            body: &bytes,
        };
        return match verifier.verify(&header, signed, nip98::now()) {
            Ok(key) => {
                let mut req = Request::from_parts(parts, Body::from(bytes));
                req.extensions_mut()
                    .insert(Caller::key_holder(nostr_owner(&key)));
                next.run(req).await
            }
            Err(e) => {
                let status = match e {
                    AuthError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                nostr_challenge(ApiFailure::new(status, e.code(), e.to_string()).into_response())
            }
        };
    }
    let token = header.strip_prefix("Bearer ").map(str::trim);
    let owner = auth
        .tokens
        .as_ref()
        .zip(token)
        .and_then(|(tokens, t)| tokens.owner(t));
    match owner {
        Some(owner) => {
            let mut req = req;
            req.extensions_mut().insert(Caller::tenant(owner));
            next.run(req).await
        }
        None => {
            let wanted = match (&auth.tokens, &auth.nostr) {
                (Some(_), Some(_)) => {
                    "a valid `Authorization: Bearer <token>` or `Authorization: Nostr <NIP-98 event>` header is required"
                }
                (None, Some(_)) => {
                    "a valid `Authorization: Nostr <NIP-98 event>` header is required"
                }
                _ => "a valid `Authorization: Bearer <token>` header is required",
            };
            let r =
                ApiFailure::new(StatusCode::UNAUTHORIZED, "unauthorized", wanted).into_response();
            if auth.nostr.is_some() {
                nostr_challenge(r)
            } else {
                r
            }
        }
    }
}

/// A 401 of a listener that takes NIP-98: its challenge names `Nostr`
/// too (after `Bearer`, which every 401 carries).
fn nostr_challenge(mut r: Response) -> Response {
    if r.status() == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .append(header::WWW_AUTHENTICATE, HeaderValue::from_static("Nostr"));
    }
    r
}

async fn not_found() -> ApiFailure {
    ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

// ------------------------------------------------------------------ schemas

/// A cell document (`apiVersion: cellhost.dev/v1`, `kind: Cell`), as JSON
/// (`Content-Type: application/json`) or YAML (`application/yaml`). Unknown
/// fields are errors. Secrets may only be inline (`from: {value: ...}`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CellDocument {
    #[schema(example = "cellhost.dev/v1")]
    api_version: String,
    #[schema(example = "Cell")]
    kind: String,
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
    #[schema(value_type = Object)]
    spec: serde_json::Value,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateQuery {
    /// Start the workload after creating it (default true).
    pub start: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// SIGTERM→SIGKILL grace, seconds (default: the daemon's).
    #[param(maximum = 3600)]
    pub grace_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendRequest {
    /// Seconds to add to the lease.
    #[schema(minimum = 1, maximum = 31622400)]
    pub seconds: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments; the program is resolved on the cell's PATH.
    pub argv: Vec<String>,
    /// The exec'd process's whole environment.
    #[serde(default)]
    #[schema(value_type = std::collections::HashMap<String, String>)]
    pub env: indexmap::IndexMap<String, String>,
    pub cwd: Option<String>,
    /// Killed after this many milliseconds (default 30000).
    #[schema(minimum = 1, maximum = 3600000)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecResponse {
    /// The exit code, or 128 + signal.
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// Output as UTF-8 (invalid sequences replaced), each capped.
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the response open and stream new output until the cell ends.
    pub follow: Option<bool>,
    /// Byte offset to start from (default 0).
    pub offset: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Stream (Server-Sent Events) instead of returning one page.
    pub follow: Option<bool>,
    /// Return events with an id greater than this (default 0).
    pub after: Option<i64>,
    /// Page size, 1..=1000 (default 100); ignored when following.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub events: Vec<CloudEvent>,
    /// Pass as `after` to continue.
    pub next: i64,
}

/// The TeardownReport: what destroy checked, and what it found left.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TeardownReportSchema {
    cell_id: String,
    #[schema(value_type = Vec<Object>)]
    checks: Vec<serde_json::Value>,
    errors: Option<Vec<String>>,
    already_gone: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

// ----------------------------------------------------------------- handlers

/// Create (and start) a cell.
#[utoipa::path(post, path = "/v1/cells", tag = "cells",
    params(CreateQuery, (
        "Cellhost-Volume-Key" = Option<String>, Header,
        description = "Key of an encrypted spec.volume: 32 bytes as 64 hex digits or base64. Held in memory only, never stored."
    )),
    request_body(content(
        (CellDocument = "application/json"),
        (CellDocument = "application/yaml"),
    )),
    responses(
        (status = 201, description = "Created", body = CellView),
        (status = 400, description = "Invalid document", body = ApiError),
        (status = 401, description = "No valid token", body = ApiError),
        (status = 403, description = "The operator's policy refuses a field", body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 409, description = "Not enough capacity", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 422, description = "Tier not available here", body = ApiError),
    ))]
async fn create_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<CreateQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<CellView>)> {
    let q = query(q)?;
    let volume_key = volume_key(&headers)?;
    let body = body.map_err(|rej| body_rejected(rej.status(), rej.body_text()))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiFailure::bad_request(None, "the document is not UTF-8"))?;
    let mut cell = cellhost_spec::parse_and_validate(text).map_err(|e| {
        let errs = e.field_errors();
        let field = errs.first().map(|f| f.path.clone());
        let message = if errs.is_empty() {
            e.to_string()
        } else {
            errs.iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        };
        ApiFailure::bad_request(field.as_deref(), message)
    })?;
    let confidential = Confidential {
        secrets: crate::supervisor::take_inline_secrets(&mut cell)?,
        volume_key,
    };
    let view = st
        .sup
        .create(&caller, cell, confidential, q.start.unwrap_or(true))
        .await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The header that carries an encrypted volume's key.
pub const VOLUME_KEY_HEADER: &str = "cellhost-volume-key";

/// The volume key from its header, if sent.
fn volume_key(headers: &HeaderMap) -> ApiResult<Option<VolumeKey>> {
    let Some(v) = headers.get(VOLUME_KEY_HEADER) else {
        return Ok(None);
    };
    VolumeKey::parse(v.as_bytes())
        .map(Some)
        .map_err(|e| ApiFailure::bad_request(Some("Cellhost-Volume-Key"), e.to_string()))
}

/// List the caller's cells (every cell for the operator).
#[utoipa::path(get, path = "/v1/cells", tag = "cells",
    responses(
        (status = 200, body = Vec<CellView>),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
    ))]
async fn list_cells(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<CellView>>> {
    Ok(Json(st.sup.list(&caller).await?))
}

/// One cell, with its metered usage.
#[utoipa::path(get, path = "/v1/cells/{id}", tag = "cells",
    params(("id" = String, Path, description = "Cell id (12 hex digits)")),
    responses(
        (status = 200, body = CellView),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
    ))]
async fn get_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<CellView>> {
    Ok(Json(st.sup.get(&caller, &id).await?))
}

/// Destroy a cell; returns the TeardownReport (residue 0 or what is left).
#[utoipa::path(delete, path = "/v1/cells/{id}", tag = "cells",
    params(("id" = String, Path, description = "Cell id")),
    responses(
        (status = 200, body = TeardownReportSchema),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, description = "Another operation is running", body = ApiError),
    ))]
async fn delete_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<cellhost_core::TeardownReport>> {
    Ok(Json(st.sup.destroy(&caller, &id).await?))
}

/// Start a created (or stopped, where the tier can) cell.
#[utoipa::path(post, path = "/v1/cells/{id}/start", tag = "cells",
    params(("id" = String, Path, description = "Cell id"), (
        "Cellhost-Volume-Key" = Option<String>, Header,
        description = "Reopens the cell's encrypted volume (closed when it stopped)."
    )),
    responses(
        (status = 200, body = CellView),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, body = ApiError),
    ))]
async fn start_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<CellView>> {
    let key = volume_key(&headers)?;
    Ok(Json(st.sup.start(&caller, &id, key).await?))
}

/// Stop the workload (SIGTERM, SIGKILL after the grace); the cell stays.
#[utoipa::path(post, path = "/v1/cells/{id}/stop", tag = "cells",
    params(("id" = String, Path, description = "Cell id"), StopQuery),
    responses(
        (status = 200, body = CellView),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, body = ApiError),
    ))]
async fn stop_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<StopQuery>, QueryRejection>,
) -> ApiResult<Json<CellView>> {
    let q = query(q)?;
    let grace = match q.grace_seconds {
        Some(s) if s > 3600 => {
            return Err(ApiFailure::bad_request(
                Some("graceSeconds"),
                "must be 0..=3600",
            ));
        }
        g => g.map(Duration::from_secs),
    };
    Ok(Json(st.sup.stop(&caller, &id, grace).await?))
}

/// Extend the lease.
#[utoipa::path(post, path = "/v1/cells/{id}/extend", tag = "cells",
    params(("id" = String, Path, description = "Cell id")),
    request_body = ExtendRequest,
    responses(
        (status = 200, body = CellView),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, description = "Lease already ended", body = ApiError),
    ))]
async fn extend_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExtendRequest>,
) -> ApiResult<Json<CellView>> {
    Ok(Json(st.sup.extend(&caller, &id, body.seconds).await?))
}

/// Run a command inside a running cell and collect its output.
#[utoipa::path(post, path = "/v1/cells/{id}/exec", tag = "cells",
    params(("id" = String, Path, description = "Cell id")),
    request_body = ExecBody,
    responses(
        (status = 200, body = ExecResponse),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, body = ApiError),
        (status = 422, description = "The tier cannot exec", body = ApiError),
        (status = 504, description = "Timed out", body = ApiError),
    ))]
async fn exec_cell(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> ApiResult<Json<ExecResponse>> {
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiFailure::bad_request(Some("argv"), "must name a program"));
    }
    if body.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiFailure::bad_request(
            Some("argv"),
            "must not contain NUL",
        ));
    }
    for (k, v) in &body.env {
        if !cellhost_spec::is_posix_name(k) || v.contains('\0') {
            return Err(ApiFailure::bad_request(
                Some(&format!("env.{}", k.escape_debug())),
                "names must be POSIX names and values must not contain NUL",
            ));
        }
    }
    let timeout = body.timeout_ms.unwrap_or(30_000);
    if !(1..=3_600_000).contains(&timeout) {
        return Err(ApiFailure::bad_request(
            Some("timeoutMs"),
            "must be 1..=3600000",
        ));
    }
    let req = ExecRequest {
        argv: body.argv,
        env: body.env.into_iter().collect(),
        cwd: body.cwd,
        timeout: Some(Duration::from_millis(timeout)),
    };
    let _stream = st.stream(&caller)?;
    let out = st.sup.exec(&caller, &id, req).await?;
    let cap = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(EXEC_OUTPUT_LIMIT)]).into_owned();
    Ok(Json(ExecResponse {
        exit_code: out.exit.shell_code(),
        signal: out.exit.signal,
        stdout: cap(&out.stdout),
        stderr: cap(&out.stderr),
    }))
}

/// The cell's combined stdout+stderr (`text/plain`); `follow=true` streams.
#[utoipa::path(get, path = "/v1/cells/{id}/logs", tag = "cells",
    params(("id" = String, Path, description = "Cell id"), LogsQuery),
    responses(
        (status = 200, description = "Log bytes", content_type = "text/plain", body = String),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 404, body = ApiError),
    ))]
async fn cell_logs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let mut offset = q.offset.unwrap_or(0);
    // Fail early (404) before a streaming response has started.
    let first = st.sup.logs(&caller, &id, offset).await?;
    let plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !q.follow.unwrap_or(false) {
        let mut data = first.data;
        offset = first.next_offset;
        let mut more = first.more;
        while more && data.len() < LOG_PAGE_LIMIT {
            let c = st.sup.logs(&caller, &id, offset).await?;
            offset = c.next_offset;
            more = c.more;
            data.extend_from_slice(&c.data);
        }
        data.truncate(LOG_PAGE_LIMIT);
        return Ok((plain, data).into_response());
    }
    struct Follow {
        st: AppState,
        caller: Caller,
        id: String,
        offset: u64,
        pending: Option<Vec<u8>>,
        idle_checks: u32,
        /// Held for as long as the stream is open.
        _guard: Option<StreamGuard>,
    }
    let guard = st.stream(&caller)?;
    let init = Follow {
        _guard: guard,
        st,
        caller,
        id,
        offset: first.next_offset,
        pending: Some(first.data).filter(|d| !d.is_empty()),
        idle_checks: 0,
    };
    let s = stream::unfold(init, |mut f| async move {
        if let Some(d) = f.pending.take() {
            return Some((Ok::<_, Infallible>(Bytes::from(d)), f));
        }
        loop {
            match f.st.sup.logs(&f.caller, &f.id, f.offset).await {
                Ok(c) if !c.data.is_empty() => {
                    f.offset = c.next_offset;
                    f.idle_checks = 0;
                    return Some((Ok(Bytes::from(c.data)), f));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
            // Nothing new: end once the workload cannot write any more
            // (checked every 10 idle polls, and the log drained again).
            f.idle_checks += 1;
            if f.idle_checks % 10 == 0 && !f.st.sup.log_open(&f.caller, &f.id).await {
                let last = f.st.sup.logs(&f.caller, &f.id, f.offset).await.ok()?;
                if last.data.is_empty() {
                    return None;
                }
                f.offset = last.next_offset;
                return Some((Ok(Bytes::from(last.data)), f));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok((plain, Body::from_stream(s)).into_response())
}

/// Most bytes of one WebSocket message a port stream takes from a client.
pub const PORT_MESSAGE_LIMIT: usize = 1 << 20;

/// A TCP stream to a port inside the cell, carried over a WebSocket
/// (binary messages both ways), with no host port published. The
/// connection is made from inside the cell before the upgrade, so a
/// closed port is an HTTP error, not an empty stream. It counts as one of
/// the tenant's streams.
#[utoipa::path(get, path = "/v1/cells/{id}/ports/{port}", tag = "cells",
    params(("id" = String, Path, description = "Cell id"),
           ("port" = u16, Path, description = "TCP port inside the cell, 1..=65535")),
    responses(
        (status = 101, description = "A WebSocket: binary messages are the TCP stream's bytes"),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 404, body = ApiError),
        (status = 409, description = "The cell is not running", body = ApiError),
        (status = 422, description = "The tier cannot connect into its cells", body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 502, description = "Nothing in the cell accepts connections on the port", body = ApiError),
    ))]
async fn port_stream(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, port)): Path<(String, String)>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiFailure::bad_request(Some("port"), "must be 1..=65535"))?;
    let ws = ws.map_err(|rej| ApiFailure::bad_request(None, rej.body_text()))?;
    let guard = st.stream(&caller)?;
    let tcp = st.sup.connect(&caller, &id, port).await?;
    let tcp = tcp
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(tcp))
        .map_err(|e| {
            ApiFailure::from(SupervisorError::Internal(format!(
                "port stream socket: {e}"
            )))
        })?;
    Ok(ws
        .max_message_size(PORT_MESSAGE_LIMIT)
        .max_frame_size(PORT_MESSAGE_LIMIT)
        .on_upgrade(move |socket| async move {
            pump_port(socket, tcp).await;
            drop(guard);
        }))
}

/// Copy WebSocket binary messages into `tcp` and its bytes back, until
/// the cell's side closes (or the client's, once the cell has answered).
async fn pump_port(socket: WebSocket, tcp: tokio::net::TcpStream) {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut to_client, mut from_client) = socket.split();
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        while let Some(Ok(msg)) = from_client.next().await {
            let more = match msg {
                WsMessage::Binary(b) => wr.write_all(&b).await.is_ok(),
                WsMessage::Close(_) => false,
                _ => true,
            };
            if !more {
                break;
            }
        }
        // The client is done sending: half-close, as TCP would.
        let _ = wr.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if to_client.send(WsMessage::Binary(chunk)).await.is_err() {
                return;
            }
        }
        let _ = to_client.send(WsMessage::Close(None)).await;
    };
    tokio::pin!(down);
    tokio::select! {
        () = up => down.await,
        () = &mut down => {}
    }
}

/// The audit log as CloudEvents; `follow=true` streams Server-Sent Events.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events, or a Server-Sent Events stream of CloudEvents when following",
            content((EventPage = "application/json"), (String = "text/event-stream"))),
        (status = 400, body = ApiError),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
    ))]
async fn events(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiFailure::bad_request(Some("limit"), "must be 1..=1000"));
    }
    // SSE clients resume with Last-Event-ID.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let after = resume.or(q.after).unwrap_or(0).max(0);
    if !q.follow.unwrap_or(false) {
        let (events, next) = st.sup.events(&caller, after, limit).await?;
        return Ok(Json(EventPage { events, next }).into_response());
    }
    let guard = st.stream(&caller)?;
    Ok(Sse::new(event_stream(st.sup, caller, after, guard))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn event_stream(
    sup: Arc<Supervisor>,
    caller: Caller,
    after: i64,
    guard: Option<StreamGuard>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let rx = sup.subscribe();
    let init = (
        sup,
        caller,
        after,
        rx,
        std::collections::VecDeque::<CloudEvent>::new(),
        guard,
    );
    stream::unfold(
        init,
        |(sup, caller, mut cursor, mut rx, mut buf, guard)| async move {
            loop {
                if let Some(ev) = buf.pop_front() {
                    let sse = SseEvent::default()
                        .id(ev.id.clone())
                        .event(ev.kind.clone())
                        .json_data(&ev)
                        .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
                    return Some((Ok(sse), (sup, caller, cursor, rx, buf, guard)));
                }
                rx.mark_unchanged();
                match sup.events(&caller, cursor, 256).await {
                    Ok((events, next)) => {
                        cursor = next;
                        if !events.is_empty() {
                            buf.extend(events);
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("event stream: {e}");
                        return None;
                    }
                }
                // Woken by the supervisor, or poll now and then (events written
                // by another process, e.g. `cellhost run`).
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
        },
    )
}

/// The operator gets the node's real CPU, memory and disk figures,
/// capacity and reservations; a tenant only what the market publishes
/// (tiers, free room, running cells).
#[utoipa::path(get, path = "/v1/node", tag = "node",
    responses(
        (status = 200, body = NodeView),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
    ))]
async fn node(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<NodeView>> {
    if caller.operator {
        return Ok(Json(NodeView::Operator(Box::new(st.sup.node().await?))));
    }
    let counts = st.sup.cell_counts().await?;
    Ok(Json(NodeView::Tenant(TenantNodeStatus {
        name: st.sup.node_name().to_string(),
        tiers: st.sup.tiers().iter().map(|t| t.to_string()).collect(),
        free: st.sup.capacity().free(st.sup.reserved()),
        running_cells: counts.running,
    })))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "node",
    responses(
        (status = 200, content_type = "text/plain", body = String),
        (status = 401, body = ApiError),
        (status = 429, description = "A per-tenant cap (policy: tenants)", body = ApiError),
        (status = 403, description = "Only the operator reads metrics", body = ApiError),
    ))]
async fn metrics(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Response> {
    if !caller.operator {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "metrics are for the operator",
        ));
    }
    let text = crate::metrics::render(&st.sup).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "node",
    security(()),
    responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "node",
    security(()),
    responses((status = 200, content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "cellhost", description = "Rent isolated compute cells. On the unix socket every caller is the operator; on TCP a bearer token names the owner."),
    paths(create_cell, list_cells, get_cell, delete_cell, start_cell, stop_cell, extend_cell,
          exec_cell, cell_logs, port_stream, events, node, metrics, healthz, openapi_json),
    components(schemas(ApiError, CellView, CellDocument, EventPage, CloudEvent, NodeStatus,
                        TenantNodeStatus, NodeView,
                        ExtendRequest, ExecBody, ExecResponse, TeardownReportSchema, Health)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
struct ApiDoc;

/// The OpenAPI 3.1 document of this API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
