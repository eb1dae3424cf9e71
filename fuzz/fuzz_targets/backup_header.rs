//! Fuzz target for the backup file header reader, `backup::FileHeader::read`
//! (what `replimesh backup inspect` and every restore read first, from a file
//! that may have been damaged or tampered with).
//!
//! The first input byte steers the rest so that the deeper checks are
//! reached: bit 0 writes a snapshot or journal magic in front, bit 1 a header
//! length of 96, bit 2 version 1, bit 3 a correct header checksum (at the
//! place the header length field points to). The reader must never panic,
//! must fail only with `Corrupted` or `NewerFormat`, and a header it accepts
//! must be consistent: the file is at least a header long, its magic names
//! the kind, the version is one this build reads, `kdf` is there exactly for
//! encrypted files, and nothing after the header changes the result.
#![no_main]

use std::path::Path;

use backup::{Error, FileHeader, FileKind, FORMAT_VERSION, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= 8 {
        let magic = if mode & 0x10 != 0 {
            b"RPLMJRNL"
        } else {
            b"RPLMSNAP"
        };
        bytes[..8].copy_from_slice(magic);
    }
    if mode & 2 != 0 && bytes.len() >= 12 {
        bytes[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    }
    if mode & 4 != 0 && bytes.len() >= 10 {
        bytes[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    }
    if mode & 8 != 0 && bytes.len() >= 12 {
        let hlen = usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
        if (16..=bytes.len()).contains(&hlen) {
            let crc = crc32fast::hash(&bytes[..hlen - 4]);
            bytes[hlen - 4..hlen].copy_from_slice(&crc.to_le_bytes());
        }
    }

    let path = Path::new("fuzz.backup");
    match FileHeader::read(&bytes, path) {
        Ok(h) => {
            assert!(bytes.len() >= HEADER_LEN);
            let magic: &[u8] = match h.kind {
                FileKind::Snapshot => b"RPLMSNAP",
                FileKind::Journal => b"RPLMJRNL",
                _ => unreachable!("a kind this target does not know: {:?}", h.kind),
            };
            assert_eq!(&bytes[..8], magic);
            assert!(h.version >= 1 && h.version <= FORMAT_VERSION);
            assert_eq!(h.encrypted, h.kdf.is_some());
            let again = FileHeader::read(&bytes[..HEADER_LEN], path)
                .expect("the header alone reads as the whole file does");
            assert_eq!(again, h);
        }
        Err(Error::Corrupted { .. } | Error::NewerFormat { .. }) => {}
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
});
