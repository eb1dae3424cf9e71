//! What a peer can make a clone hold or do is bounded: publish to all is
//! linear in the subscribers, the core's command queue pushes back on the
//! sockets that fill it, subscriptions and names have limits, the client's
//! inbox is bounded, a dropped client stops dialling.

mod common;

use std::time::Duration;

use bytes::Bytes;
use replimesh_mesh::core::{Action, Core, CoreConfig};
use replimesh_mesh::{Client, ClientConfig, Groups, Server, ServerConfig};

const T: Duration = Duration::from_secs(10);

fn client_config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new([url]);
    c.reconnect_delay = Duration::from_millis(10);
    c.max_reconnect_delay = Duration::from_millis(50);
    c
}

/// Publish to all with many clients, each in groups of its own: every
/// subscribed client gets the message once, for one of its groups, and
/// nobody else does. The work is linear in the clients (one map look-up
/// per client, 2.3 s for the whole test in a debug build); it was a search
/// through the groups seen so far for each client (40,000 clients in
/// 40,000 groups: 8·10⁸ string compares per message), so the old code did
/// not get through these 40 messages before the watchdog's minute.
#[test]
fn publish_to_all_reaches_each_subscriber_once_in_linear_work() {
    let _watchdog = common::watchdog("publish_to_all_reaches_each_subscriber_once_in_linear_work");
    const N: u64 = 40_000;
    let mut core = Core::new(CoreConfig::new("a", "", 1), Duration::ZERO);
    for c in 0..N {
        core.client_connected(c, &format!("c{c}"));
        let groups: Vec<String> = if c % 10 == 0 {
            // in three groups, two of them shared
            vec![format!("g{c}"), "shared-x".into(), "shared-y".into()]
        } else {
            vec![format!("g{c}")]
        };
        core.subscribe(c, &groups);
    }
    // clients in no group get nothing
    for c in N..N + 1000 {
        core.client_connected(c, &format!("idle{c}"));
    }
    while core.poll_action().is_some() {}
    for round in 0..40u64 {
        core.publish(
            None,
            Vec::new(),
            true,
            false,
            Bytes::from(vec![round as u8]),
        );
        let mut got = vec![0u32; N as usize];
        let mut deliveries = 0;
        while let Some(a) = core.poll_action() {
            if let Action::Deliver {
                msg,
                targets,
                group_of,
            } = a
            {
                deliveries += 1;
                assert!(msg.all);
                for t in targets {
                    assert!(t.conn < N, "client {} is in no group", t.conn);
                    got[t.conn as usize] += 1;
                    let g = &group_of[t.group];
                    assert!(
                        *g == format!("g{}", t.conn) || g.starts_with("shared-"),
                        "client {} got it for {g}",
                        t.conn
                    );
                }
            }
        }
        assert_eq!(deliveries, 1, "round {round}");
        assert!(
            got.iter().all(|n| *n == 1),
            "round {round}: each subscriber once"
        );
    }
}

/// A publisher flooding the clone: the commands waiting for the core never
/// exceed `command_queue` (the publisher's connection is not read while it
/// is full), everything published is delivered, and `shutdown` returns
/// while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_pushed_back_and_shutdown_is_not_stuck_behind_it() {
    let _watchdog = common::watchdog("a_flood_is_pushed_back_and_shutdown_is_not_stuck_behind_it");
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.command_queue = 4;
    let s = Server::start(cfg).await.unwrap();
    let mut subs = Vec::new();
    for i in 0..20 {
        let c = Client::connect(client_config(s.url())).await.unwrap();
        c.subscribe(&[&format!("g{i}")]).unwrap();
        let mut inbox = c.deliveries().unwrap();
        tokio::spawn(async move { while inbox.recv().await.is_some() {} });
        subs.push(c);
    }
    let mut pc = client_config(s.url());
    pc.reconnect = false;
    let publisher = Client::connect(pc).await.unwrap();
    let flood = {
        let p = publisher.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while p
                .publish_wait(Groups::All, &b"flood"[..], false)
                .await
                .is_ok()
            {
                n += 1;
                // a task that never yields would keep its connection's
                // writer (woken into this worker's LIFO slot) from running
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            n
        })
    };
    // wait until deliveries flow, watching the queue meanwhile
    let mut max_queued = 0;
    let end = tokio::time::Instant::now() + T;
    while s.stats().delivered < 20 * 2_000 && tokio::time::Instant::now() < end {
        max_queued = max_queued.max(s.stats().queued_commands);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(s.stats().delivered >= 20 * 2_000, "{:?}", s.stats());
    assert!(max_queued <= 4, "{max_queued} commands queued");
    tokio::time::timeout(T, s.shutdown())
        .await
        .expect("shutdown during a flood");
    let n = tokio::time::timeout(T, flood).await.unwrap().unwrap();
    assert!(n > 0);
}
