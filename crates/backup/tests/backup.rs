//! Behaviour of the `Backup` handle: restore, policies, journal rotation, bad files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use replimesh_backup::journal::list_segments;
use replimesh_backup::{
    Backup, BackupConfig, Due, Error, FsyncPolicy, KdfParams, OnBadFile, Persistence, Snapshot,
};

fn snap(seq: u64, counter: u64) -> Snapshot {
    Snapshot {
        store: "counter".into(),
        schema: 2,
        history_id: 0xfeed,
        seq,
        state: Bytes::copy_from_slice(&counter.to_le_bytes()),
    }
}

fn config(path: &Path) -> BackupConfig {
    BackupConfig::new(path)
        .key("pw")
        .kdf(KdfParams::insecure_fast())
        .journal(FsyncPolicy::Always)
}

/// Applies a restore to a counter state: (counter, last seq, history id).
fn replay(r: &replimesh_backup::Restored) -> (u64, u64, u64) {
    let mut c = u64::from_le_bytes(r.snapshot.state[..].try_into().unwrap());
    let mut last = r.snapshot.seq;
    for e in &r.journal {
        assert_eq!(e.seq, last + 1, "journal is contiguous");
        last = e.seq;
        c += u64::from_le_bytes(e.action[..].try_into().unwrap());
    }
    (c, r.last_seq(), r.snapshot.history_id)
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.backup");
    (dir, path)
}

fn run(backup: &Backup, from: u64, to: u64, counter: &mut u64) {
    for seq in from..=to {
        *counter += 1;
        if backup.record(seq, &1u64.to_le_bytes()).unwrap() == Due::Snapshot {
            backup.snapshot(snap(seq, *counter)).unwrap();
        }
    }
}

#[test]
fn restart_keeps_history_and_seq_for_every_policy() {
    for policy in [
        FsyncPolicy::Always,
        FsyncPolicy::Every(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        for key in [true, false] {
            let (_d, path) = tmp();
            let mut cfg = config(&path).journal(policy).count(7);
            if !key {
                cfg.key = None;
            }
            let (b, r) = Backup::open(cfg.clone()).unwrap();
            assert!(r.is_none());
            assert!(matches!(b.record(1, b"x"), Err(Error::NotStarted)));
            b.snapshot(snap(0, 0)).unwrap();
            let mut counter = 0;
            run(&b, 1, 40, &mut counter);
            drop(b); // like a crash of the store (the journal buffer is flushed on drop)

            let (b, r) = Backup::open(cfg.clone()).unwrap();
            let r = r.unwrap();
            assert_eq!(replay(&r), (40, 40, 0xfeed), "{policy:?} key {key}");
            assert_eq!(r.snapshot.store, "counter");
            assert_eq!(r.snapshot.schema, 2);
            assert_eq!(b.last_seq(), 40);
            run(&b, 41, 50, &mut counter);
            b.shutdown(Some(snap(50, counter))).unwrap();
            assert!(matches!(b.record(51, b"x"), Err(Error::Closed)));
            drop(b);

            let (_b, r) = Backup::open(cfg).unwrap();
            let r = r.unwrap();
            assert!(r.journal.is_empty(), "final snapshot covers the journal");
            assert_eq!(replay(&r), (50, 50, 0xfeed));
        }
    }
}

#[test]
fn snapshot_rotates_the_journal() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    let mut counter = 0;
    run(&b, 1, 10, &mut counter);
    assert_eq!(list_segments(&path).unwrap().len(), 1);
    b.snapshot_now(snap(10, counter)).unwrap();
    let segs = list_segments(&path).unwrap();
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(segs[0].0, 10);
    run(&b, 11, 12, &mut counter);
    // snapshot_with: the state is produced on the background thread.
    b.snapshot_with(12, move || snap(12, counter)).unwrap();
    b.shutdown(None).unwrap();
    drop(b);
    let segs = list_segments(&path).unwrap();
    assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![12]);
    let (_b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (12, 12, 0xfeed));
}

