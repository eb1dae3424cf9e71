//! Exactly-once without hidden lost writes, and bounded per-peer state: an op
//! id reused for another action is refused, op ids do not wrap, a batch that
//! is too large or too long a client id gets one error, and made-up client
//! ids do not grow the duplicate table.

mod common;

use std::time::Duration;

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;
use replimesh_store::core::{Authority, AuthorityConfig, FollowerId};
use replimesh_store::{Encoding, ErrorCode, Store, StoreConfig};

use common::{counter, raw_login, server_config, Act, Counter, T};

fn add(n: i64) -> Bytes {
    Encoding::Binary.encode(&Act::Add(n)).unwrap()
}

/// A raw, logged-in connection attached to "counter" as `client_id`.
async fn attach(url: &str, client_id: &str) -> (transport::Sender, transport::Receiver) {
    let (tx, rx) = raw_login(url).await;
    tx.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: 1,
        client_id: client_id.into(),
        ..Default::default()
    })))
    .unwrap();
    (tx, rx)
}

fn dispatch(op_id: u64, actions: Vec<Bytes>) -> Frame {
    let mut it = actions.into_iter();
    Frame::new(Body::Dispatch(proto::Dispatch {
        store: "counter".into(),
        op_id,
        action: it.next().unwrap_or_default(),
        more: it.collect(),
        client_id: String::new(),
    }))
}

/// The next `Committed` or `StoreError` frame.
async fn answer(rx: &mut transport::Receiver) -> Body {
    loop {
        let f = tokio::time::timeout(T, rx.recv())
            .await
            .expect("an answer")
            .expect("the connection is open");
        match f.body {
            Some(b @ (Body::Committed(_) | Body::StoreError(_))) => return b,
            _ => continue,
        }
    }
}

/// Nothing more than `Actions`/`Snapshot` frames for a short while.
async fn no_more_answers(rx: &mut transport::Receiver) {
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            let Ok(f) = rx.recv().await else { return };
            if let Some(Body::Committed(_) | Body::StoreError(_)) = &f.body {
                panic!("unexpected answer {f:?}")
            }
        }
    })
    .await;
}

async fn serve() -> (
    Store<Counter>,
    replimesh_store::Server,
    String,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("s.sock").display());
    let a = Store::authority(counter(), StoreConfig::default());
    let server = a.serve(&url, server_config()).await.unwrap();
    let url = server.urls()[0].clone();
    (a, server, url, dir)
}

/// A client that restarts with the same client id and numbers its ops from 1
/// again gets its new action refused (`OP_ID_REUSED`), not a `Committed`
/// for the old one; resending the same action is still answered with its
/// first seq.
#[testkit::test]
async fn reused_op_id_with_another_action_is_refused() {
    let (a, _server, url, _dir) = serve().await;
    let (tx, mut rx) = attach(&url, "client-1").await;
    tx.send(&dispatch(1, vec![add(1)])).unwrap();
    let Body::Committed(c) = answer(&mut rx).await else {
        panic!("not committed")
    };
    assert_eq!((c.op_id, c.seq), (1, 1));
    drop((tx, rx));

    // "Restarted": same client id, op 1 again, another action.
    let (tx, mut rx) = attach(&url, "client-1").await;
    tx.send(&dispatch(1, vec![add(5)])).unwrap();
    match answer(&mut rx).await {
        Body::StoreError(e) => {
            let info = e.error.unwrap();
            assert_eq!(e.op_id, 1);
            assert_eq!(ErrorCode::from_u32(info.code), ErrorCode::OpIdReused);
            assert!(info.message.contains("another action"), "{}", info.message);
        }
        other => panic!("expected OP_ID_REUSED, got {other:?}"),
    }
    // The same action again: a resend, answered with its seq.
    tx.send(&dispatch(1, vec![add(1)])).unwrap();
    let Body::Committed(c) = answer(&mut rx).await else {
        panic!("a resend was not answered with its seq")
    };
    assert_eq!((c.op_id, c.seq), (1, 1));
    let s = a.state().clone();
    assert_eq!((s.total, s.count), (1, 1));
}

