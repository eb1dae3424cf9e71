//! Scenario `backup`: snapshot writes of a 100 MB state (encrypted and not, including fsync),
//! journal appends per second under each fsync policy, and key derivation time.
//! Run it with `cargo xtask bench backup`.
//!
//! Results go to stdout as JSON lines; progress to stderr. Environment: `BENCH_ROUNDS`
//! (default 3), `BENCH_STATE_MB` (default 100), `BENCH_JOURNAL_MS` (length of a journal
//! round, default 1000).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use backup::snapshot::{encode_snapshot_to, read_snapshot, write_snapshot, DEFAULT_CHUNK_SIZE};
use backup::{Backup, BackupConfig, FsyncPolicy, KdfParams, Key, KeyRing, Snapshot};
use bytes::Bytes;
use serde_json::{json, Value};

const SCENARIO: &str = "backup";
/// Size of a journaled action.
const ACTION_LEN: usize = 32;

fn main() -> Result<()> {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(170));
        eprintln!("bench-backup: watchdog: still running, exiting");
        std::process::exit(3);
    });
    let rounds = env_num("BENCH_ROUNDS", 3) as usize;
    let state_mb = env_num("BENCH_STATE_MB", 100);
    let journal_len = Duration::from_millis(env_num("BENCH_JOURNAL_MS", 1000));
    let dir = BenchDir::new()?;

    // Key derivation with the default parameters.
    let params = KdfParams::default();
    let mut times = Vec::new();
    for i in 0..rounds {
        let t = Instant::now();
        let _ = Key::derive(b"bench passphrase", [i as u8; 16], params)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let kdf_ms = median(&times);
    eprintln!("key derivation (Argon2id {params:?}): {kdf_ms:.1} ms");
    emit(
        "key_derivation",
        kdf_ms,
        "ms",
        json!({"m_cost_kib": params.m_cost_kib, "t_cost": params.t_cost, "p_cost": params.p_cost}),
    );

    // Snapshot writes of a large state.
    let key = KeyRing::new("bench passphrase", params);
    let write_key = key.write_key()?;
    let state = pseudo_random(state_mb as usize * 1_000_000);
    let snap = Snapshot {
        store: "bench".into(),
        schema: 1,
        history_id: 7,
        seq: 1_000_000,
        state: Bytes::from(state),
    };
    let path = dir.path().join("state.backup");
    let mb = snap.state.len() as f64 / 1e6;
    for encrypted in [true, false] {
        let k = encrypted.then_some(&*write_key);
        let mut write = Vec::new();
        let mut encode = Vec::new();
        let mut read = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            encode_snapshot_to(&mut std::io::sink(), &snap, k, DEFAULT_CHUNK_SIZE)?;
            encode.push(mb / t.elapsed().as_secs_f64());
            let t = Instant::now();
            write_snapshot(&path, &snap, k, DEFAULT_CHUNK_SIZE)?;
            write.push(mb / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let back = read_snapshot(&path, encrypted.then_some(&key))?;
            read.push(mb / t.elapsed().as_secs_f64());
            anyhow::ensure!(
                back.state.len() == snap.state.len(),
                "read back a different state"
            );
        }
        let p = json!({"encrypted": encrypted, "state_mb": state_mb, "chunk": DEFAULT_CHUNK_SIZE});
        let (w, e, r) = (median(&write), median(&encode), median(&read));
        eprintln!(
            "snapshot {state_mb} MB encrypted={encrypted}: write+fsync {w:.0} MB/s, encode to a sink (CPU only) {e:.0} MB/s, read+verify {r:.0} MB/s"
        );
        emit("snapshot_write", w, "MB/s", p.clone());
        emit("snapshot_encode", e, "MB/s", p.clone());
        emit("snapshot_read", r, "MB/s", p);
    }
    std::fs::remove_file(&path).ok();

    // Journal appends.
    let policies = [
        ("every_10ms", FsyncPolicy::Every(Duration::from_millis(10))),
        ("never", FsyncPolicy::Never),
        ("always", FsyncPolicy::Always),
    ];
    for encrypted in [true, false] {
        for (name, policy) in policies {
            let mut rates = Vec::new();
            for round in 0..rounds {
                let sub = dir.path().join(format!("j-{name}-{encrypted}-{round}"));
                rates.push(journal_round(&sub, policy, encrypted, params, journal_len)?);
                std::fs::remove_dir_all(&sub).ok();
            }
            let rate = median(&rates);
            eprintln!("journal fsync={name} encrypted={encrypted}: {rate:.0} actions/s");
            emit(
                "journal_appends",
                rate,
                "actions/s",
                json!({"fsync": name, "encrypted": encrypted, "action_bytes": ACTION_LEN}),
            );
        }
    }
    Ok(())
}

/// Records actions for `length`, then flushes (with fsync): actions per second overall.
fn journal_round(
    dir: &Path,
    policy: FsyncPolicy,
    encrypted: bool,
    params: KdfParams,
    length: Duration,
) -> Result<f64> {
    let mut cfg = BackupConfig::new(dir.join("j.backup"))
        .journal(policy)
        .kdf(params);
    if encrypted {
        cfg = cfg.key("bench passphrase");
    }
    let (backup, _) = Backup::open(cfg).context("opening the journal bench backup")?;
    backup.snapshot(Snapshot {
        store: "bench".into(),
        schema: 1,
        history_id: 7,
        seq: 0,
        state: Bytes::from_static(b"initial"),
    })?;
    let action = [0x5au8; ACTION_LEN];
    let start = Instant::now();
    let mut seq = 0u64;
    'outer: loop {
        for _ in 0..256 {
            seq += 1;
            let _ = backup.record(seq, &action)?;
            if policy == FsyncPolicy::Always && start.elapsed() >= length {
                break 'outer;
            }
        }
        if start.elapsed() >= length {
            break;
        }
    }
    backup.flush()?;
    let rate = seq as f64 / start.elapsed().as_secs_f64();
    backup.shutdown(None)?;
    Ok(rate)
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn emit(metric: &str, value: f64, unit: &str, params: Value) {
    let line = json!({"scenario": SCENARIO, "metric": metric, "value": value, "unit": unit, "params": params});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A private directory on the machine's disk (the system temp dir), removed on drop.
struct BenchDir(PathBuf);

impl BenchDir {
    fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!("replimesh-bench-backup-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