#[test]
fn count_and_timeout_policies() {
    let (_d, path) = tmp();
    let cfg = config(&path).count(3).timeout(Duration::from_secs(3600));
    let (b, _) = Backup::open(cfg).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    assert_eq!(b.deadline(), None);
    assert!(!b.is_due());
    assert_eq!(b.record(1, b"a").unwrap(), Due::No);
    let d = b.deadline().expect("a change starts the timeout");
    assert_eq!(b.record(2, b"a").unwrap(), Due::No);
    assert_eq!(
        b.deadline(),
        Some(d),
        "deadline counts from the first change"
    );
    assert_eq!(b.record(3, b"a").unwrap(), Due::Snapshot);
    assert!(b.is_due());
    b.snapshot(snap(3, 3)).unwrap();
    assert_eq!(b.deadline(), None);
    assert!(!b.is_due());

    let (_d2, path2) = tmp();
    let (b, _) = Backup::open(config(&path2).timeout(Duration::ZERO)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    assert_eq!(b.record(1, b"a").unwrap(), Due::No);
    assert!(b.is_due(), "zero timeout is due at once");
}

#[test]
fn out_of_order_seq_is_refused() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(5, 0)).unwrap();
    assert!(matches!(
        b.record(5, b"a"),
        Err(Error::SeqOutOfOrder { last: 5, got: 5 })
    ));
    assert_eq!(b.record(6, b"a").unwrap(), Due::No);
    // A snapshot may lag behind the journal, but not behind an earlier snapshot.
    assert!(matches!(
        b.snapshot(snap(4, 0)),
        Err(Error::SeqOutOfOrder { last: 5, got: 4 })
    ));
}

#[test]
fn key_errors_at_open() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    drop(b);
    let mut wrong = config(&path).key("other");
    let r = Backup::open(wrong.clone());
    assert!(matches!(r, Err(Error::WrongKey { .. })), "{r:?}");
    // A wrong key is never "fixed" by moving the file aside.
    wrong.on_bad_file = OnBadFile::MoveAside;
    assert!(matches!(Backup::open(wrong), Err(Error::WrongKey { .. })));
    let mut none = config(&path);
    none.key = None;
    assert!(matches!(Backup::open(none), Err(Error::KeyRequired { .. })));
    assert!(Backup::open(config(&path)).unwrap().1.is_some());
}

#[test]
fn corrupted_snapshot_fails_or_moves_aside() {
    let (dir, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 3, &mut 0);
    drop(b);
    let mut data = std::fs::read(&path).unwrap();
    let n = data.len();
    data[n - 3] ^= 0x10;
    std::fs::write(&path, &data).unwrap();

    let r = Backup::open(config(&path));
    assert!(matches!(r, Err(Error::Corrupted { .. })), "{r:?}");
    assert_eq!(std::fs::read(&path).unwrap(), data, "file untouched");

    let (b, r) = Backup::open(config(&path).on_bad_file(OnBadFile::MoveAside)).unwrap();
    assert!(r.is_none(), "starts empty");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("store.backup.bad-")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n.contains(".orphan-")), "{names:?}");
    assert!(!path.exists());
    b.snapshot(snap(0, 0)).unwrap();
    drop(b);
    assert!(Backup::open(config(&path)).unwrap().1.is_some());
}

#[test]
fn corrupted_journal_record_fails() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 5, &mut 0);
    drop(b);
    let (_, seg) = list_segments(&path).unwrap().remove(0);
    let mut data = std::fs::read(&seg).unwrap();
    data[replimesh_backup::HEADER_LEN + 10] ^= 1;
    std::fs::write(&seg, &data).unwrap();
    let r = Backup::open(config(&path));
    assert!(
        matches!(
            r,
            Err(Error::Corrupted {
                location: replimesh_backup::Location::Record { index: 0, .. },
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn torn_journal_tail_is_dropped_and_restart_continues() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 5, &mut 0);
    drop(b);
    let (_, seg) = list_segments(&path).unwrap().remove(0);
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    let (b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (4, 4, 0xfeed));
    let mut c = 4;
    run(&b, 5, 9, &mut c);
    drop(b);
    let (_b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (9, 9, 0xfeed));
}

#[test]
fn persistence_trait_object() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path).count(2)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    let p: &dyn Persistence = &b;
    assert_eq!(p.record(1, &1u64.to_le_bytes()).unwrap(), Due::No);
    assert_eq!(p.record(2, &1u64.to_le_bytes()).unwrap(), Due::Snapshot);
    p.snapshot(snap(2, 2)).unwrap();
    p.shutdown(None).unwrap();
}

#[test]
fn no_journal_loses_only_unsnapshotted_actions() {
    let (_d, path) = tmp();
    let mut cfg = config(&path).count(4);
    cfg.journal = None;
    let (b, _) = Backup::open(cfg.clone()).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 10, &mut 0);
    b.flush().unwrap();
    drop(b);
    assert!(list_segments(&path).unwrap().is_empty());
    let (_b, r) = Backup::open(cfg).unwrap();
    assert_eq!(replay(&r.unwrap()), (8, 8, 0xfeed));
}

