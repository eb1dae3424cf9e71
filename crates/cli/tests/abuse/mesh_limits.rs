//! Findings 2, 3 and 7: the mesh (publish to all, groups per client, slow
//! consumers of tiny frames).

use std::time::{Duration, Instant};

use replimesh::proto::{self, frame::Body, Frame};

use crate::harness::{metric, rss_after, serial, start_node, tmpdir, wire, Probe, Raw, Watch, T};

fn subscribe(groups: Vec<String>) -> Frame {
    Frame::new(Body::Subscribe(proto::Subscribe { groups }))
}

fn publish(groups: Vec<String>, all: bool, data: &[u8]) -> Frame {
    Frame::new(Body::Publish(proto::Publish {
        groups,
        all,
        data: data.to_vec().into(),
        ..Default::default()
    }))
}

/// Finding 2: 100 idle clients, each in a group of its own, and one client
/// publishing to all groups as fast as the node reads, for 3 s. At 87102c1
/// a publish to all cost O(clients x groups) in the mesh core and its queue
/// was unbounded: the core fell behind, frames piled up (RSS 28 MiB -> 4.1
/// GiB in 25 s) and other publishes were not delivered for seconds. Now it
/// costs O(subscribers), the core's command queue is bounded and pushes back
/// on the publisher's socket, one connection holds at most 8 places in that
/// queue (`max_publishes_in_flight`: without it the publisher filled all
/// 1,024 and the round-trip probe waited seconds behind them), and the idle
/// clients (which do not read) are cut once their 256 KiB queue is full.
/// The round-trip probe's messages go through the same core. Bound: RSS
/// +96 MiB.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn publish_to_all_stays_linear_and_bounded() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "max_queue_bytes = 262144", "");
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut c = Raw::client(&node.url, &format!("idle-{i}"), "").await;
        c.send(&subscribe(vec![format!("group-{i}")]))
            .await
            .unwrap();
        idle.push(c);
    }
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::round_trip(&node.url).await,
    ];
    let watch = Watch::start("finding 2 (publish to all)", &node, probes);
    let mut publisher = Raw::client(&node.url, "to-all", "").await;
    publisher.drain();
    let many: Vec<u8> = (0..100)
        .flat_map(|_| wire(&publish(Vec::new(), true, &[7; 16])))
        .collect();
    let end = Instant::now() + Duration::from_secs(3);
    let mut sent = 0u64;
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(1), publisher.send_bytes(&many)).await {
            Ok(Ok(())) => sent += 100,
            Ok(Err(e)) => panic!("the publisher was cut: {e}"),
            // Pushed back for a whole second: try again until the end.
            Err(_) => {}
        }
    }
    let r = watch.finish().await;
    let published = metric(&node, "replimesh_messages_published_total", None).await;
    println!("finding 2: {sent} publishes to all sent, {published} published on the node");
    drop(idle);
    r.check(96);
}

