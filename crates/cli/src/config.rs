//! The node configuration file (`node.toml`): format, parsing and validation.
//!
//! The format is documented with a commented example in `docs/config.md`.
//! Every error names the key it is about (`listen[1].cert`, `store[0].mode`,
//! ...) and what is wrong with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// Built-in reducers a node can host (a node cannot load Rust code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReducerKind {
    /// An `i64` counter; actions `{"Add": n}` and `"Reset"`.
    Counter,
    /// A string→string map; actions `{"Set": {"key": k, "value": v}}`,
    /// `{"Delete": k}` and `"Clear"`.
    Kv,
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

fn toml_error(e: toml::de::Error, text: &str) -> ConfigError {
    // toml's message names unknown and missing fields; for bad values, find
    // the key from the error's position in the text.
    let msg = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError::new("", msg);
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count();
    let mut table = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut key = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if i < line_no || (i == line_no && t.starts_with('[')) {
            if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
                let n = counts.entry(name.trim().to_owned()).or_insert(0);
                table = format!("{}[{}]", name.trim(), *n);
                *n += 1;
            } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
                let name = name.trim();
                // `[store.backup]` after `[[store]]` belongs to the last store.
                table = match name.split_once('.') {
                    Some((head, tail)) if counts.contains_key(head) => {
                        format!("{head}[{}].{tail}", counts[head] - 1)
                    }
                    _ => name.to_owned(),
                };
            }
        }
        if i == line_no {
            if let Some((k, _)) = t.split_once('=') {
                key = k.trim().trim_matches('"').to_owned();
            }
            break;
        }
    }
    let full = match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    };
    ConfigError::new(full, format!("{msg} (line {})", line_no + 1))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    id: Option<String>,
    url: Option<String>,
    #[serde(default)]
    data: String,
    admin: Option<String>,
    #[serde(default)]
    listen: Vec<RawListen>,
    #[serde(default)]
    peer: Vec<RawPeer>,
    auth: Option<RawAuth>,
    #[serde(default)]
    limits: RawLimits,
    tls: Option<RawTls>,
    #[serde(default)]
    store: Vec<RawStore>,
    #[serde(default)]
    security: RawSecurity,
    #[serde(default)]
    access: RawAccess,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    anonymous: Option<RawPermissions>,
    default: Option<RawPermissions>,
    #[serde(default)]
    logins: BTreeMap<String, RawPermissions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    /// Only in `[access.anonymous]`.
    allow: Option<bool>,
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    publish_all: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSecurity {
    clone_auth: Option<String>,
    bans: Option<String>,
    node_info: Option<String>,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    url: String,
    /// Removed: every listener serves everything. Kept to explain the error.
    serves: Option<toml::Value>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    id: String,
    url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_frame: Option<u64>,
    max_queue_bytes: Option<u64>,
    slow_consumer: Option<String>,
    max_connections: Option<u64>,
    max_connections_per_ip: Option<u64>,
    handshake_timeout_ms: Option<u64>,
    ping_interval_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    max_login_failures: Option<u32>,
    ban_seconds: Option<u64>,
    login_threads: Option<usize>,
    login_queue: Option<usize>,
    logins_per_address: Option<usize>,
    max_requests_in_flight: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    name: String,
    reducer: Option<String>,
    mode: Option<String>,
    resync: Option<u64>,
    #[serde(default)]
    logins: BTreeMap<String, String>,
    backup: Option<RawBackup>,
    upstream: Option<RawUpstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    login: String,
    password: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackup {
    path: PathBuf,
    key_file: Option<PathBuf>,
    every: Option<u64>,
    after_ms: Option<u64>,
    journal: Option<String>,
    kdf_memory_kib: Option<u32>,
    kdf_passes: Option<u32>,
}

const SCHEMES: [&str; 5] = ["tcp://", "tls://", "unix://", "ws://", "wss://"];

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let Some(scheme) = SCHEMES.iter().find(|s| url.starts_with(**s)) else {
        return Err(ConfigError::new(
            key,
            format!("`{url}` is not a tcp://, tls://, unix://, ws:// or wss:// URL"),
        ));
    };
    let rest = &url[scheme.len()..];
    if rest.is_empty() {
        return Err(ConfigError::new(key, format!("`{url}` has no address")));
    }
    if *scheme != "unix://" {
        let hostport = rest.split('/').next().unwrap_or("");
        let port = hostport.rsplit_once(':').map(|(_, p)| p);
        match port {
            Some(p) if p.parse::<u16>().is_ok() => {}
            _ => {
                return Err(ConfigError::new(
                    key,
                    format!("`{url}` needs host:port with a port number"),
                ))
            }
        }
    }
    Ok(())
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn ms(key: &str, v: u64) -> Result<Duration, ConfigError> {
    if v > 365 * 24 * 3600 * 1000 {
        return Err(ConfigError::new(key, "more than a year"));
    }
    Ok(Duration::from_millis(v))
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<NodeConfig, ConfigError> {
        let id = match self.id {
            Some(id) if id.trim().is_empty() => {
                return Err(ConfigError::new("id", "must not be empty"))
            }
            Some(id) => id,
            None => format!("clone-{:08x}", rand::random::<u32>()),
        };
        if let Some(url) = &self.url {
            check_url("url", url)?;
        }
        if let Some(admin) = &self.admin {
            if admin.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    "admin",
                    format!("`{admin}` is not an ip:port address (e.g. 127.0.0.1:9100)"),
                ));
            }
        }
        let mut listen = Vec::new();
        for (i, l) in self.listen.into_iter().enumerate() {
            let key = |k: &str| format!("listen[{i}].{k}");
            check_url(&key("url"), &l.url)?;
            if l.serves.is_some() {
                return Err(ConfigError::new(
                    key("serves"),
                    "no longer exists: every listener serves the mesh and the stores; remove it",
                ));
            }
            let tls = l.url.starts_with("tls://") || l.url.starts_with("wss://");
            let (cert, keyp) = match (tls, l.cert, l.key) {
                (true, Some(c), Some(k)) => {
                    let (c, k) = (resolve(base, &c), resolve(base, &k));
                    for (name, p) in [("cert", &c), ("key", &k)] {
                        if !p.is_file() {
                            return Err(ConfigError::new(
                                key(name),
                                format!("no such file: {}", p.display()),
                            ));
                        }
                    }
                    (Some(c), Some(k))
                }
                (true, None, _) => {
                    return Err(ConfigError::new(
                        key("cert"),
                        "required for tls:// and wss:// listeners",
                    ))
                }
                (true, _, None) => {
                    return Err(ConfigError::new(
                        key("key"),
                        "required for tls:// and wss:// listeners",
                    ))
                }
                (false, Some(_), _) => {
                    return Err(ConfigError::new(
                        key("cert"),
                        "only for tls:// and wss:// listeners",
                    ))
                }
                (false, _, Some(_)) => {
                    return Err(ConfigError::new(
                        key("key"),
                        "only for tls:// and wss:// listeners",
                    ))
                }
                (false, None, None) => (None, None),
            };
            listen.push(Listen {
                url: l.url,
                cert,
                key: keyp,
            });
        }
        let mut peers = Vec::new();
        for (i, p) in self.peer.into_iter().enumerate() {
            if p.id.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("peer[{i}].id"),
                    "must not be empty",
                ));
            }
            if p.id == id {
                return Err(ConfigError::new(
                    format!("peer[{i}].id"),
                    format!("`{}` is this node's own id", p.id),
                ));
            }
            check_url(&format!("peer[{i}].url"), &p.url)?;
            peers.push(Peer {
                id: p.id,
                url: p.url,
            });
        }
        let token = match self.auth {
            None => None,
            Some(RawAuth {
                token: Some(_),
                token_file: Some(_),
            }) => {
                return Err(ConfigError::new(
                    "auth.token_file",
                    "give either auth.token or auth.token_file, not both",
                ))
            }
            Some(RawAuth {
                token: Some(t),
                token_file: None,
            }) => {
                if t.is_empty() {
                    return Err(ConfigError::new("auth.token", "must not be empty"));
                }
                Some(t)
            }
            Some(RawAuth {
                token: None,
                token_file: Some(f),
            }) => Some(read_secret("auth.token_file", &resolve(base, &f))?),
            Some(RawAuth {
                token: None,
                token_file: None,
            }) => {
                return Err(ConfigError::new(
                    "auth",
                    "needs auth.token or auth.token_file",
                ))
            }
        };
        let limits = self.limits.validate()?;
        let security = self.security.validate(base, token.is_some())?;
        let tls_ca = match self.tls {
            None => None,
            Some(t) => {
                let path = resolve(base, &t.ca_file);
                let pem = std::fs::read(&path).map_err(|e| {
                    ConfigError::new(
                        "tls.ca_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                replimesh::transport::TlsConfig::client_from_pem(&pem)
                    .map_err(|e| ConfigError::new("tls.ca_file", e.to_string()))?;
                Some(path)
            }
        };
        let mut stores = Vec::new();
        for (i, s) in self.store.into_iter().enumerate() {
            let key = |k: &str| format!("store[{i}].{k}");
            if s.name.trim().is_empty() {
                return Err(ConfigError::new(key("name"), "must not be empty"));
            }
            if stores.iter().any(|o: &StoreSettings| o.name == s.name) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("store `{}` is configured twice", s.name),
                ));
            }
            let reducer = match s.reducer.as_deref() {
                None | Some("kv") => ReducerKind::Kv,
                Some("counter") => ReducerKind::Counter,
                Some(o) => {
                    return Err(ConfigError::new(
                        key("reducer"),
                        format!("`{o}` is not a built-in reducer (\"kv\" or \"counter\")"),
                    ))
                }
            };
            let mode = match s.mode.as_deref() {
                None | Some("action") => Mode::Action,
                Some("snapshot") => Mode::Snapshot,
                Some("digest") => Mode::Digest,
                Some(o) => {
                    return Err(ConfigError::new(
                        key("mode"),
                        format!("`{o}` is not \"action\", \"snapshot\" or \"digest\""),
                    ))
                }
            };
            let resync = s.resync.unwrap_or(1000);
            if resync == 0 {
                return Err(ConfigError::new(key("resync"), "must be at least 1"));
            }
            for (user, pw) in &s.logins {
                if user.is_empty() || pw.is_empty() {
                    return Err(ConfigError::new(
                        format!("store[{i}].logins.{user}"),
                        "user names and passwords must not be empty",
                    ));
                }
            }
            let backup = match s.backup {
                None => None,
                Some(b) => {
                    let journal = match b.journal.as_deref() {
                        None | Some("always") => Journal::Always,
                        Some("off") => Journal::Off,
                        Some("interval") => Journal::Interval,
                        Some("never") => Journal::Never,
                        Some(o) => {
                            return Err(ConfigError::new(
                                key("backup.journal"),
                                format!(
                                    "`{o}` is not \"always\", \"interval\", \"never\" or \"off\""
                                ),
                            ))
                        }
                    };
                    let path = resolve(base, &b.path);
                    if let Some(dir) = path.parent() {
                        if !dir.as_os_str().is_empty() && !dir.is_dir() {
                            return Err(ConfigError::new(
                                key("backup.path"),
                                format!("directory {} does not exist", dir.display()),
                            ));
                        }
                    }
                    let key_file = b.key_file.map(|k| resolve(base, &k));
                    if let Some(k) = &key_file {
                        read_secret(&key("backup.key_file"), k)?;
                    }
                    Some(BackupSettings {
                        path,
                        key_file,
                        every: b.every.unwrap_or(1000),
                        after: b
                            .after_ms
                            .map(|v| ms(&key("backup.after_ms"), v))
                            .transpose()?,
                        journal,
                        kdf: match (b.kdf_memory_kib, b.kdf_passes) {
                            (None, None) => None,
                            (m, t) => {
                                let (m, t) = (m.unwrap_or(19 * 1024), t.unwrap_or(2));
                                if !(8..=4 * 1024 * 1024).contains(&m) {
                                    return Err(ConfigError::new(
                                        key("backup.kdf_memory_kib"),
                                        "must be between 8 and 4194304",
                                    ));
                                }
                                if !(1..=1000).contains(&t) {
                                    return Err(ConfigError::new(
                                        key("backup.kdf_passes"),
                                        "must be between 1 and 1000",
                                    ));
                                }
                                Some((m, t))
                            }
                        },
                    })
                }
            };
            let upstream = match s.upstream {
                None => None,
                Some(u) => {
                    check_url(&key("upstream.url"), &u.url)?;
                    if backup.is_some() {
                        return Err(ConfigError::new(
                            key("backup"),
                            "a store with an upstream is a replica; back it up at its authority",
                        ));
                    }
                    let password = match (u.password, u.password_file) {
                        (Some(p), None) => p,
                        (None, Some(f)) => {
                            read_secret(&key("upstream.password_file"), &resolve(base, &f))?
                        }
                        _ => {
                            return Err(ConfigError::new(
                                key("upstream.password"),
                                "give either upstream.password or upstream.password_file",
                            ))
                        }
                    };
                    Some(Upstream {
                        url: u.url,
                        login: u.login,
                        password,
                    })
                }
            };
            stores.push(StoreSettings {
                name: s.name,
                reducer,
                mode,
                resync,
                logins: s.logins,
                backup,
                upstream,
            });
        }
        let access = self.access.validate(&stores)?;
        Ok(NodeConfig {
            id,
            url: self.url,
            data: self.data,
            admin: self.admin,
            listen,
            peers,
            token,
            security,
            limits,
            access,
            stores,
            tls_ca,
        })
    }
}

