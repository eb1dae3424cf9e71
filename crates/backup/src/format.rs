//! The common file header of snapshot files and journal segments (see `docs/backup-format.md`).

use std::path::Path;

use crate::key::{KdfParams, Key, CHECK_LEN, NONCE_LEN, SALT_LEN};
use crate::{Error, Location};

/// Newest format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the version 1 header.
pub const HEADER_LEN: usize = 96;

/// Upper bounds on Argon2id parameters read from a file (a tampered header must not make us
/// allocate without limit).
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 1000;
const MAX_P_COST: u32 = 64;

pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"RPLMSNAP";
pub(crate) const JOURNAL_MAGIC: [u8; 8] = *b"RPLMJRNL";

/// Which file a header belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Snapshot,
    Journal,
}

impl Kind {
    fn magic(self) -> [u8; 8] {
        match self {
            Kind::Snapshot => SNAPSHOT_MAGIC,
            Kind::Journal => JOURNAL_MAGIC,
        }
    }
}

/// How the body of a file is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protection {
    /// CRC-32 checksums (no key configured).
    Crc32,
    /// AES-256-GCM with an Argon2id-derived key.
    Aes256Gcm,
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) kind: Kind,
    pub(crate) protection: Protection,
    pub(crate) params: KdfParams,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) check: [u8; CHECK_LEN],
    pub(crate) nonce: [u8; NONCE_LEN],
    /// Snapshot: plaintext bytes per chunk. Journal: 0.
    pub(crate) chunk_size: u32,
    /// Snapshot: plaintext length. Journal: base seq.
    pub(crate) word: u64,
    /// Journal: history id. Snapshot: 0.
    pub(crate) history_id: u64,
}