/// Op ids do not wrap: op 2^64 - 1 with one more action is refused whole,
/// with one error, and nothing is committed; the connection still works.
#[testkit::test]
async fn op_ids_do_not_wrap() {
    let (a, _server, url, _dir) = serve().await;
    let (tx, mut rx) = attach(&url, "client-2").await;
    tx.send(&dispatch(u64::MAX, vec![add(1), add(2), add(3)]))
        .unwrap();
    match answer(&mut rx).await {
        Body::StoreError(e) => {
            assert_eq!((e.op_id, e.count), (u64::MAX, 3));
            assert!(e.error.unwrap().message.contains("do not wrap"));
        }
        other => panic!("expected an error, got {other:?}"),
    }
    no_more_answers(&mut rx).await;
    assert_eq!(a.state().count, 0);
    tx.send(&dispatch(1, vec![add(1)])).unwrap();
    assert!(matches!(answer(&mut rx).await, Body::Committed(_)));
}

/// A batch of more actions than `max_dispatch_batch` gets one error frame
/// naming the range and nothing is committed; a batch of undecodable actions
/// gets one error frame too (not one per action); a client id longer than
/// `max_client_id_len` is refused.
#[testkit::test]
async fn bad_batches_get_one_error() {
    let (a, _server, url, _dir) = serve().await;
    let (tx, mut rx) = attach(&url, "client-3").await;
    tx.send(&dispatch(1, vec![add(1); 5_000])).unwrap();
    match answer(&mut rx).await {
        Body::StoreError(e) => {
            assert_eq!((e.op_id, e.count), (1, 5_000));
            assert_eq!(
                ErrorCode::from_u32(e.error.unwrap().code),
                ErrorCode::BadAction
            );
        }
        other => panic!("expected one error, got {other:?}"),
    }
    no_more_answers(&mut rx).await;
    assert_eq!(a.state().count, 0);

    let junk = Bytes::from_static(&[0xff; 3]);
    tx.send(&dispatch(1, vec![junk; 1_000])).unwrap();
    match answer(&mut rx).await {
        Body::StoreError(e) => assert_eq!((e.op_id, e.count), (1, 1_000)),
        other => panic!("expected one error, got {other:?}"),
    }
    no_more_answers(&mut rx).await;

    let mut long = dispatch(5_000, vec![add(1)]);
    if let Some(Body::Dispatch(d)) = &mut long.body {
        d.client_id = "x".repeat(1024);
    }
    tx.send(&long).unwrap();
    match answer(&mut rx).await {
        Body::StoreError(e) => {
            assert!(e.client_id.is_empty(), "the long client id was echoed");
            assert!(e.error.unwrap().message.contains("client id of 1024 bytes"));
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(a.state().count, 0);
}

/// 10,000 made-up client ids, each with op 1 and op 32,768 (undecodable
/// actions), from one login: the duplicate table keeps at most
/// `dedup_clients_per_login` of them, two op ids each (on the old code each
/// id held a window of 32,768 slots: 512 KiB).
#[test]
fn made_up_client_ids_keep_the_table_bounded() {
    let mut a = Authority::new(counter(), AuthorityConfig::default(), 7);
    let hello = proto::StoreHello {
        store: "counter".into(),
        schema: 1,
        client_id: "attacker".into(),
        ..Default::default()
    };
    let fid: FollowerId = a.on_hello_as(&hello, "mallory").unwrap();
    for i in 0..10_000 {
        for op in [1, 32_768] {
            let d = proto::Dispatch {
                store: "counter".into(),
                op_id: op,
                action: Bytes::from_static(&[0xff]),
                more: Vec::new(),
                client_id: format!("made-up-{i}"),
            };
            a.on_dispatch(fid, d);
        }
        let _ = a.poll(fid, usize::MAX);
    }
    let (clients, entries) = a.dedup_size();
    let max = AuthorityConfig::default().dedup_clients_per_login;
    assert!(clients <= max, "{clients} client ids kept");
    assert!(entries <= 2 * max, "{entries} op ids kept");
    // Another login's client is not evicted by them.
    let fid2 = a
        .on_hello_as(
            &proto::StoreHello {
                client_id: "honest".into(),
                ..hello.clone()
            },
            "alice",
        )
        .unwrap();
    let d = proto::Dispatch {
        store: "counter".into(),
        op_id: 1,
        action: add(1),
        more: Vec::new(),
        client_id: String::new(),
    };
    a.on_dispatch(fid2, d.clone());
    for i in 0..5_000 {
        let d = proto::Dispatch {
            store: "counter".into(),
            op_id: 1,
            action: Bytes::from_static(&[0xff]),
            more: Vec::new(),
            client_id: format!("more-{i}"),
        };
        a.on_dispatch(fid, d);
        let _ = a.poll(fid, usize::MAX);
    }
    let _ = a.poll(fid2, usize::MAX);
    a.on_dispatch(fid2, d);
    assert_eq!(a.seq(), 1, "the honest client's resend was applied again");
}
