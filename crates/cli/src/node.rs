//! A node: one mesh clone plus the stores it hosts, an admin HTTP server
//! with metrics and the dashboard, and a graceful shutdown.
//!
//! The mesh and the stores **share the node's listeners and connections**:
//! the node accepts every connection and passes its frames to the mesh or to
//! the store server by type (see [`crate::front`]), so one client connection
//! can subscribe to groups and replicate stores.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use replimesh::backup::{self, BackupConfig, FsyncPolicy};
use replimesh::mesh;
use replimesh::store::{self, Reducer, Store, StoreConfig};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminServer, AdminSource};
use crate::config::{Journal, Mode, NodeConfig, ReducerKind, StoreSettings};
use crate::front::Front;
use crate::metrics::{Counter, Registry};
use crate::reducers::{CounterReducer, Kv};

/// Longest group name that gets a `replimesh_group_subscribers` label.
const MAX_GROUP_LABEL: usize = 128;

/// A store hosted by a node, whatever its reducer.
#[derive(Clone)]
pub enum HostedStore {
    /// A [`CounterReducer`] store.
    Counter(Store<CounterReducer>),
    /// A [`Kv`] store.
    Kv(Store<Kv>),
}

macro_rules! with_store {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            HostedStore::Counter($s) => $e,
            HostedStore::Kv($s) => $e,
        }
    };
}

impl HostedStore {
    /// The store's name.
    pub fn name(&self) -> String {
        with_store!(self, s => s.name().to_owned())
    }
    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        with_store!(self, s => s.seq())
    }
    /// The state as JSON.
    #[allow(clippy::needless_borrows_for_generic_args)] // `&*` is needed for the non-Copy states
    pub fn state_json(&self) -> serde_json::Value {
        with_store!(self, s => serde_json::to_value(&*s.state()).unwrap_or(serde_json::Value::Null))
    }
    /// Whether it is the authority.
    pub fn is_authority(&self) -> bool {
        with_store!(self, s => s.is_authority())
    }
    /// Whether it is connected (an authority always is).
    pub fn connected(&self) -> bool {
        with_store!(self, s => s.connected())
    }
    async fn shutdown(&self) {
        with_store!(self, s => s.shutdown().await)
    }
    fn add_to(&self, server: &store::Server) {
        with_store!(self, s => { server.add(s); })
    }
    async fn connect(
        &self,
        url: &str,
        config: store::ClientConfig,
    ) -> Result<store::Client, store::ConnectError> {
        with_store!(self, s => s.connect_with(url, config).await)
    }
}

/// The backup of one hosted store: what the metrics and the status show.
struct BackupState {
    last_write: Mutex<Option<Instant>>,
    failures: Counter,
    writes: Counter,
}

impl BackupState {
    fn wrote(&self) {
        self.writes.inc();
        *self.last_write.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    fn age(&self) -> Option<f64> {
        self.last_write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs_f64())
    }
    fn count<T>(&self, r: Result<T, store::PersistError>) -> Result<T, store::PersistError> {
        if r.is_err() {
            self.failures.inc();
        }
        r
    }
    fn count_write(&self, r: Result<(), store::PersistError>) -> Result<(), store::PersistError> {
        if r.is_ok() {
            self.wrote();
        }
        self.count(r)
    }
}

/// The store crate's [`store::BackupPersistence`] (the backup's policies,
/// the journal, and the origins that keep dispatches exactly-once across
/// restarts), counting writes and failures for the metrics.
struct CountedBackup {
    inner: store::BackupPersistence,
    state: Arc<BackupState>,
}

impl store::Persistence for CountedBackup {
    fn load(&mut self) -> Result<store::Recovered, store::PersistError> {
        self.inner.load()
    }
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[store::Origin],
    ) -> Result<bool, store::PersistError> {
        self.state
            .count(self.inner.record(history_id, first_seq, actions, origins))
    }
    fn snapshot(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.state
            .count_write(self.inner.snapshot(history_id, seq, state, origins))
    }
    fn deadline(&self) -> Option<std::time::Instant> {
        self.inner.deadline()
    }
    fn shutdown(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.state
            .count_write(self.inner.shutdown(history_id, seq, state, origins))
    }
}

/// One hosted store with its backup and upstream link.
struct Hosted {
    settings: StoreSettings,
    store: HostedStore,
    backup: Option<Arc<BackupState>>,
    upstream: Mutex<Option<store::Client>>,
}

