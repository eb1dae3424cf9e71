//! Snapshot files: encoding, atomic writing and verified reading.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;

use bytes::Bytes;

use crate::format::{le_u32, le_u64, Header, Kind, Protection, HEADER_LEN};
use crate::key::{nonce_at, Key, TAG_LEN};
use crate::{Error, KeyRing, Location};

/// Default number of plaintext bytes per authenticated chunk.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;

/// A point-in-time copy of a store: what a snapshot file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Name of the store.
    pub store: String,
    /// Schema version of the store's state and actions.
    pub schema: u32,
    /// Random id of the store's history (kept across restarts).
    pub history_id: u64,
    /// Sequence number of the last action included in `state`.
    pub seq: u64,
    /// The serialized state (opaque to this crate).
    pub state: Bytes,
}

/// Writes `snapshot` to `path` atomically (temporary file, fsync, rename, directory fsync),
/// encrypted with `key` when given, checksummed otherwise. Returns the file size.
///
/// `chunk_size` is the number of plaintext bytes per authenticated chunk (clamped to
/// 4 KiB..=64 MiB); [`DEFAULT_CHUNK_SIZE`] is a good choice.
pub fn write_snapshot(
    path: &Path,
    snapshot: &Snapshot,
    key: Option<&Key>,
    chunk_size: usize,
) -> Result<u64, Error> {
    crate::fsutil::write_atomic(path, |f| {
        // Pipelining pays when there is encryption to overlap with the writes (CRC-32 runs at
        // tens of GB/s).
        if key.is_some() && snapshot.state.len() >= 4 * chunk_size {
            write_body_pipelined(f, snapshot, key, chunk_size)
        } else {
            write_body(&mut { f }, snapshot, key, chunk_size)
        }
    })
    .map_err(|e| Error::io(path, e))
}

/// Encodes `snapshot` into `out` as a snapshot file (what [`write_snapshot`] writes, without
/// the atomic replacement). Returns the number of bytes written.
pub fn encode_snapshot_to(
    out: &mut impl Write,
    snapshot: &Snapshot,
    key: Option<&Key>,
    chunk_size: usize,
) -> io::Result<u64> {
    write_body(out, snapshot, key, chunk_size)
}

/// Encodes `snapshot` into the bytes of a snapshot file (what [`write_snapshot`] writes).
pub fn encode_snapshot(snapshot: &Snapshot, key: Option<&Key>, chunk_size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(snapshot.state.len() + snapshot.store.len() + 256);
    // Writing to a Vec cannot fail.
    let _ = write_body(&mut out, snapshot, key, chunk_size);
    out
}

/// Reads and verifies the snapshot at `path`. `keys` must be given for an encrypted file and
/// absent for an unencrypted one.
///
/// Errors: [`Error::NotFound`], [`Error::KeyRequired`], [`Error::NotEncrypted`],
/// [`Error::WrongKey`], [`Error::Corrupted`] (with the location), [`Error::NewerFormat`],
/// [`Error::Io`].
pub fn read_snapshot(path: &Path, keys: Option<&KeyRing>) -> Result<Snapshot, Error> {
    let data = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    decode_snapshot(data, keys, path)
}

