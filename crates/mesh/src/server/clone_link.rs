//! Clone links: an accepted one (auth, then handed to the core task), a
//! dialed one, and the reader that feeds a link's frames to the core task.

use bytes::Bytes;
use proto::{frame::Body, CloseCode, Frame, PeerKind};
use tokio::sync::oneshot;

use super::conn::Unknown;
use super::task::Cmd;
use super::{AuthOut, CloneTarget, ServerEvent, Srv};
use crate::core::{LinkId, PeerInfo};
use crate::wire;

pub(super) async fn serve_clone(
    server: Srv,
    sender: transport::Sender,
    rx: transport::Receiver,
    hello: proto::Hello,
    addr: String,
) {
    let info = PeerInfo {
        id: hello.id.clone(),
        url: hello.url.clone(),
        incarnation: hello.incarnation,
    };
    if let Some(auth) = &server.shared.auth_in {
        let ok = tokio::time::timeout(
            server.shared.hello_timeout,
            auth(hello.auth.clone(), info.clone()),
        )
        .await
        .unwrap_or(false);
        if !ok {
            sender.close(CloseCode::AuthFailed, "auth failed");
            server.event(ServerEvent::AuthError {
                id: hello.id.clone(),
                addr,
            });
            return;
        }
    }
    server.event(ServerEvent::Auth(hello.id.clone()));
    let (reply, answer) = oneshot::channel();
    if server
        .cmd(Cmd::Accept {
            info,
            sender: sender.clone(),
            reply,
        })
        .await
        .is_err()
    {
        sender.close(CloseCode::GoingAway, "stopping");
        return;
    }
    match answer.await {
        Ok(Some(link)) => link_reader(server, link, rx).await,
        _ => sender.close(CloseCode::Normal, "link refused"),
    }
}

/// Reads an established clone link and feeds the core task in batches.
pub(super) async fn link_reader(server: Srv, link: LinkId, mut rx: transport::Receiver) {
    let mut unknown = Unknown::default();
    loop {
        let first = match rx.recv().await {
            Ok(f) => f,
            Err(_) => break,
        };
        let mut batch = Vec::with_capacity(8);
        let mut bad = None;
        let mut ended = false;
        let more = std::iter::from_fn(|| match rx.try_recv() {
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => {
                ended = true;
                None
            }
            None => None,
        });
        for f in std::iter::once(first).chain(more.take(255)) {
            match f.body.map(wire::decode_clone) {
                Some(Ok(cf)) => batch.push(cf),
                Some(Err(other)) => {
                    bad = Some(other);
                    break;
                }
                None if unknown.ignore(&server.shared) => {}
                None => {
                    bad = Some("unknown (past the limit)");
                    break;
                }
            }
        }
        if !batch.is_empty() && server.cmd(Cmd::LinkFrames(link, batch)).await.is_err() {
            break;
        }
        if let Some(kind) = bad {
            server.event(ServerEvent::Error(format!(
                "clone link {link}: unexpected {kind} frame"
            )));
            break;
        }
        if ended {
            break;
        }
    }
    let _ = server.cmd(Cmd::LinkDown(link)).await;
}

/// Dials a clone: connect, hello with the auth value, wait for welcome.
pub(super) async fn dial(
    server: Srv,
    link: LinkId,
    peer: String,
    url: String,
    auth_out: Option<AuthOut>,
    incarnation: u64,
) {
    let result = async {
        let mut conn = tokio::time::timeout(
            server.shared.hello_timeout,
            transport::connect(&url, &server.shared.transport),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let auth = match auth_out {
            Some(f) => {
                f(CloneTarget {
                    id: peer.clone(),
                    url: url.clone(),
                })
                .await
            }
            None => Bytes::new(),
        };
        let hello = Frame::new(Body::Hello(proto::Hello {
            version: proto::PROTOCOL_VERSION,
            kind: PeerKind::Clone as i32,
            id: server.shared.id.clone(),
            url: server.shared.url.clone(),
            incarnation,
            auth,
            data: server.shared.data.clone(),
            login: String::new(),
            password: String::new(),
        }));
        conn.send(&hello).map_err(|e| e.to_string())?;
        let f = tokio::time::timeout(server.shared.hello_timeout, conn.recv())
            .await
            .map_err(|_| "no welcome in time".to_string())?
            .map_err(|e| e.to_string())?;
        match f.body {
            Some(Body::Welcome(w)) => Ok((
                PeerInfo {
                    id: w.id,
                    url: w.url,
                    incarnation: w.incarnation,
                },
                conn,
            )),
            _ => Err(format!("expected welcome, got {}", f.kind())),
        }
    }
    .await;
    let _ = server.cmd(Cmd::DialDone { link, result }).await;
}