/// Finding 3: 20 clients subscribe to 1,000 groups each (the default limit
/// per client), one of them asks for 1,000 more, another for 1,001 in one
/// frame. At 87102c1 there was no limit (1,000,000 groups from one client:
/// 4.24 GiB peak, 4.15 GiB kept, a 42 MB `/api/status`). Now a `Subscribe`
/// past `max_groups_per_client` closes the connection as a protocol error
/// naming the limit, and the clone holds at most 100,000 groups. Bound: RSS
/// +96 MiB. Prints the memory a few seconds after the clients left.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn groups_per_client_are_limited() {
    let _one = serial().await;
    let dir = tmpdir();
    let node = start_node(dir.path(), "", "");
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::round_trip(&node.url).await,
    ];
    let watch = Watch::start("finding 3 (groups per client)", &node, probes);
    let names = |client: usize, from: usize, n: usize| -> Vec<String> {
        (from..from + n)
            .map(|g| format!("client-{client:03}-group-{g:06}-padding-to-48-bytes"))
            .collect()
    };
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = Raw::client(&node.url, &format!("grouper-{i}"), "").await;
        c.send(&subscribe(names(i, 0, 1000))).await.unwrap();
        c.drain();
        clients.push(c);
    }
    // Past the limit, in two frames and in one.
    clients[0]
        .send(&subscribe(names(0, 1000, 1000)))
        .await
        .unwrap();
    clients[1]
        .send(&subscribe(names(1, 1000, 1001)))
        .await
        .unwrap();
    let cut = testkit::eventually(T, || {
        let (a, b) = (clients[0].received(), clients[1].received());
        async move { a.ended && b.ended }
    })
    .await;
    let r = watch.finish().await;
    let (a, b) = (clients[0].received(), clients[1].received());
    println!("finding 3: cut: {:?} / {:?}", a.errors, b.errors);
    assert!(
        cut,
        "a client past the group limit was not cut: {a:?} {b:?}"
    );
    for got in [&a, &b] {
        assert!(
            got.errors.iter().any(|e| e.contains("limit")),
            "the close does not name the limit: {got:?}"
        );
    }
    drop(clients);
    rss_after(&node, &r, Duration::from_secs(3)).await;
    r.check(96);
}

/// Finding 7: 10 subscribers that never read (4 KiB socket receive
/// buffers) and a publisher of 1-byte messages to their group. At 87102c1
/// the slow-consumer limit counted payload bytes only: a queue of 1-byte
/// frames grew to about 100 bytes of memory per byte counted (2.96 GiB in
/// 35 s, never cut). Now each queued frame costs its length plus 96 bytes
/// against `max_queue_bytes` (256 KiB here) and 65,536 frames at most, so
/// every subscriber is cut after about 2,700 queued messages. Bound: RSS
/// +48 MiB.
#[testkit::test(flavor = "multi_thread", worker_threads = 2, deadline = 180)]
async fn slow_consumers_of_tiny_frames_are_cut() {
    let _one = serial().await;
    let dir = tmpdir();
    // The sleepers never answer pings: with the default idle timeout (6 s)
    // a loaded machine closed them as silent before their queues filled,
    // and they were not counted as cut. Only the queue limit is tested.
    let node = start_node(
        dir.path(),
        "max_queue_bytes = 262144\nidle_timeout_ms = 120000",
        "",
    );
    let mut sleepers = Vec::new();
    for i in 0..10 {
        let mut c = Raw::connect_with(&node.url, None, Some(4096)).await;
        c.send(&crate::harness::hello(&format!("sleeper-{i}"), ""))
            .await
            .unwrap();
        assert!(matches!(
            c.recv().await,
            Ok(Frame {
                body: Some(Body::Welcome(_))
            })
        ));
        c.send(&subscribe(vec!["tiny".into()])).await.unwrap();
        sleepers.push(c);
    }
    let probes = vec![
        Probe::echo(&node.url).await,
        Probe::round_trip(&node.url).await,
    ];
    let watch = Watch::start("finding 7 (slow consumers of tiny frames)", &node, probes);
    let mut publisher = Raw::client(&node.url, "tiny-publisher", "").await;
    publisher.drain();
    let many: Vec<u8> = (0..1000)
        .flat_map(|_| wire(&publish(vec!["tiny".into()], false, &[1])))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0u64;
    let cut = loop {
        let cut = metric(&node, "replimesh_slow_consumer_disconnects_total", None).await;
        if cut >= 10.0 || Instant::now() > deadline {
            break cut;
        }
        for _ in 0..20 {
            if tokio::time::timeout(Duration::from_secs(1), publisher.send_bytes(&many))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                sent += 1000;
            }
        }
    };
    let r = watch.finish().await;
    println!("finding 7: {sent} 1-byte messages sent, {cut} subscribers cut");
    assert_eq!(cut, 10.0, "not every slow consumer was cut");
    drop(sleepers);
    r.check(48);
}
