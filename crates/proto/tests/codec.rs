//! Codec tests: round trips, limits, and arbitrary input.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use replimesh_proto::{frame::Body, CodecError, Frame, FrameCodec, Message, Publish, Request};
use tokio_util::codec::{Decoder, Encoder};

fn arb_body() -> impl Strategy<Value = Frame> {
    prop_oneof![
        any::<u64>().prop_map(Frame::ping),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Frame::data),
        (
            any::<u64>(),
            ".{0,20}",
            ".{0,20}",
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(id, route, act, data)| Frame::new(Body::Request(Request {
                id,
                route,
                act,
                data: data.into()
            }))),
        (
            proptest::collection::vec(".{0,12}", 0..5),
            any::<bool>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(groups, all, not_to_me, data)| Frame::new(Body::Publish(
                Publish {
                    groups,
                    all,
                    not_to_me,
                    data: data.into()
                }
            ))),
    ]
}

proptest! {
    #[test]
    fn encode_decode_is_identity(frames in proptest::collection::vec(arb_body(), 1..20)) {
        let mut codec = FrameCodec::new(1 << 20);
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut wire).unwrap();
        }
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut wire).unwrap() {
            out.push(f);
        }
        prop_assert_eq!(out, frames);
        prop_assert!(wire.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..32)) {
        let mut codec = FrameCodec::new(4096);
        let mut buf = BytesMut::new();
        'outer: for chunk in chunks {
            buf.extend_from_slice(&chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(_) => break 'outer,
                }
            }
        }
    }

    #[test]
    fn split_reassembly_any_chunking(frames in proptest::collection::vec(arb_body(), 1..10), cut in 1usize..17) {
        let mut codec = FrameCodec::new(1 << 20);
        let mut wire = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(cut) {
            buf.extend_from_slice(piece);
            while let Some(f) = codec.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
    }
}

#[test]
fn oversized_length_is_rejected_without_allocating() {
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::with_capacity(8);
    buf.put_u32(1025);
    buf.put_slice(b"abcd");
    let cap_before = buf.capacity();
    match codec.decode(&mut buf) {
        Err(CodecError::FrameTooLarge { len, max }) => {
            assert_eq!((len, max), (1025, 1024));
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    assert_eq!(
        buf.capacity(),
        cap_before,
        "decoder grew the buffer for a refused frame"
    );

    let mut huge = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    assert!(matches!(
        codec.decode(&mut huge),
        Err(CodecError::FrameTooLarge { .. })
    ));
    assert!(huge.capacity() < 1024);
}

#[test]
fn frame_at_exactly_the_maximum_passes_and_one_more_fails() {
    // A Data frame's encoding: tag(1) + len varint + (tag + len varint + payload).
    let max = 1 << 20;
    let mut payload_len = max - 16;
    let frame = loop {
        let f = Frame::data(vec![7u8; payload_len]);
        let len = prost::Message::encoded_len(&f);
        if len == max {
            break f;
        }
        payload_len += max - len;
    };
    let mut codec = FrameCodec::new(max);
    let mut wire = BytesMut::new();
    codec.encode(&frame, &mut wire).unwrap();
    assert_eq!(wire.len(), max + 4);
    assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame.clone()));

    let mut small = FrameCodec::new(max - 1);
    let mut wire = BytesMut::new();
    assert!(matches!(
        small.encode(&frame, &mut wire),
        Err(CodecError::FrameTooLarge { .. })
    ));
}

