//! The handshakes of an accepted connection (TLS, WebSocket upgrade).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use proto::{WS_SUBPROTOCOL, WS_SUBPROTOCOL_JSON};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

use super::listen::{Accepted, Mode};
use super::{deadline, step, tls_step, ws_config};
use crate::conn::{spawn_sock, spawn_stream, spawn_ws, Limit, Meter, Metered};
use crate::sock::{Slot, Sock, SockIo, Stream};
use crate::{http, Config, Connection, Error, PeerAddr};

/// The TLS and WebSocket handshakes of an accepted connection, together
/// bounded by [`Config::handshake_timeout`]. The connection keeps `slot`
/// (its place in the listener's limits) while its socket is open.
pub(super) async fn handshake(
    accepted: Accepted,
    slot: Slot,
    mode: &Mode,
    config: &Config,
) -> Result<Connection, Error> {
    let deadline = deadline(config);
    let limit = Limit::BeforeHello;
    match (accepted, mode) {
        (Accepted::Unix(s, peer), _) => {
            let sock = Sock::new(Stream::Unix(s), Some(slot));
            Ok(spawn_sock(sock, peer, config, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Plain) => {
            let sock = Sock::new(Stream::Tcp(s), Some(slot));
            Ok(spawn_sock(sock, peer, config, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Tls(acceptor)) => {
            let io = SockIo::whole(&Sock::new(Stream::Tcp(s), Some(slot)));
            let tls = tls_server(acceptor, io, config, deadline).await?;
            let (r, w) = tokio::io::split(tls);
            Ok(spawn_stream(r, w, peer, config, None, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Ws { tls, path }) => {
            let io = SockIo::whole(&Sock::new(Stream::Tcp(s), Some(slot)));
            match tls {
                Some(acceptor) => {
                    let tls = tls_server(acceptor, io, config, deadline).await?;
                    ws_server(tls, path, peer, config, deadline).await
                }
                None => ws_server(io, path, peer, config, deadline).await,
            }
        }
    }
}

/// The TLS handshake of an accepted connection.
async fn tls_server(
    acceptor: &TlsAcceptor,
    io: SockIo,
    config: &Config,
    deadline: Instant,
) -> Result<TlsStream<SockIo>, Error> {
    tls_step(config, deadline, acceptor.accept(io)).await
}

/// The WebSocket upgrade of an accepted connection (at `path`, with one of
/// our subprotocols), then its tasks. Its reads are metered against the
/// pre-hello frame limit from the upgrade request on.
async fn ws_server<S>(
    io: S,
    path: &str,
    peer: PeerAddr,
    config: &Config,
    deadline: Instant,
) -> Result<Connection, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let json = Arc::new(AtomicBool::new(false));
    let callback = ws_callback(path.to_string(), json.clone());
    let meter = Meter::new(config);
    let io = Metered::new(io, meter.clone());
    let io = http_or_upgrade(io, config, deadline).await?;
    let ws = step(config, deadline, "websocket upgrade", async {
        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(ws_config(config)))
            .await
            .map_err(|e| Error::WebSocket(e.to_string()))
    })
    .await?;
    let json = json.load(Ordering::Relaxed);
    Ok(spawn_ws(
        ws,
        peer,
        config,
        json,
        Limit::BeforeHello,
        Some(meter),
    ))
}

/// The stream to upgrade, or [`Error::HttpServed`] when the connection was
/// a plain `GET` of one of [`Config::http_files`] (answered and closed).
async fn http_or_upgrade<S>(
    s: S,
    config: &Config,
    deadline: Instant,
) -> Result<http::Prefixed<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = step(config, deadline, "http request", async {
        http::serve_or_upgrade(s, &config.http_files)
            .await
            .map_err(Error::Io)
    })
    .await?;
    match head {
        http::Head::Upgrade(s) => Ok(s),
        http::Head::Served(path) => Err(Error::HttpServed(path)),
    }
}

#[allow(clippy::result_large_err)]
fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

#[allow(clippy::result_large_err)] // the error type is tungstenite's
fn ws_callback(
    path: String,
    json: Arc<AtomicBool>,
) -> impl FnOnce(&Request, Response) -> Result<Response, ErrorResponse> {
    move |req: &Request, mut resp: Response| {
        if path != "/" && req.uri().path() != path {
            return Err(reject(
                StatusCode::NOT_FOUND,
                "no WebSocket endpoint at this path",
            ));
        }
        if let Some(offered) = req.headers().get("Sec-WebSocket-Protocol") {
            let offered = offered.to_str().unwrap_or("");
            let has = |name: &str| offered.split(',').any(|p| p.trim() == name);
            // Binary is preferred when a client offers both.
            let chosen = if has(WS_SUBPROTOCOL) {
                WS_SUBPROTOCOL
            } else if has(WS_SUBPROTOCOL_JSON) {
                json.store(true, Ordering::Relaxed);
                WS_SUBPROTOCOL_JSON
            } else {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "unsupported WebSocket subprotocol (this server speaks replimesh.v1 and replimesh.v1.json)",
                ));
            };
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        }
        Ok(resp)
    }
}