impl Hosted {
    /// Stops the store and waits for it; an authority with a backup writes
    /// its final state there (through [`CountedBackup`]) and releases the
    /// backup's lock.
    async fn shutdown(&self) -> anyhow::Result<()> {
        let failures = self.backup.as_ref().map(|b| b.failures.get());
        self.store.shutdown().await;
        match (&self.backup, failures) {
            (Some(b), Some(before)) if b.failures.get() > before => Err(anyhow::anyhow!(
                "final backup of store {} failed (see the log)",
                self.settings.name
            )),
            _ => Ok(()),
        }
    }
}

struct Shared {
    config: NodeConfig,
    mesh: mesh::Server,
    front: Arc<Front>,
    stores: Vec<Hosted>,
    registry: Registry,
    healthy: AtomicBool,
    started: Instant,
    status: Mutex<serde_json::Value>,
    stop: CancellationToken,
    urls: Vec<String>,
    requests: Counter,
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
    fn admin_token(&self) -> Option<&str> {
        self.config.security.admin_token.as_deref()
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
                    "reducer": match h.settings.reducer { ReducerKind::Counter => "counter", ReducerKind::Kv => "kv" },
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
    async fn refresh(&self, gauges: &mut BTreeMap<String, ()>) {
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

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    admin: Arc<Mutex<Option<AdminServer>>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.shared.config.id)
            .finish_non_exhaustive()
    }
}

/// The transport settings of one listener: the node's limits plus the
/// listener's own certificate for `tls://` and `wss://`, and the browser
/// client (`/replimesh.js`) for plain HTTP GETs on `ws://` and `wss://`.
fn listener_transport(
    l: &crate::config::Listen,
    base: &replimesh::transport::Config,
) -> anyhow::Result<replimesh::transport::Config> {
    let mut t = base.clone();
    // WebSocket listeners also serve the browser client to a plain GET, so
    // pages need not reach the (private) admin port.
    t.http_files = std::sync::Arc::new([replimesh::transport::HttpFile {
        path: "/replimesh.js".into(),
        content_type: crate::assets::JS.into(),
        body: Bytes::from_static(crate::assets::REPLIMESH_JS.as_bytes()),
    }]);
    if let (Some(cert), Some(key)) = (&l.cert, &l.key) {
        let c = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let k = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        t.tls.server = Some(
            replimesh::transport::TlsConfig::server_from_pem(&c, &k)
                .with_context(|| format!("certificate {}", cert.display()))?,
        );
    }
    Ok(t)
}

fn make_store(s: &StoreSettings) -> StoreConfig {
    let mode = match s.mode {
        Mode::Action => store::SyncMode::Action,
        Mode::Snapshot => store::SyncMode::Snapshot,
        Mode::Digest => store::SyncMode::Digest,
    };
    StoreConfig::default().mode(mode).resync(s.resync)
}

type OpenedBackup = (Arc<BackupState>, Box<dyn store::Persistence>);

fn open_backup(
    s: &StoreSettings,
    schema: u32,
    registry: &Registry,
) -> anyhow::Result<Option<OpenedBackup>> {
    let Some(b) = &s.backup else { return Ok(None) };
    let mut bc = BackupConfig::new(&b.path);
    if let Some(k) = &b.key_file {
        bc = bc.key(crate::config::read_secret("backup.key_file", k)?);
    }
    if let Some((m, t)) = b.kdf {
        bc = bc.kdf(backup::KdfParams {
            m_cost_kib: m,
            t_cost: t,
            p_cost: 1,
        });
    }
    if b.every > 0 {
        bc = bc.count(b.every);
    }
    if let Some(t) = b.after {
        bc = bc.timeout(t);
    }
    bc = match b.journal {
        Journal::Off => bc,
        Journal::Always => bc.journal(FsyncPolicy::Always),
        Journal::Interval => bc.journal(FsyncPolicy::Every(Duration::from_millis(200))),
        Journal::Never => bc.journal(FsyncPolicy::Never),
    };
    let inner = store::BackupPersistence::open(bc, &s.name, schema)
        .map_err(|e| anyhow::anyhow!("opening the backup of store {}: {e}", s.name))?;
    let labels = [("store", s.name.as_str())];
    let state = Arc::new(BackupState {
        last_write: Mutex::new(None),
        failures: registry.counter(
            "replimesh_backup_failures_total",
            "Failed backup writes",
            &labels,
        ),
        writes: registry.counter(
            "replimesh_backup_writes_total",
            "Backup snapshots written",
            &labels,
        ),
    });
    let p = CountedBackup {
        inner,
        state: state.clone(),
    };
    Ok(Some((state, Box::new(p))))
}

