//! [`Node::start`], one named step after another: stores, listeners, the
//! store server, the mesh clone, the front, routes, metrics, upstreams,
//! peers, background tasks and the admin server.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use replimesh::mesh;
use replimesh::store;
use replimesh::transport::Listener;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::hosted::{host_store, Hosted};
use super::metrics::register_metrics;
use super::shared::Shared;
use super::{upstream, Node};
use crate::admin::{AdminServer, AdminSource};
use crate::config::{CloneAuth, NodeConfig, Peer};
use crate::front::Front;
use crate::metrics::{Counter, Registry};

impl Node {
    /// Starts everything the configuration describes: stores (restoring
    /// backups), listeners, clone links, the admin server.
    pub async fn start(config: NodeConfig) -> anyhow::Result<Node> {
        let registry = Registry::new();
        let transport = config.transport();

        // Stores first: a restored authority must exist before replicas attach.
        let stores = config
            .stores
            .iter()
            .map(|s| host_store(s, &registry))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let listeners = open_listeners(&config, &transport).await?;
        let urls: Vec<String> = listeners.iter().map(|l| l.local_url()).collect();
        let store_server = store_server(&stores);
        let mesh = start_mesh(&config, &transport, &urls).await?;
        let stop = CancellationToken::new();
        let front = Front::new(mesh.clone(), store_server, &config, &registry, stop.clone())?;
        log_clone_auth(config.security.clone_auth);
        let requests = count_requests(&mesh, &registry);
        let shared = Arc::new(Shared {
            config: config.clone(),
            mesh: mesh.clone(),
            front: front.clone(),
            stores,
            registry: registry.clone(),
            healthy: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            started: Instant::now(),
            status: Mutex::new(json!({"id": config.id})),
            stop,
            urls,
            requests,
        });
        add_routes(&shared);
        register_metrics(&shared);
        for l in listeners {
            front.serve(l);
        }
        // Upstreams of relaying stores (retried in the background until they answer).
        upstream::spawn_all(&shared);
        add_peers(&mesh, &config.peers).await;
        // Background: status refresh, backup policies, events.
        spawn_status_refresh(&shared);
        spawn_event_counters(&shared);
        shared.refresh(&mut BTreeMap::new()).await;

        let admin = match &config.admin {
            Some(addr) => Some(
                AdminServer::start(addr, registry.clone(), shared.clone())
                    .await
                    .with_context(|| format!("admin listener {addr}"))?,
            ),
            None => None,
        };
        shared.ready.store(true, Ordering::Relaxed);
        Ok(Node {
            shared,
            admin: Arc::new(Mutex::new(admin)),
        })
    }
}

/// The node's listeners: the mesh and the stores share them.
async fn open_listeners(
    config: &NodeConfig,
    transport: &replimesh::transport::Config,
) -> anyhow::Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for (i, l) in config.listen.iter().enumerate() {
        let t =
            listener_transport(l, transport).with_context(|| format!("listen[{i}] ({})", l.url))?;
        listeners.push(
            replimesh::transport::listen(&l.url, &t)
                .await
                .with_context(|| format!("listen[{i}]: {}", l.url))?,
        );
    }
    Ok(listeners)
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

/// The store server gets its connections from the node's listeners; logins
/// are checked per store by the node (see `front`).
fn store_server(stores: &[Hosted]) -> store::Server {
    let server = store::Server::new(store::ServerConfig::default());
    for h in stores {
        h.store.add_to(&server);
    }
    server
}

/// The mesh clone: no listeners of its own either.
async fn start_mesh(
    config: &NodeConfig,
    transport: &replimesh::transport::Config,
    urls: &[String],
) -> anyhow::Result<mesh::Server> {
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
    mesh::Server::start(mc)
        .await
        .map_err(|e| anyhow::anyhow!("starting the mesh clone: {e}"))
}

/// Says at start-up who may open clone links when it is not "token holders".
fn log_clone_auth(clone_auth: CloneAuth) {
    match clone_auth {
        CloneAuth::Open => tracing::warn!(
            "security.clone_auth = \"none\": ANY peer that reaches a listener can join this mesh as a clone (delete groups, make this node dial URLs); use an [auth] token unless every listener is private"
        ),
        CloneAuth::Closed => tracing::info!(
            "no [auth] token: this node dials its peers but refuses incoming clone links"
        ),
        CloneAuth::Token => {}
    }
}

/// Counts every routed request and send (`replimesh_requests_total`) in a
/// middleware.
fn count_requests(mesh: &mesh::Server, registry: &Registry) -> Counter {
    let requests = registry.counter(
        "replimesh_requests_total",
        "Routed requests and sends handled by this node",
        &[],
    );
    let counter = requests.clone();
    mesh.use_middleware(move |_ctx| {
        counter.inc();
        async { Ok(mesh::Flow::Next) }
    });
    requests
}

/// Built-in routes: `echo` (any act) and `node/info` (status).
fn add_routes(shared: &Arc<Shared>) {
    shared
        .mesh
        .route("echo", "", |ctx| async move { Ok(ctx.data) });
    let weak = Arc::downgrade(shared);
    shared.mesh.route("node", "info", move |_ctx| {
        let weak = weak.clone();
        async move {
            let v = weak.upgrade().map(|s| s.status()).unwrap_or_default();
            Ok(Bytes::from(v.to_string()))
        }
    });
}

/// Links to the configured peers (a failure is logged: the mesh retries).
async fn add_peers(mesh: &mesh::Server, peers: &[Peer]) {
    for p in peers {
        if let Err(e) = mesh.add_clone(&p.id, &p.url, None).await {
            tracing::warn!(peer = %p.id, url = %p.url, error = %e, "add_clone failed");
        }
    }
}

/// Refreshes the status document and the gauges every 500 ms until the
/// node stops.
fn spawn_status_refresh(shared: &Arc<Shared>) {
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

/// Counts the mesh's failed clone authentications, errors and unrouted
/// messages until the node stops.
fn spawn_event_counters(shared: &Arc<Shared>) {
    let s = shared.clone();
    let mut events = shared.mesh.events();
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