impl RawLimits {
    fn validate(self) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let max_frame = match self.max_frame {
            None => d.max_frame,
            Some(v) if (1024..=(1u64 << 30)).contains(&v) => v as usize,
            Some(_) => {
                return Err(ConfigError::new(
                    "limits.max_frame",
                    "must be between 1024 and 1073741824 bytes",
                ))
            }
        };
        let max_queue_bytes = match self.max_queue_bytes {
            None => d.max_queue_bytes,
            // One frame is always accepted into an empty queue, so a bound
            // below max_frame is fine.
            Some(v) if v >= 64 * 1024 => v as usize,
            Some(_) => {
                return Err(ConfigError::new(
                    "limits.max_queue_bytes",
                    "must be at least 65536 bytes",
                ))
            }
        };
        let slow_consumer_reject = match self.slow_consumer.as_deref() {
            None | Some("disconnect") => false,
            Some("reject") => true,
            Some(o) => {
                return Err(ConfigError::new(
                    "limits.slow_consumer",
                    format!("`{o}` is not \"disconnect\" or \"reject\""),
                ))
            }
        };
        let opt = |k: &str, v: Option<u64>, d: Option<Duration>| match v {
            None => Ok(d),
            Some(0) => Ok(None),
            Some(v) => ms(k, v).map(Some),
        };
        let count = |k: &str, v: Option<u64>, d: usize| match v {
            None => Ok(d),
            Some(v) if v >= 1 => Ok(v as usize),
            Some(_) => Err(ConfigError::new(k, "must be at least 1")),
        };
        Ok(Limits {
            max_frame,
            max_queue_bytes,
            slow_consumer_reject,
            max_connections: count(
                "limits.max_connections",
                self.max_connections,
                d.max_connections,
            )?,
            max_connections_per_ip: count(
                "limits.max_connections_per_ip",
                self.max_connections_per_ip,
                d.max_connections_per_ip,
            )?,
            max_requests_in_flight: count(
                "limits.max_requests_in_flight",
                self.max_requests_in_flight,
                d.max_requests_in_flight,
            )?,
            handshake_timeout: match self.handshake_timeout_ms {
                None => d.handshake_timeout,
                Some(0) => {
                    return Err(ConfigError::new(
                        "limits.handshake_timeout_ms",
                        "must be at least 1",
                    ))
                }
                Some(v) => ms("limits.handshake_timeout_ms", v)?,
            },
            ping_interval: opt(
                "limits.ping_interval_ms",
                self.ping_interval_ms,
                d.ping_interval,
            )?,
            idle_timeout: opt(
                "limits.idle_timeout_ms",
                self.idle_timeout_ms,
                d.idle_timeout,
            )?,
            max_login_failures: self.max_login_failures.unwrap_or(d.max_login_failures),
            ban: self.ban_seconds.map(Duration::from_secs).unwrap_or(d.ban),
            login_threads: match self.login_threads {
                None => d.login_threads,
                Some(v) if (1..=64).contains(&v) => v,
                Some(_) => {
                    return Err(ConfigError::new(
                        "limits.login_threads",
                        "must be between 1 and 64",
                    ))
                }
            },
            login_queue: match self.login_queue {
                None => d.login_queue,
                Some(v) if (1..=1_000_000).contains(&v) => v,
                Some(_) => {
                    return Err(ConfigError::new(
                        "limits.login_queue",
                        "must be between 1 and 1000000",
                    ))
                }
            },
            logins_per_address: match self.logins_per_address {
                None => d.logins_per_address,
                Some(v) if (1..=1000).contains(&v) => v,
                Some(_) => {
                    return Err(ConfigError::new(
                        "limits.logins_per_address",
                        "must be between 1 and 1000",
                    ))
                }
            },
        })
    }
}

