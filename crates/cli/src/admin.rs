//! The admin HTTP server: `/health`, `/metrics`, `/api/status`, the
//! dashboard and the browser client, all compiled into the binary.
//!
//! A deliberately small HTTP/1.1 server: `GET` (and `HEAD`) only, one request
//! per connection (`Connection: close`), request heads up to 16 KiB, a
//! 10-second read timeout. It is meant for a private admin port, not for the
//! open internet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::assets;
use crate::metrics::Registry;

/// What the admin server shows: implemented by the node and the demo.
pub trait AdminSource: Send + Sync + 'static {
    /// The status document served at `/api/status` (the dashboard polls it).
    fn status(&self) -> serde_json::Value;
    /// False while shutting down: `/health` then answers 503.
    fn healthy(&self) -> bool;
    /// When set, `/api/status` answers only requests that present it
    /// (`Authorization: Bearer <token>` or `?token=<token>`); others get 401.
    fn admin_token(&self) -> Option<&str> {
        None
    }
}

/// Whether the request presents `token` (compared in constant time).
fn authorized(head: &str, target: &str, token: &str) -> bool {
    let eq = |given: &str| {
        given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    };
    let from_header = head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("authorization")
                && v.trim()
                    .strip_prefix("Bearer ")
                    .is_some_and(|t| eq(t.trim()))
        })
    });
    let from_query = target
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or(""))
        .is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.strip_prefix("token=").is_some_and(eq))
        });
    from_header || from_query
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
        let token = stop.clone();
        let requests = registry.counter(
            "replimesh_admin_requests_total",
            "HTTP requests served by the admin server",
            &[],
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = token.cancelled() => break,
                };
                requests.inc();
                let (registry, source) = (registry.clone(), source.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        handle(stream, &registry, &*source),
                    )
                    .await;
                });
            }
        });
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

struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn new(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Reply {
            status,
            content_type,
            body: body.into(),
        }
    }
}

/// Answers one request.
fn route(method: &str, target: &str, registry: &Registry, source: &dyn AdminSource) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::new("405 Method Not Allowed", "text/plain", "GET only\n");
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    match path {
        "/health" => {
            if source.healthy() {
                Reply::new("200 OK", "application/json", "{\"status\":\"ok\"}\n")
            } else {
                Reply::new(
                    "503 Service Unavailable",
                    "application/json",
                    "{\"status\":\"draining\"}\n",
                )
            }
        }
        "/metrics" => Reply::new(
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        ),
        "/api/status" => Reply::new("200 OK", "application/json", source.status().to_string()),
        _ => match assets::get(path) {
            Some((body, ct)) => Reply::new("200 OK", ct, body),
            None => Reply::new("404 Not Found", "text/plain", "not found\n"),
        },
    }
}

async fn handle(mut stream: TcpStream, registry: &Registry, source: &dyn AdminSource) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 16 * 1024 {
            let _ = write_reply(
                &mut stream,
                false,
                Reply::new("431 Request Header Fields Too Large", "text/plain", ""),
            )
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let reply = match (method, target, version) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
            let path = t.split(['?', '#']).next().unwrap_or("/");
            match source.admin_token() {
                Some(token) if path == "/api/status" && !authorized(&head, t, token) => {
                    Reply::new("401 Unauthorized", "text/plain", "admin token needed\n")
                }
                _ => route(m, t, registry, source),
            }
        }
        _ => Reply::new("400 Bad Request", "text/plain", "bad request\n"),
    };
    let _ = write_reply(&mut stream, method == Some("HEAD"), reply).await;
}

async fn write_reply(stream: &mut TcpStream, head_only: bool, reply: Reply) -> std::io::Result<()> {
    let header = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    let mut out = header.into_bytes();
    if !head_only {
        out.extend_from_slice(&reply.body);
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
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
mod tests {
    use super::*;

    struct Fake(std::sync::atomic::AtomicBool);
    impl AdminSource for Fake {
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"id": "x"})
        }
        fn healthy(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn serves_routes() {
        let reg = Registry::new();
        let fake = Arc::new(Fake(true.into()));
        let server = AdminServer::start("127.0.0.1:0", reg.clone(), fake.clone())
            .await
            .unwrap();
        let a = server.addr();
        assert_eq!(http_get(a, "/health").await.unwrap().0, 200);
        let (code, body) = http_get(a, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        let samples = crate::metrics::parse_text(&body).unwrap();
        assert!(samples
            .iter()
            .any(|s| s.0 == "replimesh_admin_requests_total" && s.2 >= 2.0));
        let (code, body) = http_get(a, "/api/status").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "{\"id\":\"x\"}"));
        let (code, body) = http_get(a, "/").await.unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("<html"));
        let (code, body) = http_get(a, "/replimesh.js").await.unwrap();
        assert_eq!(code, 200);
        assert!(body.contains("export"));
        assert_eq!(http_get(a, "/nope").await.unwrap().0, 404);
        fake.0.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(http_get(a, "/health").await.unwrap().0, 503);
        // Garbage and non-GET methods are refused.
        let mut s = TcpStream::connect(a).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    }
}
