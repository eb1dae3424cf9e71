//! The door of a listener: accepting connections, the `Hello` within a
//! timeout, and logins with bans by address.
//!
//! The store [`Server`](crate::Server) lets its connections in through a
//! [`Gate`], and so does a process that accepts connections itself and
//! passes their store frames on with [`Server::adopt`](crate::Server::adopt)
//! (the `replimesh` node, whose listeners also serve the mesh): what happens
//! after the hello and the login is the caller's.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use proto::frame::Body;
use proto::{CloseCode, Frame, Hello, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;

use crate::auth::Bans;

/// Accepts connections on `listener` until `stop` is cancelled or the
/// listener fails (logged), and runs `serve` on each in a task of its own.
/// Returns at once: the accepting runs in a task. Must be called inside a
/// Tokio runtime.
pub fn accept_each<F, Fut>(listener: transport::Listener, stop: CancellationToken, mut serve: F)
where
    F: FnMut(transport::Connection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => break,
            };
            match conn {
                Ok(c) => {
                    tokio::spawn(serve(c));
                }
                Err(e) => {
                    tracing::error!(url = %listener.local_url(), error = %e, "listener failed");
                    break;
                }
            }
        }
    });
}

/// Why [`Gate::login`] refused a connection (which it has closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The address was banned already: the login was not checked.
    Banned,
    /// The login or password was wrong (the failure was counted, and may
    /// have banned the address).
    Failed,
}

/// What a listener checks before it serves a connection: the `Hello` within
/// a timeout, its protocol version, and logins, with failed logins counted
/// per address and banned after a number of them.
pub struct Gate {
    bans: Mutex<Bans>,
    hello_timeout: Duration,
    stop: CancellationToken,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("hello_timeout", &self.hello_timeout)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate that bans an address for `ban_duration` after `max_failures`
    /// consecutive failed logins (at least 1), closes connections that send
    /// no `Hello` within `hello_timeout`, and stops waiting for hellos (and
    /// logins) when `stop` is cancelled.
    pub fn new(
        max_failures: u32,
        ban_duration: Duration,
        hello_timeout: Duration,
        stop: CancellationToken,
    ) -> Gate {
        Gate {
            bans: Mutex::new(Bans::new(max_failures, ban_duration)),
            hello_timeout,
            stop,
        }
    }

    /// The key bans are counted under: the peer's IP, or one key for all
    /// local (Unix-socket, in-process) peers.
    fn ban_key(tx: &transport::Sender) -> String {
        match tx.peer_addr().ip() {
            Some(ip) => ip.to_string(),
            None => "local".to_owned(),
        }
    }

    fn bans(&self) -> std::sync::MutexGuard<'_, Bans> {
        self.bans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection with `Close{BANNED}` if its address is banned;
    /// true when it did.
    pub fn refuse_banned(&self, tx: &transport::Sender) -> bool {
        if self.bans().is_banned(&Self::ban_key(tx)) {
            tx.close(CloseCode::Banned, "banned after too many failed logins");
            return true;
        }
        false
    }

    /// Reads the connection's first frame, which must be a `Hello` of this
    /// protocol version, within the hello timeout, and then raises the
    /// connection's frame limit to the configured maximum (before the hello
    /// the transport's small `max_frame_before_hello` applies). `None` when the
    /// connection ended, or was closed here (timeout, another frame, another
    /// version), or the gate stopped.
    pub async fn hello(
        &self,
        tx: &transport::Sender,
        rx: &mut transport::Receiver,
    ) -> Option<Hello> {
        let first = tokio::select! {
            r = tokio::time::timeout(self.hello_timeout, rx.recv()) => r,
            _ = self.stop.cancelled() => return None,
        };
        let hello = match first {
            Ok(Ok(Frame {
                body: Some(Body::Hello(h)),
            })) => h,
            Ok(Ok(f)) => {
                tx.close(
                    CloseCode::ProtocolError,
                    &format!("expected hello, got {}", f.kind()),
                );
                return None;
            }
            Ok(Err(_)) => return None,
            Err(_) => {
                tx.close(CloseCode::Timeout, "no hello within the handshake timeout");
                return None;
            }
        };
        if hello.version != PROTOCOL_VERSION {
            tx.close(
                CloseCode::UnsupportedVersion,
                &format!("protocol version {} not supported", hello.version),
            );
            return None;
        }
        // A hello was accepted: frames up to the configured maximum from
        // now on (before it, the transport's small pre-hello limit).
        rx.raise_max_frame();
        Some(hello)
    }

    /// Checks `login` on this connection: refused at once if the address is
    /// banned; else `verify` decides (`Some`: accepted, with what it found).
    /// A failure is counted against the address (and may ban it) and closes
    /// the connection with `Close{AUTH_FAILED}` (or `Close{BANNED}`); a
    /// success resets the address's count.
    pub async fn login<T>(
        &self,
        tx: &transport::Sender,
        login: &str,
        verify: impl Future<Output = Option<T>>,
    ) -> Result<T, Refusal> {
        if self.refuse_banned(tx) {
            return Err(Refusal::Banned);
        }
        let key = Self::ban_key(tx);
        let verdict = verify.await;
        let mut bans = self.bans();
        match verdict {
            Some(found) => {
                bans.success(&key);
                Ok(found)
            }
            None => {
                let banned = bans.fail(&key);
                drop(bans);
                tracing::info!(login = %login, banned, "failed login");
                if banned {
                    tx.close(CloseCode::Banned, "wrong login or password; address banned");
                } else {
                    tx.close(CloseCode::AuthFailed, "wrong login or password");
                }
                Err(Refusal::Failed)
            }
        }
    }
}