impl RawPermissions {
    fn validate(self, key: &str) -> Result<replimesh::mesh::Permissions, ConfigError> {
        use replimesh::mesh::{GroupPatterns, Permissions};
        if self.allow.is_some() {
            return Err(ConfigError::new(
                format!("{key}.allow"),
                "only access.anonymous has `allow`",
            ));
        }
        let patterns = |field: &str, v: Option<Vec<String>>| match v {
            None => Ok(GroupPatterns::any()),
            Some(v) => {
                for p in &v {
                    let body = p.strip_suffix('*').unwrap_or(p);
                    if p.is_empty() || body.contains('*') {
                        return Err(ConfigError::new(
                            format!("{key}.{field}"),
                            format!("{p:?} is not a group name or a prefix ending in `*`"),
                        ));
                    }
                }
                Ok(GroupPatterns::new(&v))
            }
        };
        Ok(Permissions {
            subscribe: patterns("subscribe", self.subscribe)?,
            publish: patterns("publish", self.publish)?,
            publish_all: self.publish_all.unwrap_or(true),
        })
    }
}

impl RawAccess {
    fn validate(self, stores: &[StoreSettings]) -> Result<replimesh::mesh::Access, ConfigError> {
        use replimesh::mesh::{Access, Permissions};
        let known: std::collections::BTreeSet<&String> =
            stores.iter().flat_map(|s| s.logins.keys()).collect();
        let anonymous = match self.anonymous {
            None => Some(Permissions::open()),
            Some(mut a) => {
                let allow = a.allow.take().unwrap_or(true);
                if !allow && known.is_empty() {
                    return Err(ConfigError::new(
                        "access.anonymous.allow",
                        "false needs logins, and no [[store]] has any",
                    ));
                }
                let p = a.validate("access.anonymous")?;
                allow.then_some(p)
            }
        };
        let default_login = match self.default {
            None => Permissions::open(),
            Some(d) => d.validate("access.default")?,
        };
        let mut logins: std::collections::HashMap<String, Permissions> = known
            .iter()
            .map(|l| ((*l).clone(), default_login.clone()))
            .collect();
        for (name, p) in self.logins {
            let key = format!("access.logins.{name}");
            if !known.contains(&name) {
                return Err(ConfigError::new(key, "no [[store]] has this login"));
            }
            let p = p.validate(&key)?;
            logins.insert(name, p);
        }
        Ok(Access {
            anonymous,
            default_login,
            logins,
        })
    }
}

