//! Findings 1, 5, 6, 9 and 10: the stores (durable writes, the duplicate
//! table, error frames, the backup lock, exactly-once).

use std::time::{Duration, Instant};

use replimesh::proto::{self, frame::Body, Frame};
use replimesh::store::{Encoding, Reducer};
use replimesh_cli::reducers::{CounterAction, CounterReducer};

use crate::harness::{metric, serial, start_node, tmpdir, Probe, Raw, Watch, T};

/// A `counter` store (login `app`) with a backup whose journal fsyncs every
/// commit (`always`, the node's default).
const DURABLE_COUNTER: &str = r#"
[[store]]
name = "counter"
reducer = "counter"
logins = { app = "PHC" }
[store.backup]
path = "counter.backup"
journal = "always"
"#;

fn durable_counter() -> String {
    DURABLE_COUNTER.replace("PHC", &crate::harness::phc())
}

fn counter_schema() -> u32 {
    CounterReducer {
        name: "counter".into(),
    }
    .schema()
}

fn add(n: i64) -> bytes::Bytes {
    Encoding::Binary.encode(&CounterAction::Add(n)).unwrap()
}

fn dispatch(store: &str, op_id: u64, actions: Vec<bytes::Bytes>, client_id: &str) -> Frame {
    let mut it = actions.into_iter();
    let action = it.next().unwrap_or_default();
    Frame::new(Body::Dispatch(proto::Dispatch {
        store: store.into(),
        op_id,
        action,
        more: it.collect(),
        client_id: client_id.into(),
    }))
}

/// Finding 1: two connections send `Dispatch` frames of 1,000 actions to a
/// store whose journal fsyncs every commit, each as fast as the node commits
/// them (the next frame once the last is committed), for 4 s. The node at 87102c1 fsynced under the store's lock on the
/// runtime's worker threads: echo requests and dispatches to another store
/// waited seconds (3.3 s and 13.3 s in the issue; with two flooding
/// connections the node froze). Now the journal has a thread of its own
/// with group commit, and a full journal queue pushes back on the flooding
/// sockets only. Bound: RSS +128 MiB (the journal queue holds at most
/// 65,536 actions plus one batch per connection).
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn dispatch_flood_on_a_durable_store_freezes_nothing() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "", &durable_counter());
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::dispatch(&node.url).await,
    ];
    let watch = Watch::start("finding 1 (dispatch flood, journal always)", &node, probes);
    let batch: Vec<_> = (0..1000).map(|_| add(1)).collect();
    let mut floods = Vec::new();
    for i in 0..2 {
        let mut c = Raw::replica(
            &node.url,
            "counter",
            counter_schema(),
            &format!("flood-{i}"),
        )
        .await;
        let batch = batch.clone();
        floods.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(4);
            let mut op = 1;
            while Instant::now() < end {
                c.send(&dispatch("counter", op, batch.clone(), ""))
                    .await
                    .unwrap();
                // The next frame once this one is committed (fsynced).
                loop {
                    match answer(&mut c).await.body {
                        Some(Body::Committed(x)) if x.op_id == op => break,
                        Some(Body::Committed(_)) => continue,
                        other => panic!("flood frame not committed: {other:?}"),
                    }
                }
                op += 1000;
            }
            op / 1000
        }));
    }
    let mut frames = 0;
    for f in floods {
        frames += f.await.unwrap();
    }
    let r = watch.finish().await;
    let seq = metric(&node, "replimesh_store_seq", Some(("store", "counter"))).await;
    println!("finding 1: {frames} frames of 1,000 actions sent, counter seq {seq}");
    assert!(seq > 0.0, "nothing was committed");
    r.check(128);
}

