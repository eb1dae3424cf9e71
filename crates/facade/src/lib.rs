//! Replimesh: a messaging mesh and a replicated redux-style store.
//!
//! Depend on `replimesh` alone and use everything through it:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`mesh`] | `replimesh-mesh` | clones that find each other, groups with exactly-once fan-out, request/response and routes, clients with reconnect |
//! | [`store`] | `replimesh-store` | a reducer's state replicated from one authority: exactly-once dispatch, catch-up, logins, relays |
//! | [`backup`] | `replimesh-backup` | encrypted, crash-safe snapshots and a journal of committed actions |
//! | [`transport`] | `replimesh-transport` | framed connections over `tcp://`, `tls://`, `unix://`, `ws://`, `wss://` |
//! | [`proto`] | `replimesh-proto` | the wire schema (`Frame`) and its codecs |
//!
//! [`prelude`] imports the names most programs need, with the mesh's and
//! the store's servers and clients told apart (`MeshServer`, `StoreServer`,
//! ...). The `replimesh` binary (crate `replimesh-cli`) runs a node from a
//! config file, the demo, and serves a browser client and a dashboard.
//!
//! The example below gives the mesh and the store a listener each. A node
//! serves both on the same listeners and connections: it accepts the
//! connections itself, reads each `Hello`, and hands the frames on by type
//! with [`mesh::Server::adopt`] / [`mesh::Server::adopt_client_encoded`] and
//! [`store::Server::adopt`] (see `crates/cli/src/front.rs`).
//!
//! # Example: a clone that serves a group and a store
//!
//! ```
//! use std::time::Duration;
//! use replimesh::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! /// The store: a counter, as in redux-cluster's example.
//! struct Counter;
//!
//! #[derive(Serialize, Deserialize)]
//! enum Action {
//!     Add(i64),
//! }
//!
//! impl Reducer for Counter {
//!     type State = i64;
//!     type Action = Action;
//!     fn name(&self) -> &str {
//!         "counter"
//!     }
//!     fn initial_state(&self) -> i64 {
//!         0
//!     }
//!     fn reduce(&self, state: &mut i64, action: &Action) {
//!         match action {
//!             Action::Add(n) => *state += n,
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A clone of the mesh, listening on a free loopback port.
//! let clone = MeshServer::start(MeshServerConfig::new("clone-1", "tcp://127.0.0.1:0")).await?;
//!
//! // The same process holds the counter's authority and serves it with a login.
//! let counter = Store::authority(Counter, StoreConfig::default());
//! let mut logins = Logins::new();
//! # let cost = replimesh::store::HashCost { memory_kib: 1024, iterations: 1, parallelism: 1 };
//! # logins.add_with_cost("app", "secret", cost)?;
//! # if false {
//! logins.add("app", "secret")?; // kept only as an Argon2id hash
//! # }
//! let store_server = counter
//!     .serve("tcp://127.0.0.1:0", StoreServerConfig::with_logins(logins))
//!     .await?;
//! let store_url = store_server.urls()[0].clone();
//!
//! // A client subscribes to `news`; another publishes to it.
//! let reader = MeshClient::connect(MeshClientConfig::new([clone.url()])).await?;
//! let mut inbox = reader.deliveries().expect("first call");
//! reader.subscribe(&["news"])?;
//! let writer = MeshClient::connect(MeshClientConfig::new([clone.url()])).await?;
//! let message = loop {
//!     // (the subscription travels on another connection: publish until it is in)
//!     writer.publish(Groups::one("news"), &b"hello"[..], false)?;
//!     if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(50), inbox.recv()).await {
//!         break d;
//!     }
//! };
//! assert_eq!((message.group.as_str(), &message.data[..]), ("news", &b"hello"[..]));
//!
//! // A replica of the store elsewhere dispatches; the action is committed once.
//! let replica = Store::replica(Counter, StoreConfig::default());
//! let _link = replica.connect(&store_url, "app", "secret").await?;
//! let seq = replica.dispatch(Action::Add(5)).await?;
//! counter.wait_for(seq).await;
//! assert_eq!((*counter.state(), *replica.state()), (5, 5));
//!
//! clone.stop().await;
//! # Ok(())
//! # }
//! ```

#[doc(inline)]
pub use backup;
#[doc(inline)]
pub use mesh;
#[doc(inline)]
pub use proto;
#[doc(inline)]
pub use store;
#[doc(inline)]
pub use transport;

/// The names most programs need: `use replimesh::prelude::*;`.
///
/// The mesh and the store both have a server and a client; here they are
/// `MeshServer`/`MeshClient` and `StoreServer`/`StoreClient`.
pub mod prelude {
    #[doc(no_inline)]
    pub use crate::backup::{Backup, BackupConfig, FsyncPolicy};
    #[doc(no_inline)]
    pub use crate::mesh::{
        Client as MeshClient, ClientConfig as MeshClientConfig, Ctx, Delivery, Flow, Groups,
        MeshError, RouteError, Server as MeshServer, ServerConfig as MeshServerConfig, ServerEvent,
    };
    #[doc(no_inline)]
    pub use crate::store::{
        Client as StoreClient, ClientConfig as StoreClientConfig, DispatchError, Logins, Reducer,
        Server as StoreServer, ServerConfig as StoreServerConfig, Store, StoreConfig, SyncMode,
    };
    #[doc(no_inline)]
    pub use crate::transport::Config as TransportConfig;
}
