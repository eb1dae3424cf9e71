//! Client connections: the checks of the hello, then the read loop that
//! turns a client's frames into commands of the core task and routed
//! requests, within the per-connection limits and the client's permissions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proto::wire::field;
use proto::{frame::Body, CloseCode, Frame};
use tokio::sync::Semaphore;

use super::conn::{protocol_error, welcome, ClientRx, Unknown};
use super::task::Cmd;
use super::{random_id, run_or_spawn, Groups, ServerEvent, Shared, Srv};
use crate::router::{handle_routed, Peer, CODE_BUSY};
use crate::wire;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub(super) async fn serve_client(
    server: Srv,
    sender: transport::Sender,
    mut rx: ClientRx,
    hello: proto::Hello,
) {
    if hello.id.len() > server.shared.max_name_len {
        let why = format!(
            "limit: client id of {} bytes, at most {} allowed",
            hello.id.len(),
            server.shared.max_name_len
        );
        return protocol_error(&server, &sender, why);
    }
    let access = server.shared.access.clone();
    let refused = |why: String| {
        sender.close(CloseCode::AuthFailed, &why);
        server.event(ServerEvent::Error(why));
    };
    if access.permissions(&hello.login).is_none() {
        return refused("this server takes no clients without a login".into());
    }
    let id = match access.client_id(&hello.id, &hello.login) {
        Ok(Some(id)) => id,
        Ok(None) => random_id("client"),
        Err(why) => return refused(why),
    };
    let login = hello.login;
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let peer = Peer::new(
        sender.clone(),
        key,
        id.clone(),
        hello.data.clone(),
        server.shared.response_timeout,
    );
    if sender.send(&welcome(&server.shared)).is_err() {
        return;
    }
    if server.cmd(Cmd::ClientUp(peer.clone())).await.is_err() {
        return;
    }
    server.event(ServerEvent::Connection {
        key,
        id: id.clone(),
    });
    let publishes = Arc::new(Semaphore::new(server.shared.max_publishes_in_flight));
    let requests = Arc::new(Semaphore::new(server.shared.max_requests_in_flight));
    let mut unknown = Unknown::default();
    loop {
        let f = match rx.recv().await {
            Ok(f) => f,
            Err(e) => {
                if !matches!(
                    e,
                    transport::RecvError::Closed { .. } | transport::RecvError::Eof
                ) {
                    server.event(ServerEvent::Error(format!("client {id}: {e}")));
                }
                break;
            }
        };
        let Some(body) = f.body else {
            if unknown.ignore(&server.shared) {
                continue;
            }
            let why = format!(
                "client {id}: more than {} frames of unknown kinds",
                server.shared.max_unknown_frames
            );
            protocol_error(&server, &sender, why);
            break;
        };
        if wire::is_clone_level(&body) {
            let kind = Frame::new(body).kind();
            protocol_error(
                &server,
                &sender,
                format!("client {id}: {kind} is for clone links only"),
            );
            break;
        }
        let named = match &body {
            Body::Subscribe(s) => Some(&s.groups),
            Body::Unsubscribe(s) => Some(&s.groups),
            Body::Publish(p) => Some(&p.groups),
            _ => None,
        };
        if let Some(Err(why)) = named.map(|g| check_groups(&server.shared, g)) {
            protocol_error(&server, &sender, format!("client {id}: {why}"));
            break;
        }
        if let Some(refusal) = access.permissions(&login).and_then(|p| refuse(p, &body)) {
            let _ = sender.send(&refusal);
            continue;
        }
        let ok = match body {
            Body::Subscribe(s) => server
                .cmd(Cmd::Subscribe(key, s.groups, true))
                .await
                .is_ok(),
            Body::Unsubscribe(s) => server.cmd(Cmd::Unsubscribe(key, s.groups)).await.is_ok(),
            Body::Publish(p) => {
                // Not read further while this connection has its most
                // publishes waiting for the core (push back).
                let Ok(permit) = publishes.clone().acquire_owned().await else {
                    break;
                };
                server
                    .cmd(Cmd::Publish {
                        from: Some(key),
                        groups: if p.all {
                            Groups::All
                        } else {
                            Groups::Some(p.groups)
                        },
                        not_to_me: p.not_to_me,
                        data: p.data,
                        _permit: Some(permit),
                    })
                    .await
                    .is_ok()
            }
            Body::Response(r) => {
                peer.resolve(r);
                true
            }
            b @ (Body::Request(_) | Body::Send(_)) => {
                let (route, act) = match &b {
                    Body::Request(r) => (r.route.clone(), r.act.clone()),
                    Body::Send(s) => (s.route.clone(), s.act.clone()),
                    _ => (String::new(), String::new()),
                };
                let Ok(permit) = requests.clone().try_acquire_owned() else {
                    busy(&server, &sender, &id, b);
                    continue;
                };
                // handlers run in their own task: one may await a response
                // from this very client, which this loop must read
                let (srv, p) = (server.clone(), peer.clone());
                let fut = Box::pin(async move {
                    if handle_routed(&srv.shared.router, &p, srv.upgrade(), b).await {
                        srv.event(ServerEvent::NoRoute { route, act });
                    }
                    drop(permit);
                });
                run_or_spawn(fut);
                true
            }
            Body::Hello(_) | Body::Welcome(_) => {
                protocol_error(&server, &sender, format!("client {id}: second handshake"));
                false
            }
            _ => true, // store frames and others are not the mesh's business
        };
        if !ok {
            break;
        }
    }
    peer.fail_all();
    let _ = server.cmd(Cmd::ClientDown(key)).await;
    server.event(ServerEvent::ClientClosed { key, id });
}

