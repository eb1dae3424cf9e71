//! Journal segments: the committed actions since a snapshot, in authenticated records.
//!
//! A journal is a sequence of segment files named `<snapshot file>.journal.<base seq>` (base
//! in 20 decimal digits) next to the snapshot file. A segment holds actions with seq greater
//! than its base, in records. A record holds the actions of one write: exactly one under
//! [`FsyncPolicy::Always`](crate::FsyncPolicy::Always), the batch buffered since the last write
//! under the other policies (which may lose that batch anyway). Each record is independently
//! checksummed or authenticated, so a record torn by a crash (the incomplete last one) is
//! detected and dropped, while damage anywhere else is reported as corruption.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::format::{le_u32, le_u64, Header, Kind, HEADER_LEN};
use crate::key::{nonce_at, Key, TAG_LEN};
use crate::{Error, KeyRing, Location};

/// Bytes of the record frame before the body: body length (u32) and its checksum (u32).
pub const RECORD_HEAD_LEN: usize = 8;

/// One journaled action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    /// Sequence number of the action.
    pub seq: u64,
    /// The serialized action (opaque to this crate).
    pub action: Bytes,
}

/// Bytes an action adds to a record's plaintext besides the action itself (seq and length).
pub const ENTRY_OVERHEAD: usize = 12;

/// Largest action accepted in the journal.
pub const MAX_ACTION_LEN: usize = 1 << 30;

/// Appends the plaintext of one entry, `u64 seq || u32 len || action`, to a record batch.
pub fn push_entry(batch: &mut Vec<u8>, seq: u64, action: &[u8]) -> Result<(), Error> {
    if action.len() > MAX_ACTION_LEN {
        return Err(Error::ActionTooLarge { len: action.len() });
    }
    batch.reserve(ENTRY_OVERHEAD + action.len());
    batch.extend_from_slice(&seq.to_le_bytes());
    batch.extend_from_slice(&(action.len() as u32).to_le_bytes());
    batch.extend_from_slice(action);
    Ok(())
}

/// Encodes the header and records of one journal segment.
#[derive(Debug)]
pub struct SegmentEncoder {
    header: [u8; HEADER_LEN],
    nonce: [u8; 12],
    key: Option<Arc<Key>>,
    base: u64,
    next_index: u64,
    last_seq: u64,
}

impl SegmentEncoder {
    /// A new segment after seq `base` of history `history_id`, encrypted with `key` if given
    /// (each segment gets a fresh random nonce).
    pub fn new(base: u64, history_id: u64, key: Option<Arc<Key>>) -> Result<Self, Error> {
        let mut h = Header::new(Kind::Journal, key.as_deref())
            .map_err(|e| Error::io(Path::new("<system random generator>"), e))?;
        h.word = base;
        h.history_id = history_id;
        Ok(Self {
            header: h.encode(),
            nonce: h.nonce,
            key,
            base,
            next_index: 0,
            last_seq: base,
        })
    }

    /// The segment's file header (the first bytes of the file).
    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// The base seq of the segment.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Appends a record holding the single action `(seq, action)` to `out`. `seq` must be
    /// greater than the seqs encoded before with this method.
    pub fn encode(&mut self, seq: u64, action: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if seq <= self.last_seq {
            return Err(Error::SeqOutOfOrder {
                last: self.last_seq,
                got: seq,
            });
        }
        let start = out.len();
        out.extend_from_slice(&[0u8; RECORD_HEAD_LEN]);
        if let Err(e) = push_entry(out, seq, action) {
            out.truncate(start);
            return Err(e);
        }
        self.seal(out, start)?;
        self.last_seq = seq;
        Ok(())
    }

    /// Appends a record holding `batch` (entries made with [`push_entry`], seqs increasing and
    /// greater than those of earlier records) to `out`. An empty batch writes nothing.
    pub fn encode_batch(&mut self, batch: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let start = out.len();
        out.reserve(RECORD_HEAD_LEN + batch.len() + TAG_LEN);
        out.extend_from_slice(&[0u8; RECORD_HEAD_LEN]);
        out.extend_from_slice(batch);
        self.seal(out, start)
    }

