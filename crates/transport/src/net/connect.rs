//! Dialing: `connect` by URL, with its TLS and WebSocket handshakes.

use proto::{WS_SUBPROTOCOL, WS_SUBPROTOCOL_JSON};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::{deadline, step, tls_step, ws_config};
use crate::conn::{spawn_sock, spawn_stream, spawn_ws, Limit};
use crate::sock::{Sock, Stream};
use crate::{Config, Connection, Endpoint, Error, PeerAddr};

fn tls_connector(
    config: &Config,
    host: &str,
) -> Result<(TlsConnector, ServerName<'static>), Error> {
    let client = config.tls.client.clone().ok_or_else(|| {
        Error::Tls("connecting to tls:// or wss:// needs Config::tls.client (trusted roots)".into())
    })?;
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| Error::Tls(format!("invalid server name `{host}`: {e}")))?;
    Ok((TlsConnector::from(client), name))
}

async fn dial_tcp(
    host: &str,
    port: u16,
    config: &Config,
    deadline: tokio::time::Instant,
) -> Result<(TcpStream, PeerAddr), Error> {
    let stream = step(config, deadline, "connect", async {
        Ok(TcpStream::connect((host, port)).await?)
    })
    .await?;
    stream.set_nodelay(true)?;
    let peer = PeerAddr::Tcp(stream.peer_addr()?);
    Ok((stream, peer))
}

/// The TLS handshake of a dialed connection, with the `connector` and
/// server name [`tls_connector`] made.
async fn tls_client(
    (connector, name): (TlsConnector, ServerName<'static>),
    stream: TcpStream,
    config: &Config,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, Error> {
    tls_step(config, deadline, connector.connect(name, stream)).await
}

/// The WebSocket upgrade of a dialed connection (`request` offers the
/// subprotocol), then its tasks.
async fn ws_client<S>(
    request: Request,
    stream: S,
    peer: PeerAddr,
    config: &Config,
    deadline: Instant,
) -> Result<Connection, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws = step(config, deadline, "websocket upgrade", async {
        let (ws, _resp) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config(config)))
                .await
                .map_err(|e| Error::WebSocket(e.to_string()))?;
        Ok(ws)
    })
    .await?;
    Ok(spawn_ws(
        ws,
        peer,
        config,
        config.ws_json,
        Limit::Full,
        None,
    ))
}

/// Connects to `url` (see the crate docs for the schemes).
///
/// TLS (`tls://`, `wss://`) needs [`crate::TlsConfig::client`]. The whole of
/// it (the TCP or Unix connect, the TLS handshake, the WebSocket upgrade) is
/// bounded by [`Config::handshake_timeout`]: past it, the error is
/// [`Error::HandshakeTimeout`] naming the step (`connect`, `tls`,
/// `websocket upgrade`).
pub async fn connect(url: &str, config: &Config) -> Result<Connection, Error> {
    let endpoint = Endpoint::parse(url)?;
    let deadline = deadline(config);
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let (stream, peer) = dial_tcp(&host, port, config, deadline).await?;
            let sock = Sock::new(Stream::Tcp(stream), None);
            Ok(spawn_sock(sock, peer, config, Limit::Full))
        }
        Endpoint::Tls { host, port } => {
            let connector = tls_connector(config, &host)?;
            let (stream, peer) = dial_tcp(&host, port, config, deadline).await?;
            let tls = tls_client(connector, stream, config, deadline).await?;
            let (r, w) = tokio::io::split(tls);
            Ok(spawn_stream(r, w, peer, config, None, Limit::Full))
        }
        Endpoint::Unix { path } => {
            let stream = step(config, deadline, "connect", async {
                Ok(UnixStream::connect(&path).await?)
            })
            .await?;
            let sock = Sock::new(Stream::Unix(stream), None);
            Ok(spawn_sock(
                sock,
                PeerAddr::Unix(Some(path)),
                config,
                Limit::Full,
            ))
        }
        Endpoint::Ws {
            secure,
            ref host,
            port,
            ..
        } => {
            let mut request = url
                .into_client_request()
                .map_err(|e| Error::WebSocket(e.to_string()))?;
            let json = config.ws_json;
            let offered = if json {
                WS_SUBPROTOCOL_JSON
            } else {
                WS_SUBPROTOCOL
            };
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(offered));
            let tls = if secure {
                Some(tls_connector(config, host)?)
            } else {
                None
            };
            let (stream, peer) = dial_tcp(host, port, config, deadline).await?;
            match tls {
                Some(connector) => {
                    let tls = tls_client(connector, stream, config, deadline).await?;
                    ws_client(request, tls, peer, config, deadline).await
                }
                None => ws_client(request, stream, peer, config, deadline).await,
            }
        }
    }
}
