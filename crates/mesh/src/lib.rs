//! Replimesh mesh: servers ("clones") that find each other, deliver group
//! messages exactly once across the mesh, and route requests both ways
//! between clients and servers. It replaces the horizontal scaling of the
//! JavaScript library jrf-ws-3.
//!
//! * [`Server`] — a clone: listeners, [`Server::add_clone`] /
//!   [`Server::delete_clone`], authenticated clone links (`auth_in` /
//!   `auth_out`), groups, routes and middlewares, an event stream
//!   ([`Events`], a `futures::Stream`). It stops when [`Server::stop`] is
//!   called or the last handle is dropped.
//! * [`Client`] — one or several server URLs with round-robin reconnect,
//!   subscriptions restored after reconnect, `send` / `request` (queued in a
//!   bounded outbox while reconnecting), routes on the client too; group
//!   messages arrive in its [`Deliveries`] as [`Delivery`]s, whose group and
//!   sender names are [`SharedStr`]s shared between deliveries.
//! * [`core`] — the sans-IO state machine of a clone (clone table, gossip,
//!   link dedup, interest routing, duplicate windows) that the server drives
//!   and the simulation tests.
//!
//! # Example: the jrf-ws-3 four-clone scenario
//!
//! Four clones; clone1 adds clone2 and clone4, clone3 adds clone4: every
//! clone ends up knowing the three others, and a group message reaches
//! subscribers on every clone once.
//!
//! ```
//! use std::time::Duration;
//! use replimesh_mesh::{Client, ClientConfig, Groups, Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut clones = Vec::new();
//! for i in 1..=4 {
//!     let config = ServerConfig::new(format!("clone{i}"), "tcp://127.0.0.1:0")
//!         .auth_out(|_| "token".into())
//!         .auth_in(|v| v == b"token");
//!     clones.push(Server::start(config).await?);
//! }
//! clones[0].add_clone("clone2", clones[1].url(), None).await?;
//! clones[0].add_clone("clone4", clones[3].url(), None).await?;
//! clones[2].add_clone("clone4", clones[3].url(), None).await?;
//!
//! // wait until every clone is linked to the three others
//! for _ in 0..200 {
//!     let mut done = true;
//!     for c in &clones {
//!         done &= c.clones().await?.iter().filter(|x| x.linked).count() == 3;
//!     }
//!     if done { break; }
//!     tokio::time::sleep(Duration::from_millis(10)).await;
//! }
//! let mut ids: Vec<String> = clones[2].clones().await?.into_iter().map(|c| c.id).collect();
//! ids.sort();
//! assert_eq!(ids, ["clone1", "clone2", "clone4"]);
//!
//! // a subscriber on clone3 gets what a client of clone1 publishes
//! let sub = Client::connect(ClientConfig::new([clones[2].url()])).await?;
//! let mut inbox = sub.deliveries().unwrap();
//! sub.subscribe(&["news"])?;
//! let publisher = Client::connect(ClientConfig::new([clones[0].url()])).await?;
//! let got = loop {
//!     publisher.publish(Groups::one("news"), &b"hello"[..], false)?;
//!     if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(50), inbox.recv()).await {
//!         break d;
//!     }
//! };
//! assert_eq!(got.group, "news");
//! for c in &clones { c.stop().await; }
//! # Ok(())
//! # }
//! ```
//!
//! See `docs/mesh.md` for the protocol and its guarantees, including when a
//! deleted clone may come back.

mod access;
mod client;
// The sans-IO core: public only for the simulation tests; hidden, not
// part of the API and not covered by semver.
#[doc(hidden)]
pub mod core;
mod error;
mod router;
mod server;
mod shared_str;
mod wire;

pub use crate::core::{CloneInfo, CoreError, CoreEvent, GroupInfo, LinkRefusal, PeerInfo};
pub use access::{Access, GroupPatterns, Permissions};
pub use client::{Client, ClientConfig, ClientStatus, Deliveries, Delivery};
pub use error::{MeshError, RouteError};
pub use router::{Ctx, Flow, Peer, Router, CODE_BUSY, CODE_HANDLER, CODE_NO_ROUTE};
pub use server::{
    auth_out_async, auth_out_sync, AuthIn, AuthOut, ClientInfo, CloneTarget, Events, Groups,
    Server, ServerConfig, ServerEvent, ServerStats, WeakServer,
};
pub use shared_str::SharedStr;
