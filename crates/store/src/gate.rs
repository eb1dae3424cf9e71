//! The door of a listener: accepting connections, the `Hello` within a
//! timeout, and logins with bans by address.
//!
//! The store [`Server`](crate::Server) lets its connections in through a
//! [`Gate`], and so does a process that accepts connections itself and
//! passes their store frames on with [`Server::adopt`](crate::Server::adopt)
//! (the `replimesh` node, whose listeners also serve the mesh): what happens
//! after the hello and the login is the caller's.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use proto::frame::Body;
use proto::{CloseCode, Frame, Hello, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Bans, Busy, CheckPool};

/// Accepts connections on `listener` until `stop` is cancelled or the
/// listener fails (logged), and runs `serve` on each in a task of its own.
/// Returns at once: the accepting runs in a task. The accepting task and
/// the connections' tasks are spawned on `tasks`, so that whoever stops the
/// server can wait for them; once the accepting task has ended, the
/// listener is closed (a new connection is refused, a Unix socket's file is
/// gone). Must be called inside a Tokio runtime.
pub fn accept_each<F, Fut>(
    listener: transport::Listener,
    stop: CancellationToken,
    tasks: &TaskTracker,
    mut serve: F,
) where
    F: FnMut(transport::Connection) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let spawner = tasks.clone();
    tasks.spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => break,
            };
            match conn {
                Ok(c) => {
                    spawner.spawn(serve(c));
                }
                Err(e) => {
                    tracing::error!(url = %listener.local_url(), error = %e, "listener failed");
                    break;
                }
            }
        }
        listener.close().await;
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
    /// Too many password checks were waiting (the [`CheckPool`]'s queue was
    /// full, or the address had too many logins in progress, or its login
    /// did not get its turn in time): not counted against the address; the
    /// connection was closed (`Close{GOING_AWAY}` or `Close{TIMEOUT}`) and
    /// may try again.
    Busy,
}

/// Logins of one address in progress, at most this many by default (the
/// running check included); more are refused (not counted as failures).
pub const DEFAULT_LOGINS_PER_ADDRESS: usize = 64;

/// What a listener checks before it serves a connection: the `Hello` within
/// a timeout, its protocol version, and logins, with failed logins counted
/// per address and banned after a number of them.
///
/// Password checks are bounded and fair:
///
/// - one check at a time per address: the next login of an address waits
///   for the previous one's verdict, and the ban is checked again just
///   before each check, so `N` concurrent guesses from one address cost at
///   most as many checks as it takes to ban it, and every one is counted;
/// - at most [`Gate::logins_per_address`] logins of an address in progress
///   (default [`DEFAULT_LOGINS_PER_ADDRESS`]); more are refused at once
///   with `Close{GOING_AWAY}` ([`Refusal::Busy`], not counted), and a login
///   that does not get its turn within the hello timeout is closed with
///   `Close{TIMEOUT}` (not counted either);
/// - the checks themselves run on a [`CheckPool`] (a bounded budget of
///   Argon2 work on dedicated threads), addresses that logged in before
///   first, then by their failures so far.
pub struct Gate {
    bans: Mutex<Bans>,
    hello_timeout: Duration,
    stop: CancellationToken,
    pool: CheckPool,
    per_address: usize,
    checks: AtomicU64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("hello_timeout", &self.hello_timeout)
            .field("pool", &self.pool)
            .field("per_address", &self.per_address)
            .finish_non_exhaustive()
    }
}

/// Ends a login admitted by [`Bans::enter`] whatever way it ends.
struct Admitted<'a> {
    gate: &'a Gate,
    key: &'a str,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.gate.bans().leave(self.key);
    }
}

