//! Replimesh store: redux-style state replicated from one authority.
//!
//! This crate will hold the `Reducer` trait, the authority that orders
//! actions into a history (history id + sequence numbers), replicas that
//! catch up from a backlog or a snapshot plus tail, exactly-once dispatch,
//! logins with bans, and the worker-process scheme. It is being built under
//! issue 4; today it only names its dependencies.
