//! A node: one mesh clone plus the stores it hosts, an admin HTTP server
//! with metrics and the dashboard, and a graceful shutdown.
//!
//! The mesh and the stores **share the node's listeners and connections**:
//! the node accepts every connection and passes its frames to the mesh or to
//! the store server by type (see [`crate::front`]), so one client connection
//! can subscribe to groups and replicate stores.

//!
//! One file a concern: `hosted` the stores and their backups, `shared`
//! the state the node's tasks share and the status document, `start` the
//! start-up steps, `upstream` the links of relaying stores to their
//! authorities, `metrics` the exported gauges.

mod hosted;
mod metrics;
mod shared;
mod start;
mod upstream;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use replimesh::mesh;

pub use hosted::HostedStore;
use shared::Shared;

use crate::admin::{AdminServer, AdminSource};
use crate::config::NodeConfig;
use crate::metrics::Registry;

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

impl Node {
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
        s.ready.store(false, Ordering::Relaxed);
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
