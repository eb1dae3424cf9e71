//! The node's listeners: one set of listeners, and one connection per
//! client, for the mesh clone and the hosted stores.
//!
//! The node accepts every connection itself and reads its `Hello`:
//!
//! - a **clone link** (`kind = CLONE`) is handed to the mesh as it is;
//! - a **client** is checked (store login, bans) and welcomed by the mesh;
//!   then the node reads its frames and passes each on by type: store frames
//!   (`StoreHello`, `Dispatch`, `Resync`, ...) to the store server, the rest
//!   (subscribe, publish, requests, ...) to the mesh. Both answer on the
//!   connection's one [`Sender`](transport::Sender), so the connection has one outbound queue
//!   and one slow-consumer limit (`limits.max_queue_bytes`): the mesh's
//!   messages cut a consumer that lets it overflow, the store's followers wait
//!   for room instead. The store side of a connection is only set up when it
//!   sends its first store frame.
//!
//! Store logins are per store: the `Hello`'s login and password are checked
//! against every store that lists the login; the connection may attach to
//! those stores only. A login that no store accepts is refused ("auth
//! failed") and counts towards a ban of the address; a client without a
//! login uses the mesh only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use replimesh::mesh;
use replimesh::proto::{self, frame::Body, wire, CloseCode, Frame, PeerKind};
use replimesh::store;
use replimesh::transport::{self, CloseReason, RecvError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{BanScope, CloneAuth, NodeConfig, NodeInfo, StoreSettings};
use crate::metrics::{Counter, Gauge, Registry};

/// Frames waiting for the mesh or a store on one connection before the node
/// stops reading it (backpressure to the peer).
const FEED_QUEUE: usize = 64;

/// The check for one configured login value, and the stores that have it.
type LoginCheck = (Arc<store::Logins>, Vec<String>);

/// Per-store logins: who may attach to which store.
struct Access {
    /// login -> (the check for one configured value, the stores with that value)
    users: HashMap<String, Vec<LoginCheck>>,
    /// A table whose dummy hash is checked for unknown users, and to bring
    /// every login to the same number of checks.
    dummy: Option<Arc<store::Logins>>,
    /// Argon2 checks per login: the most values any login has (usually 1).
    checks_per_login: usize,
}

impl Access {
    fn new(stores: &[StoreSettings]) -> anyhow::Result<Access> {
        let mut by_value: HashMap<(String, String), Vec<String>> = HashMap::new();
        for s in stores {
            for (user, value) in &s.logins {
                by_value
                    .entry((user.clone(), value.clone()))
                    .or_default()
                    .push(s.name.clone());
            }
        }
        let mut users: HashMap<String, Vec<_>> = HashMap::new();
        for ((user, value), names) in by_value {
            let mut l = store::Logins::new();
            l.add_config(&user, &value)
                .map_err(|e| anyhow::anyhow!("store {} login {user}: {e}", names[0]))?;
            users.entry(user).or_default().push((Arc::new(l), names));
        }
        let dummy = users.values().flatten().next().map(|(l, _)| l.clone());
        let checks_per_login = users.values().map(Vec::len).max().unwrap_or(0);
        Ok(Access {
            users,
            dummy,
            checks_per_login,
        })
    }

    /// The stores this login and password may use (empty: none). Slow on
    /// purpose (Argon2id): runs on the gate's check pool. Every login name,
    /// known or not, costs the same number of checks: unknown users (and
    /// users with fewer values than others) are checked against a dummy
    /// hash.
    fn allowed(&self, user: &str, password: &str) -> HashSet<String> {
        let mut out = HashSet::new();
        let entries = self.users.get(user).map(Vec::as_slice).unwrap_or(&[]);
        for (logins, names) in entries {
            if logins.verify(user, password) {
                out.extend(names.iter().cloned());
            }
        }
        if let Some(dummy) = &self.dummy {
            for _ in entries.len()..self.checks_per_login {
                // The empty user name is never configured: its dummy hash.
                let _ = dummy.verify("", password);
            }
        }
        out
    }
}

/// What the listeners count (registered in the node's metrics registry).
pub(crate) struct FrontStats {
    /// Open client connections.
    pub connections: Gauge,
    /// Client connections accepted.
    pub opened: Counter,
    /// Clone links accepted on the node's listeners.
    pub clone_links_accepted: Counter,
    /// Frames received from clients, by destination.
    pub frames_mesh: Counter,
    /// Frames received from clients for the stores.
    pub frames_store: Counter,
    /// Group messages published by this node's clients.
    pub published: Counter,
    /// Connections cut because they did not read fast enough.
    pub slow_consumers: Counter,
    /// Refused logins.
    pub login_failures: Counter,
    /// Connections attached (or attaching) to each store.
    pub attached: HashMap<String, Gauge>,
}

impl FrontStats {
    fn new(r: &Registry, stores: &[StoreSettings]) -> FrontStats {
        FrontStats {
            connections: r.gauge("replimesh_connections", "Open client connections", &[]),
            opened: r.counter(
                "replimesh_connections_opened_total",
                "Client connections accepted",
                &[],
            ),
            clone_links_accepted: r.counter(
                "replimesh_clone_links_accepted_total",
                "Clone links accepted on this node's listeners",
                &[],
            ),
            frames_mesh: r.counter(
                "replimesh_client_frames_total",
                "Frames received from clients, by destination",
                &[("to", "mesh")],
            ),
            frames_store: r.counter(
                "replimesh_client_frames_total",
                "Frames received from clients, by destination",
                &[("to", "store")],
            ),
            published: r.counter(
                "replimesh_client_publishes_total",
                "Group messages published by this node's clients",
                &[],
            ),
            slow_consumers: r.counter(
                "replimesh_slow_consumer_disconnects_total",
                "Client connections cut because they did not read fast enough",
                &[],
            ),
            login_failures: r.counter(
                "replimesh_login_failures_total",
                "Refused store logins",
                &[],
            ),
            attached: stores
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        r.gauge(
                            "replimesh_store_replicas",
                            "Client connections attached to the store (replicas and relays)",
                            &[("store", &s.name)],
                        ),
                    )
                })
                .collect(),
        }
    }
}

