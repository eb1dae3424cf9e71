//! The state a running node shares between its tasks, the admin server and
//! the metrics, and the status document (`/api/status`) built from it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use replimesh::mesh;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::hosted::Hosted;
use crate::admin::AdminSource;
use crate::config::NodeConfig;
use crate::front::Front;
use crate::metrics::{Counter, Registry};
use std::sync::Arc;

/// Longest group name that gets a `replimesh_group_subscribers` label.
const MAX_GROUP_LABEL: usize = 128;
pub(super) struct Shared {
    pub(super) config: NodeConfig,
    pub(super) mesh: mesh::Server,
    pub(super) front: Arc<Front>,
    pub(super) stores: Vec<Hosted>,
    pub(super) registry: Registry,
    pub(super) healthy: AtomicBool,
    /// Set once listeners, stores and backups are up; cleared when the
    /// node begins to stop.
    pub(super) ready: AtomicBool,
    pub(super) started: Instant,
    pub(super) status: Mutex<serde_json::Value>,
    pub(super) stop: CancellationToken,
    pub(super) urls: Vec<String>,
    pub(super) requests: Counter,
}

impl AdminSource for Shared {
    fn status(&self) -> serde_json::Value {
        let mut v = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v["uptime_s"] = json!(self.started.elapsed().as_secs_f64());
        v["security"] = self.security_json();
        v["stores"] = json!(self.stores_json());
        v
    }
    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.healthy()
    }
    fn admin_token(&self) -> Option<String> {
        self.config.security.admin_token.clone()
    }
    fn write_token(&self) -> Option<String> {
        self.config.security.admin_write_token.clone()
    }
    fn mesh(&self) -> Option<&mesh::Server> {
        Some(&self.mesh)
    }
}

impl Shared {
    /// The node's access controls, as `/api/status` shows them (`clone_links`
    /// is `"open"` on a node that takes any clone).
    fn security_json(&self) -> serde_json::Value {
        use crate::config::{BanScope, CloneAuth, NodeInfo};
        let s = &self.config.security;
        json!({
            "clone_links": match s.clone_auth {
                CloneAuth::Token => "token",
                CloneAuth::Closed => "closed",
                CloneAuth::Open => "open",
            },
            "bans": match s.bans { BanScope::All => "all", BanScope::Store => "store" },
            "node_info": match s.node_info {
                NodeInfo::Off => "off",
                NodeInfo::Login => "login",
                NodeInfo::Anyone => "anyone",
            },
        })
    }

    fn stores_json(&self) -> Vec<serde_json::Value> {
        self.stores
            .iter()
            .map(|h| {
                json!({
                    "name": h.store.name(),
                    "reducer": h.settings.reducer.label(),
                    "role": if h.store.is_authority() { "authority" } else { "relay" },
                    "seq": h.store.seq(),
                    "connected": h.store.connected(),
                    "replicas": self.front.stats.attached.get(&h.settings.name).map(|g| g.get()),
                    "backup": h.backup.as_ref().map(|b| json!({
                        "path": h.settings.backup.as_ref().map(|s| s.path.display().to_string()),
                        "age_s": b.age(),
                        "failures": b.failures.get(),
                    })),
                })
            })
            .collect()
    }

    /// Refreshes the cached status and the gauges from the mesh.
    pub(super) async fn refresh(&self, gauges: &mut BTreeMap<String, ()>) {
        // counts and at most 200 groups: this runs every 500 ms, and a
        // listing of every group and client was O(groups) each time
        let (Ok(clones), Ok(groups), Ok((group_count, client_count))) = (
            self.mesh.clones().await,
            self.mesh.some_groups(200).await,
            self.mesh.counts().await,
        ) else {
            return;
        };
        let r = &self.registry;
        let up = clones.iter().filter(|c| c.up).count();
        r.gauge(
            "replimesh_clones",
            "Known clones by state",
            &[("state", "up")],
        )
        .set(up as i64);
        r.gauge(
            "replimesh_clones",
            "Known clones by state",
            &[("state", "down")],
        )
        .set((clones.len() - up) as i64);
        r.gauge("replimesh_clone_links", "Established clone links", &[])
            .set(clones.iter().filter(|c| c.linked).count() as i64);
        r.gauge("replimesh_groups", "Local groups", &[])
            .set(group_count as i64);
        // Subscriber gauges for up to 200 groups whose names are at most
        // 128 bytes (a longer name would be as long a label on every
        // scrape: such groups get no gauge); stale ones are removed.
        let mut seen = BTreeMap::new();
        for g in groups
            .iter()
            .filter(|g| g.name.len() <= MAX_GROUP_LABEL)
            .take(200)
        {
            r.gauge(
                "replimesh_group_subscribers",
                "Local subscribers per group",
                &[("group", &g.name)],
            )
            .set(g.subscribers as i64);
            seen.insert(g.name.clone(), ());
        }
        for old in gauges.keys() {
            if !seen.contains_key(old) {
                r.remove("replimesh_group_subscribers", &[("group", old)]);
            }
        }
        *gauges = seen;
        let me = self.mesh.id().to_owned();
        let mesh_stats = self.mesh.stats();
        let mut clone_rows = vec![
            json!({"id": me, "url": self.mesh.url(), "up": true, "linked": true, "self": true}),
        ];
        let mut links = Vec::new();
        for c in &clones {
            clone_rows.push(
                json!({"id": c.id, "url": c.url, "up": c.up, "linked": c.linked, "self": false}),
            );
            if c.linked {
                links.push(json!({"from": me, "to": c.id}));
            }
        }
        let status = json!({
            "id": me,
            "url": self.mesh.url(),
            "clones": clone_rows,
            "links": links,
            "groups": groups.iter().map(|g| json!({"name": g.name, "subscribers": g.subscribers})).collect::<Vec<_>>(),
            "counters": {
                "requests": self.requests.get(),
                "connections": self.front.stats.connections.get(),
                "mesh_clients": client_count,
                "actions": self.stores.iter().map(|h| h.store.seq()).sum::<u64>(),
                "messages_in": mesh_stats.published,
                "messages_out": mesh_stats.delivered,
                "dropped": mesh_stats.dropped,
                "slow_consumers": self.front.stats.slow_consumers.get(),
            },
            "endpoints": {
                "urls": self.urls,
                "ws": self.urls.iter().filter(|u| u.starts_with("ws")).collect::<Vec<_>>(),
            },
        });
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }
}