fn host_store(s: &StoreSettings, registry: &Registry) -> anyhow::Result<Hosted> {
    let cfg = make_store(s);
    macro_rules! build {
        ($reducer:expr, $variant:ident) => {{
            let reducer = $reducer;
            let schema = reducer.schema();
            if s.upstream.is_some() {
                (HostedStore::$variant(Store::replica(reducer, cfg)), None)
            } else {
                match open_backup(s, schema, registry)? {
                    Some((b, p)) => (
                        HostedStore::$variant(
                            Store::authority_with_persistence(reducer, cfg, p)
                                .map_err(|e| anyhow::anyhow!("store {}: {e}", s.name))?,
                        ),
                        Some(b),
                    ),
                    None => (HostedStore::$variant(Store::authority(reducer, cfg)), None),
                }
            }
        }};
    }
    let name = s.name.clone();
    let (store, backup) = match s.reducer {
        ReducerKind::Counter => build!(CounterReducer { name }, Counter),
        ReducerKind::Kv => build!(Kv { name }, Kv),
    };
    Ok(Hosted {
        settings: s.clone(),
        store,
        backup,
        upstream: Mutex::new(None),
    })
}

impl Node {
    /// Starts everything the configuration describes: stores (restoring
    /// backups), listeners, clone links, the admin server.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let registry = Registry::new();
        let transport = config.transport();

        // Stores first: a restored authority must exist before replicas attach.
        let mut stores = Vec::new();
        for s in &config.stores {
            stores.push(host_store(s, &registry)?);
        }
        // The node's listeners: the mesh and the stores share them.
        let mut listeners = Vec::new();
        for (i, l) in config.listen.iter().enumerate() {
            let t = listener_transport(l, &transport)
                .with_context(|| format!("listen[{i}] ({})", l.url))?;
            listeners.push(
                replimesh::transport::listen(&l.url, &t)
                    .await
                    .with_context(|| format!("listen[{i}]: {}", l.url))?,
            );
        }
        let urls: Vec<String> = listeners.iter().map(|l| l.local_url()).collect();

        // The store server gets its connections from the node's listeners;
        // logins are checked per store by the node (see `front`).
        let store_server = store::Server::new(store::ServerConfig::default());
        for h in &stores {
            h.store.add_to(&store_server);
        }

        // The mesh clone: no listeners of its own either.
        let mut mc = mesh::ServerConfig {
            id: Some(config.id.clone()),
            listen: Vec::new(),
            url: config.url.clone().or_else(|| urls.first().cloned()),
            data: Bytes::from(config.data.clone().into_bytes()),
            transport: transport.clone(),
            hello_timeout: config.limits.handshake_timeout,
            max_requests_in_flight: config.limits.max_requests_in_flight,
            access: config.access.clone(),
            ..Default::default()
        };
        if let Some(token) = &config.token {
            let t_in = token.clone().into_bytes();
            let t_out = Bytes::from(token.clone().into_bytes());
            mc = mc
                .auth_in(move |v| v == t_in.as_slice())
                .auth_out(move |_| t_out.clone());
        }
        let mesh = mesh::Server::start(mc)
            .await
            .map_err(|e| anyhow::anyhow!("starting the mesh clone: {e}"))?;
        let stop = CancellationToken::new();
        let front = Front::new(mesh.clone(), store_server, &config, &registry, stop.clone())?;
        match config.security.clone_auth {
            crate::config::CloneAuth::Open => tracing::warn!(
                "security.clone_auth = \"none\": ANY peer that reaches a listener can join this mesh as a clone (delete groups, make this node dial URLs); use an [auth] token unless every listener is private"
            ),
            crate::config::CloneAuth::Closed => tracing::info!(
                "no [auth] token: this node dials its peers but refuses incoming clone links"
            ),
            crate::config::CloneAuth::Token => {}
        }
        let requests = registry.counter(
            "replimesh_requests_total",
            "Routed requests and sends handled by this node",
            &[],
        );
        {
            let requests = requests.clone();
            mesh.use_middleware(move |_ctx| {
                requests.inc();
                async { Ok(mesh::Flow::Next) }
            });
        }
        // Built-in routes: `node/info` (status) and `echo` (any act).
        mesh.route("echo", "", |ctx| async move { Ok(ctx.data) });