/// Finding 5: one login sends `Dispatch` frames for 3,000 made-up client
/// ids, each at op ids 1 and 32,768, with actions that do not decode. At
/// 87102c1 each client id took a window of 32,768 op ids that was never
/// forgotten (+1,002 MiB kept for 2,000 ids). Now one login is remembered
/// with at most 1,024 client ids and the table stores the op ids it saw
/// (sparse, with digests). Bound: RSS +64 MiB.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn made_up_client_ids_do_not_inflate_the_duplicate_table() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "", "");
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::dispatch(&node.url).await,
    ];
    let watch = Watch::start("finding 5 (made-up client ids)", &node, probes);
    let mut c = Raw::replica(&node.url, "kv", kv_schema(), "inflater").await;
    c.drain();
    let bad = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
    let ids = 3_000;
    for i in 0..ids {
        for op in [1, 32_768] {
            let f = dispatch("kv", op, vec![bad.clone()], &format!("made-up-{i:05}"));
            tokio::time::timeout(T, c.send(&f)).await.unwrap().unwrap();
        }
    }
    // Every frame is answered (an error or a commit) once it was handled.
    let answered = testkit::eventually(Duration::from_secs(30), || {
        let got = c.received();
        async move { got.count("store_error") + got.count("committed") >= 2 * ids || got.ended }
    })
    .await;
    let r = watch.finish().await;
    let got = c.received();
    println!("finding 5: {:?}", got.kinds);
    assert!(
        answered && !got.ended,
        "the frames were not all answered: {got:?}"
    );
    r.check(64);
}

fn kv_schema() -> u32 {
    replimesh_cli::reducers::Kv { name: "kv".into() }.schema()
}

/// Finding 6: one frame of 200,000 actions that do not decode, 300 frames
/// with a 1 KiB client id, and a 256 KiB client id on 20 frames to a store
/// with a backup. At 87102c1 each bad action got its own error frame (1 M
/// frames back for one 3 MB frame, +629 MiB), long client ids were kept
/// (1.1 GiB peak) and written to the backup (1.3 MB -> 53.7 MB). Now a
/// frame over `max_dispatch_batch` (4,096) is refused whole with one
/// `StoreError`, a client id over 128 bytes is refused, and the backup does
/// not grow. Bound: RSS +64 MiB; at most one error frame per frame sent.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn bad_batches_and_huge_client_ids_get_one_error_each() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "", &durable_counter());
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::dispatch(&node.url).await,
    ];
    let watch = Watch::start("finding 6 (per-action amplification)", &node, probes);
    let backup_before = backup_bytes(dir.path());

    let mut c = Raw::replica(&node.url, "counter", counter_schema(), "amplifier").await;
    c.drain();
    let bad = bytes::Bytes::from_static(&[0xff]);
    let mut sent = 0;
    c.send(&dispatch("counter", 1, vec![bad.clone(); 200_000], ""))
        .await
        .unwrap();
    sent += 1;
    let long_id = "x".repeat(1024);
    for i in 0..300 {
        let f = dispatch("counter", 10 + i, vec![bad.clone(); 10], &long_id);
        tokio::time::timeout(T, c.send(&f)).await.unwrap().unwrap();
        sent += 1;
    }
    let huge_id = "y".repeat(256 * 1024);
    for i in 0..20 {
        let f = dispatch("counter", 1_000 + 200 * i, vec![add(1); 200], &huge_id);
        tokio::time::timeout(T, c.send(&f)).await.unwrap().unwrap();
        sent += 1;
    }
    let answered = testkit::eventually(Duration::from_secs(20), || {
        let got = c.received();
        async move { got.count("store_error") >= sent || got.ended }
    })
    .await;
    // Anything more would come right after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = watch.finish().await;
    let got = c.received();
    let backup_after = backup_bytes(dir.path());
    println!(
        "finding 6: {sent} frames sent, received {:?}, backup {backup_before} -> {backup_after} bytes",
        got.kinds
    );
    assert!(answered, "not every bad frame was answered: {got:?}");
    assert!(
        got.count("store_error") <= sent,
        "{} errors for {sent} frames",
        got.count("store_error")
    );
    assert_eq!(got.count("committed"), 0, "{got:?}");
    assert!(
        backup_after <= backup_before + 64 * 1024,
        "the backup grew from {backup_before} to {backup_after} bytes"
    );
    r.check(64);
}