#[test]
fn malformed_body_is_an_error() {
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    buf.put_u32(3);
    buf.put_slice(&[0xff, 0xff, 0xff]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn pre_encoded_bytes_decode_to_the_same_frame() {
    let frame = Frame::data(Bytes::from_static(b"hello"));
    let body = frame.encode_to_bytes();
    let mut codec = FrameCodec::default();
    let mut wire = BytesMut::new();
    codec.encode(body, &mut wire).unwrap();
    assert_eq!(codec.decode(&mut wire).unwrap(), Some(frame));
}

#[test]
fn json_round_trip_uses_canonical_proto3_json() {
    let frame = Frame::new(Body::Publish(Publish {
        groups: vec!["chat".into()],
        all: false,
        not_to_me: true,
        data: Bytes::from_static(b"hi"),
    }));
    let json = frame.to_json();
    // camelCase field names, bytes as base64, default values omitted.
    assert_eq!(
        json,
        r#"{"publish":{"groups":["chat"],"notToMe":true,"data":"aGk="}}"#
    );
    assert_eq!(Frame::from_json(&json).unwrap(), frame);
    // uint64 is a string in proto3 JSON.
    let json = Frame::ping(u64::MAX).to_json();
    assert_eq!(json, r#"{"ping":{"nonce":"18446744073709551615"}}"#);
    assert!(Frame::from_json("{\"ping\":").is_err());
}

#[test]
fn close_codes_are_enum_names_in_json_and_varints_on_the_wire() {
    use replimesh_proto::CloseCode;
    let close = Frame::close(CloseCode::GoingAway, "bye");
    assert_eq!(
        close.to_json(),
        r#"{"close":{"code":"CLOSE_CODE_GOING_AWAY","reason":"bye"}}"#
    );
    // Names and numbers are both read; NORMAL (0) is omitted as a default.
    let by_number = Frame::from_json(r#"{"close":{"code":1,"reason":"bye"}}"#).unwrap();
    assert_eq!(by_number, close);
    assert_eq!(
        Frame::close(CloseCode::Normal, "").to_json(),
        r#"{"close":{}}"#
    );
    // The binary encoding is the varint of the former `uint32` field: field
    // 5 (length 7), then field 1 = 1, field 2 = "bye".
    assert_eq!(
        &close.encode_to_bytes()[..],
        &[0x2a, 7, 0x08, 1, 0x12, 3, b'b', b'y', b'e']
    );
    // Unknown codes from the binary wire are kept.
    let unknown = Frame::decode(&[0x2a, 2, 0x08, 99][..]).unwrap();
    match unknown.body {
        Some(Body::Close(c)) => assert_eq!(CloseCode::from_u32(c.code as u32), None),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[test]
fn a_json_store_frame_with_a_bad_value_becomes_a_store_error_for_its_store() {
    use replimesh_proto::STORE_ERROR_BAD_FRAME;
    let bad = r#"{"storeHello":{"store":"s","schema":1,"encoding":"ENCODING_XML"}}"#;
    assert!(Frame::from_json(bad).is_err());
    match Frame::from_json_or_store_error(bad).unwrap().body {
        Some(Body::StoreError(e)) => {
            assert_eq!((e.store.as_str(), e.op_id, e.count), ("s", 0, 0));
            let info = e.error.unwrap();
            assert_eq!(info.code, STORE_ERROR_BAD_FRAME);
            assert!(info.message.contains("ENCODING_XML"), "{}", info.message);
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    // A dispatch keeps its op ids (action and more) and client id.
    let bad = r#"{"dispatch":{"store":"s","opId":"4","action":"!!","more":["e30=","e30="],"clientId":"c"}}"#;
    match Frame::from_json_or_store_error(bad).unwrap().body {
        Some(Body::StoreError(e)) => {
            assert_eq!((e.op_id, e.count, e.client_id.as_str()), (4, 3, "c"));
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    // Good frames decode as they are; frames that name no store, other
    // frames and broken JSON stay errors.
    let good = r#"{"resync":{"store":"s","lastSeq":"2"}}"#;
    assert_eq!(
        Frame::from_json_or_store_error(good).unwrap(),
        Frame::from_json(good).unwrap()
    );
    for text in [
        r#"{"storeHello":{"schema":"x"}}"#,
        r#"{"storeHello":{"store":7,"schema":"x"}}"#,
        r#"{"subscribe":{"groups":"g"}}"#,
        r#"{"storeHello":{"store":"s"},"ping":{}}"#,
        r#"{"storeHello":{"store":"s""#,
    ] {
        assert!(Frame::from_json_or_store_error(text).is_err(), "{text}");
    }
}

proptest! {
    /// Any value in any field of a JSON store frame that names its store
    /// gives that frame or a `StoreError` for that store, never a panic or
    /// another store; the result survives `to_json` -> `from_json`.
    #[test]
    fn json_store_frames_with_any_value_answer_for_their_store(
        kind in prop::sample::select(vec![
            "storeHello", "storeWelcome", "dispatch", "committed", "actions",
            "snapshot", "digest", "resync", "storeError",
        ]),
        store in "[a-z]{1,8}",
        field in prop::sample::select(vec![
            "schema", "clientId", "historyId", "lastSeq", "encoding", "mode", "opId",
            "action", "more", "seq", "moreSeqs", "firstSeq", "actions", "state",
            "digest", "error", "count", "resync", "nope",
        ]),
        value in prop::sample::select(vec![
            "0", "1", "-1", "7", "\"7\"", "\"x\"", "\"ENCODING_JSON\"", "\"ENCODING_XML\"",
            "\"aGk=\"", "\"!!\"", "true", "null", "[]", "[\"aGk=\"]", "[1]", "{}",
            "18446744073709551616", "1.5",
        ]),
    ) {
        let text = format!(r#"{{"{kind}":{{"store":"{store}","{field}":{value}}}}}"#);
        let frame = Frame::from_json_or_store_error(&text)
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let json = frame.to_json();
        prop_assert_eq!(&Frame::from_json(&json).unwrap(), &frame);
        let named = match &frame.body {
            Some(Body::StoreHello(f)) => &f.store,
            Some(Body::StoreWelcome(f)) => &f.store,
            Some(Body::Dispatch(f)) => &f.store,
            Some(Body::Committed(f)) => &f.store,
            Some(Body::Actions(f)) => &f.store,
            Some(Body::Snapshot(f)) => &f.store,
            Some(Body::Digest(f)) => &f.store,
            Some(Body::Resync(f)) => &f.store,
            Some(Body::StoreError(f)) => &f.store,
            other => panic!("{text} gave {other:?}"),
        };
        prop_assert_eq!(named, &store);
    }
}

/// As the binary decoder does, the JSON decoder skips what a newer peer
/// may send: unknown fields, and unknown frame kinds (an empty frame).
#[test]
fn json_skips_unknown_fields_and_frame_kinds() {
    let f = Frame::from_json(r#"{"futureKind":{"x":[1,2]}}"#).unwrap();
    assert_eq!(f, Frame { body: None });
    let f = Frame::from_json(r#"{"publish":{"groups":["g"],"futureField":{"a":1}}}"#).unwrap();
    assert_eq!(
        f,
        Frame::new(Body::Publish(Publish {
            groups: vec!["g".into()],
            ..Default::default()
        }))
    );
    // Still JSON, still the right types for known fields.
    assert!(Frame::from_json(r#"{"publish":{"groups":"g"}}"#).is_err());
}