impl Gate {
    /// A gate that bans an address for `ban_duration` after `max_failures`
    /// consecutive failed logins (at least 1), closes connections that send
    /// no `Hello` within `hello_timeout`, and stops waiting for hellos (and
    /// logins) when `stop` is cancelled. Its password checks run on the
    /// process's [`CheckPool::global`] unless [`Gate::with_pool`] says
    /// otherwise.
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
            pool: CheckPool::global(),
            per_address: DEFAULT_LOGINS_PER_ADDRESS,
            checks: AtomicU64::new(0),
        }
    }

    /// Runs this gate's password checks on `pool`.
    pub fn with_pool(mut self, pool: CheckPool) -> Gate {
        self.pool = pool;
        self
    }

    /// At most `n` (at least 1) logins of one address in progress at once
    /// (waiting for their turn or checked); more are refused with
    /// `Close{GOING_AWAY}`, not counted as failed logins. Default
    /// [`DEFAULT_LOGINS_PER_ADDRESS`].
    pub fn logins_per_address(mut self, n: usize) -> Gate {
        self.per_address = n.max(1);
        self
    }

    /// Password checks this gate has run (each [`Gate::login`] that got its
    /// turn and a place in the pool).
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
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

    /// Whether the connection's address is banned now.
    pub fn is_banned(&self, tx: &transport::Sender) -> bool {
        self.bans().is_banned(&Self::ban_key(tx))
    }

    /// Closes the connection with `Close{BANNED}` if its address is banned;
    /// true when it did.
    pub fn refuse_banned(&self, tx: &transport::Sender) -> bool {
        if self.is_banned(tx) {
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

    /// Counts a failed login of this connection's address and closes it with
    /// `Close{AUTH_FAILED}` (or `Close{BANNED}` when that banned it).
    fn failed(&self, tx: &transport::Sender, key: &str, what: &str, login: &str, why: &str) {
        let banned = self.bans().fail(key);
        tracing::info!(peer = %tx.peer_addr(), login = %login, banned, "failed {what}: {why}");
        if banned {
            tx.close(CloseCode::Banned, &format!("{why}; address banned"));
        } else {
            tx.close(CloseCode::AuthFailed, why);
        }
    }

    /// A check that costs nothing (a clone link's token, compared in
    /// constant time by the caller): refused at once if the address is
    /// banned; else `ok` decides. A failure is counted against the address
    /// as a failed login (`what` names it in the log) and closes the
    /// connection as [`Gate::login`] does.
    pub fn check_now(&self, tx: &transport::Sender, what: &str, ok: bool) -> Result<(), Refusal> {
        let key = Self::ban_key(tx);
        if self.refuse_banned(tx) {
            return Err(Refusal::Banned);
        }
        if ok {
            self.bans().success(&key);
            return Ok(());
        }
        self.failed(tx, &key, what, "", "authentication failed");
        Err(Refusal::Failed)
    }

    /// Checks `login` on this connection: refused at once if the address is
    /// banned, or has too many logins in progress ([`Refusal::Busy`]);
    /// else, in its address's turn and if the address is still not banned,
    /// `check` decides on the gate's [`CheckPool`] (`Some`: accepted, with
    /// what it found). A failure is counted against the address (and may
    /// ban it) before the next login of the address is checked, and closes
    /// the connection with `Close{AUTH_FAILED}` (or `Close{BANNED}`); a
    /// success resets the address's count. `check` should cost the same
    /// for unknown and known users (see [`Logins::verify`](crate::Logins::verify)).
    pub async fn login<T: Send + 'static>(
        &self,
        tx: &transport::Sender,
        login: &str,
        check: impl FnOnce() -> Option<T> + Send + 'static,
    ) -> Result<T, Refusal> {
        let key = Self::ban_key(tx);
        let turn = {
            let mut bans = self.bans();
            if bans.is_banned(&key) {
                drop(bans);
                tx.close(CloseCode::Banned, "banned after too many failed logins");
                return Err(Refusal::Banned);
            }
            bans.enter(&key, self.per_address)
        };
        let Some(turn) = turn else {
            tracing::info!(peer = %tx.peer_addr(), login = %login, "login refused: too many logins in progress from this address");
            tx.close(
                CloseCode::GoingAway,
                "too many logins in progress from this address; try again later",
            );
            return Err(Refusal::Busy);
        };
        let _admitted = Admitted {
            gate: self,
            key: &key,
        };
        // One check at a time per address: the verdict of each is counted
        // before the next one starts.
        let _turn = tokio::select! {
            t = tokio::time::timeout(self.hello_timeout, turn.lock()) => match t {
                Ok(t) => t,
                Err(_) => {
                    tx.close(CloseCode::Timeout, "login not checked in time; try again later");
                    return Err(Refusal::Busy);
                }
            },
            _ = tx.closed() => return Err(Refusal::Busy),
            _ = self.stop.cancelled() => return Err(Refusal::Busy),
        };
        let priority = {
            let mut bans = self.bans();
            if bans.is_banned(&key) {
                drop(bans);
                tx.close(CloseCode::Banned, "banned after too many failed logins");
                return Err(Refusal::Banned);
            }
            bans.priority(&key)
        };
        self.checks.fetch_add(1, Ordering::Relaxed);
        let verdict = tokio::select! {
            v = self.pool.run(priority, check) => v,
            _ = tx.closed() => return Err(Refusal::Busy),
            _ = self.stop.cancelled() => return Err(Refusal::Busy),
        };
        match verdict {
            Ok(Some(found)) => {
                self.bans().success(&key);
                Ok(found)
            }
            Ok(None) => {
                self.failed(tx, &key, "login", login, "wrong login or password");
                Err(Refusal::Failed)
            }
            Err(Busy) => {
                tracing::warn!(peer = %tx.peer_addr(), login = %login, "login refused: too many password checks waiting");
                tx.close(
                    CloseCode::GoingAway,
                    "too many logins waiting; try again later",
                );
                Err(Refusal::Busy)
            }
        }
    }
}
