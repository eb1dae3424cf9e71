//! The core task: the one task that owns the sans-IO [`Core`], takes the
//! commands of connections and of the application ([`Cmd`]), and executes
//! the core's actions (dial, send, close, deliver, events).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use proto::CloseCode;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::clone_link::{dial, link_reader};
use super::conn::welcome;
use super::stats::count;
use super::{AuthOut, ClientInfo, Groups, ServerEvent, Srv};
use crate::core::{Action, CloneFrame, CloneInfo, ConnKey, Core, GroupInfo, LinkId, PeerInfo};
use crate::error::MeshError;
use crate::router::Peer;
use crate::wire;

pub(super) enum Query {
    Clones(oneshot::Sender<Vec<CloneInfo>>),
    Groups(oneshot::Sender<Vec<GroupInfo>>),
    Clients(oneshot::Sender<Vec<ClientInfo>>),
    ClientGroups(u64, oneshot::Sender<Vec<String>>),
    Counts(oneshot::Sender<(usize, usize)>),
    SomeGroups(usize, oneshot::Sender<Vec<GroupInfo>>),
    Disconnect(u64, String, oneshot::Sender<bool>),
}

pub(super) enum Cmd {
    Accept {
        info: PeerInfo,
        sender: transport::Sender,
        reply: oneshot::Sender<Option<LinkId>>,
    },
    DialDone {
        link: LinkId,
        result: Result<(PeerInfo, transport::Connection), String>,
    },
    LinkFrames(LinkId, Vec<CloneFrame>),
    LinkDown(LinkId),
    ClientUp(Peer),
    ClientDown(u64),
    /// A client's (`true`: within the limits) or the application's subscription.
    Subscribe(u64, Vec<String>, bool),
    Unsubscribe(u64, Vec<String>),
    Publish {
        from: Option<u64>,
        groups: Groups,
        not_to_me: bool,
        data: Bytes,
        /// A client's place among its publishes in flight (see
        /// [`ServerConfig::max_publishes_in_flight`]), given back when the
        /// core task has handled the command; `None` for the application's.
        _permit: Option<OwnedSemaphorePermit>,
    },
    CreateGroup(String, Bytes),
    DeleteGroup(String),
    AddClone {
        id: String,
        url: String,
        auth_out: Option<AuthOut>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    DeleteClone(String, oneshot::Sender<bool>),
    UpdateAuthOut(Option<AuthOut>),
    Query(Query),
}

pub(super) struct CoreTask {
    pub(super) core: Core,
    pub(super) epoch: Instant,
    pub(super) server: Srv,
    pub(super) links: HashMap<LinkId, transport::Sender>,
    pub(super) link_peers: HashMap<LinkId, String>,
    pub(super) clients: HashMap<ConnKey, Peer>,
    /// The connection of each client id: a newer one replaces it.
    pub(super) ids: HashMap<String, ConnKey>,
    pub(super) auth_out: Option<AuthOut>,
    pub(super) clone_auth: HashMap<String, AuthOut>,
    /// Scratch space of [`Action::Deliver`]: the encoded frame per group.
    pub(super) encoded: Vec<Option<Bytes>>,
}

impl CoreTask {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut ctl: mpsc::UnboundedReceiver<Cmd>,
    ) {
        let mut stop = self.server.shared.shutdown.subscribe();
        loop {
            // a stop goes before everything queued
            if *stop.borrow_and_update() {
                break;
            }
            let deadline = self.epoch + self.core.next_deadline();
            let cmd = tokio::select! {
                biased;
                _ = stop.changed() => continue,
                c = ctl.recv() => c,
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.core.tick(now);
                    self.drain();
                    continue;
                }
            };
            let Some(cmd) = cmd else { break };
            self.handle(cmd);
            // take what else is queued before sleeping again
            for _ in 0..256 {
                if *stop.borrow() {
                    break;
                }
                match ctl.try_recv().or_else(|_| rx.try_recv()) {
                    Ok(c) => self.handle(c),
                    Err(_) => break,
                }
            }
        }
        self.stop_now();
        // whoever waits to queue a command sees the server stopped
        drop(rx);
        drop(ctl);
        // the accept loops end on `shutdown` and close their listeners
        self.server.shared.shutdown.send_replace(true);
        let acceptors: Vec<_> = crate::router::lock(&self.server.shared.acceptors)
            .drain(..)
            .collect();
        for h in acceptors {
            let _ = h.await;
        }
        let _ = self.server.shared.events.send(ServerEvent::Stop);
        self.server.shared.stopped.send_replace(true);
    }

    /// Leaves the mesh and closes every link and client.
    fn stop_now(&mut self) {
        let now = self.now();
        self.core.leave(now);
        self.drain();
        for s in self.links.values() {
            s.close(CloseCode::GoingAway, "server stopping");
        }
        for p in self.clients.values() {
            p.sender().close(CloseCode::GoingAway, "server stopping");
        }
        self.links.clear();
        self.clients.clear();
        self.ids.clear();
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Accept {
                info,
                sender,
                reply,
            } => {
                let link = self.core.new_link_id();
                let peer_id = info.id.clone();
                match self.core.accept(link, info, now) {
                    Ok(()) => {
                        // Welcome goes before anything the core queued for the link
                        let _ = sender.send(&welcome(&self.server.shared));
                        self.links.insert(link, sender);
                        self.link_peers.insert(link, peer_id.clone());
                        let _ = reply.send(Some(link));
                        self.server.event(ServerEvent::CloneLinked(peer_id));
                    }
                    Err(_) => {
                        let _ = reply.send(None);
                    }
                }
            }
            Cmd::DialDone { link, result } => match result {
                Ok((info, conn)) => {
                    let (sender, receiver) = conn.split();
                    self.links.insert(link, sender);
                    let peer_id = info.id.clone();
                    if self.core.dial_ok(link, info, now).is_ok() {
                        self.link_peers.insert(link, peer_id.clone());
                        tokio::spawn(link_reader(self.server.clone(), link, receiver));
                        self.server.event(ServerEvent::CloneLinked(peer_id));
                    }
                }
                Err(e) => {
                    self.server.event(ServerEvent::Error(format!("dial: {e}")));
                    self.core.link_down(link, now);
                }
            },
            Cmd::LinkFrames(link, frames) => {
                count(&self.server.shared.stats.clone_frames_in, frames.len());
                for f in frames {
                    self.core.on_frame(link, f, now);
                    self.drain();
                }
            }
            Cmd::LinkDown(link) => {
                self.links.remove(&link);
                if let Some(p) = self.link_peers.remove(&link) {
                    self.server.event(ServerEvent::Close(p));
                }
                self.core.link_down(link, now);
            }
            Cmd::ClientUp(peer) => {
                if let Some(old) = self.ids.insert(peer.id().to_owned(), peer.key()) {
                    if let Some(p) = self.clients.get(&old) {
                        p.sender().close(
                            CloseCode::GoingAway,
                            "replaced by a newer connection with the same client id",
                        );
                    }
                }
                self.core.client_connected(peer.key(), peer.id());
                self.clients.insert(peer.key(), peer);
            }
            Cmd::ClientDown(key) => {
                if let Some(p) = self.clients.remove(&key) {
                    if self.ids.get(p.id()) == Some(&key) {
                        self.ids.remove(p.id());
                    }
                }
                if self.clients.capacity() > 64 && self.clients.len() < self.clients.capacity() / 4
                {
                    self.clients.shrink_to(self.clients.len() * 2);
                    self.ids.shrink_to(self.ids.len() * 2);
                }
                self.core.client_gone(key);
            }
            Cmd::Subscribe(key, groups, false) => {
                self.core.subscribe(key, &groups);
            }
            Cmd::Subscribe(key, groups, true) => {
                if let Err(e) = self.core.try_subscribe(key, &groups) {
                    if let Some(p) = self.clients.get(&key) {
                        let why = format!("limit: subscribe refused: {e}");
                        p.sender().close(CloseCode::ProtocolError, &why);
                        self.server
                            .event(ServerEvent::Error(format!("client {}: {why}", p.id())));
                    }
                }
            }
            Cmd::Unsubscribe(key, groups) => self.core.unsubscribe(key, &groups),
            Cmd::Publish {
                from,
                groups,
                not_to_me,
                data,
                _permit,
            } => {
                let (groups, all) = match groups {
                    Groups::All => (Vec::new(), true),
                    Groups::Some(g) => (g, false),
                };
                count(&self.server.shared.stats.published, 1);
                self.core.publish(from, groups, all, not_to_me, data);
            }
            Cmd::CreateGroup(name, data) => self.core.create_group(&name, data),
            Cmd::DeleteGroup(name) => self.core.delete_group(&name, now),
            Cmd::AddClone {
                id,
                url,
                auth_out,
                reply,
            } => {
                if let Some(f) = auth_out {
                    self.clone_auth.insert(id.clone(), f);
                }
                let r = self.core.add_clone(&id, &url, now).map_err(MeshError::from);
                let _ = reply.send(r);
            }
            Cmd::DeleteClone(id, reply) => {
                self.clone_auth.remove(&id);
                let _ = reply.send(self.core.delete_clone(&id, now));
            }
            Cmd::UpdateAuthOut(f) => {
                self.auth_out = f;
                self.core.reset_links(now);
            }
            Cmd::Query(q) => match q {
                Query::Clones(tx) => {
                    let _ = tx.send(self.core.clones());
                }
                Query::Groups(tx) => {
                    let _ = tx.send(self.core.groups());
                }
                Query::Clients(tx) => {
                    let mut v: Vec<ClientInfo> = self
                        .clients
                        .values()
                        .map(|p| ClientInfo {
                            key: p.key(),
                            id: p.id().to_string(),
                            data: p.data().clone(),
                            addr: format!("{:?}", p.addr()),
                            groups: self.core.client_groups(p.key()),
                        })
                        .collect();
                    v.sort_by_key(|c| c.key);
                    let _ = tx.send(v);
                }
                Query::ClientGroups(key, tx) => {
                    let _ = tx.send(self.core.client_groups(key));
                }
                Query::Counts(tx) => {
                    let _ = tx.send((self.core.group_count(), self.core.client_count()));
                }
                Query::SomeGroups(limit, tx) => {
                    let _ = tx.send(self.core.some_groups(limit));
                }
                Query::Disconnect(key, reason, tx) => {
                    let found = self.clients.get(&key).map(|p| {
                        p.sender().close(CloseCode::Normal, &reason);
                    });
                    let _ = tx.send(found.is_some());
                }
            },
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Dial { link, peer, url } => {
                    let auth = self
                        .clone_auth
                        .get(&peer)
                        .cloned()
                        .or_else(|| self.auth_out.clone());
                    let inc = self.core.incarnation();
                    tokio::spawn(dial(self.server.clone(), link, peer, url, auth, inc));
                }
                Action::Send { links, frame } => {
                    let bytes = wire::encode_clone(&frame);
                    let mut sent = 0;
                    for l in links {
                        if let Some(s) = self.links.get(&l) {
                            sent += s.send_encoded(bytes.clone()).is_ok() as usize;
                        }
                    }
                    count(&self.server.shared.stats.clone_frames_out, sent);
                }
                Action::Close { link, reason } => {
                    if let Some(s) = self.links.remove(&link) {
                        s.close(CloseCode::Normal, &reason.to_string());
                    }
                    if let Some(p) = self.link_peers.remove(&link) {
                        self.server.event(ServerEvent::Close(p));
                    }
                }
                Action::Deliver {
                    msg,
                    targets,
                    group_of,
                } => {
                    let names: &[String] = if msg.all { &group_of } else { &msg.groups };
                    // the encoded frame per group, made on first use
                    let cache = &mut self.encoded;
                    cache.clear();
                    cache.resize(names.len(), None);
                    let (mut delivered, mut dropped, mut slow) = (0, 0, 0);
                    for t in targets {
                        let Some(p) = self.clients.get(&t.conn) else {
                            continue;
                        };
                        let Some(name) = names.get(t.group) else {
                            continue;
                        };
                        let bytes = cache[t.group]
                            .get_or_insert_with(|| {
                                proto::wire::encode_deliver(name, &msg.from, &msg.data)
                            })
                            .clone();
                        match p.sender().send_encoded(bytes) {
                            Ok(()) => delivered += 1,
                            Err(transport::SendError::SlowConsumer) => {
                                dropped += 1;
                                slow += 1;
                            }
                            Err(_) => dropped += 1,
                        }
                    }
                    let st = &self.server.shared.stats;
                    count(&st.delivered, delivered);
                    count(&st.dropped, dropped);
                    count(&st.slow_consumers, slow);
                    self.encoded.clear();
                }
                Action::Event(e) => self.server.event(ServerEvent::Mesh(e)),
            }
        }
    }
}
