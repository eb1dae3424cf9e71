//! Property tests of the snapshot and journal file formats.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use proptest::prelude::*;
use replimesh_backup::journal::{
    decode_segment, push_entry, SegmentEncoder, ENTRY_OVERHEAD, RECORD_HEAD_LEN,
};
use replimesh_backup::snapshot::{decode_snapshot, encode_snapshot, write_snapshot};
use replimesh_backup::{Error, KdfParams, Key, KeyRing, Location, Snapshot, HEADER_LEN};

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| KeyRing::new("correct horse", KdfParams::insecure_fast()))
}

fn wrong_ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| KeyRing::new("battery staple", KdfParams::insecure_fast()))
}

fn key() -> Arc<Key> {
    ring().write_key().unwrap()
}

fn snapshot_bytes(s: &Snapshot, encrypted: bool, chunk: usize) -> Vec<u8> {
    let k = key();
    encode_snapshot(s, encrypted.then_some(&*k), chunk)
}

/// The file written by `write_snapshot` is what `encode_snapshot` produces (up to the nonce).
#[test]
fn written_file_matches_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.backup");
    let s = Snapshot {
        store: "w".into(),
        schema: 1,
        history_id: 2,
        seq: 3,
        state: Bytes::from((0..40_000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>()),
    };
    let n = write_snapshot(&path, &s, None, 4096).unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(data, snapshot_bytes(&s, false, 4096));
    let k = key();
    write_snapshot(&path, &s, Some(&k), 4096).unwrap();
    assert_eq!(
        replimesh_backup::snapshot::read_snapshot(&path, Some(ring())).unwrap(),
        s
    );
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left");
}

fn decode(data: Vec<u8>, encrypted: bool) -> Result<Snapshot, Error> {
    decode_snapshot(data, encrypted.then(ring), Path::new("mem"))
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (
        "[a-z]{0,12}",
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..20_000),
    )
        .prop_map(|(store, schema, history_id, seq, state)| Snapshot {
            store,
            schema,
            history_id,
            seq,
            state: Bytes::from(state),
        })
}

fn journal_bytes(records: &[(u64, Vec<u8>)], encrypted: bool) -> Vec<u8> {
    let mut enc = SegmentEncoder::new(7, 99, encrypted.then(key)).unwrap();
    let mut out = enc.header().to_vec();
    for (seq, a) in records {
        enc.encode(*seq, a, &mut out).unwrap();
    }
    out
}

fn arb_records() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    prop::collection::vec((1u64..5, prop::collection::vec(any::<u8>(), 0..40)), 0..12).prop_map(
        |v| {
            let mut seq = 7;
            v.into_iter()
                .map(|(d, a)| {
                    seq += d;
                    (seq, a)
                })
                .collect()
        },
    )
}

