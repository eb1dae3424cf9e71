//! Fuzz target for `proto::wire`, the code that reads and writes encoded
//! frames without prost on fast paths: the node's front peeks at a frame's
//! kind with `frame_field`, connections spot their control frames with
//! `is_control`, mesh clients read `Deliver` frames with `deliver_parts`,
//! and clones write `Deliver` and `Forward` frames with `encode_deliver` and
//! `encode_forward`.
//!
//! 1. Readers, on arbitrary bytes: none may panic; where prost decodes the
//!    same bytes as a `Deliver`, the parts must be exactly prost's fields;
//!    for every frame prost decodes, re-encoding it gives a body whose
//!    `frame_field` is the variant prost found and that `is_control` marks
//!    exactly when it is a `Ping`, `Pong` or `Close`.
//! 2. Encoders, on fields cut from the input (pieces between 0xfe bytes):
//!    `encode_deliver` and `encode_forward` write byte for byte what prost
//!    writes, and `deliver_parts` reads the encoded `Deliver` back exactly.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::wire::{
    deliver_parts, encode_deliver, encode_forward, frame_field, is_control, read_varint, ForwardRef,
};
use proto::{frame::Body, Frame, Message};

fn readers(data: &[u8]) {
    let field = frame_field(data);
    let mut pos = 0;
    let _ = read_varint(data, &mut pos);
    assert!(pos <= data.len());
    let _ = is_control(data);
    let parts = deliver_parts(data);
    if let Some(p) = &parts {
        for r in [&p.group, &p.from, &p.data] {
            assert!(r.start <= r.end && r.end <= data.len());
        }
        assert_eq!(field, proto::wire::field::DELIVER);
    }
    if let Ok(frame) = Frame::decode(data) {
        if let (Some(p), Some(Body::Deliver(d))) = (&parts, &frame.body) {
            assert_eq!(&data[p.group.clone()], d.group.as_bytes());
            assert_eq!(&data[p.from.clone()], d.from.as_bytes());
            assert_eq!(&data[p.data.clone()], &d.data[..]);
        }
        if let Some(body) = &frame.body {
            let again = frame.encode_to_vec();
            let mut key = Vec::new();
            body.encode(&mut key);
            let mut kp = 0;
            let expected = (read_varint(&key, &mut kp).unwrap_or(0) >> 3) as u32;
            assert_eq!(frame_field(&again), expected);
            let control = matches!(body, Body::Ping(_) | Body::Pong(_) | Body::Close(_));
            assert_eq!(is_control(&again), control);
        }
    }
}

fn encoders(data: &[u8]) {
    let mut pieces = data.split(|&b| b == 0xfe);
    let mut next = move || pieces.next().unwrap_or(&[]);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let texts = |b: &[u8]| -> Vec<String> { b.split(|&c| c == 0xfd).map(text).collect() };
    let number = |b: &[u8]| {
        let mut a = [0u8; 8];
        let n = b.len().min(8);
        a[..n].copy_from_slice(&b[..n]);
        u64::from_le_bytes(a)
    };

    // Deliver.
    let (group, from, payload) = (text(next()), text(next()), next());
    let body = encode_deliver(&group, &from, payload);
    let want = Frame::new(Body::Deliver(proto::Deliver {
        group: group.clone(),
        from: from.clone(),
        data: Bytes::copy_from_slice(payload),
    }));
    assert_eq!(body, want.encode_to_bytes());
    let p = deliver_parts(&body).expect("an encoded Deliver takes the fast path");
    assert_eq!(&body[p.group], group.as_bytes());
    assert_eq!(&body[p.from], from.as_bytes());
    assert_eq!(&body[p.data], payload);

    // Forward.
    let flags = next().first().copied().unwrap_or(0);
    let (origin, msg_id, groups) = (text(next()), number(next()), texts(next()));
    let (exclude_client, sender, fdata) = (text(next()), text(next()), next());
    let (origin_incarnation, seen) = (number(next()), texts(next()));
    let f = ForwardRef {
        origin: &origin,
        msg_id,
        groups: &groups,
        all: flags & 1 != 0,
        exclude_client: &exclude_client,
        from: &sender,
        data: fdata,
        origin_incarnation,
        seen: &seen,
        relay: flags & 2 != 0,
    };
    let want = Frame::new(Body::Forward(proto::Forward {
        origin: origin.clone(),
        msg_id,
        groups: groups.clone(),
        all: f.all,
        exclude_client: exclude_client.clone(),
        from: sender.clone(),
        data: Bytes::copy_from_slice(fdata),
        origin_incarnation,
        seen: seen.clone(),
        relay: f.relay,
    }));
    let body = encode_forward(&f);
    assert_eq!(body, want.encode_to_bytes());
    assert_eq!(Frame::decode(body).ok(), Some(want));
}

fuzz_target!(|data: &[u8]| {
    readers(data);
    encoders(data);
});