    /// Turns `out[start..]` (a placeholder frame head, then the plaintext) into a sealed
    /// record in place.
    fn seal(&mut self, out: &mut Vec<u8>, start: usize) -> Result<(), Error> {
        let trailer = if self.key.is_some() { TAG_LEN } else { 4 };
        let plain_len = out.len() - start - RECORD_HEAD_LEN;
        let body_len = match u32::try_from(plain_len + trailer) {
            Ok(n) => n,
            Err(_) => {
                out.truncate(start);
                return Err(Error::ActionTooLarge { len: plain_len });
            }
        };
        let index = self.next_index;
        out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&len_crc(index, body_len).to_le_bytes());
        let body = start + RECORD_HEAD_LEN;
        match &self.key {
            Some(k) => {
                let tag = k.encrypt(
                    &nonce_at(&self.nonce, index),
                    &self.header,
                    &mut out[body..],
                );
                out.extend_from_slice(&tag);
            }
            None => {
                let crc = body_crc(index, &out[body..]);
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
        self.next_index += 1;
        Ok(())
    }
}

/// What a journal segment holds.
#[derive(Debug, Clone)]
pub struct SegmentContents {
    /// Seq after which this segment starts.
    pub base: u64,
    /// History id written in the segment header.
    pub history_id: u64,
    /// The complete, verified records, in order.
    pub entries: Vec<JournalEntry>,
    /// File offset of an incomplete last record (torn by a crash) that was dropped, if any.
    pub torn_at: Option<u64>,
}

/// Reads and verifies a journal segment file.
pub fn read_segment(path: &Path, keys: Option<&KeyRing>) -> Result<SegmentContents, Error> {
    let data = fs::read(path).map_err(|e| Error::read(path, e))?;
    decode_segment(data, keys, path)
}

/// Decodes a journal segment from its bytes (`path` is only used in errors).
///
/// The last record is dropped (and reported in [`SegmentContents::torn_at`]) when the file ends
/// before its end, or when everything from its start to the end of the file is zero bytes (the
/// way some file systems leave a write interrupted by power loss). Any other damage is
/// [`Error::Corrupted`] with [`Location::Record`].
pub fn decode_segment(
    mut data: Vec<u8>,
    keys: Option<&KeyRing>,
    path: &Path,
) -> Result<SegmentContents, Error> {
    let header = Header::decode(&data, Kind::Journal, path)?;
    let key = header.key(keys, path)?;
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(&data[..HEADER_LEN]);
    let trailer = if key.is_some() { TAG_LEN } else { 4 };
    let mut records: Vec<(u64, usize, usize)> = Vec::new();
    let mut torn_at = None;
    let mut pos = HEADER_LEN;
    let mut last = header.word;
    let mut index = 0u64;
    while pos < data.len() {
        let rest = &data[pos..];
        let zero_tail = || rest.iter().all(|&b| b == 0);
        let corrupt = |detail: &'static str| {
            Error::corrupted(
                path,
                Location::Record {
                    index,
                    offset: pos as u64,
                },
                detail,
            )
        };
        if rest.len() < RECORD_HEAD_LEN {
            torn_at = Some(pos as u64);
            break;
        }
        let body_len = le_u32(rest);
        if le_u32(&rest[4..]) != len_crc(index, body_len) {
            if zero_tail() {
                torn_at = Some(pos as u64);
                break;
            }
            return Err(corrupt("record length checksum mismatch"));
        }
        let body_len = body_len as usize;
        if body_len < ENTRY_OVERHEAD + trailer {
            return Err(corrupt("record too short"));
        }
        if rest.len() - RECORD_HEAD_LEN < body_len {
            torn_at = Some(pos as u64);
            break;
        }
        let start = pos + RECORD_HEAD_LEN;
        let end = start + body_len;
        let ok = match &key {
            Some(k) => {
                let (msg, tag) = data[start..end].split_at_mut(body_len - TAG_LEN);
                k.decrypt(&nonce_at(&header.nonce, index), &header_bytes, msg, tag)
            }
            None => body_crc(index, &data[start..end - 4]) == le_u32(&data[end - 4..end]),
        };
        if !ok {
            if data[pos..].iter().all(|&b| b == 0) {
                torn_at = Some(pos as u64);
                break;
            }
            return Err(Error::corrupted(
                path,
                Location::Record {
                    index,
                    offset: pos as u64,
                },
                if key.is_some() {
                    "record failed authentication"
                } else {
                    "record checksum mismatch"
                },
            ));
        }
        // The verified plaintext: entries `u64 seq || u32 len || action`.
        let mut p = start;
        let plain_end = end - trailer;
        while p < plain_end {
            let bad = |detail: &'static str| {
                Error::corrupted(
                    path,
                    Location::Record {
                        index,
                        offset: pos as u64,
                    },
                    detail,
                )
            };
            if plain_end - p < ENTRY_OVERHEAD {
                return Err(bad("truncated entry in record"));
            }
            let seq = le_u64(&data[p..]);
            let len = le_u32(&data[p + 8..]) as usize;
            let a = p + ENTRY_OVERHEAD;
            if plain_end - a < len {
                return Err(bad("entry longer than its record"));
            }
            if seq <= last {
                return Err(bad("record sequence numbers out of order"));
            }
            last = seq;
            records.push((seq, a, a + len));
            p = a + len;
        }
        index += 1;
        pos = end;
    }
    let data = Bytes::from(data);
    Ok(SegmentContents {
        base: header.word,
        history_id: header.history_id,
        entries: records
            .into_iter()
            .map(|(seq, a, b)| JournalEntry {
                seq,
                action: data.slice(a..b),
            })
            .collect(),
        torn_at,
    })
}

/// The path of the segment with base `base` for the snapshot file `path`.
pub fn segment_path(path: &Path, base: u64) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".journal.{base:020}"));
    PathBuf::from(s)
}

/// The journal segments of the snapshot file `path`, sorted by base.
pub fn list_segments(path: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let dir = crate::fsutil::parent_dir(path);
    let mut prefix: OsString = path.file_name().unwrap_or_default().to_owned();
    prefix.push(".journal.");
    let prefix = prefix.as_encoded_bytes();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name();
        let bytes = name.as_encoded_bytes();
        if let Some(rest) = bytes.strip_prefix(prefix) {
            if rest.len() == 20 && rest.iter().all(u8::is_ascii_digit) {
                let base = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(base) = base {
                    out.push((base, dir.join(&name)));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn len_crc(index: u64, len: u32) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.finalize()
}

fn body_crc(index: u64, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(body);
    h.finalize()
}
