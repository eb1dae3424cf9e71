//! The application's calls on a running [`Server`]: identity, routes,
//! clones, groups, publishing, introspection and shutdown.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::task::{Cmd, Query};
use super::{AuthOut, Events, Server, WeakServer};
use crate::core::{CloneInfo, GroupInfo};
use crate::error::MeshError;
use crate::router::{Flow, Router};

/// A local client, for introspection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Key.
    pub key: u64,
    /// Announced id.
    pub id: String,
    /// Announced data.
    pub data: Bytes,
    /// Address.
    pub addr: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// Where a publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Groups {
    /// One or several groups.
    Some(Vec<String>),
    /// Every group.
    All,
}

impl Groups {
    /// One group.
    pub fn one(g: impl Into<String>) -> Self {
        Groups::Some(vec![g.into()])
    }
}

impl Server {
    /// This clone's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The url announced to other clones.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The actual urls of the listeners (ports filled in).
    pub fn listen_urls(&self) -> &[String] {
        &self.shared.listen_urls
    }

    /// This clone's incarnation (microseconds since the epoch at start).
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// The events from now on: an [`Events`], which is a
    /// [`futures_util::Stream`] of [`ServerEvent`](crate::ServerEvent)s and has [`Events::recv`].
    pub fn events(&self) -> Events {
        Events::new(self.shared.events.subscribe())
    }

    /// A handle that does not keep the server running (for closures the
    /// server owns, such as route handlers).
    pub fn downgrade(&self) -> WeakServer {
        WeakServer {
            shared: Arc::downgrade(&self.shared),
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// The router: add middlewares and route handlers.
    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    /// Adds a middleware (see [`Router::use_middleware`]).
    pub fn use_middleware<F, Fut>(&self, f: F)
    where
        F: Fn(crate::Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Flow, crate::RouteError>> + Send + 'static,
    {
        self.shared.router.use_middleware(f)
    }

    /// Sets a route handler (see [`Router::route`]).
    pub fn route<F, Fut>(&self, route: &str, act: &str, f: F)
    where
        F: Fn(crate::Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, crate::RouteError>> + Send + 'static,
    {
        self.shared.router.route(route, act, f)
    }

    /// Queues a command of the application (not bounded: see
    /// [`ServerConfig::command_queue`]).
    fn cmd(&self, c: Cmd) -> Result<(), MeshError> {
        self.shared.ctl.send(c).map_err(|_| MeshError::Stopped)
    }

    async fn ask<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Query) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Cmd::Query(f(tx)))?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Adds a clone (dials it and tells it every clone we know). Adding
    /// yourself is an error; adding a known id with a new url updates it.
    /// `auth_out` overrides the server's function for this clone.
    pub async fn add_clone(
        &self,
        id: &str,
        url: &str,
        auth_out: Option<AuthOut>,
    ) -> Result<(), MeshError> {
        let (reply, rx) = oneshot::channel();
        self.cmd(Cmd::AddClone {
            id: id.to_string(),
            url: url.to_string(),
            auth_out,
            reply,
        })?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Deletes a clone: drops its link and stops dialing it. This incarnation
    /// of it stays refused (gossip about it is ignored) until it is added
    /// again or restarts; see the crate docs.
    pub async fn delete_clone(&self, id: &str) -> Result<bool, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Cmd::DeleteClone(id.to_string(), tx))?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Closes every clone link, swaps `auth_out` and dials again.
    pub fn update_auth_out(&self, f: Option<AuthOut>) -> Result<(), MeshError> {
        self.cmd(Cmd::UpdateAuthOut(f))
    }

    /// Creates a group with user data (it persists until deleted).
    pub fn create_group(&self, name: &str, data: impl Into<Bytes>) -> Result<(), MeshError> {
        self.cmd(Cmd::CreateGroup(name.to_string(), data.into()))
    }

    /// Deletes a group here and on every clone (once).
    pub fn delete_group(&self, name: &str) -> Result<(), MeshError> {
        self.cmd(Cmd::DeleteGroup(name.to_string()))
    }

    /// Adds a local client to groups.
    pub fn subscribe(&self, client: u64, groups: &[&str]) -> Result<(), MeshError> {
        self.cmd(Cmd::Subscribe(
            client,
            groups.iter().map(|s| s.to_string()).collect(),
            false,
        ))
    }

    /// Removes a local client from groups.
    pub fn unsubscribe(&self, client: u64, groups: &[&str]) -> Result<(), MeshError> {
        self.cmd(Cmd::Unsubscribe(
            client,
            groups.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// Publishes to groups on every clone. `not_to` excludes one local client
    /// (by key) from the delivery, everywhere.
    pub fn publish(
        &self,
        groups: Groups,
        data: impl Into<Bytes>,
        not_to: Option<u64>,
    ) -> Result<(), MeshError> {
        self.cmd(Cmd::Publish {
            from: not_to,
            groups,
            not_to_me: not_to.is_some(),
            data: data.into(),
            _permit: None,
        })
    }

    /// Known clones.
    pub async fn clones(&self) -> Result<Vec<CloneInfo>, MeshError> {
        self.ask(Query::Clones).await
    }

    /// Local groups with subscriber counts.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, MeshError> {
        self.ask(Query::Groups).await
    }

    /// Local clients.
    pub async fn clients(&self) -> Result<Vec<ClientInfo>, MeshError> {
        self.ask(Query::Clients).await
    }

    /// How many local groups and local clients there are (cheap, unlike
    /// [`Server::groups`] and [`Server::clients`], which list them all).
    pub async fn counts(&self) -> Result<(usize, usize), MeshError> {
        self.ask(Query::Counts).await
    }

    /// Up to `limit` local groups (any of them, sorted by name), for status
    /// pages: O(limit) work, not O(groups).
    pub async fn some_groups(&self, limit: usize) -> Result<Vec<GroupInfo>, MeshError> {
        self.ask(|tx| Query::SomeGroups(limit, tx)).await
    }

    /// The groups of a local client.
    pub async fn client_groups(&self, client: u64) -> Result<Vec<String>, MeshError> {
        self.ask(|tx| Query::ClientGroups(client, tx)).await
    }

    /// Closes the connection of the local client with this key (close code
    /// `Normal`, with `reason`); it leaves its groups as on any close. False
    /// when there is no such client. The client may connect again.
    pub async fn disconnect_client(&self, key: u64, reason: &str) -> Result<bool, MeshError> {
        let reason = reason.to_owned();
        self.ask(|tx| Query::Disconnect(key, reason, tx)).await
    }

    /// Stops the server gracefully and waits until it has stopped: other
    /// clones are told this clone is gone, clients and links are closed, the
    /// listeners are closed (a new connection is refused), then
    /// [`ServerEvent::Stop`](crate::ServerEvent::Stop) is sent. Queued
    /// commands do not delay it. Other handles see [`MeshError::Stopped`] from then on. Calling it again, or
    /// on a stopped server, returns at once.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let mut done = self.shared.stopped.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    /// The same as [`Server::shutdown`] (its older name).
    pub async fn stop(&self) {
        self.shutdown().await
    }
}
