//! Conversions between the core's domain frames and protobuf frames (the edge).

use std::sync::Arc;

use bytes::Bytes;
use proto::{frame::Body, Frame};

use crate::core::{CloneEntry, CloneFrame, GroupMsg};

/// Encodes a clone-level frame.
pub(crate) fn encode_clone(f: &CloneFrame) -> Bytes {
    let body = match f {
        CloneFrame::Gossip { entries, full } => Body::Gossip(proto::Gossip {
            clones: entries
                .iter()
                .map(|e| proto::CloneEntry {
                    id: e.id.clone(),
                    url: e.url.clone(),
                    incarnation: e.incarnation,
                    up: e.up,
                    gone: e.gone,
                })
                .collect(),
            full: *full,
        }),
        CloneFrame::Forward { msg, seen, relay } => Body::Forward(proto::Forward {
            origin: msg.origin.clone(),
            msg_id: msg.msg_id,
            groups: msg.groups.clone(),
            all: msg.all,
            exclude_client: msg.exclude_client.clone(),
            from: msg.from.clone(),
            data: msg.data.clone(),
            origin_incarnation: msg.origin_incarnation,
            seen: seen.clone(),
            relay: *relay,
        }),
        CloneFrame::GroupDelete {
            origin,
            origin_incarnation,
            msg_id,
            group,
            seen,
        } => Body::GroupDelete(proto::GroupDelete {
            origin: origin.clone(),
            msg_id: *msg_id,
            group: group.clone(),
            origin_incarnation: *origin_incarnation,
            seen: seen.clone(),
        }),
        CloneFrame::Interest { add, remove, full } => Body::Interest(proto::Interest {
            add: add.clone(),
            remove: remove.clone(),
            full: *full,
        }),
    };
    Frame::new(body).encode_to_bytes()
}

/// The clone-level frame in `body`, or the kind of frame it is instead.
pub(crate) fn decode_clone(body: Body) -> Result<CloneFrame, &'static str> {
    Ok(match body {
        Body::Gossip(g) => CloneFrame::Gossip {
            entries: g
                .clones
                .into_iter()
                .map(|e| CloneEntry {
                    id: e.id,
                    url: e.url,
                    incarnation: e.incarnation,
                    up: e.up,
                    gone: e.gone,
                })
                .collect(),
            full: g.full,
        },
        Body::Forward(f) => CloneFrame::Forward {
            msg: Arc::new(GroupMsg {
                origin: f.origin,
                origin_incarnation: f.origin_incarnation,
                msg_id: f.msg_id,
                groups: f.groups,
                all: f.all,
                exclude_client: f.exclude_client,
                from: f.from,
                data: f.data,
            }),
            seen: f.seen,
            relay: f.relay,
        },
        Body::GroupDelete(d) => CloneFrame::GroupDelete {
            origin: d.origin,
            origin_incarnation: d.origin_incarnation,
            msg_id: d.msg_id,
            group: d.group,
            seen: d.seen,
        },
        Body::Interest(i) => CloneFrame::Interest {
            add: i.add,
            remove: i.remove,
            full: i.full,
        },
        other => return Err(Frame::new(other).kind()),
    })
}

/// Whether a body is clone-level (only allowed on authenticated clone links).
pub(crate) fn is_clone_level(body: &Body) -> bool {
    matches!(
        body,
        Body::Gossip(_) | Body::Forward(_) | Body::GroupDelete(_) | Body::Interest(_)
    )
}

/// An encoded `Deliver` frame.
pub(crate) fn encode_deliver(group: &str, from: &str, data: &Bytes) -> Bytes {
    Frame::new(Body::Deliver(proto::Deliver {
        group: group.to_string(),
        from: from.to_string(),
        data: data.clone(),
    }))
    .encode_to_bytes()
}
