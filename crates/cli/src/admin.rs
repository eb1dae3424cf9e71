//! The admin HTTP server: `/health`, `/ready`, `/metrics`, `/api/status`,
//! the dashboard and the browser client, all compiled into the binary, and
//! the write endpoints that change a running node (`/api/clones`,
//! `/api/groups`, `/api/publish`, `/api/clients`, `/api/auth-out`).
//!
//! Served by [axum] on hyper's HTTP/1.1 server: one request per connection
//! (`Connection: close`), request heads up to 16 KiB (431 past it), bodies
//! up to 64 KiB (413 past it), 10 seconds for a whole exchange, at most
//! [`MAX_CONNECTIONS`] connections at once (the next ones wait in the
//! listener's backlog). It is meant for a private admin port, not for the
//! open internet.
//!
//! The write endpoints (see [`AdminSource::write_token`] and
//! docs/operations.md) need `Authorization: Bearer <write token>`; without a
//! write token configured they answer 404.

mod client;
mod process;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use replimesh::mesh;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::assets;
use crate::metrics::Registry;

pub use client::{AdminClient, AdminClientError};

/// Admin connections served at once; further ones wait to be accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head (request line and headers), in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Longest request body, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Time for one whole exchange (head, body and answer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin server shows and changes: implemented by the node and the
/// demo.
pub trait AdminSource: Send + Sync + 'static {
    /// The status document served at `/api/status` (the dashboard polls it).
    fn status(&self) -> serde_json::Value;
    /// False while shutting down: `/health` then answers 503.
    fn healthy(&self) -> bool;
    /// True once everything is up (listeners, stores, backups) and until
    /// the node begins to stop: `/ready` answers 200, else 503. Defaults to
    /// [`AdminSource::healthy`].
    fn ready(&self) -> bool {
        self.healthy()
    }
    /// When set, `/api/status` answers only requests that present it (or
    /// the write token) as `Authorization: Bearer <token>` or
    /// `?token=<token>`; others get 401.
    fn admin_token(&self) -> Option<String> {
        None
    }
    /// The token of the write endpoints (`Authorization: Bearer <token>`).
    /// `None` turns them off: they answer 404.
    fn write_token(&self) -> Option<String> {
        None
    }
    /// The mesh clone the write endpoints change; `None` turns them off.
    fn mesh(&self) -> Option<&mesh::Server> {
        None
    }
}

/// Whether `given` equals `token`, compared in time that depends only on
/// the lengths.
fn token_eq(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The bearer token of the request's `Authorization` header, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether the request presents one of `tokens`, in its `Authorization`
/// header or (when `query` is given) as `token=` in the query string.
fn presents(headers: &HeaderMap, query: Option<&str>, tokens: &[&str]) -> bool {
    let ok = |given: &str| tokens.iter().any(|t| token_eq(given, t));
    let from_header = bearer(headers).is_some_and(ok);
    let from_query = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.strip_prefix("token=").is_some_and(ok))
    });
    from_header || from_query
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    registry: Registry,
    source: Arc<dyn AdminSource>,
    writes: write::WriteStats,
}

/// A running admin server; dropping it (or [`AdminServer::shutdown`]) stops it.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl AdminServer {
    /// Binds `addr` (`ip:port`, port 0 picks one) and serves in the background.
    pub async fn start(
        addr: &str,
        registry: Registry,
        source: Arc<dyn AdminSource>,
    ) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let requests = registry.counter(
            "replimesh_admin_requests_total",
            "HTTP requests served by the admin server",
            &[],
        );
        let writes = write::WriteStats::new(&registry);
        process::register(&registry);
        let app = router(AppState {
            registry,
            source,
            writes,
        });
        tokio::spawn(accept_loop(listener, app, requests, stop.clone()));
        Ok(AdminServer { addr, stop })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dashboard's URL.
    pub fn dashboard_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Stops accepting.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    requests: crate::metrics::Counter,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        requests.inc();
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .timer(TokioTimer::new())
                .header_read_timeout(EXCHANGE_TIMEOUT);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, conn).await;
        });
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/api/clones", post(write::add_clone))
        .route("/api/clones/{id}", delete(write::delete_clone))
        .route("/api/auth-out", put(write::set_auth_out))
        .route("/api/groups", post(write::create_group))
        .route("/api/groups/{name}", delete(write::delete_group))
        .route("/api/publish", post(write::publish))
        .route("/api/clients", get(write::list_clients))
        .route("/api/clients/{key}", delete(write::disconnect_client))
        .fallback(asset)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(common_headers))
        .with_state(state)
}

/// Headers on every answer: never cached, never sniffed.
async fn common_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A plain-text answer.
fn text(code: StatusCode, body: &'static str) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// A JSON answer.
fn json(code: StatusCode, body: &serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

async fn health(State(s): State<AppState>) -> Response {
    if s.source.healthy() {
        json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "draining"}),
        )
    }
}

async fn ready(State(s): State<AppState>) -> Response {
    if s.source.ready() {
        json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
    } else if s.source.healthy() {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "starting"}),
        )
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "stopping"}),
        )
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.registry.render(),
    )
        .into_response()
}

async fn status(
    State(s): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Some(token) = s.source.admin_token() {
        let write = s.source.write_token();
        let mut tokens = vec![token.as_str()];
        tokens.extend(write.as_deref());
        if !presents(&headers, query.as_deref(), &tokens) {
            return text(StatusCode::UNAUTHORIZED, "admin token needed\n");
        }
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.source.status().to_string(),
    )
        .into_response()
}

/// The compiled-in files; `GET` and `HEAD` only.
async fn asset(method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match assets::get(uri.path()) {
        Some((body, ct)) => ([(header::CONTENT_TYPE, ct)], body).into_response(),
        None => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A minimal HTTP GET client for tests and tools: returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status code"))?;
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests;