/// Bytes of the counter's backup files (snapshot, journal).
fn backup_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("counter.backup")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Finding 9: a second node on the same backup path. At 87102c1 both ran
/// and acknowledged dispatches, and a restart lost one node's. Now the
/// second fails at start-up (exit code 1) naming the path and the holder's
/// pid, and the first goes on serving its store. Bound: RSS +32 MiB.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn a_second_node_on_the_same_backup_path_refuses_to_start() {
    let _one = serial().await;
    let dir = tmpdir();
    let first = start_node(dir.path(), "", &durable_counter());
    let probes = vec![
        Probe::echo(&first.url).await,
        Probe::dispatch(&first.url).await,
    ];
    let watch = Watch::start("finding 9 (two nodes, one backup path)", &first, probes);
    // The same config in another file: the same backup path.
    let path = dir.path().join("second.toml");
    let toml = std::fs::read_to_string(dir.path().join("node.toml")).unwrap();
    std::fs::write(&path, toml.replace("id = \"target\"", "id = \"second\"")).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_replimesh"))
        .args(["node", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second node on the same backup path is still running");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    // The first node still commits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = watch.finish().await;
    println!(
        "finding 9: second node exited with {status}: {}",
        err.trim()
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("counter.backup"),
        "does not name the path: {err}"
    );
    assert!(
        err.contains(&first.pid().to_string()),
        "does not name the holder's pid {}: {err}",
        first.pid()
    );
    r.check(32);
}

/// Finding 10: a client restarts with the same client id and numbers its
/// ops from 1 again, with another action; then it sends op id 2^64 - 1 with
/// two more actions in the same frame. At 87102c1 the first was answered
/// `committed seq 1` (the earlier action's) and never applied, and the op
/// ids wrapped to 0 and 1 and were answered "handled before". Now both are
/// refused with a `StoreError` and nothing else is committed. Bound: RSS
/// +32 MiB.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn a_reused_op_id_with_another_action_is_refused() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "", &durable_counter());
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::dispatch(&node.url).await,
    ];
    let watch = Watch::start("finding 10 (op ids reused, op id wrap)", &node, probes);

    let mut first = Raw::replica(&node.url, "counter", counter_schema(), "stable").await;
    first
        .send(&dispatch("counter", 1, vec![add(1)], ""))
        .await
        .unwrap();
    let committed = answer(&mut first).await;
    assert!(
        matches!(&committed.body, Some(Body::Committed(c)) if c.op_id == 1 && c.seq == 1),
        "{committed:?}"
    );
    drop(first);

    let mut again = Raw::replica(&node.url, "counter", counter_schema(), "stable").await;
    again
        .send(&dispatch("counter", 1, vec![add(5)], ""))
        .await
        .unwrap();
    let reused = answer(&mut again).await;
    assert!(
        matches!(&reused.body, Some(Body::StoreError(_))),
        "op id 1 with another action: {reused:?}"
    );
    again
        .send(&dispatch("counter", u64::MAX, vec![add(1); 3], ""))
        .await
        .unwrap();
    let wrapped = answer(&mut again).await;
    assert!(
        matches!(&wrapped.body, Some(Body::StoreError(_))),
        "op ids past 2^64 - 1: {wrapped:?}"
    );
    let r = watch.finish().await;
    let seq = metric(&node, "replimesh_store_seq", Some(("store", "counter"))).await;
    println!("finding 10: answers {reused:?} / {wrapped:?}, counter seq {seq}");
    assert_eq!(seq, 1.0, "only the first action may be committed");
    r.check(32);
}

/// The next `Committed` or `StoreError` (catch-up frames are skipped).
async fn answer(c: &mut Raw) -> Frame {
    loop {
        let f = c.recv().await.expect("no answer");
        if matches!(
            f.body,
            Some(Body::Committed(_) | Body::StoreError(_) | Body::Close(_))
        ) {
            return f;
        }
    }
}