/// The shared front of a node: accepts connections on the node's listeners
/// and passes their frames to the mesh and the store server.
pub(crate) struct Front {
    mesh: mesh::Server,
    stores: store::Server,
    hosted: HashSet<String>,
    access: Arc<Access>,
    /// The hello, bans and login checks, as the store server's listeners.
    gate: store::Gate,
    /// Who may open clone links, and the token they must present.
    clone_auth: CloneAuth,
    token: Option<Vec<u8>>,
    /// What bans cover.
    bans: BanScope,
    /// Who may ask `node/info`.
    node_info: NodeInfo,
    /// Stops the listeners.
    accepting: CancellationToken,
    /// Stops everything (after the mesh and the stores said goodbye).
    stop: CancellationToken,
    /// The accepting tasks and the connections' tasks.
    tasks: TaskTracker,
    pub(crate) stats: FrontStats,
}

impl Front {
    pub(crate) fn new(
        mesh: mesh::Server,
        stores: store::Server,
        config: &NodeConfig,
        registry: &Registry,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Front>> {
        let (settings, limits) = (&config.stores, &config.limits);
        let front = Arc::new(Front {
            mesh,
            stores,
            hosted: settings.iter().map(|s| s.name.clone()).collect(),
            access: Arc::new(Access::new(settings)?),
            gate: store::Gate::new(
                limits.max_login_failures,
                limits.ban,
                limits.handshake_timeout,
                stop.clone(),
            )
            .with_pool(store::CheckPool::new(
                limits.login_threads,
                limits.login_queue,
            ))
            .logins_per_address(limits.logins_per_address),
            clone_auth: config.security.clone_auth,
            token: config.token.as_ref().map(|t| t.as_bytes().to_vec()),
            bans: config.security.bans,
            node_info: config.security.node_info,
            accepting: stop.child_token(),
            stop,
            tasks: TaskTracker::new(),
            stats: FrontStats::new(registry, settings),
        });
        let weak = Arc::downgrade(&front);
        registry.counter_fn(
            "replimesh_password_checks_total",
            "Logins whose password was checked (each runs one or more Argon2id checks)",
            &[],
            move || weak.upgrade().map_or(0.0, |f| f.gate.checks() as f64),
        );
        registry.counter_fn(
            "replimesh_argon2_runs_total",
            "Argon2id computations of this process (hashes and checks, dummy ones included)",
            &[],
            || store::argon2_runs() as f64,
        );
        Ok(front)
    }

    /// Accepts on `listener` until the node stops.
    pub(crate) fn serve(self: &Arc<Self>, listener: transport::Listener) {
        let front = self.clone();
        store::accept_each(listener, self.accepting.clone(), &self.tasks, move |c| {
            front.clone().connection(c)
        });
    }

    /// The store server the connections' store frames go to.
    pub(crate) fn stores(&self) -> &store::Server {
        &self.stores
    }

    /// Stops accepting connections (the open ones go on).
    pub(crate) fn stop_accepting(&self) {
        self.accepting.cancel();
    }

    /// Waits until the listeners are closed and, once the node's stop is
    /// cancelled, every connection's task has ended.
    pub(crate) async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// One accepted connection: its hello, then its frames.
    async fn connection(self: Arc<Self>, conn: transport::Connection) {
        let (tx, mut rx) = conn.split();
        // The handshake is boxed: the future of a connection lives as long
        // as the connection, and only its small loop part should stay.
        let Some((hello, login, allowed)) = Box::pin(self.handshake(&tx, &mut rx)).await else {
            return;
        };
        if hello.kind == PeerKind::Clone as i32 {
            // Clone links carry only mesh frames: the mesh reads them itself.
            self.stats.clone_links_accepted.inc();
            self.mesh.adopt(tx, rx, hello);
            return;
        }
        self.stats.opened.inc();
        self.stats.connections.add(1);
        // Mesh frames are passed on as they came (bodies, decoded by the
        // mesh's task); a channel of `Bytes` keeps idle connections small.
        let (mesh_tx, mesh_rx) = mpsc::channel::<Bytes>(FEED_QUEUE);
        self.mesh.adopt_client_encoded(tx.clone(), hello, mesh_rx);
        let mut store_tx: Option<mpsc::Sender<Frame>> = None;
        let mut attached: HashSet<String> = HashSet::new();
        let end = loop {
            let body = tokio::select! {
                b = rx.recv_encoded() => b,
                _ = self.stop.cancelled() => break None,
            };
            let body = match body {
                Ok(b) => b,
                Err(e) => break Some(e),
            };
            let field = wire::frame_field(&body);
            if field == wire::field::REQUEST && self.refuse_info(&tx, &body, !login.is_empty()) {
                continue;
            }
            if !wire::STORE_FIELDS.contains(&field) {
                self.stats.frames_mesh.inc();
                if field == wire::field::PUBLISH {
                    self.stats.published.inc();
                }
                match mesh_tx.try_send(body) {
                    Ok(()) => {}
                    // Backpressure, boxed (rare; keeps the idle future small).
                    Err(mpsc::error::TrySendError::Full(b)) => {
                        if Box::pin(mesh_tx.send(b)).await.is_err() {
                            break None;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break None,
                }
                continue;
            }
            self.stats.frames_store.inc();
            let f = match <Frame as proto::Message>::decode(body) {
                Ok(f) => f,
                Err(e) => {
                    tx.close(CloseCode::ProtocolError, &format!("malformed frame: {e}"));
                    break None;
                }
            };
            // (A crafted body whose first field is a store field but whose
            // last one is not decodes to another frame: dropped.)
            let Some(name) = store::store_of(&f) else {
                continue;
            };
            if let Some(Body::StoreHello(_)) = &f.body {
                if let Some(refusal) = self.refuse_attach(name, &login, &allowed) {
                    let _ = tx.send(&refusal);
                    continue;
                }
                if attached.insert(name.to_owned()) {
                    if let Some(g) = self.stats.attached.get(name) {
                        g.add(1);
                    }
                }
            }
            let feed = store_tx.get_or_insert_with(|| {
                let (t, r) = mpsc::channel(FEED_QUEUE);
                self.stores.adopt_as(&login, tx.clone(), r);
                t
            });
            match feed.try_send(f) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(f)) => {
                    if Box::pin(feed.send(f)).await.is_err() {
                        break None;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break None,
            }
        };
        if let Some(RecvError::Local(CloseReason::SlowConsumer { .. })) = end {
            self.stats.slow_consumers.inc();
        }
        for name in attached {
            if let Some(g) = self.stats.attached.get(&name) {
                g.add(-1);
            }
        }
        self.stats.connections.add(-1);
    }

    /// Reads and checks the hello: `None` when the connection was refused
    /// (closed) or ended. For clients with a login, the stores it may use;
    /// the hello comes back without login and password.
    async fn handshake(
        &self,
        tx: &transport::Sender,
        rx: &mut transport::Receiver,
    ) -> Option<(proto::Hello, String, HashSet<String>)> {
        // A banned address is refused before it may say anything (with
        // `bans = "store"`, only its store logins are).
        if self.bans == BanScope::All && self.gate.refuse_banned(tx) {
            return None;
        }
        let mut hello = self.gate.hello(tx, rx).await?;
        if hello.kind == PeerKind::Clone as i32 {
            self.check_clone(tx, &hello).then_some(())?;
            return Some((hello, String::new(), HashSet::new()));
        }
        let mut allowed = HashSet::new();
        if !hello.login.is_empty() {
            let (access, user, password) = (
                self.access.clone(),
                hello.login.clone(),
                hello.password.clone(),
            );
            let check = move || Some(access.allowed(&user, &password)).filter(|a| !a.is_empty());
            match self.gate.login(tx, &hello.login, check).await {
                Ok(a) => allowed = a,
                Err(refusal) => {
                    if refusal == store::Refusal::Failed {
                        self.stats.login_failures.inc();
                    }
                    return None;
                }
            }
        }
        // The mesh takes the login as checked (client ids, access control).
        let login = hello.login.clone();
        hello.password.clear();
        Some((hello, login, allowed))
    }

    /// Whether a clone link may go on (else it was closed): with a token,
    /// the hello must present it (a wrong one counts as a failed login of
    /// the address, with `bans = "all"`); without one, only a node that
    /// says `clone_auth = "none"` takes clone links.
    fn check_clone(&self, tx: &transport::Sender, hello: &proto::Hello) -> bool {
        match (self.clone_auth, &self.token) {
            (CloneAuth::Open, _) => true,
            (CloneAuth::Token, Some(token)) => {
                let ok = constant_time_eq(&hello.auth, token);
                if self.bans == BanScope::All {
                    return self.gate.check_now(tx, "clone link", ok).is_ok();
                }
                if !ok {
                    tracing::info!(peer = %tx.peer_addr(), clone = %hello.id, "clone link refused: wrong token");
                    tx.close(CloseCode::AuthFailed, "wrong clone token");
                }
                ok
            }
            _ => {
                // Nothing to guess: not counted towards a ban.
                tracing::info!(peer = %tx.peer_addr(), clone = %hello.id, "clone link refused: this node takes no clone links");
                tx.close(
                    CloseCode::AuthFailed,
                    "this node takes no clone links (no [auth] token configured)",
                );
                false
            }
        }
    }

    /// Whether a client's mesh frame is a `node/info` request it may not
    /// make; if so it was answered with an error here.
    fn refuse_info(&self, tx: &transport::Sender, body: &[u8], logged_in: bool) -> bool {
        let allowed = match self.node_info {
            NodeInfo::Anyone => return false,
            NodeInfo::Login => logged_in,
            NodeInfo::Off => false,
        };
        let Ok(Frame {
            body: Some(Body::Request(r)),
        }) = <Frame as proto::Message>::decode(body)
        else {
            return false;
        };
        if r.route != "node" || r.act != "info" || allowed {
            return false;
        }
        let message = match self.node_info {
            NodeInfo::Off => "node/info is off on this node",
            _ => "node/info needs a login (give it in the connection's hello)",
        };
        let _ = tx.send(&Frame::new(Body::Response(proto::Response {
            id: r.id,
            error: Some(proto::ErrorInfo {
                code: 403,
                message: message.into(),
            }),
            ..Default::default()
        })));
        true
    }

    /// Why this connection may not attach to store `name`, as the frame to
    /// answer with; `None` when it may. A store the login may not use is
    /// refused like an unknown one (code `UnknownStore`, which replicas treat
    /// as a refusal), with a message that says why.
    fn refuse_attach(&self, name: &str, login: &str, allowed: &HashSet<String>) -> Option<Frame> {
        let message = if !self.hosted.contains(name) {
            format!("unknown store {name:?}")
        } else if login.is_empty() {
            format!("store {name:?} needs a login (give it in the connection's hello)")
        } else if !allowed.contains(name) {
            format!("login {login:?} may not use store {name:?}")
        } else {
            return None;
        };
        let code = store::ErrorCode::UnknownStore.as_u32();
        Some(Frame::new(Body::StoreError(proto::StoreError {
            store: name.to_owned(),
            op_id: 0,
            error: Some(proto::ErrorInfo { code, message }),
            ..Default::default()
        })))
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
