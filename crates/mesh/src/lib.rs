//! Replimesh mesh: servers ("clones") that find each other and form a mesh.
//!
//! This crate will hold the clone table and gossip merge, group interest
//! routing with exactly-once delivery (origin + message id dedup), the
//! authenticated clone links, and clients with route/act routing,
//! middlewares and request/response. It is being built under issue 3; today
//! it only names its dependencies.
