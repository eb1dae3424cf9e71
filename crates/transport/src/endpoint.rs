//! Parsing of transport URLs.

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// A parsed transport URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// `tcp://host:port`: length-prefixed frames over plain TCP.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port (0 lets the OS pick when listening).
        port: u16,
    },
    /// `tls://host:port`: length-prefixed frames over TLS over TCP.
    Tls {
        /// Host name or IP address; also the TLS server name when connecting.
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:///absolute/path`: length-prefixed frames over a Unix socket.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
    /// `ws://host:port/path` or `wss://host:port/path`: one frame per binary message.
    Ws {
        /// Whether TLS is used (`wss://`).
        secure: bool,
        /// Host name or IP address.
        host: String,
        /// Port (default 80 / 443).
        port: u16,
        /// Request path, `/` when absent.
        path: String,
    },
}

impl Endpoint {
    /// Parses `tcp://`, `tls://`, `unix://`, `ws://` and `wss://` URLs.
    pub fn parse(url: &str) -> Result<Endpoint, Error> {
        let bad = |why: &str| Error::InvalidUrl {
            url: url.to_string(),
            reason: why.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("missing scheme://"))?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(Endpoint::Unix {
                    path: PathBuf::from(rest),
                })
            }
            "tcp" | "tls" => {
                let (host, port) = split_host_port(rest, None).map_err(|r| bad(&r))?;
                if rest.contains('/') {
                    return Err(bad("tcp:// and tls:// URLs take no path"));
                }
                Ok(if scheme == "tcp" {
                    Endpoint::Tcp { host, port }
                } else {
                    Endpoint::Tls { host, port }
                })
            }
            "ws" | "wss" => {
                let secure = scheme == "wss";
                let (authority, path) = match rest.find('/') {
                    Some(i) => (&rest[..i], rest[i..].to_string()),
                    None => (rest, "/".to_string()),
                };
                let (host, port) = split_host_port(authority, Some(if secure { 443 } else { 80 }))
                    .map_err(|r| bad(&r))?;
                Ok(Endpoint::Ws {
                    secure,
                    host,
                    port,
                    path,
                })
            }
            other => Err(bad(&format!(
                "unknown scheme `{other}` (expected tcp, tls, unix, ws or wss)"
            ))),
        }
    }

    /// The host part, for TCP-based endpoints.
    pub fn host(&self) -> Option<&str> {
        match self {
            Endpoint::Tcp { host, .. } | Endpoint::Tls { host, .. } | Endpoint::Ws { host, .. } => {
                Some(host)
            }
            Endpoint::Unix { .. } => None,
        }
    }
}

fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let (host, port) = if let Some(stripped) = s.strip_prefix('[') {
        let end = stripped.find(']').ok_or("unclosed [ in IPv6 address")?;
        let host = &stripped[..end];
        let after = &stripped[end + 1..];
        let port = after.strip_prefix(':');
        (host.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("empty host".into());
    }
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().map_err(|_| format!("bad port `{p}`"))?,
        (None, Some(d)) => d,
        (None, None) => return Err("missing :port".into()),
    };
    Ok((host, port))
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_fmt = |h: &str| {
            if h.contains(':') {
                format!("[{h}]")
            } else {
                h.to_string()
            }
        };
        match self {
            Endpoint::Tcp { host, port } => write!(f, "tcp://{}:{port}", host_fmt(host)),
            Endpoint::Tls { host, port } => write!(f, "tls://{}:{port}", host_fmt(host)),
            Endpoint::Unix { path } => write!(f, "unix://{}", path.display()),
            Endpoint::Ws {
                secure,
                host,
                port,
                path,
            } => write!(
                f,
                "{}://{}:{port}{path}",
                if *secure { "wss" } else { "ws" },
                host_fmt(host)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_schemes() {
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:80").unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 80
            }
        );
        assert_eq!(
            Endpoint::parse("unix:///tmp/x.sock").unwrap(),
            Endpoint::Unix {
                path: "/tmp/x.sock".into()
            }
        );
        assert_eq!(
            Endpoint::parse("wss://example.org").unwrap(),
            Endpoint::Ws {
                secure: true,
                host: "example.org".into(),
                port: 443,
                path: "/".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ws://[::1]:9000/mesh").unwrap().to_string(),
            "ws://[::1]:9000/mesh"
        );
        assert!(Endpoint::parse("http://x:1").is_err());
        assert!(Endpoint::parse("tcp://x").is_err());
        assert!(Endpoint::parse("tcp://x:99999").is_err());
        assert!(Endpoint::parse("nothing").is_err());
        assert!(Endpoint::parse("unix://").is_err());
    }
}