/// Offsets at which each record ends.
fn record_ends(records: &[(u64, Vec<u8>)], encrypted: bool) -> Vec<usize> {
    let trailer = if encrypted { 16 } else { 4 };
    let mut pos = HEADER_LEN;
    records
        .iter()
        .map(|(_, a)| {
            pos += RECORD_HEAD_LEN + ENTRY_OVERHEAD + a.len() + trailer;
            pos
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn snapshot_round_trip(s in arb_snapshot(), encrypted: bool, chunk in 4096usize..9000) {
        let data = snapshot_bytes(&s, encrypted, chunk);
        prop_assert_eq!(decode(data, encrypted).unwrap(), s);
    }

    #[test]
    fn snapshot_bit_flip_detected(s in arb_snapshot(), encrypted: bool, bit: prop::sample::Index) {
        let mut data = snapshot_bytes(&s, encrypted, 4096);
        let bit = bit.index(data.len() * 8);
        data[bit / 8] ^= 1 << (bit % 8);
        match decode(data, encrypted) {
            Err(Error::Corrupted { .. }) => {}
            other => prop_assert!(false, "flip of bit {} not detected as corruption: {:?}", bit, other),
        }
    }

    #[test]
    fn snapshot_truncation_detected(s in arb_snapshot(), encrypted: bool, cut: prop::sample::Index) {
        let mut data = snapshot_bytes(&s, encrypted, 4096);
        let cut = cut.index(data.len());
        data.truncate(cut);
        match decode(data, encrypted) {
            Err(Error::Corrupted { .. }) => {}
            other => prop_assert!(false, "truncation at {} not detected: {:?}", cut, other),
        }
    }

    #[test]
    fn snapshot_extension_detected(s in arb_snapshot(), encrypted: bool, extra in prop::collection::vec(any::<u8>(), 1..64)) {
        let mut data = snapshot_bytes(&s, encrypted, 4096);
        data.extend_from_slice(&extra);
        let r = decode(data, encrypted);
        prop_assert!(matches!(r, Err(Error::Corrupted { location: Location::TrailingData { .. }, .. })), "{:?}", r);
    }

    #[test]
    fn journal_round_trip(records in arb_records(), encrypted: bool) {
        let data = journal_bytes(&records, encrypted);
        let c = decode_segment(data, encrypted.then(ring), Path::new("mem")).unwrap();
        prop_assert_eq!(c.base, 7);
        prop_assert_eq!(c.history_id, 99);
        prop_assert_eq!(c.torn_at, None);
        let got: Vec<_> = c.entries.iter().map(|e| (e.seq, e.action.to_vec())).collect();
        prop_assert_eq!(got, records);
    }

    #[test]
    fn journal_torn_tail_dropped(records in arb_records(), encrypted: bool, cut: prop::sample::Index) {
        let data = journal_bytes(&records, encrypted);
        let cut = HEADER_LEN + cut.index(data.len() - HEADER_LEN + 1);
        let ends = record_ends(&records, encrypted);
        let complete = ends.iter().filter(|&&e| e <= cut).count();
        let c = decode_segment(data[..cut].to_vec(), encrypted.then(ring), Path::new("mem")).unwrap();
        prop_assert_eq!(c.entries.len(), complete);
        let at_boundary = cut == HEADER_LEN || ends.contains(&cut);
        prop_assert_eq!(c.torn_at.is_some(), !at_boundary);
        for (e, r) in c.entries.iter().zip(&records) {
            prop_assert_eq!(e.seq, r.0);
            prop_assert_eq!(&e.action[..], &r.1[..]);
        }
    }

    #[test]
    fn journal_zero_filled_tail_dropped(records in arb_records(), encrypted: bool, zeros in 1usize..200) {
        let mut data = journal_bytes(&records, encrypted);
        data.resize(data.len() + zeros, 0);
        let c = decode_segment(data, encrypted.then(ring), Path::new("mem")).unwrap();
        prop_assert_eq!(c.entries.len(), records.len());
        prop_assert!(c.torn_at.is_some());
    }

    #[test]
    fn journal_bit_flip_detected(records in arb_records(), encrypted: bool, bit: prop::sample::Index) {
        let mut data = journal_bytes(&records, encrypted);
        let bit = bit.index(data.len() * 8);
        data[bit / 8] ^= 1 << (bit % 8);
        match decode_segment(data, encrypted.then(ring), Path::new("mem")) {
            Err(Error::Corrupted { .. }) => {}
            other => prop_assert!(false, "flip of bit {} not detected: {:?}", bit, other),
        }
    }
}

#[test]
fn wrong_key_is_wrong_key() {
    let s = Snapshot {
        store: "s".into(),
        schema: 1,
        history_id: 1,
        seq: 1,
        state: Bytes::from_static(b"state"),
    };
    let data = snapshot_bytes(&s, true, 4096);
    let r = decode_snapshot(data.clone(), Some(wrong_ring()), Path::new("mem"));
    assert!(matches!(r, Err(Error::WrongKey { .. })), "{r:?}");
    let r = decode_snapshot(data, None, Path::new("mem"));
    assert!(matches!(r, Err(Error::KeyRequired { .. })), "{r:?}");
    let plain = snapshot_bytes(&s, false, 4096);
    let r = decode_snapshot(plain, Some(ring()), Path::new("mem"));
    assert!(matches!(r, Err(Error::NotEncrypted { .. })), "{r:?}");
    let j = journal_bytes(&[(8, b"a".to_vec())], true);
    let r = decode_segment(j, Some(wrong_ring()), Path::new("mem"));
    assert!(matches!(r, Err(Error::WrongKey { .. })), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    // Each case derives a key for a new passphrase, so only a few cases.
    #[test]
    fn any_other_passphrase_is_wrong_key(pass in "[ -~]{0,16}") {
        prop_assume!(pass != "correct horse");
        let s = Snapshot { store: "s".into(), schema: 1, history_id: 1, seq: 1, state: Bytes::new() };
        let data = snapshot_bytes(&s, true, 4096);
        let other = KeyRing::new(&pass, KdfParams::insecure_fast());
        let r = decode_snapshot(data, Some(&other), Path::new("mem"));
        prop_assert!(matches!(r, Err(Error::WrongKey { .. })), "{:?}", r);
    }
}

#[test]
fn newer_format_is_reported() {
    let s = Snapshot {
        store: "s".into(),
        schema: 1,
        history_id: 1,
        seq: 1,
        state: Bytes::new(),
    };
    let mut data = snapshot_bytes(&s, false, 4096);
    data[8..10].copy_from_slice(&2u16.to_le_bytes());
    let crc = crc32(&data[..HEADER_LEN - 4]);
    data[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    let r = decode_snapshot(data, None, Path::new("mem"));
    assert!(
        matches!(
            r,
            Err(Error::NewerFormat {
                found: 2,
                supported: 1,
                ..
            })
        ),
        "{r:?}"
    );
}

/// CRC-32 (IEEE), bitwise: an independent implementation for the test.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let r = replimesh_backup::snapshot::read_snapshot(&dir.path().join("nope"), None);
    assert!(matches!(r, Err(Error::NotFound { .. })), "{r:?}");
}

/// Bits of a small two-chunk snapshot file and every bit of a small journal, flipped in turn;
/// every truncation of the snapshot.
#[test]
fn every_bit_flip_and_truncation_detected() {
    let s = Snapshot {
        store: "exhaustive".into(),
        schema: 3,
        history_id: 77,
        seq: 1234,
        state: Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<u8>>()),
    };
    for encrypted in [false, true] {
        let data = snapshot_bytes(&s, encrypted, 4096);
        // Every bit of the header and of the trailer; one bit (rotating) of every other byte.
        let n = data.len();
        let bits = (0..n * 8).filter(|b| {
            let byte = b / 8;
            byte < HEADER_LEN + 8 || byte >= n - 40 || b % 8 == byte % 8
        });
        for bit in bits {
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            let r = decode(d, encrypted);
            assert!(
                matches!(r, Err(Error::Corrupted { .. })),
                "snapshot (encrypted: {encrypted}) bit {bit}: {r:?}"
            );
        }
        for cut in 0..data.len() {
            let r = decode(data[..cut].to_vec(), encrypted);
            assert!(
                matches!(r, Err(Error::Corrupted { .. })),
                "snapshot cut {cut}: {r:?}"
            );
        }
        let records = vec![(8, b"one".to_vec()), (9, Vec::new()), (12, vec![7; 30])];
        let data = journal_bytes(&records, encrypted);
        for bit in 0..data.len() * 8 {
            let mut d = data.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            let r = decode_segment(d, encrypted.then(ring), Path::new("mem"));
            assert!(
                matches!(r, Err(Error::Corrupted { .. })),
                "journal (encrypted: {encrypted}) bit {bit}: {r:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Records holding batches of actions (as written under `Every`/`Never`): round trip, and a
    /// cut anywhere keeps exactly the complete records.
    #[test]
    fn journal_batches(batches in prop::collection::vec(arb_records(), 1..5), encrypted: bool, cut: prop::sample::Index) {
        let mut enc = SegmentEncoder::new(7, 99, encrypted.then(key)).unwrap();
        let mut out = enc.header().to_vec();
        let mut seq = 7;
        let mut expected = Vec::new();
        let mut ends = Vec::new();
        for b in &batches {
            let mut batch = Vec::new();
            let mut these = Vec::new();
            for (d, a) in b {
                seq += d;
                push_entry(&mut batch, seq, a).unwrap();
                these.push((seq, a.clone()));
            }
            enc.encode_batch(&batch, &mut out).unwrap();
            if !these.is_empty() {
                ends.push((out.len(), expected.len() + these.len()));
            }
            expected.extend(these);
        }
        let c = decode_segment(out.clone(), encrypted.then(ring), Path::new("mem")).unwrap();
        let got: Vec<_> = c.entries.iter().map(|e| (e.seq, e.action.to_vec())).collect();
        prop_assert_eq!(&got, &expected);

        let cut = HEADER_LEN + cut.index(out.len() - HEADER_LEN + 1);
        let keep = ends.iter().filter(|(e, _)| *e <= cut).map(|(_, n)| *n).max().unwrap_or(0);
        let c = decode_segment(out[..cut].to_vec(), encrypted.then(ring), Path::new("mem")).unwrap();
        prop_assert_eq!(c.entries.len(), keep);
        prop_assert_eq!(c.torn_at.is_some(), cut != HEADER_LEN && !ends.iter().any(|(e, _)| *e == cut));
    }
}

/// Sets a valid header CRC on `data` (so that the fields behind it are parsed).
fn fix_header_crc(data: &mut [u8]) {
    if data.len() >= HEADER_LEN {
        let crc = crc32(&data[..HEADER_LEN - 4]);
        data[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Decoders never panic, whatever the bytes after a plausible header.
    #[test]
    fn decoders_do_not_panic(
        encrypted: bool,
        fields in prop::collection::vec(any::<u8>(), 80),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        for magic in [*b"RPLMSNAP", *b"RPLMJRNL"] {
            let mut data = magic.to_vec();
            data.extend_from_slice(&1u16.to_le_bytes());
            data.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
            data.extend_from_slice(&fields);
            data[12] = u8::from(encrypted);
            // Keep the Argon2 costs cheap when the key is tried.
            data[16..28].copy_from_slice(&[8, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
            data.extend_from_slice(&body);
            fix_header_crc(&mut data);
            let _ = decode_snapshot(data.clone(), encrypted.then(ring), Path::new("mem"));
            let _ = decode_segment(data, encrypted.then(ring), Path::new("mem"));
        }
    }
}

/// The public header reader: reads both kinds of file, and any bytes (cut,
/// flipped, random) give an error, never a panic.
#[test]
fn file_header_reader_reads_both_kinds_and_refuses_junk() {
    use replimesh_backup::{Backup, BackupConfig, FileHeader, FileKind, FsyncPolicy, KdfParams};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.backup");
    let config = BackupConfig::new(&path)
        .key("pw")
        .kdf(KdfParams::insecure_fast())
        .journal(FsyncPolicy::Always);
    let (b, _) = Backup::open(config).unwrap();
    b.snapshot(replimesh_backup::Snapshot {
        store: "s".into(),
        schema: 1,
        history_id: 42,
        seq: 0,
        state: bytes::Bytes::from_static(b"state"),
    })
    .unwrap();
    let _ = b.record(1, b"a").unwrap();
    drop(b);
    let snap = std::fs::read(&path).unwrap();
    let h = FileHeader::read(&snap, &path).unwrap();
    assert_eq!(
        (h.kind, h.version, h.encrypted),
        (FileKind::Snapshot, 1, true)
    );
    assert_eq!(h.kdf, Some(KdfParams::insecure_fast()));
    let seg = replimesh_backup::journal::list_segments(&path).unwrap()[0]
        .1
        .clone();
    let j = FileHeader::read(&std::fs::read(&seg).unwrap(), &seg).unwrap();
    assert_eq!((j.kind, j.word, j.history_id), (FileKind::Journal, 0, 42));
    for n in 0..snap.len().min(200) {
        assert!(FileHeader::read(&snap[..n], &path).is_err() || n >= replimesh_backup::HEADER_LEN);
    }
    let mut flipped = snap.clone();
    for i in 0..replimesh_backup::HEADER_LEN {
        flipped[i] ^= 0x40;
        assert!(
            FileHeader::read(&flipped, &path).is_err(),
            "flip at {i} accepted"
        );
        flipped[i] ^= 0x40;
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..2000 {
        let junk: Vec<u8> = (0..(x % 200) as usize)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = FileHeader::read(&junk, &path);
        x = x.wrapping_add(1);
    }
}
