//! Validation: from the raw TOML tables ([`super::file`]) to a
//! [`NodeConfig`], one step per section, each error naming its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{
    RawAccess, RawAuth, RawBackup, RawConfig, RawLimits, RawListen, RawPeer, RawPermissions,
    RawSecurity, RawStore, RawTls, RawUpstream,
};
use super::{
    read_secret, BackupSettings, BanScope, CloneAuth, ConfigError, Journal, JsReducerSettings,
    Limits, Listen, Mode, NodeConfig, NodeInfo, Peer, ReducerKind, Security, StoreSettings,
    Upstream,
};

const SCHEMES: [&str; 5] = ["tcp://", "tls://", "unix://", "ws://", "wss://"];

pub(crate) fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
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
    /// Validates every section, in file order of importance: the first
    /// error found is returned.
    pub(super) fn validate(self, base: &Path) -> Result<NodeConfig, ConfigError> {
        let id = validate_id(self.id)?;
        if let Some(url) = &self.url {
            check_url("url", url)?;
        }
        if let Some(admin) = &self.admin {
            check_admin(admin)?;
        }
        let listen = self
            .listen
            .into_iter()
            .enumerate()
            .map(|(i, l)| l.validate(i, base))
            .collect::<Result<Vec<_>, _>>()?;
        let peers = self
            .peer
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.validate(i, &id))
            .collect::<Result<Vec<_>, _>>()?;
        let token = match self.auth {
            None => None,
            Some(auth) => Some(auth.validate(base)?),
        };
        let limits = self.limits.validate()?;
        let security = self.security.validate(base, token.is_some())?;
        let tls_ca = match self.tls {
            None => None,
            Some(t) => Some(t.validate(base)?),
        };
        let mut stores = Vec::new();
        for (i, s) in self.store.into_iter().enumerate() {
            let s = s.validate(i, base, &stores)?;
            stores.push(s);
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

/// The clone id: as given (not blank), or a random `clone-xxxxxxxx`.
fn validate_id(id: Option<String>) -> Result<String, ConfigError> {
    match id {
        Some(id) if id.trim().is_empty() => Err(ConfigError::new("id", "must not be empty")),
        Some(id) => Ok(id),
        None => Ok(format!("clone-{:08x}", rand::random::<u32>())),
    }
}

fn check_admin(admin: &str) -> Result<(), ConfigError> {
    if admin.parse::<std::net::SocketAddr>().is_err() {
        return Err(ConfigError::new(
            "admin",
            format!("`{admin}` is not an ip:port address (e.g. 127.0.0.1:9100)"),
        ));
    }
    Ok(())
}

impl RawListen {
    /// `listen[i]`: its URL, and a certificate and key exactly for
    /// `tls://` and `wss://`.
    fn validate(self, i: usize, base: &Path) -> Result<Listen, ConfigError> {
        let key = |k: &str| format!("listen[{i}].{k}");
        check_url(&key("url"), &self.url)?;
        if self.serves.is_some() {
            return Err(ConfigError::new(
                key("serves"),
                "no longer exists: every listener serves the mesh and the stores; remove it",
            ));
        }
        let tls = self.url.starts_with("tls://") || self.url.starts_with("wss://");
        let (cert, keyp) = match (tls, self.cert, self.key) {
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
        Ok(Listen {
            url: self.url,
            cert,
            key: keyp,
        })
    }
}

impl RawPeer {
    /// `peer[i]`: a non-blank id other than this node's, and a URL.
    fn validate(self, i: usize, own_id: &str) -> Result<Peer, ConfigError> {
        if self.id.trim().is_empty() {
            return Err(ConfigError::new(
                format!("peer[{i}].id"),
                "must not be empty",
            ));
        }
        if self.id == own_id {
            return Err(ConfigError::new(
                format!("peer[{i}].id"),
                format!("`{}` is this node's own id", self.id),
            ));
        }
        check_url(&format!("peer[{i}].url"), &self.url)?;
        Ok(Peer {
            id: self.id,
            url: self.url,
        })
    }
}

impl RawAuth {
    /// `[auth]`: the clone-link token, given inline or in a file.
    fn validate(self, base: &Path) -> Result<String, ConfigError> {
        match self {
            RawAuth {
                token: Some(_),
                token_file: Some(_),
            } => Err(ConfigError::new(
                "auth.token_file",
                "give either auth.token or auth.token_file, not both",
            )),
            RawAuth {
                token: Some(t),
                token_file: None,
            } => {
                if t.is_empty() {
                    return Err(ConfigError::new("auth.token", "must not be empty"));
                }
                Ok(t)
            }
            RawAuth {
                token: None,
                token_file: Some(f),
            } => read_secret("auth.token_file", &resolve(base, &f)),
            RawAuth {
                token: None,
                token_file: None,
            } => Err(ConfigError::new(
                "auth",
                "needs auth.token or auth.token_file",
            )),
        }
    }
}

impl RawTls {
    /// `[tls]`: the CA file, read and parsed now so that a bad one fails
    /// at start-up.
    fn validate(self, base: &Path) -> Result<PathBuf, ConfigError> {
        let path = resolve(base, &self.ca_file);
        let pem = std::fs::read(&path).map_err(|e| {
            ConfigError::new(
                "tls.ca_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        replimesh::transport::TlsConfig::client_from_pem(&pem)
            .map_err(|e| ConfigError::new("tls.ca_file", e.to_string()))?;
        Ok(path)
    }
}

/// `reducer`: `"kv"` (the default), `"counter"`, or `{ js = "file.js",
/// schema = n, time_limit_ms = n, memory_limit_mib = n }`.
fn reducer(raw: Option<toml::Value>, key: &str, base: &Path) -> Result<ReducerKind, ConfigError> {
    const ONE_OF: &str = "\"kv\", \"counter\" or { js = \"file.js\" }";
    let table = match raw {
        None => return Ok(ReducerKind::Kv),
        Some(toml::Value::String(s)) => {
            return match s.as_str() {
                "kv" => Ok(ReducerKind::Kv),
                "counter" => Ok(ReducerKind::Counter),
                o => Err(ConfigError::new(key, format!("`{o}` is not {ONE_OF}"))),
            }
        }
        Some(toml::Value::Table(t)) => t,
        Some(o) => {
            return Err(ConfigError::new(
                key,
                format!("a {} is not {ONE_OF}", o.type_str()),
            ))
        }
    };
    let sub = |k: &str| format!("{key}.{k}");
    let int = |k: &str, min: i64, max: i64| -> Result<Option<i64>, ConfigError> {
        match table.get(k) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if (min..=max).contains(n) => Ok(Some(*n)),
            Some(_) => Err(ConfigError::new(
                sub(k),
                format!("must be an integer from {min} to {max}"),
            )),
        }
    };
    if let Some(k) = table
        .keys()
        .find(|k| !["js", "schema", "time_limit_ms", "memory_limit_mib"].contains(&k.as_str()))
    {
        return Err(ConfigError::new(
            sub(k),
            "unknown key (js, schema, time_limit_ms, memory_limit_mib)",
        ));
    }
    let path = match table.get("js") {
        Some(toml::Value::String(p)) if !p.is_empty() => resolve(base, Path::new(p)),
        _ => {
            return Err(ConfigError::new(
                sub("js"),
                "the reducer's file name is needed",
            ))
        }
    };
    let schema = int("schema", 0, u32::MAX.into())?.map(|n| n as u32);
    let time_ms = int("time_limit_ms", 1, 60_000)?.unwrap_or(100) as u64;
    let memory_mib = int("memory_limit_mib", 1, 4096)?.unwrap_or(64) as usize;
    Ok(ReducerKind::Js(JsReducerSettings {
        path,
        schema,
        time_limit: Duration::from_millis(time_ms),
        memory_limit: memory_mib << 20,
    }))
}

impl RawStore {
    /// `store[i]`, given the stores before it (names are unique).
    fn validate(
        self,
        i: usize,
        base: &Path,
        earlier: &[StoreSettings],
    ) -> Result<StoreSettings, ConfigError> {
        let key = |k: &str| format!("store[{i}].{k}");
        if self.name.trim().is_empty() {
            return Err(ConfigError::new(key("name"), "must not be empty"));
        }
        if earlier.iter().any(|o| o.name == self.name) {
            return Err(ConfigError::new(
                key("name"),
                format!("store `{}` is configured twice", self.name),
            ));
        }
        let reducer = reducer(self.reducer, &key("reducer"), base)?;
        let mode = match self.mode.as_deref() {
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
        let resync = self.resync.unwrap_or(1000);
        if resync == 0 {
            return Err(ConfigError::new(key("resync"), "must be at least 1"));
        }
        for (user, pw) in &self.logins {
            if user.is_empty() || pw.is_empty() {
                return Err(ConfigError::new(
                    format!("store[{i}].logins.{user}"),
                    "user names and passwords must not be empty",
                ));
            }
        }
        let backup = match self.backup {
            None => None,
            Some(b) => Some(b.validate(&key, base)?),
        };
        let upstream = match self.upstream {
            None => None,
            Some(u) => Some(u.validate(&key, base, backup.is_some())?),
        };
        Ok(StoreSettings {
            name: self.name,
            reducer,
            mode,
            resync,
            logins: self.logins,
            backup,
            upstream,
        })
    }
}

impl RawBackup {
    /// `store[i].backup`; `key` names a key of the store.
    fn validate(
        self,
        key: &dyn Fn(&str) -> String,
        base: &Path,
    ) -> Result<BackupSettings, ConfigError> {
        let journal = match self.journal.as_deref() {
            None | Some("always") => Journal::Always,
            Some("off") => Journal::Off,
            Some("interval") => Journal::Interval,
            Some("never") => Journal::Never,
            Some(o) => {
                return Err(ConfigError::new(
                    key("backup.journal"),
                    format!("`{o}` is not \"always\", \"interval\", \"never\" or \"off\""),
                ))
            }
        };
        let path = resolve(base, &self.path);
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(ConfigError::new(
                    key("backup.path"),
                    format!("directory {} does not exist", dir.display()),
                ));
            }
        }
        let key_file = self.key_file.map(|k| resolve(base, &k));
        if let Some(k) = &key_file {
            read_secret(&key("backup.key_file"), k)?;
        }
        Ok(BackupSettings {
            path,
            key_file,
            every: self.every.unwrap_or(1000),
            after: self
                .after_ms
                .map(|v| ms(&key("backup.after_ms"), v))
                .transpose()?,
            journal,
            kdf: kdf(key, self.kdf_memory_kib, self.kdf_passes)?,
        })
    }
}

/// The Argon2id cost of a backup key: none when neither key is given, else
/// both within bounds (a missing one takes its default).
fn kdf(
    key: &dyn Fn(&str) -> String,
    memory_kib: Option<u32>,
    passes: Option<u32>,
) -> Result<Option<(u32, u32)>, ConfigError> {
    match (memory_kib, passes) {
        (None, None) => Ok(None),
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
            Ok(Some((m, t)))
        }
    }
}

impl RawUpstream {
    /// `store[i].upstream`; a store with one is a replica, so it has no
    /// backup of its own.
    fn validate(
        self,
        key: &dyn Fn(&str) -> String,
        base: &Path,
        has_backup: bool,
    ) -> Result<Upstream, ConfigError> {
        check_url(&key("upstream.url"), &self.url)?;
        if has_backup {
            return Err(ConfigError::new(
                key("backup"),
                "a store with an upstream is a replica; back it up at its authority",
            ));
        }
        let password = match (self.password, self.password_file) {
            (Some(p), None) => p,
            (None, Some(f)) => read_secret(&key("upstream.password_file"), &resolve(base, &f))?,
            _ => {
                return Err(ConfigError::new(
                    key("upstream.password"),
                    "give either upstream.password or upstream.password_file",
                ))
            }
        };
        Ok(Upstream {
            url: self.url,
            login: self.login,
            password,
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
        let admin_token = token_pair(
            base,
            ("security.admin_token", self.admin_token),
            ("security.admin_token_file", self.admin_token_file),
        )?;
        let admin_write_token = token_pair(
            base,
            ("security.admin_write_token", self.admin_write_token),
            (
                "security.admin_write_token_file",
                self.admin_write_token_file,
            ),
        )?;
        Ok(Security {
            clone_auth,
            bans,
            node_info,
            admin_token,
            admin_write_token,
        })
    }
}

/// A secret given inline (`key`) or in a file (`key_file`), not both.
fn token_pair(
    base: &Path,
    (key, inline): (&str, Option<String>),
    (file_key, file): (&str, Option<PathBuf>),
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(ConfigError::new(
            file_key,
            format!("give either {key} or {file_key}, not both"),
        )),
        (Some(t), None) if t.is_empty() => Err(ConfigError::new(key, "must not be empty")),
        (Some(t), None) => Ok(Some(t)),
        (None, Some(f)) => Ok(Some(read_secret(file_key, &resolve(base, &f))?)),
    }
}
