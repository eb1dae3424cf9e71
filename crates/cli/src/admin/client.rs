//! A client of the admin HTTP endpoints (what `replimesh clone add` and the
//! other admin subcommands use), on hyper's HTTP/1.1 client.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// Largest answer read, in bytes (a client list of a busy node fits).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The admin URL is not `http://host:port`.
    #[error("admin URL `{0}`: expected http://HOST:PORT")]
    Url(String),
    /// The node could not be reached, or the exchange broke.
    #[error("admin {addr}: {why}")]
    Io {
        /// The address dialed.
        addr: String,
        /// What went wrong.
        why: String,
    },
    /// No answer in time.
    #[error("admin {0}: no answer within the timeout")]
    Timeout(String),
    /// The node answered with an error status.
    #[error("{status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The node's `error` message (or its answer as text).
        message: String,
    },
}

/// A client of one node's admin server.
#[derive(Debug, Clone)]
pub struct AdminClient {
    authority: String,
    token: Option<String>,
    timeout: Duration,
}

/// Percent-encodes one path segment (everything but unreserved characters).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl AdminClient {
    /// A client of the admin server at `url` (`http://HOST:PORT`, a
    /// trailing `/` allowed, or plain `HOST:PORT`), presenting `token` as
    /// a bearer token.
    pub fn new(url: &str, token: Option<String>) -> Result<AdminClient, AdminClientError> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let authority = rest.trim_end_matches('/');
        let scheme_ok = !url.contains("://") || url.starts_with("http://");
        let valid = scheme_ok
            && !authority.contains(['/', '?', '#', '@'])
            && authority
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(AdminClientError::Url(url.to_owned()));
        }
        Ok(AdminClient {
            authority: authority.to_owned(),
            token,
            timeout: Duration::from_secs(10),
        })
    }

    /// Sets the time one request may take (default 10 s).
    pub fn timeout(mut self, t: Duration) -> AdminClient {
        self.timeout = t;
        self
    }

    /// Sends one request; returns the status and the body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), AdminClientError> {
        let io = |e: &dyn std::fmt::Display| AdminClientError::Io {
            addr: self.authority.clone(),
            why: e.to_string(),
        };
        let exchange = async {
            let stream = TcpStream::connect(&self.authority)
                .await
                .map_err(|e| io(&e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| io(&e))?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &self.authority);
            if let Some(t) = &self.token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
            }
            let payload = match body {
                Some(v) => {
                    req = req.header(header::CONTENT_TYPE, "application/json");
                    Bytes::from(v.to_string())
                }
                None => Bytes::new(),
            };
            let req = req.body(Full::new(payload)).map_err(|e| io(&e))?;
            let resp = sender.send_request(req).await.map_err(|e| io(&e))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| io(&e))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AdminClientError::Timeout(self.authority.clone()))?
    }

    /// Sends one request and reads its JSON answer; an error status becomes
    /// [`AdminClientError::Refused`] with the node's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AdminClientError> {
        let (status, bytes) = self.send(method, path, body).await?;
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            let message = parsed
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
            return Err(AdminClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        parsed.ok_or_else(|| AdminClientError::Io {
            addr: self.authority.clone(),
            why: "the answer is not JSON".into(),
        })
    }

    /// Links the node to a clone (`POST /api/clones`).
    pub async fn add_clone(&self, id: &str, url: &str) -> Result<Value, AdminClientError> {
        let body = json!({"id": id, "url": url});
        self.call(Method::POST, "/api/clones", Some(&body)).await
    }

    /// Unlinks a clone (`DELETE /api/clones/{id}`).
    pub async fn delete_clone(&self, id: &str) -> Result<Value, AdminClientError> {
        let path = format!("/api/clones/{}", segment(id));
        self.call(Method::DELETE, &path, None).await
    }

    /// Replaces the auth value the node presents to clones (`PUT /api/auth-out`).
    pub async fn set_auth_out(&self, value: &str) -> Result<Value, AdminClientError> {
        let body = json!({ "value": value });
        self.call(Method::PUT, "/api/auth-out", Some(&body)).await
    }

    /// Creates a group (`POST /api/groups`).
    pub async fn create_group(&self, name: &str, data: &str) -> Result<Value, AdminClientError> {
        let body = json!({"name": name, "data": data});
        self.call(Method::POST, "/api/groups", Some(&body)).await
    }

    /// Deletes a group (`DELETE /api/groups/{name}`).
    pub async fn delete_group(&self, name: &str) -> Result<Value, AdminClientError> {
        let path = format!("/api/groups/{}", segment(name));
        self.call(Method::DELETE, &path, None).await
    }

    /// Publishes `data` to `groups`, or to every group when `groups` is
    /// empty (`POST /api/publish`).
    pub async fn publish(&self, groups: &[String], data: &str) -> Result<Value, AdminClientError> {
        let body = if groups.is_empty() {
            json!({"all": true, "data": data})
        } else {
            json!({"groups": groups, "data": data})
        };
        self.call(Method::POST, "/api/publish", Some(&body)).await
    }

    /// The node's mesh clients (`GET /api/clients`).
    pub async fn clients(&self) -> Result<Value, AdminClientError> {
        self.call(Method::GET, "/api/clients", None).await
    }

    /// Closes a client's connection (`DELETE /api/clients/{key}`).
    pub async fn disconnect_client(&self, key: u64) -> Result<Value, AdminClientError> {
        self.call(Method::DELETE, &format!("/api/clients/{key}"), None)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_segments() {
        assert!(AdminClient::new("http://127.0.0.1:9100/", None).is_ok());
        assert!(AdminClient::new("127.0.0.1:9100", None).is_ok());
        for bad in [
            "https://127.0.0.1:9100",
            "http://x",
            "http://:1",
            "http://h:1/p",
            "",
        ] {
            assert!(AdminClient::new(bad, None).is_err(), "{bad}");
        }
        assert_eq!(segment("a/b c%"), "a%2Fb%20c%25");
        assert_eq!(segment("node-1.x_y~"), "node-1.x_y~");
    }
}
