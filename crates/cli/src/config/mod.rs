//! The node configuration file (`node.toml`): format, parsing and validation.
//!
//! The format is documented with a commented example in `docs/config.md`.
//! Every error names the key it is about (`listen[1].cert`, `store[0].mode`,
//! ...) and what is wrong with it.

mod file;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use file::{toml_error, RawConfig};
pub(crate) use validate::check_url;

/// A configuration error: the key it is about and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The key, as a path (`listen[0].url`), or the file name for I/O and syntax errors.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// One listener. Every listener serves clone links, mesh clients and store
/// replicas alike (one client connection can do both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// `tcp://`, `tls://`, `unix://`, `ws://` or `wss://` URL.
    pub url: String,
    /// Certificate chain (PEM) for `tls://` and `wss://`.
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for `tls://` and `wss://`.
    pub key: Option<PathBuf>,
}

/// A clone to link to at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's clone id.
    pub id: String,
    /// The peer's URL.
    pub url: String,
}

/// The reducer of a hosted store: a built-in one or JavaScript (a node
/// cannot load Rust code). Action formats: `docs/protocol.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReducerKind {
    /// An `i64` counter; actions `{"type": "add", "payload": n}` and
    /// `{"type": "reset"}`.
    Counter,
    /// A string→string map; actions `{"type": "set", "payload": {"key": k,
    /// "value": v}}`, `{"type": "delete", "payload": k}`, `{"type": "clear"}`.
    Kv,
    /// A JavaScript reducer (`reducer = { js = "file.js" }`).
    Js(JsReducerSettings),
}

impl ReducerKind {
    /// How the status page names it: `kv`, `counter` or `js`.
    pub fn label(&self) -> &'static str {
        match self {
            ReducerKind::Counter => "counter",
            ReducerKind::Kv => "kv",
            ReducerKind::Js(_) => "js",
        }
    }
}

/// A JavaScript reducer: an ES module whose default export is a redux
/// reducer (see `docs/javascript.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsReducerSettings {
    /// The module file (relative paths are from the config file's directory).
    pub path: PathBuf,
    /// The schema version; `None`: from the file's content (`replimesh_js::schema_of`).
    pub schema: Option<u32>,
    /// The longest one action may run (`time_limit_ms`, default 100).
    pub time_limit: Duration,
    /// The memory its engine may hold (`memory_limit_mib`, default 64).
    pub memory_limit: usize,
}

/// Sync mode of a store (see the store crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Actions plus a snapshot every `resync` actions.
    Action,
    /// The whole state after each action.
    Snapshot,
    /// Actions plus a digest every `resync` actions.
    Digest,
}

/// Journal fsync policy of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// No journal: only snapshots.
    Off,
    /// Journal, fsync after every record.
    Always,
    /// Journal, fsync at an interval.
    Interval,
    /// Journal, never fsync (the OS decides).
    Never,
}

/// A store's backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSettings {
    /// The snapshot file.
    pub path: PathBuf,
    /// File holding the passphrase (first line); none: checksummed, not encrypted.
    pub key_file: Option<PathBuf>,
    /// Snapshot every this many actions (0: never by count).
    pub every: u64,
    /// Snapshot this long after a change (none: never by time).
    pub after: Option<Duration>,
    /// Journal of the actions between snapshots.
    pub journal: Journal,
    /// Argon2id cost of the key derivation: (memory KiB, passes); default (19456, 2).
    pub kdf: Option<(u32, u32)>,
}

/// One hosted store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The store's name (what replicas ask for).
    pub name: String,
    /// Its reducer.
    pub reducer: ReducerKind,
    /// Sync mode.
    pub mode: Mode,
    /// Snapshot/digest interval in actions.
    pub resync: u64,
    /// Logins: user → password or Argon2id PHC string.
    pub logins: BTreeMap<String, String>,
    /// Backup, if any (authority only).
    pub backup: Option<BackupSettings>,
    /// When set, this store is a replica of the authority at this URL and
    /// relays it to its own replicas (a clone carrying another clone's store).
    pub upstream: Option<Upstream>,
}

/// The authority a relaying store follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The authority's store listener URL.
    pub url: String,
    /// Login at the authority.
    pub login: String,
    /// Password at the authority.
    pub password: String,
}

/// Connection limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted, bytes.
    pub max_frame: usize,
    /// Outbound queue per connection, bytes of memory (each frame costs its
    /// length plus `transport::QUEUE_FRAME_OVERHEAD`).
    pub max_queue_bytes: usize,
    /// What to do with a slow consumer: disconnect it (default) or reject frames.
    pub slow_consumer_reject: bool,
    /// Most connections open at once per listener (default 10,000).
    pub max_connections: usize,
    /// Most connections open at once per listener from one IP address
    /// (default 1,000).
    pub max_connections_per_ip: usize,
    /// Handshake timeout.
    pub handshake_timeout: Duration,
    /// Keep-alive ping interval (none: off; default 2 s).
    pub ping_interval: Option<Duration>,
    /// Idle timeout (none: off; default 6 s: a frozen peer is noticed within
    /// 6–7.5 s).
    pub idle_timeout: Option<Duration>,
    /// Failed logins before an address is banned.
    pub max_login_failures: u32,
    /// How long a ban lasts.
    pub ban: Duration,
    /// Password checks (Argon2id) running at once, each on its own thread
    /// (`limits.login_threads`, default 1).
    pub login_threads: usize,
    /// Password checks waiting for a thread (`limits.login_queue`, default
    /// 256); past it the worst-placed login is closed with "going away".
    pub login_queue: usize,
    /// Logins of one address in progress at once (`limits.logins_per_address`,
    /// default 64); more are closed with "going away", not counted as
    /// failed logins.
    pub logins_per_address: usize,
    /// Routed requests (and sends) of one client connection being handled
    /// at once (`limits.max_requests_in_flight`, default 64); past it a
    /// request is answered with an error (code 429) naming the limit and a
    /// send is dropped.
    pub max_requests_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            max_queue_bytes: 8 << 20,
            slow_consumer_reject: false,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(2)),
            idle_timeout: Some(Duration::from_secs(6)),
            max_login_failures: 5,
            ban: Duration::from_secs(3 * 3600),
            login_threads: 1,
            login_queue: 256,
            logins_per_address: replimesh::store::DEFAULT_LOGINS_PER_ADDRESS,
            max_requests_in_flight: 64,
        }
    }
}

