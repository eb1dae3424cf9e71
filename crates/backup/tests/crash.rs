//! Crash test with real processes: a child process records increments of a counter with
//! `FsyncPolicy::Always` and takes snapshots in the background; the parent kills it with
//! SIGKILL at random moments (at least 200 times), restarts it, and checks that every restart
//! loads a valid snapshot and that every action the child acknowledged (printed after `record`
//! returned) is present.
//!
//! The child is this test binary re-executed with `CHILD_ENV` set (hence `harness = false`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use replimesh_backup::{Backup, BackupConfig, Due, FsyncPolicy, KdfParams, Snapshot};

const CHILD_ENV: &str = "REPLIMESH_BACKUP_CRASH_CHILD";
/// `always` or `every` (the fsync policy of the child).
const POLICY_ENV: &str = "REPLIMESH_BACKUP_CRASH_POLICY";
/// Kills with `FsyncPolicy::Always` (every acknowledged action must survive).
const KILLS: usize = 200;
/// Kills with `FsyncPolicy::Every(2 ms)` (restarts must load a consistent prefix).
const KILLS_EVERY: usize = 50;
/// Padding that makes snapshot writes take long enough to be interrupted.
const PAD: usize = 64 * 1024;

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
    }
    if std::env::args().any(|a| a == "--list") {
        println!("crash_test: test");
        return;
    }
    parent(true, KILLS);
    parent(false, KILLS_EVERY);
    println!("test crash_test ... ok");
}

fn config(dir: &Path, always: bool) -> BackupConfig {
    BackupConfig::new(dir.join("counter.backup"))
        .key("crash test")
        .kdf(KdfParams::insecure_fast())
        .journal(if always {
            FsyncPolicy::Always
        } else {
            FsyncPolicy::Every(Duration::from_millis(2))
        })
        .count(if always { 4 } else { 300 })
}

fn snap(seq: u64, counter: u64) -> Snapshot {
    let mut state = vec![0u8; 8 + PAD];
    state[..8].copy_from_slice(&counter.to_le_bytes());
    state[8..16].copy_from_slice(&seq.to_le_bytes());
    Snapshot {
        store: "counter".into(),
        schema: 1,
        history_id: 0xc0ffee,
        seq,
        state: Bytes::from(state),
    }
}

fn child(dir: &Path) -> ! {
    // Never outlive a parent that died, and never hang the parent forever.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(20));
        eprintln!("child: watchdog: still running after 20 s");
        std::process::exit(3);
    });
    let out = std::io::stdout();
    let fail = |msg: String| -> ! {
        eprintln!("child: {msg}");
        std::process::exit(2)
    };
    let always = std::env::var(POLICY_ENV).map_or(true, |p| p == "always");
    let (backup, restored) =
        Backup::open(config(dir, always)).unwrap_or_else(|e| fail(format!("open: {e}")));
    let (mut seq, mut counter) = match restored {
        None => {
            backup
                .snapshot(snap(0, 0))
                .unwrap_or_else(|e| fail(format!("initial snapshot: {e}")));
            (0, 0)
        }
        Some(r) => {
            let s = &r.snapshot;
            if s.history_id != 0xc0ffee || s.store != "counter" || s.state.len() != 8 + PAD {
                fail(format!("bad snapshot {s:?}"));
            }
            let mut counter = u64::from_le_bytes(s.state[..8].try_into().unwrap_or_default());
            let mut last = s.seq;
            for e in &r.journal {
                if e.seq != last + 1 {
                    fail(format!("journal gap: {} after {last}", e.seq));
                }
                last = e.seq;
                counter += u64::from_le_bytes(e.action[..].try_into().unwrap_or_default());
            }
            (last, counter)
        }
    };
    if counter != seq {
        fail(format!("counter {counter} != seq {seq}"));
    }
    writeln!(out.lock(), "LOADED {seq}").unwrap_or_else(|e| fail(e.to_string()));
    loop {
        seq += 1;
        counter += 1;
        let due = backup
            .record(seq, &1u64.to_le_bytes())
            .unwrap_or_else(|e| fail(format!("record: {e}")));
        if always {
            // Acknowledge: the action is durable.
            writeln!(out.lock(), "{seq}").unwrap_or_else(|e| fail(e.to_string()));
        }
        if due == Due::Snapshot {
            // Sometimes a state captured a few actions ago (a snapshot lagging the journal).
            let lag = seq % 3;
            backup
                .snapshot(snap(seq - lag, counter - lag))
                .unwrap_or_else(|e| fail(format!("snapshot: {e}")));
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Kills and restarts the child `kills` times. With `always`, checks that every acknowledged
/// action survives; otherwise (actions are not acknowledged) that each restart loads a
/// consistent state (the child checks counter == seq and a gap-free journal).
fn parent(always: bool, kills: usize) {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("crash test (always: {always}) seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0u64; // highest seq any child acknowledged
    let mut verified = 0usize;
    let mut max_loaded = 0u64;
    for round in 0..=kills {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .env(POLICY_ENV, if always { "always" } else { "every" })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut lines = Vec::new();
        // One kill in eight hits the child during start-up (open, replay, new segment).
        let early = rng.next() % 8 == 0;
        if !early || round == kills {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            lines.push(line);
        }
        if round == kills {
            child.kill().unwrap();
            child.wait().unwrap();
        } else {
            let delay = if early {
                rng.next() % 3000
            } else {
                rng.next() % 25_000
            };
            std::thread::sleep(Duration::from_micros(delay));
            child.kill().unwrap(); // SIGKILL
            let status = child.wait().unwrap();
            if status.code().is_some() {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
                panic!("round {round}: child exited by itself ({status}): {err} (seed {seed})");
            }
        }
        lines.extend(stdout.lines().map_while(Result::ok));
        let mut it = lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty());
        let Some(first) = it.next() else { continue };
        let loaded: u64 = first
            .strip_prefix("LOADED ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("round {round}: bad first line {first:?}"));
        assert!(
            loaded >= acked,
            "round {round}: restart loaded seq {loaded} but seq {acked} was acknowledged (seed {seed})"
        );
        // What a restart loaded is on disk for good: the next restart cannot load less.
        assert!(
            loaded >= max_loaded,
            "round {round}: restart loaded seq {loaded} after an earlier one loaded {max_loaded} (seed {seed})"
        );
        verified += 1;
        max_loaded = loaded;
        for (expect, l) in (loaded + 1..).zip(it) {
            let s: u64 = l
                .parse()
                .unwrap_or_else(|_| panic!("round {round}: bad line {l:?}"));
            assert_eq!(s, expect, "round {round}: acknowledgements in order");
            acked = acked.max(s);
        }
    }
    // Every early kill is followed by a start that is waited for, so most rounds verify.
    assert!(
        verified >= kills / 2,
        "only {verified} restarts verified (seed {seed})"
    );
    assert!(max_loaded > 0, "no progress at all (seed {seed})");
    eprintln!(
        "crash test (always: {always}): {kills} kills, {verified} verified restarts, {acked} \
         actions acknowledged, last loaded seq {max_loaded}"
    );
}
