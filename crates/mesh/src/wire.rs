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
        // The frame of every group message: written directly.
        CloneFrame::Forward { msg, seen, relay } => {
            return proto::wire::encode_forward(&proto::wire::ForwardRef {
                origin: &msg.origin,
                msg_id: msg.msg_id,
                groups: &msg.groups,
                all: msg.all,
                exclude_client: &msg.exclude_client,
                from: &msg.from,
                data: &msg.data,
                origin_incarnation: msg.origin_incarnation,
                seen,
                relay: *relay,
            })
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Message;

    #[test]
    fn forward_frames_are_what_prost_encodes_and_decode_back() {
        let msg =
            |groups: &[&str], all, exclude: &str, from: &str, data: &[u8], id, inc| GroupMsg {
                origin: "clone-1".into(),
                origin_incarnation: inc,
                msg_id: id,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                all,
                exclude_client: exclude.into(),
                from: from.into(),
                data: Bytes::copy_from_slice(data),
            };
        let big = vec![1u8; 1000];
        let msgs = [
            msg(
                &["bench"],
                false,
                "",
                "client-1",
                b"payload",
                1,
                1_700_000_000_000_000,
            ),
            msg(&[], true, "c", "", b"", 0, 0),
            msg(
                &["a", "", "\u{e9}t\u{e9}"],
                false,
                "x",
                "y",
                &big,
                u64::MAX,
                3,
            ),
        ];
        let seens: [Vec<String>; 2] = [Vec::new(), vec!["a".into(), String::new(), "c".into()]];
        for m in msgs {
            for seen in &seens {
                for relay in [false, true] {
                    let f = CloneFrame::Forward {
                        msg: Arc::new(m.clone()),
                        seen: seen.clone(),
                        relay,
                    };
                    let want = Frame::new(Body::Forward(proto::Forward {
                        origin: m.origin.clone(),
                        msg_id: m.msg_id,
                        groups: m.groups.clone(),
                        all: m.all,
                        exclude_client: m.exclude_client.clone(),
                        from: m.from.clone(),
                        data: m.data.clone(),
                        origin_incarnation: m.origin_incarnation,
                        seen: seen.clone(),
                        relay,
                    }));
                    let bytes = encode_clone(&f);
                    assert_eq!(bytes, want.encode_to_bytes(), "{m:?} {seen:?} {relay}");
                    let back = Frame::decode(bytes).unwrap().body.unwrap();
                    assert_eq!(decode_clone(back), Ok(f));
                }
            }
        }
    }
}
