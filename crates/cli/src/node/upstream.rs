//! The links of relaying stores to their authorities: each is dialled in
//! the background, with a jittered backoff, until it answers or the node
//! stops.

use std::sync::Arc;
use std::time::Duration;

use replimesh::store;

use super::shared::Shared;
use crate::config::Upstream;

/// Starts one dialling task per store that has an upstream.
pub(super) fn spawn_all(shared: &Arc<Shared>) {
    for (i, h) in shared.stores.iter().enumerate() {
        if let Some(u) = &h.settings.upstream {
            tokio::spawn(connect(shared.clone(), i, u.clone()));
        }
    }
}

/// Dials store `i`'s upstream `u` until it answers (the client is kept in
/// the store's `upstream`) or the node stops.
async fn connect(s: Arc<Shared>, i: usize, u: Upstream) {
    let mut backoff =
        replimesh::transport::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
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
}