impl Header {
    pub(crate) fn new(kind: Kind, key: Option<&Key>) -> std::io::Result<Self> {
        Ok(match key {
            Some(k) => Self {
                kind,
                protection: Protection::Aes256Gcm,
                params: k.params(),
                salt: *k.salt(),
                check: *k.check(),
                nonce: crate::key::random_nonce()?,
                chunk_size: 0,
                word: 0,
                history_id: 0,
            },
            None => Self {
                kind,
                protection: Protection::Crc32,
                params: KdfParams {
                    m_cost_kib: 0,
                    t_cost: 0,
                    p_cost: 0,
                },
                salt: [0; SALT_LEN],
                check: [0; CHECK_LEN],
                nonce: [0; NONCE_LEN],
                chunk_size: 0,
                word: 0,
                history_id: 0,
            },
        })
    }

    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&self.kind.magic());
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[12] = match self.protection {
            Protection::Crc32 => 0,
            Protection::Aes256Gcm => 1,
        };
        h[16..20].copy_from_slice(&self.params.m_cost_kib.to_le_bytes());
        h[20..24].copy_from_slice(&self.params.t_cost.to_le_bytes());
        h[24..28].copy_from_slice(&self.params.p_cost.to_le_bytes());
        h[28..44].copy_from_slice(&self.salt);
        h[44..60].copy_from_slice(&self.check);
        h[60..72].copy_from_slice(&self.nonce);
        h[72..76].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[76..84].copy_from_slice(&self.word.to_le_bytes());
        h[84..92].copy_from_slice(&self.history_id.to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_LEN - 4]);
        h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header. Order of checks: length, magic, header checksum, version,
    /// fields.
    pub(crate) fn decode(bytes: &[u8], kind: Kind, path: &Path) -> Result<Self, Error> {
        let corrupt = |detail: &'static str| Error::corrupted(path, Location::Header, detail);
        if bytes.len() < 12 {
            return Err(Error::corrupted(
                path,
                Location::Truncated {
                    expected: HEADER_LEN as u64,
                    actual: bytes.len() as u64,
                },
                "file shorter than a header",
            ));
        }
        if bytes[0..8] != kind.magic() {
            let other = match kind {
                Kind::Snapshot => JOURNAL_MAGIC,
                Kind::Journal => SNAPSHOT_MAGIC,
            };
            return Err(corrupt(if bytes[0..8] == other {
                "magic of the other file kind (snapshot vs journal)"
            } else {
                "bad magic: not a replimesh backup file"
            }));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        let hlen = usize::from(u16::from_le_bytes([bytes[10], bytes[11]]));
        if hlen < 16 {
            return Err(corrupt("header length field too small"));
        }
        if bytes.len() < hlen {
            return Err(Error::corrupted(
                path,
                Location::Truncated {
                    expected: hlen as u64,
                    actual: bytes.len() as u64,
                },
                "file shorter than its header",
            ));
        }
        let stored = le_u32(&bytes[hlen - 4..hlen]);
        if crc32fast::hash(&bytes[..hlen - 4]) != stored {
            return Err(corrupt("header checksum mismatch"));
        }
        if version > FORMAT_VERSION {
            return Err(Error::NewerFormat {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version == 0 || hlen != HEADER_LEN {
            return Err(corrupt("bad version or header length"));
        }
        let protection = match bytes[12] {
            0 => Protection::Crc32,
            1 => Protection::Aes256Gcm,
            _ => return Err(corrupt("unknown protection")),
        };
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&bytes[28..44]);
        let mut check = [0u8; CHECK_LEN];
        check.copy_from_slice(&bytes[44..60]);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[60..72]);
        Ok(Self {
            kind,
            protection,
            params: KdfParams {
                m_cost_kib: le_u32(&bytes[16..20]),
                t_cost: le_u32(&bytes[20..24]),
                p_cost: le_u32(&bytes[24..28]),
            },
            salt,
            check,
            nonce,
            chunk_size: le_u32(&bytes[72..76]),
            word: le_u64(&bytes[76..84]),
            history_id: le_u64(&bytes[84..92]),
        })
    }

    /// Picks the key for this header from the key ring, checking the key check value.
    pub(crate) fn key(
        &self,
        keys: Option<&crate::KeyRing>,
        path: &Path,
    ) -> Result<Option<std::sync::Arc<Key>>, Error> {
        match (self.protection, keys) {
            (Protection::Crc32, None) => Ok(None),
            (Protection::Crc32, Some(_)) => Err(Error::NotEncrypted {
                path: path.to_path_buf(),
            }),
            (Protection::Aes256Gcm, None) => Err(Error::KeyRequired {
                path: path.to_path_buf(),
            }),
            (Protection::Aes256Gcm, Some(ring)) => {
                let p = self.params;
                if p.m_cost_kib > MAX_M_COST_KIB || p.t_cost > MAX_T_COST || p.p_cost > MAX_P_COST {
                    return Err(Error::corrupted(
                        path,
                        Location::Header,
                        "Argon2id parameters out of the accepted range",
                    ));
                }
                let key = ring.key_for(&self.salt, self.params)?;
                if key.check() != &self.check {
                    return Err(Error::WrongKey {
                        path: path.to_path_buf(),
                    });
                }
                Ok(Some(key))
            }
        }
    }
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Which backup file a [`FileHeader`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileKind {
    /// A snapshot file (magic `RPLMSNAP`).
    Snapshot,
    /// A journal segment (magic `RPLMJRNL`).
    Journal,
}

/// The common header of a backup file (snapshot or journal segment), read and checked without
/// the key: layout in `docs/backup-format.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileHeader {
    /// Snapshot or journal segment (from the magic).
    pub kind: FileKind,
    /// Format version.
    pub version: u16,
    /// Encrypted (AES-256-GCM) or only checksummed (CRC-32).
    pub encrypted: bool,
    /// The Argon2id parameters of the file's key (encrypted files only).
    pub kdf: Option<KdfParams>,
    /// Plaintext bytes per authenticated chunk (snapshots).
    pub chunk_size: u32,
    /// Snapshot: plaintext body length; journal segment: base seq.
    pub word: u64,
    /// The history id written in the header (journal segments; snapshot files keep theirs in
    /// the encrypted body).
    pub history_id: u64,
}

impl FileHeader {
    /// Reads the header at the start of `bytes` (the whole file or at least its first
    /// [`HEADER_LEN`] bytes), for a file of either kind. `path` is only used in errors.
    ///
    /// Checks, in order: length, magic, header checksum, version, fields. Never panics and
    /// allocates nothing, whatever the bytes: errors are [`Error::Corrupted`] (with
    /// [`Location::Header`] or [`Location::Truncated`]) or [`Error::NewerFormat`].
    pub fn read(bytes: &[u8], path: &Path) -> Result<FileHeader, Error> {
        let kind = if bytes.len() >= 8 && bytes[0..8] == JOURNAL_MAGIC {
            Kind::Journal
        } else {
            Kind::Snapshot
        };
        let h = Header::decode(bytes, kind, path)?;
        let encrypted = h.protection == Protection::Aes256Gcm;
        Ok(FileHeader {
            kind: match h.kind {
                Kind::Snapshot => FileKind::Snapshot,
                Kind::Journal => FileKind::Journal,
            },
            version: u16::from_le_bytes([bytes[8], bytes[9]]),
            encrypted,
            kdf: encrypted.then_some(h.params),
            chunk_size: h.chunk_size,
            word: h.word,
            history_id: h.history_id,
        })
    }
}
