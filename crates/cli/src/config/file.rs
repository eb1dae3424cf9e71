//! The TOML shape of `node.toml`: the raw tables as serde reads them, before
//! validation, and the translation of toml's errors into [`ConfigError`]s
//! that name the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

pub(super) fn toml_error(e: toml::de::Error, text: &str) -> ConfigError {
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
pub(super) struct RawConfig {
    pub(super) id: Option<String>,
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) data: String,
    pub(super) admin: Option<String>,
    #[serde(default)]
    pub(super) listen: Vec<RawListen>,
    #[serde(default)]
    pub(super) peer: Vec<RawPeer>,
    pub(super) auth: Option<RawAuth>,
    #[serde(default)]
    pub(super) limits: RawLimits,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) store: Vec<RawStore>,
    #[serde(default)]
    pub(super) security: RawSecurity,
    #[serde(default)]
    pub(super) access: RawAccess,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    pub(super) anonymous: Option<RawPermissions>,
    pub(super) default: Option<RawPermissions>,
    #[serde(default)]
    pub(super) logins: BTreeMap<String, RawPermissions>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPermissions {
    /// Only in `[access.anonymous]`.
    pub(super) allow: Option<bool>,
    pub(super) subscribe: Option<Vec<String>>,
    pub(super) publish: Option<Vec<String>>,
    pub(super) publish_all: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecurity {
    pub(super) clone_auth: Option<String>,
    pub(super) bans: Option<String>,
    pub(super) node_info: Option<String>,
    pub(super) admin_token: Option<String>,
    pub(super) admin_token_file: Option<PathBuf>,
    pub(super) admin_write_token: Option<String>,
    pub(super) admin_write_token_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) url: String,
    /// Removed: every listener serves everything. Kept to explain the error.
    pub(super) serves: Option<toml::Value>,
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) id: String,
    pub(super) url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) token: Option<String>,
    pub(super) token_file: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_frame: Option<u64>,
    pub(super) max_queue_bytes: Option<u64>,
    pub(super) slow_consumer: Option<String>,
    pub(super) max_connections: Option<u64>,
    pub(super) max_connections_per_ip: Option<u64>,
    pub(super) handshake_timeout_ms: Option<u64>,
    pub(super) ping_interval_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) max_login_failures: Option<u32>,
    pub(super) ban_seconds: Option<u64>,
    pub(super) login_threads: Option<usize>,
    pub(super) login_queue: Option<usize>,
    pub(super) logins_per_address: Option<usize>,
    pub(super) max_requests_in_flight: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) name: String,
    /// `"kv"`, `"counter"` or a table `{ js = "file.js", ... }` (read by
    /// hand for clear errors).
    pub(super) reducer: Option<toml::Value>,
    pub(super) mode: Option<String>,
    pub(super) resync: Option<u64>,
    #[serde(default)]
    pub(super) logins: BTreeMap<String, String>,
    pub(super) backup: Option<RawBackup>,
    pub(super) upstream: Option<RawUpstream>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: String,
    pub(super) login: String,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackup {
    pub(super) path: PathBuf,
    pub(super) key_file: Option<PathBuf>,
    pub(super) every: Option<u64>,
    pub(super) after_ms: Option<u64>,
    pub(super) journal: Option<String>,
    pub(super) kdf_memory_kib: Option<u32>,
    pub(super) kdf_passes: Option<u32>,
}