impl RawSecurity {
    fn validate(self, base: &Path, has_token: bool) -> Result<Security, ConfigError> {
        let clone_auth = match (self.clone_auth.as_deref(), has_token) {
            (None | Some("token"), true) => CloneAuth::Token,
            (None, false) => CloneAuth::Closed,
            (Some("token"), false) => {
                return Err(ConfigError::new(
                    "security.clone_auth",
                    "\"token\" needs auth.token or auth.token_file",
                ))
            }
            (Some("none"), false) => CloneAuth::Open,
            (Some("none"), true) => {
                return Err(ConfigError::new(
                    "security.clone_auth",
                    "\"none\" with an [auth] token: remove one of them",
                ))
            }
            (Some(o), _) => {
                return Err(ConfigError::new(
                    "security.clone_auth",
                    format!("`{o}` is not \"token\" or \"none\""),
                ))
            }
        };
        let bans = match self.bans.as_deref() {
            None | Some("all") => BanScope::All,
            Some("store") => BanScope::Store,
            Some(o) => {
                return Err(ConfigError::new(
                    "security.bans",
                    format!("`{o}` is not \"all\" or \"store\""),
                ))
            }
        };
        let node_info = match self.node_info.as_deref() {
            None | Some("login") => NodeInfo::Login,
            Some("off") => NodeInfo::Off,
            Some("anyone") => NodeInfo::Anyone,
            Some(o) => {
                return Err(ConfigError::new(
                    "security.node_info",
                    format!("`{o}` is not \"login\", \"anyone\" or \"off\""),
                ))
            }
        };
        let admin_token = match (self.admin_token, self.admin_token_file) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "security.admin_token_file",
                    "give either security.admin_token or security.admin_token_file, not both",
                ))
            }
            (Some(t), None) if t.is_empty() => {
                return Err(ConfigError::new(
                    "security.admin_token",
                    "must not be empty",
                ))
            }
            (Some(t), None) => Some(t),
            (None, Some(f)) => Some(read_secret(
                "security.admin_token_file",
                &resolve(base, &f),
            )?),
        };
        Ok(Security {
            clone_auth,
            bans,
            node_info,
            admin_token,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        NodeConfig::parse(text, Path::new("/nonexistent")).unwrap_err()
    }

    #[test]
    fn minimal_and_full() {
        let c = NodeConfig::parse("", Path::new(".")).unwrap();
        assert!(c.id.starts_with("clone-"));
        assert!(c.listen.is_empty());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("bk.key"), "pass\n").unwrap();
        let c = NodeConfig::parse(
            r#"
            id = "n1"
            admin = "127.0.0.1:0"
            [[listen]]
            url = "tcp://127.0.0.1:0"
            [[listen]]
            url = "ws://127.0.0.1:0/"
            [[peer]]
            id = "n2"
            url = "tcp://127.0.0.1:7002"
            [auth]
            token_file = "token"
            [limits]
            max_frame = 65536
            idle_timeout_ms = 0
            [[store]]
            name = "counter"
            reducer = "counter"
            mode = "digest"
            resync = 10
            logins = { web = "pw" }
            [store.backup]
            path = "counter.backup"
            key_file = "bk.key"
            every = 5
            journal = "never"
            "#,
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.id, "n1");
        assert_eq!(c.token.as_deref(), Some("s3cret"));
        assert_eq!(c.listen[1].url, "ws://127.0.0.1:0/");
        assert_eq!(c.limits.max_frame, 65536);
        assert_eq!(c.limits.idle_timeout, None);
        let s = &c.stores[0];
        assert_eq!(
            (s.reducer, s.mode, s.resync),
            (ReducerKind::Counter, Mode::Digest, 10)
        );
        let b = s.backup.as_ref().unwrap();
        assert_eq!(b.path, dir.path().join("counter.backup"));
        assert_eq!((b.every, b.journal), (5, Journal::Never));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[[listen]]\nurl = \"http://x:1\"", "listen[0].url"),
            ("[[listen]]\nurl = \"tcp://x\"", "listen[0].url"),
            ("[[listen]]\nurl = \"wss://x:1/\"", "listen[0].cert"),
            (
                "[[listen]]\nurl = \"tcp://x:1\"\nserves = \"store\"",
                "listen[0].serves",
            ),
            ("admin = \"nope\"", "admin"),
            (
                "id = \"a\"\n[[peer]]\nid = \"a\"\nurl = \"tcp://x:1\"",
                "peer[0].id",
            ),
            ("[auth]", "auth"),
            ("[auth]\ntoken_file = \"missing\"", "auth.token_file"),
            ("[tls]\nca_file = \"missing.pem\"", "tls.ca_file"),
            ("[limits]\nmax_frame = 1", "limits.max_frame"),
            ("[limits]\nlogin_threads = 0", "limits.login_threads"),
            (
                "[limits]\nmax_requests_in_flight = 0",
                "limits.max_requests_in_flight",
            ),
            (
                "[limits]\nlogins_per_address = 0",
                "limits.logins_per_address",
            ),
            ("[security]\nclone_auth = \"maybe\"", "security.clone_auth"),
            ("[security]\nclone_auth = \"token\"", "security.clone_auth"),
            (
                "[auth]\ntoken = \"t\"\n[security]\nclone_auth = \"none\"",
                "security.clone_auth",
            ),
            ("[security]\nbans = \"some\"", "security.bans"),
            ("[security]\nnode_info = \"all\"", "security.node_info"),
            ("[limits]\nslow_consumer = \"drop\"", "limits.slow_consumer"),
            ("[[store]]\nname = \"s\"\nmode = \"fast\"", "store[0].mode"),
            (
                "[[store]]\nname = \"s\"\nreducer = \"js\"",
                "store[0].reducer",
            ),
            ("[[store]]\nname = \"s\"\nresync = 0", "store[0].resync"),
            (
                "[[store]]\nname = \"s\"\n[[store]]\nname = \"s\"",
                "store[1].name",
            ),
            (
                "[[store]]\nname = \"s\"\n[store.backup]\npath = \"/nonexistent/dir/x\"",
                "store[0].backup.path",
            ),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert_eq!(&e.key, key, "{text}: {e}");
            assert!(!e.problem.is_empty());
        }
    }

    #[test]
    fn the_example_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let c = NodeConfig::load(&dir.join("node.toml")).unwrap();
        assert_eq!(c.id, "node-1");
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.stores[0].logins["web"], "secret");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("[[listen]]\nurl = \"tcp://x:1\"\nport = 3");
        assert!(e.to_string().contains("port"), "{e}");
        let e = err("colour = 3");
        assert!(e.to_string().contains("colour"), "{e}");
        let e = err("[limits]\nmax_frame = \"big\"");
        assert!(e.to_string().contains("max_frame"), "{e}");
    }
}