/// Who may open a clone link to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloneAuth {
    /// Clones presenting the `[auth]` token (the default when there is one).
    Token,
    /// Nobody: no `[auth]` token and no `security.clone_auth = "none"`
    /// (the default without a token).
    #[default]
    Closed,
    /// Anyone (`security.clone_auth = "none"`): logged as a warning at
    /// start-up and shown in `/api/status`.
    Open,
}

/// Whether bans of an address cover every connection or only store logins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BanScope {
    /// A banned address is refused on every connection: mesh clients, clone
    /// links and store logins; failed clone authentications count (default).
    #[default]
    All,
    /// Only store logins are refused and counted.
    Store,
}

/// Who may ask the built-in `node/info` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeInfo {
    /// Nobody: the route is not served.
    Off,
    /// Clients that logged in (a store login in their hello) (default).
    #[default]
    Login,
    /// Any client.
    Anyone,
}

/// The `[security]` table: who may do what.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Security {
    /// Who may open clone links.
    pub clone_auth: CloneAuth,
    /// What bans cover.
    pub bans: BanScope,
    /// Who may ask `node/info`.
    pub node_info: NodeInfo,
    /// When set, `/api/status` and the dashboard need it
    /// (`Authorization: Bearer <token>` or `?token=<token>`).
    pub admin_token: Option<String>,
    /// When set, the admin write endpoints are on and need it
    /// (`Authorization: Bearer <token>`); it also opens `/api/status`.
    pub admin_write_token: Option<String>,
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Clone id (generated when absent from the file).
    pub id: String,
    /// URL announced to other clones (default: the first mesh listener's bound URL).
    pub url: Option<String>,
    /// User data attached to the clone.
    pub data: String,
    /// Admin HTTP address (`host:port`), if any.
    pub admin: Option<String>,
    /// Listeners.
    pub listen: Vec<Listen>,
    /// Clones to link to.
    pub peers: Vec<Peer>,
    /// Clone-link token (from `auth.token` or `auth.token_file`).
    pub token: Option<String>,
    /// The `[security]` table (with `clone_auth` resolved against `token`).
    pub security: Security,
    /// Limits.
    pub limits: Limits,
    /// The `[access]` table: who may connect as a client and which groups
    /// each may subscribe and publish to. Its logins are every store login
    /// (`[access.default]` unless `[access.logins.<name>]` says otherwise).
    pub access: replimesh::mesh::Access,
    /// Hosted stores.
    pub stores: Vec<StoreSettings>,
    /// PEM file of the roots trusted when this node dials `tls://` and
    /// `wss://` URLs (clone peers, store upstreams).
    pub tls_ca: Option<PathBuf>,
}

impl NodeConfig {
    /// Reads and validates the file at `path`. Relative paths inside it are
    /// taken relative to the file's directory.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path.display().to_string(), e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|mut e| {
            if e.key.is_empty() {
                e.key = path.display().to_string();
            }
            e
        })
    }

    /// Parses and validates configuration text; relative paths are resolved
    /// against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(e, text))?;
        raw.validate(base)
    }

    /// The transport configuration for these limits.
    pub fn transport(&self) -> replimesh::transport::Config {
        let mut c = replimesh::transport::Config::default();
        c.max_frame = self.limits.max_frame;
        c.max_queue_bytes = self.limits.max_queue_bytes;
        c.max_connections = self.limits.max_connections;
        c.max_connections_per_ip = self.limits.max_connections_per_ip;
        if self.limits.slow_consumer_reject {
            c.slow_consumer = replimesh::transport::SlowConsumerPolicy::Reject;
        }
        c.handshake_timeout = self.limits.handshake_timeout;
        c.ping_interval = self.limits.ping_interval;
        c.idle_timeout = self.limits.idle_timeout;
        // The node's front, the mesh and the stores all read each connection
        // from a loop that waits in `recv`: no reader task needed.
        c.inline_reads = true;
        if let Some(ca) = &self.tls_ca {
            // Read and checked when the file was parsed.
            let roots = std::fs::read(ca).ok();
            c.tls.client =
                roots.and_then(|pem| replimesh::transport::TlsConfig::client_from_pem(&pem).ok());
        }
        c
    }
}

/// Reads a secret from a file: its first line, trimmed. Empty is an error.
pub fn read_secret(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    if line.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(line)
}
