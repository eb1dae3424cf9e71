//! `replimesh backup inspect|verify FILE [--key-file F]`.

use std::fmt::Write as _;
use std::path::Path;

use replimesh::backup::{self, KdfParams, KeyRing};

/// What the header of a backup file says (read without the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// `snapshot` or `journal`.
    pub kind: &'static str,
    /// Format version.
    pub version: u16,
    /// Encrypted (AES-256-GCM) or only checksummed (CRC-32).
    pub encrypted: bool,
    /// Argon2id parameters (encrypted files).
    pub kdf: Option<KdfParams>,
    /// Snapshot: plaintext body length; journal: base seq.
    pub word: u64,
    /// File size.
    pub size: u64,
}

/// Reads the header fields of a backup file (layout: `docs/backup-format.md`), with the
/// backup crate's checked reader ([`backup::FileHeader::read`]).
pub fn read_header(path: &Path) -> anyhow::Result<HeaderInfo> {
    let data = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let h = backup::FileHeader::read(&data, path)?;
    Ok(HeaderInfo {
        kind: match h.kind {
            backup::FileKind::Journal => "journal",
            _ => "snapshot",
        },
        version: h.version,
        encrypted: h.encrypted,
        kdf: h.kdf,
        word: h.word,
        size: data.len() as u64,
    })
}

/// `backup inspect`: prints the header, and with the key (or for an
/// unencrypted file) the snapshot's store, schema, history id and seq.
pub fn inspect(path: &Path, key_file: Option<&Path>) -> anyhow::Result<String> {
    let h = read_header(path)?;
    let mut out = String::new();
    let _ = writeln!(out, "file:       {}", path.display());
    let _ = writeln!(out, "kind:       {}", h.kind);
    let _ = writeln!(out, "format:     version {}", h.version);
    let _ = writeln!(out, "size:       {} bytes", h.size);
    match h.kdf {
        Some(k) => {
            let _ = writeln!(
                out,
                "protection: AES-256-GCM, key from Argon2id (m={} KiB, t={}, p={})",
                k.m_cost_kib, k.t_cost, k.p_cost
            );
        }
        None => {
            let _ = writeln!(out, "protection: none (CRC-32 checksums)");
        }
    }
    if h.kind == "journal" {
        let _ = writeln!(out, "base seq:   {}", h.word);
        return Ok(out);
    }
    let _ = writeln!(out, "state size: {} bytes", h.word);
    if h.encrypted && key_file.is_none() {
        let _ = writeln!(
            out,
            "(give --key-file to decrypt and show the store and seq)"
        );
        return Ok(out);
    }
    let s = read(path, key_file)?;
    let _ = writeln!(out, "store:      {}", s.store);
    let _ = writeln!(out, "schema:     {}", s.schema);
    let _ = writeln!(out, "history:    {:016x}", s.history_id);
    let _ = writeln!(out, "seq:        {}", s.seq);
    Ok(out)
}

/// `backup verify`: decrypts (or checksums) the whole file; errors name the problem.
pub fn verify(path: &Path, key_file: Option<&Path>) -> anyhow::Result<String> {
    let h = read_header(path)?;
    if h.kind == "journal" {
        let keys = keyring(key_file)?;
        let seg = backup::journal::read_segment(path, keys.as_ref())?;
        return Ok(format!(
            "ok: journal segment {} verified ({} records)\n",
            path.display(),
            seg.entries.len()
        ));
    }
    let s = read(path, key_file)?;
    Ok(format!(
        "ok: {} verified: store {} schema {} seq {} ({} state bytes)\n",
        path.display(),
        s.store,
        s.schema,
        s.seq,
        s.state.len()
    ))
}

fn keyring(key_file: Option<&Path>) -> anyhow::Result<Option<KeyRing>> {
    Ok(match key_file {
        None => None,
        Some(k) => {
            let pass = crate::config::read_secret("--key-file", k)?;
            Some(KeyRing::new(pass, KdfParams::default()))
        }
    })
}

fn read(path: &Path, key_file: Option<&Path>) -> anyhow::Result<backup::Snapshot> {
    let keys = keyring(key_file)?;
    Ok(backup::snapshot::read_snapshot(path, keys.as_ref())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn inspect_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.backup");
        let keyf = dir.path().join("k");
        std::fs::write(&keyf, "pw\n").unwrap();
        let key = backup::Key::generate(b"pw", KdfParams::insecure_fast()).unwrap();
        let snap = backup::Snapshot {
            store: "kv".into(),
            schema: 1,
            history_id: 7,
            seq: 42,
            state: Bytes::from_static(b"hello"),
        };
        backup::snapshot::write_snapshot(&path, &snap, Some(&key), 1 << 20).unwrap();
        let out = inspect(&path, None).unwrap();
        assert!(out.contains("AES-256-GCM"), "{out}");
        assert!(!out.contains("seq:"), "{out}");
        let out = inspect(&path, Some(&keyf)).unwrap();
        assert!(out.contains("seq:        42"), "{out}");
        assert!(verify(&path, Some(&keyf)).unwrap().starts_with("ok"));
        // Wrong key, missing key, damage.
        std::fs::write(&keyf, "other\n").unwrap();
        let e = verify(&path, Some(&keyf)).unwrap_err().to_string();
        assert!(e.contains("wrong key"), "{e}");
        assert!(verify(&path, None)
            .unwrap_err()
            .to_string()
            .contains("encrypted"));
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 20] ^= 1;
        std::fs::write(&path, &data).unwrap();
        std::fs::write(&keyf, "pw\n").unwrap();
        let e = verify(&path, Some(&keyf)).unwrap_err().to_string();
        assert!(e.contains("corrupted"), "{e}");
        std::fs::write(&path, b"garbage").unwrap();
        assert!(inspect(&path, None).is_err());
    }
}