        let shared = Arc::new(Shared {
            config: config.clone(),
            mesh: mesh.clone(),
            front: front.clone(),
            stores,
            registry: registry.clone(),
            healthy: AtomicBool::new(true),
            started: Instant::now(),
            status: Mutex::new(json!({"id": config.id})),
            stop,
            urls,
            requests,
        });
        {
            let weak = Arc::downgrade(&shared);
            mesh.route("node", "info", move |_ctx| {
                let weak = weak.clone();
                async move {
                    let v = weak.upgrade().map(|s| s.status()).unwrap_or_default();
                    Ok(Bytes::from(v.to_string()))
                }
            });
        }
        register_metrics(&shared);
        for l in listeners {
            front.serve(l);
        }

        // Upstreams of relaying stores (retried in the background until they answer).
        for (i, h) in shared.stores.iter().enumerate() {
            if let Some(u) = &h.settings.upstream {
                let s = shared.clone();
                let u = u.clone();
                tokio::spawn(async move {
                    let mut backoff = replimesh::transport::Backoff::new(
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                    );
                    loop {
                        let h = &s.stores[i];
                        let mut cc = store::ClientConfig::new(&u.login, &u.password);
                        cc.transport.tls.client = s.config.transport().tls.client;
                        match h.store.connect(&u.url, cc).await {
                            Ok(c) => {
                                *h.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(store = %h.settings.name, upstream = %u.url, error = %e, "upstream not reachable yet");
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_random_delay()) => {}
                            _ = s.stop.cancelled() => break,
                        }
                    }
                });
            }
        }

        // Peers.
        for p in &config.peers {
            if let Err(e) = mesh.add_clone(&p.id, &p.url, None).await {
                tracing::warn!(peer = %p.id, url = %p.url, error = %e, "add_clone failed");
            }
        }

        // Background: status refresh, backup policies, events.
        {
            let s = shared.clone();
            tokio::spawn(async move {
                let mut groups = BTreeMap::new();
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = s.stop.cancelled() => break,
                    }
                    s.refresh(&mut groups).await;
                }
            });
        }
        {
            let s = shared.clone();
            let mut events = mesh.events();
            let r = &shared.registry;
            let auth_err = r.counter(
                "replimesh_clone_auth_failures_total",
                "Clone links refused by auth_in",
                &[],
            );
            let errors = r.counter(
                "replimesh_connection_errors_total",
                "Protocol errors and failed connections",
                &[],
            );
            let noroute = r.counter(
                "replimesh_no_route_total",
                "Messages for a route without handler",
                &[],
            );
            tokio::spawn(async move {
                loop {
                    let e = tokio::select! {
                        e = events.recv() => e,
                        _ = s.stop.cancelled() => break,
                    };
                    match e {
                        None => break,
                        Some(mesh::ServerEvent::AuthError { .. }) => auth_err.inc(),
                        Some(mesh::ServerEvent::Error(_)) => errors.inc(),
                        Some(mesh::ServerEvent::NoRoute { .. }) => noroute.inc(),
                        Some(_) => {}
                    }
                }
            });
        }
        shared.refresh(&mut BTreeMap::new()).await;

        let admin = match &config.admin {
            Some(addr) => Some(
                AdminServer::start(addr, registry.clone(), shared.clone())
                    .await
                    .with_context(|| format!("admin listener {addr}"))?,
            ),
            None => None,
        };
        Ok(Node {
            shared,
            admin: Arc::new(Mutex::new(admin)),
        })
    }

    /// The node's clone id.
    pub fn id(&self) -> &str {
        self.shared.mesh.id()
    }

    /// The mesh clone.
    pub fn mesh(&self) -> &mesh::Server {
        &self.shared.mesh
    }

    /// Bound URLs of the node's listeners (in config order). Each serves
    /// clone links, mesh clients and store replicas alike.
    pub fn urls(&self) -> &[String] {
        &self.shared.urls
    }

    /// The same as [`Node::urls`] (every listener serves the mesh).
    pub fn mesh_urls(&self) -> &[String] {
        &self.shared.urls
    }

    /// The same as [`Node::urls`] (every listener serves the stores).
    pub fn store_urls(&self) -> &[String] {
        &self.shared.urls
    }

    /// The admin server's address, if any.
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|a| a.addr())
    }

    /// The metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// A hosted store by name.
    pub fn store(&self, name: &str) -> Option<HostedStore> {
        self.shared
            .stores
            .iter()
            .find(|h| h.settings.name == name)
            .map(|h| h.store.clone())
    }

    /// The status document (what `/api/status` serves).
    pub fn status(&self) -> serde_json::Value {
        self.shared.status()
    }

    /// Graceful shutdown: `/health` turns 503, listeners stop, clients are
    /// told to go elsewhere (close code "going away"), peers are told this
    /// clone left, final backups are written and the backups' locks
    /// released. Returns once all that is done: a node on the same backup
    /// paths can start right after (also in the same process).
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let s = &self.shared;
        s.healthy.store(false, Ordering::Relaxed);
        s.front.stop_accepting();
        s.front.stores().shutdown().await;
        s.mesh.shutdown().await;
        s.stop.cancel();
        s.front.stopped().await;
        let mut result = Ok(());
        for h in &s.stores {
            let upstream = h.upstream.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(c) = upstream {
                c.shutdown().await;
            }
            if let Err(e) = h.shutdown().await {
                tracing::error!(error = %e, "final backup failed");
                result = Err(e);
            }
        }
        if let Some(a) = self.admin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            a.shutdown();
        }
        result
    }
}