#[test]
fn first_snapshot_with_closure_starts_the_journal() {
    let (_d, path) = tmp();
    let (b, r) = Backup::open(config(&path)).unwrap();
    assert!(r.is_none());
    b.snapshot_with(0, || snap(0, 0)).unwrap();
    assert!(
        path.exists(),
        "the first snapshot is written before snapshot_with returns"
    );
    run(&b, 1, 3, &mut 0);
    drop(b);
    let (_b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (3, 3, 0xfeed));
}

fn plain(path: &Path) -> BackupConfig {
    let mut c = config(path);
    c.key = None;
    c
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes a journal segment by hand.
fn write_segment(path: &Path, base: u64, history: u64, seqs: std::ops::RangeInclusive<u64>) {
    use replimesh_backup::journal::{segment_path, SegmentEncoder};
    let mut enc = SegmentEncoder::new(base, history, None).unwrap();
    let mut out = enc.header().to_vec();
    for s in seqs {
        enc.encode(s, &1u64.to_le_bytes(), &mut out).unwrap();
    }
    std::fs::write(segment_path(path, base), out).unwrap();
}

#[test]
fn segments_after_a_gap_or_of_another_history_are_moved_aside() {
    let (dir, path) = tmp();
    let (b, _) = Backup::open(plain(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 5, &mut 0);
    drop(b);
    write_segment(&path, 10, 0xfeed, 11..=12); // after a gap (6..=10 missing)
    let (b, r) = Backup::open(plain(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (5, 5, 0xfeed));
    drop(b);
    let n = names(dir.path());
    assert!(
        n.iter()
            .any(|f| f.starts_with("store.backup.journal.00000000000000000010.orphan-")),
        "{n:?}"
    );

    write_segment(&path, 5, 0xbad, 6..=7); // another history, continuing the seqs
    let (_b, r) = Backup::open(plain(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (5, 5, 0xfeed));
}

#[test]
fn journal_without_snapshot_fails_or_moves_aside() {
    let (dir, path) = tmp();
    write_segment(&path, 0, 0xfeed, 1..=3);
    let r = Backup::open(plain(&path));
    assert!(matches!(r, Err(Error::OrphanJournal { .. })), "{r:?}");
    let (_b, r) = Backup::open(plain(&path).on_bad_file(OnBadFile::MoveAside)).unwrap();
    assert!(r.is_none());
    let n = names(dir.path());
    // Besides the backup's lock file.
    assert!(
        n.iter()
            .filter(|f| f.as_str() != "store.backup.lock")
            .all(|f| f.contains(".orphan-")),
        "{n:?}"
    );
}

/// One process per backup path: a second open of the same path fails with
/// `Locked`, naming the path and the holder's pid, and touches nothing; once
/// the first is gone the path opens again.
#[test]
fn a_second_opener_of_the_same_path_is_refused() {
    let (_dir, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 3, &mut 0);
    match Backup::open(config(&path)) {
        Err(e @ Error::Locked { .. }) => {
            let Error::Locked { path: p, pid } = &e else {
                unreachable!()
            };
            assert_eq!(p, &path);
            assert_eq!(*pid, Some(std::process::id()));
            let msg = e.to_string();
            assert!(
                msg.contains("store.backup")
                    && msg.contains(&format!("pid {}", std::process::id())),
                "{msg}"
            );
        }
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    run(&b, 4, 5, &mut 3);
    drop(b);
    let (_b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (5, 5, 0xfeed));
}

#[test]
fn corrupted_journal_segment_moved_aside_keeps_the_prefix() {
    let (dir, path) = tmp();
    let (b, _) = Backup::open(plain(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 4, &mut 0);
    drop(b); // segment 0: 1..=4
    let (b, _) = Backup::open(plain(&path)).unwrap();
    let mut c = 4;
    run(&b, 5, 8, &mut c);
    drop(b); // segment 4: 5..=8
    let segs = list_segments(&path).unwrap();
    assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![0, 4]);
    let mut data = std::fs::read(&segs[1].1).unwrap();
    data[replimesh_backup::HEADER_LEN + 9] ^= 4;
    std::fs::write(&segs[1].1, &data).unwrap();
    assert!(matches!(
        Backup::open(plain(&path)),
        Err(Error::Corrupted { .. })
    ));
    let (_b, r) = Backup::open(plain(&path).on_bad_file(OnBadFile::MoveAside)).unwrap();
    assert_eq!(replay(&r.unwrap()), (4, 4, 0xfeed));
    let n = names(dir.path());
    assert!(
        n.iter()
            .any(|f| f.starts_with("store.backup.journal.00000000000000000004.bad-")),
        "{n:?}"
    );
}

#[test]
fn action_size_limit() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(plain(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    let big = vec![0u8; replimesh_backup::journal::MAX_ACTION_LEN + 1];
    assert!(matches!(
        b.record(1, &big),
        Err(Error::ActionTooLarge { .. })
    ));
    assert_eq!(b.record(1, b"ok").unwrap(), Due::No);
}

#[test]
fn debug_output_hides_the_passphrase() {
    let c = BackupConfig::new("x").key("hunter2");
    let s = format!("{c:?}");
    assert!(!s.contains("hunter2"), "{s}");
    assert!(s.contains("redacted"), "{s}");
}

#[test]
fn snapshot_lagging_behind_the_journal() {
    for key in [true, false] {
        let (_d, path) = tmp();
        let mut cfg = config(&path);
        if !key {
            cfg.key = None;
        }
        let (b, _) = Backup::open(cfg.clone()).unwrap();
        b.snapshot(snap(0, 0)).unwrap();
        let mut c = 0;
        run(&b, 1, 10, &mut c);
        // A state captured after action 5, handed over after action 10.
        b.snapshot_now(snap(5, 5)).unwrap();
        run(&b, 11, 12, &mut c);
        drop(b);
        let (b, r) = Backup::open(cfg.clone()).unwrap();
        let r = r.unwrap();
        assert_eq!(r.snapshot.seq, 5);
        assert_eq!(replay(&r), (12, 12, 0xfeed));
        // A snapshot at the head covers every segment but the current one.
        b.snapshot_now(snap(12, 12)).unwrap();
        let segs = list_segments(&path).unwrap();
        assert_eq!(segs.iter().map(|s| s.0).collect::<Vec<_>>(), vec![12]);
        drop(b);
        let (_b, r) = Backup::open(cfg).unwrap();
        assert_eq!(replay(&r.unwrap()), (12, 12, 0xfeed));
    }
}

#[test]
fn new_history_replaces_the_old_one() {
    let (_d, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    run(&b, 1, 10, &mut 0);
    let mut fresh = snap(0, 0);
    fresh.history_id = 0xbeef;
    b.snapshot(fresh).unwrap();
    assert_eq!(list_segments(&path).unwrap().len(), 1);
    run(&b, 1, 3, &mut 0);
    drop(b);
    let (_b, r) = Backup::open(config(&path)).unwrap();
    assert_eq!(replay(&r.unwrap()), (3, 3, 0xbeef));
}

/// Group commit under `Always`: actions given to `append` are written as one
/// journal record by `commit` (one fsync), survive a crash after it, and a
/// snapshot switching segments in between keeps them; `record` after
/// `append` writes the appended ones first.
#[test]
fn append_and_commit_write_one_record_per_group() {
    let (_dir, path) = tmp();
    let (b, _) = Backup::open(config(&path)).unwrap();
    b.snapshot(snap(0, 0)).unwrap();
    for seq in 1..=5 {
        assert_eq!(b.append(seq, &1u64.to_le_bytes()).unwrap(), Due::No);
    }
    b.commit().unwrap();
    let seg = list_segments(&path).unwrap().last().unwrap().1.clone();
    let contents = replimesh_backup::journal::read_segment(
        &seg,
        Some(&replimesh_backup::KeyRing::new(
            "pw",
            KdfParams::insecure_fast(),
        )),
    )
    .unwrap();
    assert_eq!(contents.entries.len(), 5);
    // One record: the segment is the header, one record head, 5 entries and one tag.
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    assert_eq!(
        len,
        replimesh_backup::HEADER_LEN
            + replimesh_backup::journal::RECORD_HEAD_LEN
            + 5 * (replimesh_backup::journal::ENTRY_OVERHEAD + 8)
            + 16
    );
    // Appended, then a snapshot behind them switches segments, then record.
    let _ = b.append(6, &1u64.to_le_bytes()).unwrap();
    b.snapshot(snap(5, 5)).unwrap();
    let _ = b.append(7, &1u64.to_le_bytes()).unwrap();
    let _ = b.record(8, &1u64.to_le_bytes()).unwrap();
    b.commit().unwrap();
    drop(b); // a crash: no final snapshot
    let (_b, r) = Backup::open(config(&path)).unwrap();
    let (counter, last, _) = replay(&r.unwrap());
    assert_eq!((counter, last), (8, 8));
}
