//! Connection settings.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// What each frame in an outbound queue costs on top of its length, in
/// bytes, when the queue is measured against [`Config::max_queue_bytes`]:
/// its slot in the queue (32), the queue's growth room (up to 32 more) and
/// its allocation's header and rounding, or the shared header of a frame
/// broadcast to many connections (about 32). Measured: 1,000,000 queued
/// 6-byte frames took 64 bytes each, 105-byte ones 160 bytes each.
pub const QUEUE_FRAME_OVERHEAD: usize = 96;

/// What to do when a peer does not read fast enough and its outbound queue
/// would exceed [`Config::max_queue_bytes`] or [`Config::max_queue_frames`].
///
/// The queue is measured in memory: each frame costs its length plus
/// [`QUEUE_FRAME_OVERHEAD`], and the frames the writer task has taken but not
/// written yet still count. One frame is always accepted into an empty queue,
/// whatever its size. With the defaults (8 MiB, 65,536 frames) a peer that
/// stops reading costs at most about 8 MiB of queue (plus what the socket
/// buffers hold) before the policy applies. Control frames (pongs) are
/// queued apart, at most 256 of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Cut the connection with [`crate::CloseReason::SlowConsumer`] (as NATS
    /// does): the queued frames are dropped, the sender gets
    /// [`crate::SendError::SlowConsumer`], the receiver ends with
    /// [`crate::RecvError::Local`]. Other connections are unaffected. This
    /// is the default.
    #[default]
    Disconnect,
    /// Refuse the frame with [`crate::SendError::Full`] and keep the
    /// connection (and what is queued). `send_*_wait` wait for room under
    /// either policy.
    Reject,
}