/// Answers a routed frame that came when its connection had
/// [`ServerConfig::max_requests_in_flight`] being handled: a `Request` gets
/// an error response, a `Send` is dropped; both are reported.
fn busy(server: &Srv, sender: &transport::Sender, client: &str, b: Body) {
    let limit = server.shared.max_requests_in_flight;
    let why = format!("limit: {limit} requests in flight on this connection");
    if let Body::Request(r) = &b {
        let _ = sender.send(&Frame::new(Body::Response(proto::Response {
            id: r.id,
            error: Some(proto::ErrorInfo {
                code: CODE_BUSY,
                message: why.clone(),
            }),
            ..Default::default()
        })));
    }
    server.event(ServerEvent::Error(format!("client {client}: {why}")));
}

/// The [`proto::Refused`] answer to a client's `Subscribe` or `Publish` that
/// names a group it may not use; `None` when it may.
fn refuse(perms: &crate::Permissions, body: &Body) -> Option<Frame> {
    let (kind, group, message) = match body {
        Body::Subscribe(s) => {
            let g = perms.denied_subscribe(&s.groups)?;
            (
                field::SUBSCRIBE,
                g,
                format!("this client may not subscribe to group {g:?}"),
            )
        }
        Body::Publish(p) if p.all => {
            let g = perms.denied_publish(&[], true)?;
            (
                field::PUBLISH,
                g,
                "this client may not publish to all groups".to_owned(),
            )
        }
        Body::Publish(p) => {
            let g = perms.denied_publish(&p.groups, false)?;
            (
                field::PUBLISH,
                g,
                format!("this client may not publish to group {g:?}"),
            )
        }
        _ => return None,
    };
    Some(Frame::new(Body::Refused(proto::Refused {
        kind,
        group: group.to_owned(),
        error: Some(proto::ErrorInfo { code: 403, message }),
    })))
}

/// The group names of a client's `Subscribe`, `Unsubscribe` or `Publish`
/// within the limits ([`ServerConfig::max_groups_per_client`] names,
/// each at most [`ServerConfig::max_name_len`] bytes).
fn check_groups(shared: &Shared, groups: &[String]) -> Result<(), String> {
    if groups.len() > shared.max_groups_per_client {
        return Err(format!(
            "limit: {} groups in one frame, at most {} allowed",
            groups.len(),
            shared.max_groups_per_client
        ));
    }
    match groups.iter().find(|g| g.len() > shared.max_name_len) {
        Some(g) => Err(format!(
            "limit: group name of {} bytes, at most {} allowed",
            g.len(),
            shared.max_name_len
        )),
        None => Ok(()),
    }
}
