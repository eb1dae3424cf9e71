//! Fuzz target for the JSON frame decoder (`replimesh.v1.json` WebSocket
//! subprotocol, text messages): `Frame::from_json_or_store_error` (what the
//! WebSocket reader uses; `Frame::from_json` plus the `StoreError` for a bad
//! store frame) on arbitrary text must never panic, and a frame it returns
//! must survive `to_json` -> `from_json` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::Frame;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = Frame::from_json_or_store_error(text) {
        let json = frame.to_json();
        let again = Frame::from_json(&json)
            .unwrap_or_else(|e| panic!("re-encoded JSON {json:?} does not decode: {e}"));
        assert_eq!(again, frame);
    }
});