/// Decodes and verifies the bytes of a snapshot file (`path` is only used in errors).
pub fn decode_snapshot(
    mut data: Vec<u8>,
    keys: Option<&KeyRing>,
    path: &Path,
) -> Result<Snapshot, Error> {
    let header = Header::decode(&data, Kind::Snapshot, path)?;
    let key = header.key(keys, path)?;
    let chunk = header.chunk_size as usize;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk) {
        return Err(Error::corrupted(path, Location::Header, "bad chunk size"));
    }
    let len = header.word;
    let nchunks = len.div_ceil(chunk as u64);
    let tag_len = trailer_entry_len(header.protection) as u64;
    let expected = (HEADER_LEN as u64)
        .checked_add(len)
        .and_then(|x| x.checked_add(nchunks.checked_mul(tag_len)?));
    let actual = data.len() as u64;
    match expected {
        Some(e) if e == actual => {}
        Some(e) if e > actual => {
            return Err(Error::corrupted(
                path,
                Location::Truncated {
                    expected: e,
                    actual,
                },
                "file shorter than its header says",
            ))
        }
        Some(e) => {
            return Err(Error::corrupted(
                path,
                Location::TrailingData { offset: e },
                "file longer than its header says",
            ))
        }
        None => return Err(Error::corrupted(path, Location::Header, "bad body length")),
    }
    let len = len as usize;
    let mut header_bytes = [0u8; HEADER_LEN];
    header_bytes.copy_from_slice(&data[..HEADER_LEN]);
    let rest = &mut data[HEADER_LEN..];
    let (body, trailer) = rest.split_at_mut(len);
    for (i, piece) in body.chunks_mut(chunk).enumerate() {
        let offset = (HEADER_LEN + i * chunk) as u64;
        let entry = &trailer[i * tag_len as usize..(i + 1) * tag_len as usize];
        let ok = match &key {
            Some(k) => k.decrypt(
                &nonce_at(&header.nonce, i as u64),
                &header_bytes,
                piece,
                entry,
            ),
            None => chunk_crc(i as u64, &[piece]) == le_u32(entry),
        };
        if !ok {
            return Err(Error::corrupted(
                path,
                Location::Body { offset },
                match key {
                    Some(_) => "chunk failed authentication",
                    None => "chunk checksum mismatch",
                },
            ));
        }
    }
    parse_plain(data, len, path)
}

const MIN_CHUNK_SIZE: usize = 4096;

fn trailer_entry_len(p: Protection) -> usize {
    match p {
        Protection::Crc32 => 4,
        Protection::Aes256Gcm => TAG_LEN,
    }
}

fn chunk_crc(index: u64, pieces: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    for p in pieces {
        h.update(p);
    }
    h.finalize()
}

/// The metadata that precedes the state in the plaintext body.
fn encode_meta(s: &Snapshot) -> Vec<u8> {
    let mut m = Vec::with_capacity(4 + s.store.len() + 28);
    m.extend_from_slice(&(s.store.len() as u32).to_le_bytes());
    m.extend_from_slice(s.store.as_bytes());
    m.extend_from_slice(&s.schema.to_le_bytes());
    m.extend_from_slice(&s.history_id.to_le_bytes());
    m.extend_from_slice(&s.seq.to_le_bytes());
    m.extend_from_slice(&(s.state.len() as u64).to_le_bytes());
    m
}

fn parse_plain(data: Vec<u8>, len: usize, path: &Path) -> Result<Snapshot, Error> {
    let bad = || {
        Error::corrupted(
            path,
            Location::Body {
                offset: HEADER_LEN as u64,
            },
            "bad snapshot metadata",
        )
    };
    let body = &data[HEADER_LEN..HEADER_LEN + len];
    if body.len() < 4 {
        return Err(bad());
    }
    let name_len = le_u32(body) as usize;
    let fixed = 4usize.checked_add(name_len).ok_or_else(bad)?;
    if body.len() < fixed + 28 {
        return Err(bad());
    }
    let store = std::str::from_utf8(&body[4..fixed])
        .map_err(|_| bad())?
        .to_owned();
    let schema = le_u32(&body[fixed..]);
    let history_id = le_u64(&body[fixed + 4..]);
    let seq = le_u64(&body[fixed + 12..]);
    let state_len = le_u64(&body[fixed + 20..]);
    let start = HEADER_LEN + fixed + 28;
    if state_len != (len - fixed - 28) as u64 {
        return Err(bad());
    }
    let state = Bytes::from(data).slice(start..HEADER_LEN + len);
    Ok(Snapshot {
        store,
        schema,
        history_id,
        seq,
        state,
    })
}

/// A part of the file being produced: borrowed from the snapshot, or a filled buffer.
enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

/// Where [`produce`] puts the file's bytes, in order.
trait Sink<'a> {
    fn put(&mut self, piece: Piece<'a>) -> io::Result<()>;
    /// An empty buffer to fill (recycled when possible).
    fn buffer(&mut self) -> Vec<u8>;
}

/// Writes directly into a `Write`, reusing one buffer.
struct DirectSink<'w, W: Write> {
    out: &'w mut W,
    spare: Vec<u8>,
}

impl<'a, W: Write> Sink<'a> for DirectSink<'_, W> {
    fn put(&mut self, piece: Piece<'a>) -> io::Result<()> {
        match piece {
            Piece::Borrowed(b) => self.out.write_all(b),
            Piece::Owned(v) => {
                let r = self.out.write_all(&v);
                self.spare = v;
                r
            }
        }
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.spare);
        v.clear();
        v
    }
}