fn register_metrics(shared: &Arc<Shared>) {
    let r = &shared.registry;
    let started = shared.started;
    r.gauge_fn(
        "replimesh_uptime_seconds",
        "Seconds since the node started",
        &[],
        move || started.elapsed().as_secs_f64(),
    );
    r.gauge_fn(
        "replimesh_up",
        "1 while the node accepts work, 0 while draining",
        &[],
        {
            let w = Arc::downgrade(shared);
            move || w.upgrade().map_or(0.0, |s| s.healthy() as u8 as f64)
        },
    );
    // The mesh's own counters, read at each scrape.
    type Stat = fn(&mesh::ServerStats) -> u64;
    type MeshCounter = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Stat,
    );
    let mesh_counters: [MeshCounter; 6] = [
        (
            "replimesh_messages_published_total",
            "Group messages published on this clone",
            &[],
            |s| s.published,
        ),
        (
            "replimesh_messages_delivered_total",
            "Group messages queued to this clone's subscribers",
            &[],
            |s| s.delivered,
        ),
        (
            "replimesh_messages_dropped_total",
            "Group messages for this clone's subscribers that could not be queued (slow or closing connections)",
            &[],
            |s| s.dropped,
        ),
        (
            "replimesh_clone_frames_total",
            "Frames on clone links",
            &[("dir", "in")],
            |s| s.clone_frames_in,
        ),
        (
            "replimesh_clone_frames_total",
            "Frames on clone links",
            &[("dir", "out")],
            |s| s.clone_frames_out,
        ),
        (
            "replimesh_unknown_frames_total",
            "Frames of unknown kinds from clients and clones (ignored; a newer peer's)",
            &[],
            |s| s.unknown_frames,
        ),
    ];
    for (name, help, labels, f) in mesh_counters {
        let w = Arc::downgrade(shared);
        r.counter_fn(name, help, labels, move || {
            w.upgrade().map_or(0.0, |s| f(&s.mesh.stats()) as f64)
        });
    }
    for (i, h) in shared.stores.iter().enumerate() {
        let labels = [("store", h.settings.name.as_str())];
        let w = Arc::downgrade(shared);
        r.gauge_fn(
            "replimesh_store_seq",
            "Last committed/applied sequence number",
            &labels,
            move || w.upgrade().map_or(0.0, |s| s.stores[i].store.seq() as f64),
        );
        let w = Arc::downgrade(shared);
        r.gauge_fn(
            "replimesh_store_connected",
            "1 when the store is connected to its authority (or is it)",
            &labels,
            move || {
                w.upgrade()
                    .map_or(0.0, |s| s.stores[i].store.connected() as u8 as f64)
            },
        );
        if h.backup.is_some() {
            let w = Arc::downgrade(shared);
            r.gauge_fn(
                "replimesh_backup_age_seconds",
                "Seconds since the last backup snapshot was written (-1: none yet)",
                &labels,
                move || {
                    w.upgrade()
                        .and_then(|s| s.stores[i].backup.as_ref().and_then(|b| b.age()))
                        .unwrap_or(-1.0)
                },
            );
        }
    }
}

/// Runs a node until SIGTERM or SIGINT, printing its bound URLs; then shuts
/// it down gracefully.
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let node = Node::start(config).await?;
    println!("node {}", node.id());
    for u in node.urls() {
        println!("listening {u}");
    }
    if let Some(a) = node.admin_addr() {
        println!("admin http://{a}/");
    }
    println!("ready");
    tokio::select! {
        _ = term.recv() => println!("SIGTERM: shutting down"),
        _ = int.recv() => println!("SIGINT: shutting down"),
    }
    node.shutdown().await?;
    println!("stopped");
    Ok(())
}