/// TLS settings, used by `tls://` and `wss://` URLs.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// Server side: certificate chain and key (needed by `listen` on `tls://`/`wss://`).
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// Client side: trusted roots (needed by `connect` to `tls://`/`wss://`).
    pub client: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server", &self.server.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// A server configuration from a PEM certificate chain and a PEM private key.
    pub fn server_from_pem(
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Arc<rustls::ServerConfig>, Error> {
        let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("bad certificate PEM: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Tls("no certificate in PEM".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Tls(format!("bad private key PEM: {e}")))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| Error::Tls(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// A client configuration that trusts the CA certificates in `roots_pem`.
    pub fn client_from_pem(roots_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(roots_pem) {
            let cert = cert.map_err(|e| Error::Tls(format!("bad root certificate PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("unusable root certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Tls("no root certificate in PEM".into()));
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

/// Settings shared by [`crate::connect`] and [`crate::listen`].
///
/// `Config::default()` is a sensible production setting; every field is public
/// and may be changed before use.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame body accepted or sent, in bytes (default 16 MiB). A peer
    /// announcing a larger frame is disconnected before anything of that size
    /// is allocated.
    pub max_frame: usize,
    /// Largest frame body accepted from a peer on a connection that
    /// [`crate::listen`] accepted, until its consumer raises the limit with
    /// [`crate::Receiver::set_max_frame`] or
    /// [`crate::Receiver::raise_max_frame`] (default 64 KiB; never more than
    /// `max_frame`). The mesh and store servers raise it to `max_frame` once
    /// a `Hello` was accepted, before answering it, so an unknown peer cannot
    /// make a node buffer a large frame. A larger frame before that is
    /// refused like one above `max_frame` ([`crate::RecvError::FrameTooLarge`],
    /// `Close{FRAME_TOO_LARGE}`), before anything of its size is allocated.
    /// Connections from [`crate::connect`], [`crate::pair`] and
    /// [`crate::from_unix_stream`] accept `max_frame` from the start.
    pub max_frame_before_hello: usize,
    /// Bound of each connection's outbound queue, in bytes of memory (default
    /// 8 MiB): each frame costs its length plus [`QUEUE_FRAME_OVERHEAD`],
    /// frames being written included. One frame is always accepted into an
    /// empty queue, whatever its size. Past it, [`Config::slow_consumer`]
    /// applies.
    pub max_queue_bytes: usize,
    /// Bound of each connection's outbound queue, in frames (default
    /// 65,536), frames being written included. Past it,
    /// [`Config::slow_consumer`] applies.
    pub max_queue_frames: usize,
    /// What happens when the queue bound would be exceeded.
    pub slow_consumer: SlowConsumerPolicy,
    /// Time allowed for a whole `connect` (the TCP or Unix connect, the TLS
    /// handshake, the WebSocket upgrade) and for an accepted connection's TLS
    /// and WebSocket handshakes (default 10 s). Past it the attempt ends with
    /// [`crate::Error::HandshakeTimeout`] naming the step (an accepted
    /// connection is closed).
    pub handshake_timeout: Duration,
    /// Most connections a listener holds open at once, their handshakes
    /// included (default 10,000). One more is closed as soon as it is
    /// accepted, counted ([`crate::Listener::refused_connections`]) and
    /// logged (at most once per second).
    pub max_connections: usize,
    /// Most connections a listener holds open at once from one IP address
    /// (default 1,000); Unix-socket peers count only in the total. One more
    /// is closed as soon as it is accepted, counted and logged as above.
    pub max_connections_per_ip: usize,
    /// How often a `Ping` is sent (default 2 s); `None` sends none. The peer
    /// answers each with a `Pong`, so an idle connection carries one frame
    /// per interval each way on each side (1 frame/s per side at 2 s).
    pub ping_interval: Option<Duration>,
    /// A connection on which nothing arrives for this long is closed with
    /// [`crate::RecvError::TimedOut`] (default 6 s: three ping intervals, so
    /// a frozen or half-open peer is noticed within 6–7.5 s; it is checked
    /// every quarter of it); `None` never times out.
    pub idle_timeout: Option<Duration>,
    /// How many received frames may wait for [`crate::Receiver::recv`] before
    /// the reader stops reading the socket (backpressure), counted in reads.
    pub recv_batches: usize,
    /// TCP, TLS and Unix connections: read the socket from
    /// [`crate::Receiver::recv`] itself instead of from a reader task
    /// (default `false`). A frame then reaches its consumer without a hand-off
    /// between tasks, which saves latency, but the connection is read only
    /// while a `recv` is waiting: pings are answered, the peer's `Close` and
    /// the idle timeout are noticed only then (dropping the receiver starts a
    /// task that reads on). For consumers that always wait in `recv`.
    /// `recv_batches` does not apply; WebSocket connections ignore it.
    pub inline_reads: bool,
    /// After a local `close`, how long to wait for the peer to close its side.
    pub linger: Duration,
    /// TLS settings for `tls://` and `wss://`.
    pub tls: TlsConfig,
    /// WebSocket clients: ask for the `replimesh.v1.json` subprotocol (frames
    /// as canonical proto3 JSON in text messages, what browsers use) instead of
    /// binary `replimesh.v1`. Servers always accept both. Default `false`.
    pub ws_json: bool,
    /// WebSocket read chunk per connection, in bytes (default 4 KiB). It is
    /// what an idle WebSocket connection costs in memory; larger values
    /// trade memory for fewer read calls on busy connections.
    pub ws_read_buffer: usize,
    /// WebSocket listeners: files answered to a plain HTTP `GET` of their
    /// path (a request without `Upgrade`), such as a browser client module
    /// served where the WebSocket clients connect (default: none). The
    /// request head is then read before the WebSocket handshake (within
    /// [`Config::handshake_timeout`]); everything that is not a `GET` of one
    /// of these paths goes on to the handshake as before.
    pub http_files: std::sync::Arc<[crate::HttpFile]>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: proto::DEFAULT_MAX_FRAME,
            max_frame_before_hello: 64 * 1024,
            max_queue_bytes: 8 * 1024 * 1024,
            max_queue_frames: 65_536,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            ping_interval: Some(Duration::from_secs(2)),
            idle_timeout: Some(Duration::from_secs(6)),
            recv_batches: 64,
            inline_reads: false,
            linger: Duration::from_secs(2),
            tls: TlsConfig::default(),
            ws_json: false,
            ws_read_buffer: 4 * 1024,
            http_files: std::sync::Arc::new([]),
        }
    }
}
