//! What happened on a server: [`ServerEvent`] and the [`Events`] stream
//! that delivers them.

use std::future::Future;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::core::CoreEvent;

/// Something that happened on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// The server started (listening).
    Start,
    /// The server stopped.
    Stop,
    /// A client connected.
    Connection {
        /// Its key.
        key: u64,
        /// Its id.
        id: String,
    },
    /// A client's connection closed.
    ClientClosed {
        /// Its key.
        key: u64,
        /// Its id.
        id: String,
    },
    /// A clone link was established.
    CloneLinked(String),
    /// A clone link closed.
    Close(String),
    /// A dialing clone passed `auth_in`.
    Auth(String),
    /// A dialing clone failed `auth_in` (its link was closed).
    AuthError {
        /// The id it claimed.
        id: String,
        /// Its address.
        addr: String,
    },
    /// A connection broke the protocol, sent garbage, or something failed.
    Error(String),
    /// A message for a route/act without handler.
    NoRoute {
        /// Route.
        route: String,
        /// Act.
        act: String,
    },
    /// Membership and group changes from the core.
    Mesh(CoreEvent),
}

type EventFuture = std::pin::Pin<
    Box<
        dyn Future<
                Output = (
                    Result<ServerEvent, broadcast::error::RecvError>,
                    broadcast::Receiver<ServerEvent>,
                ),
            > + Send,
    >,
>;

async fn next_event(
    mut rx: broadcast::Receiver<ServerEvent>,
) -> (
    Result<ServerEvent, broadcast::error::RecvError>,
    broadcast::Receiver<ServerEvent>,
) {
    let r = rx.recv().await;
    (r, rx)
}

/// Events of a server, in order: a [`futures_util::Stream`] of
/// [`ServerEvent`]s that ends after [`ServerEvent::Stop`]. A reader more
/// than 4,096 events behind misses the oldest ones (they are skipped, not an error).
pub struct Events {
    next: EventFuture,
    /// `Stop` was returned: the stream is over.
    done: bool,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl futures_util::Stream for Events {
    type Item = ServerEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ServerEvent>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let (r, rx) = match self.next.as_mut().poll(cx) {
                Poll::Ready(x) => x,
                Poll::Pending => return Poll::Pending,
            };
            self.next = Box::pin(next_event(rx));
            match r {
                Ok(e) => {
                    self.done = e == ServerEvent::Stop;
                    return Poll::Ready(Some(e));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return Poll::Ready(None),
            }
        }
    }
}

impl Events {
    pub(super) fn new(rx: broadcast::Receiver<ServerEvent>) -> Self {
        Events {
            next: Box::pin(next_event(rx)),
            done: false,
        }
    }

    /// The next event; `None` after [`ServerEvent::Stop`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
        futures_util::StreamExt::next(self).await
    }

    /// Waits for the first event matching `f` (at most `timeout`).
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&ServerEvent) -> bool,
    ) -> Option<ServerEvent> {
        tokio::time::timeout(timeout, async {
            while let Some(e) = self.recv().await {
                if f(&e) {
                    return Some(e);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}