/// Hands the pieces to a writer thread.
struct ChannelSink<'a> {
    tx: mpsc::SyncSender<Piece<'a>>,
    back: mpsc::Receiver<Vec<u8>>,
}

impl<'a> Sink<'a> for ChannelSink<'a> {
    fn put(&mut self, piece: Piece<'a>) -> io::Result<()> {
        self.tx
            .send(piece)
            .map_err(|_| io::Error::other("snapshot writer thread stopped"))
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut v = self.back.try_recv().unwrap_or_default();
        v.clear();
        v
    }
}

/// Encodes `s` (with `meta` from [`encode_meta`]) into `sink`: header, chunks, trailer.
fn produce<'a>(
    s: &'a Snapshot,
    meta: &'a [u8],
    key: Option<&Key>,
    chunk_size: usize,
    sink: &mut dyn Sink<'a>,
) -> io::Result<u64> {
    let chunk = chunk_size.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE);
    let len = meta.len() + s.state.len();
    let mut header = Header::new(Kind::Snapshot, key)?;
    header.chunk_size = chunk as u32;
    header.word = len as u64;
    let hb = header.encode();
    sink.put(Piece::Owned(hb.to_vec()))?;
    let nchunks = len.div_ceil(chunk);
    let mut trailer = Vec::with_capacity(nchunks * trailer_entry_len(header.protection));
    for i in 0..nchunks {
        let (a, b) = (i * chunk, ((i + 1) * chunk).min(len));
        let pieces = slices(meta, &s.state, a, b);
        match key {
            Some(k) => {
                let mut buf = sink.buffer();
                for p in &pieces {
                    buf.extend_from_slice(p);
                }
                let tag = k.encrypt(&nonce_at(&header.nonce, i as u64), &hb, &mut buf);
                trailer.extend_from_slice(&tag);
                sink.put(Piece::Owned(buf))?;
            }
            None => {
                trailer.extend_from_slice(&chunk_crc(i as u64, &pieces).to_le_bytes());
                for p in pieces {
                    sink.put(Piece::Borrowed(p))?;
                }
            }
        }
    }
    let total = (HEADER_LEN + len + trailer.len()) as u64;
    sink.put(Piece::Owned(trailer))?;
    Ok(total)
}

fn write_body(
    f: &mut impl Write,
    s: &Snapshot,
    key: Option<&Key>,
    chunk_size: usize,
) -> io::Result<u64> {
    let meta = encode_meta(s);
    let mut sink = DirectSink {
        out: f,
        spare: Vec::new(),
    };
    produce(s, &meta, key, chunk_size, &mut sink)
}

/// Like [`write_body`] into a file, with encryption on this thread and writing on a second
/// one. (Periodic `fdatasync`s during the write, to overlap disk work with encryption, measured
/// slower on ext4 than one at the end.)
fn write_body_pipelined(
    f: &File,
    s: &Snapshot,
    key: Option<&Key>,
    chunk_size: usize,
) -> io::Result<u64> {
    let meta = encode_meta(s);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Piece<'_>>(4);
        let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> io::Result<()> {
            for piece in rx {
                let data: &[u8] = match &piece {
                    Piece::Borrowed(b) => b,
                    Piece::Owned(v) => v,
                };
                let mut w = f;
                w.write_all(data)?;
                if let Piece::Owned(v) = piece {
                    let _ = back_tx.send(v);
                }
            }
            Ok(())
        });
        let mut sink = ChannelSink { tx, back: back_rx };
        let produced = produce(s, &meta, key, chunk_size, &mut sink);
        drop(sink);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("snapshot writer thread panicked")));
        written?;
        produced
    })
}

/// The pieces of `meta ++ state` in the byte range `a..b`.
fn slices<'a>(meta: &'a [u8], state: &'a [u8], a: usize, b: usize) -> Vec<&'a [u8]> {
    let m = meta.len();
    let mut v = Vec::with_capacity(2);
    if a < m {
        v.push(&meta[a..b.min(m)]);
    }
    if b > m {
        v.push(&state[a.max(m) - m..b - m]);
    }
    v
}
