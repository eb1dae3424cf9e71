//! Integration tests with real sockets on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use replimesh_mesh::core::CoreEvent;
use replimesh_mesh::{
    Client, ClientConfig, Flow, Groups, MeshError, RouteError, Server, ServerConfig, ServerEvent,
};
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

fn cfg(id: &str) -> ServerConfig {
    let mut c = ServerConfig::new(id, "tcp://127.0.0.1:0");
    c.gossip_interval = Duration::from_millis(100);
    c.forget_after = Duration::from_millis(500);
    c
}

async fn start(id: &str) -> Server {
    Server::start(cfg(id)).await.expect("start")
}

async fn linked_ids(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = s
        .clones()
        .await
        .expect("clones")
        .into_iter()
        .filter(|c| c.linked && c.up)
        .map(|c| c.id)
        .collect();
    v.sort();
    v
}

async fn known_ids(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = s
        .clones()
        .await
        .expect("clones")
        .into_iter()
        .map(|c| c.id)
        .collect();
    v.sort();
    v
}

/// Polls `f` until it is true (at most 10 s).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + T;
    while tokio::time::Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn client(url: &str) -> Client {
    let mut c = ClientConfig::new([url]);
    c.reconnect_min = Duration::from_millis(20);
    c.reconnect_max = Duration::from_millis(100);
    Client::connect(c).await.expect("client")
}

fn others(all: &[&str], me: &str) -> Vec<String> {
    all.iter()
        .filter(|x| **x != me)
        .map(|x| x.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_four_clone_example_and_exactly_once() {
    let _watchdog = common::watchdog("seed_four_clone_example_and_exactly_once");
    let token_in = |v: &[u8]| v == b"token";
    let mut clones = Vec::new();
    for i in 1..=4 {
        let c = cfg(&format!("clone{i}"))
            .auth_out(|_| Bytes::from_static(b"token"))
            .auth_in(token_in);
        clones.push(Server::start(c).await.expect("start"));
    }
    // a subscriber on every clone, before the mesh exists
    let mut inboxes = Vec::new();
    let mut subs = Vec::new();
    for c in &clones {
        let cl = client(c.url()).await;
        let inbox = cl.deliveries().expect("inbox");
        cl.subscribe(&["news"]).expect("subscribe");
        inboxes.push(inbox);
        subs.push(cl);
    }
    for c in &clones {
        eventually("subscriptions", || async {
            c.groups().await.unwrap().iter().any(|g| g.subscribers == 1)
        })
        .await;
    }
    clones[0]
        .add_clone("clone2", clones[1].url(), None)
        .await
        .unwrap();
    clones[0]
        .add_clone("clone4", clones[3].url(), None)
        .await
        .unwrap();
    let all = ["clone1", "clone2", "clone4"];
    for i in [0usize, 1, 3] {
        let me = format!("clone{}", i + 1);
        eventually("1, 2 and 4 know each other", || async {
            linked_ids(&clones[i]).await == others(&all, &me)
        })
        .await;
    }
    assert!(
        known_ids(&clones[2]).await.is_empty(),
        "clone3 knows nobody yet"
    );
    clones[2]
        .add_clone("clone4", clones[3].url(), None)
        .await
        .unwrap();
    // publish while the mesh is still converging: never twice
    let publisher = client(clones[0].url()).await;
    for n in 0..50u32 {
        publisher
            .publish(Groups::one("news"), n.to_be_bytes().to_vec(), false)
            .unwrap();
    }
    let all = ["clone1", "clone2", "clone3", "clone4"];
    for (i, c) in clones.iter().enumerate() {
        let me = format!("clone{}", i + 1);
        eventually("all four know each other", || async {
            linked_ids(c).await == others(&all, &me)
        })
        .await;
    }
    // converged: every message reaches every subscriber exactly once
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 1000..1200u32 {
        publisher
            .publish(Groups::one("news"), n.to_be_bytes().to_vec(), false)
            .unwrap();
    }
    for inbox in inboxes.iter_mut() {
        let mut seen: HashMap<u32, u32> = HashMap::new();
        loop {
            let d = tokio::time::timeout(T, inbox.recv())
                .await
                .expect("delivery")
                .expect("open");
            assert_eq!(d.group, "news");
            let n = u32::from_be_bytes(d.data[..4].try_into().unwrap());
            *seen.entry(n).or_default() += 1;
            if n == 1199 {
                break;
            }
        }
        assert!(seen.values().all(|&k| k == 1), "a message arrived twice");
        assert_eq!((1000..1200).filter(|n| seen.contains_key(n)).count(), 200);
    }
    for c in &clones {
        c.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_clone_stays_deleted_until_added_or_restarted() {
    let _watchdog = common::watchdog("deleted_clone_stays_deleted_until_added_or_restarted");
    let a = start("a").await;
    let b = start("b").await;
    let c = start("c").await;
    a.add_clone("b", b.url(), None).await.unwrap();
    b.add_clone("c", c.url(), None).await.unwrap();
    eventually("full mesh", || async { linked_ids(&a).await == ["b", "c"] }).await;
    assert!(a.delete_clone("b").await.unwrap());
    // c still gossips b as up, and b still knows a: a keeps refusing it
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        known_ids(&a).await,
        ["c"],
        "gossip must not bring back a deleted clone"
    );
    // b restarts (new incarnation): gossip brings it back
    b.stop().await;
    let mut bc = cfg("b");
    bc.listen = vec![b.url().to_string()];
    let mut b2 = None;
    for _ in 0..200 {
        match Server::start(bc.clone()).await {
            Ok(s) => {
                b2 = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let b2 = b2.expect("restart b on its old address");
    b2.add_clone("c", c.url(), None).await.unwrap();
    eventually("restarted b is known again", || async {
        linked_ids(&a).await == ["b", "c"]
    })
    .await;
    // deleting again, then adding again by hand
    assert!(a.delete_clone("b").await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(known_ids(&a).await, ["c"]);
    a.add_clone("b", b2.url(), None).await.unwrap();
    eventually("b added again", || async {
        linked_ids(&a).await == ["b", "c"]
    })
    .await;
    assert!(matches!(
        a.add_clone("a", a.url(), None).await,
        Err(MeshError::Clone(_))
    ));
    for s in [&a, &b2, &c] {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_clone_is_forgotten() {
    let _watchdog = common::watchdog("dead_clone_is_forgotten");
    let a = start("a").await;
    let b = start("b").await;
    let c = start("c").await;
    a.add_clone("b", b.url(), None).await.unwrap();
    b.add_clone("c", c.url(), None).await.unwrap();
    eventually("a linked to c", || async {
        linked_ids(&a).await == ["b", "c"]
    })
    .await;
    c.stop().await;
    // a only learned c: it is marked down, then forgotten
    eventually("c forgotten by a", || async {
        known_ids(&a).await == ["b"]
    })
    .await;
    // b added c by hand: it keeps it, as down
    eventually("b keeps its configured c as down", || async {
        let rows = b.clones().await.unwrap();
        let row = rows
            .iter()
            .find(|r| r.id == "c")
            .expect("configured row kept");
        !row.up && !row.linked
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_client_cannot_send_clone_frames_or_inject_urls() {
    let _watchdog = common::watchdog("plain_client_cannot_send_clone_frames_or_inject_urls");
    use transport::proto::{frame::Body, CloneEntry, Frame, Gossip, GroupDelete, Hello, PeerKind};
    let a = Server::start(cfg("a").auth_out(|_| Bytes::from_static(b"secret")))
        .await
        .unwrap();
    let mut events = a.events();
    // a trap listener: nobody may ever dial it
    let trap = transport::listen("tcp://127.0.0.1:0", &Default::default())
        .await
        .unwrap();
    let trap_url = trap.local_url();
    a.create_group("keep", Bytes::new()).unwrap();
    for body in [
        Body::Gossip(Gossip {
            clones: vec![CloneEntry {
                id: "evil".into(),
                url: trap_url.clone(),
                incarnation: 1,
                up: true,
                gone: false,
            }],
            full: false,
        }),
        Body::GroupDelete(GroupDelete {
            origin: "evil".into(),
            msg_id: 1,
            group: "keep".into(),
            origin_incarnation: 1,
            seen: vec![],
        }),
    ] {
        let mut conn = transport::connect(a.url(), &Default::default())
            .await
            .unwrap();
        conn.send(&Frame::new(Body::Hello(Hello {
            version: 1,
            kind: PeerKind::Client as i32,
            id: "mallory".into(),
            ..Default::default()
        })))
        .unwrap();
        assert!(matches!(
            conn.recv().await.unwrap().body,
            Some(Body::Welcome(_))
        ));
        conn.send(&Frame::new(body)).unwrap();
        // refused and closed
        let end = tokio::time::timeout(T, async {
            loop {
                if let Err(e) = conn.recv().await {
                    return e;
                }
            }
        })
        .await
        .expect("closed");
        assert!(
            matches!(end, transport::RecvError::Closed { .. }),
            "{end:?}"
        );
        let ev = events
            .wait_for(
                T,
                |e| matches!(e, ServerEvent::Error(m) if m.contains("clone links only")),
            )
            .await;
        assert!(ev.is_some());
    }
    // nothing was learned, nothing deleted, the trap was never dialed
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(known_ids(&a).await.is_empty());
    assert!(a.groups().await.unwrap().iter().any(|g| g.name == "keep"));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), trap.accept())
            .await
            .is_err()
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_auth_closes_the_link_and_its_url_is_never_dialed() {
    let _watchdog = common::watchdog("wrong_auth_closes_the_link_and_its_url_is_never_dialed");
    let a = Server::start(cfg("a").auth_in(|v| v == b"right"))
        .await
        .unwrap();
    let mut events = a.events();
    // b presents the wrong token and announces a url that is a trap
    let trap = transport::listen("tcp://127.0.0.1:0", &Default::default())
        .await
        .unwrap();
    let mut bc = cfg("b").auth_out(|_| Bytes::from_static(b"wrong"));
    bc.url = Some(trap.local_url());
    let b = Server::start(bc).await.unwrap();
    b.add_clone("a", a.url(), None).await.unwrap();
    let ev = events
        .wait_for(T, |e| matches!(e, ServerEvent::AuthError { .. }))
        .await;
    assert!(
        matches!(ev, Some(ServerEvent::AuthError { ref id, .. }) if id == "b"),
        "{ev:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(known_ids(&a).await.is_empty());
    assert!(linked_ids(&b).await.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), trap.accept())
            .await
            .is_err()
    );
    // with the right token (update_auth_out) the link comes up
    b.update_auth_out(Some(replimesh_mesh::auth_out_sync(|_| {
        Bytes::from_static(b"right")
    })))
    .unwrap();
    eventually("linked after update_auth_out", || async {
        linked_ids(&a).await == ["b"]
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_that_connection() {
    let _watchdog = common::watchdog("malformed_frames_close_only_that_connection");
    let a = start("a").await;
    a.route("echo", "", |ctx| async move { Ok(ctx.data) });
    let mut events = a.events();
    let good = client(a.url()).await;
    let addr = a.url().trim_start_matches("tcp://").to_string();
    // a length prefix followed by garbage that is not protobuf
    let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let ev = events
        .wait_for(T, |e| matches!(e, ServerEvent::Error(_)))
        .await;
    assert!(ev.is_some());
    // an absurd length
    let mut raw2 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    raw2.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let ev = events
        .wait_for(T, |e| matches!(e, ServerEvent::Error(_)))
        .await;
    assert!(ev.is_some());
    assert_eq!(
        good.request("echo", "x", &b"still here"[..]).await.unwrap(),
        &b"still here"[..]
    );
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_middlewares_unknown_routes_and_timeouts_both_ways() {
    let _watchdog = common::watchdog("routes_middlewares_unknown_routes_and_timeouts_both_ways");
    let mut sc = cfg("a");
    sc.response_timeout = Duration::from_millis(200);
    let a = Server::start(sc).await.unwrap();
    let mut events = a.events();
    a.use_middleware(|ctx| async move {
        Ok(match ctx.act.as_str() {
            "blocked" => Flow::Reply(Bytes::from_static(b"blocked by middleware")),
            _ => Flow::Next,
        })
    });
    a.route("math", "double", |ctx| async move {
        let n = ctx.data.first().copied().unwrap_or(0);
        Ok(Bytes::from(vec![n * 2]))
    });
    a.route("math", "fail", |_| async move {
        Err(RouteError::new(418, "teapot"))
    });
    a.route("slow", "", |_| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(Bytes::new())
    });
    // server -> client request from inside a handler
    a.route("ask", "client", |ctx| async move {
        ctx.peer
            .request("client", "hello", Bytes::new())
            .await
            .map_err(|e| RouteError::new(502, e.to_string()))
    });
    let mut cc = ClientConfig::new([a.url()]);
    cc.response_timeout = Duration::from_millis(200);
    let c = Client::connect(cc).await.unwrap();
    c.route("client", "hello", |_| async move {
        Ok(Bytes::from_static(b"hi from client"))
    });
    assert_eq!(
        c.request("math", "double", vec![21u8]).await.unwrap(),
        vec![42u8]
    );
    assert_eq!(
        c.request("math", "blocked", vec![1u8]).await.unwrap(),
        &b"blocked by middleware"[..]
    );
    assert_eq!(
        c.request("math", "fail", Bytes::new()).await,
        Err(MeshError::Remote {
            code: 418,
            message: "teapot".into()
        })
    );
    assert!(matches!(
        c.request("nope", "x", Bytes::new()).await,
        Err(MeshError::Remote { code: 404, .. })
    ));
    let ev = events
        .wait_for(T, |e| matches!(e, ServerEvent::NoRoute { .. }))
        .await;
    assert_eq!(
        ev,
        Some(ServerEvent::NoRoute {
            route: "nope".into(),
            act: "x".into()
        })
    );
    assert_eq!(
        c.request("slow", "x", Bytes::new()).await,
        Err(MeshError::Timeout)
    );
    assert_eq!(
        c.request("ask", "client", Bytes::new()).await.unwrap(),
        &b"hi from client"[..]
    );
    // the client has no handler that answers in time: the server's request times out
    c.route("client", "hello", |_| async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Bytes::new())
    });
    match c.request("ask", "client", Bytes::new()).await {
        Err(MeshError::Remote { code: 502, message }) => {
            assert!(message.contains("timed out"), "{message}")
        }
        Err(MeshError::Timeout) => {} // our own 200 ms may expire first
        other => panic!("{other:?}"),
    }
    c.send("nope", "fire-and-forget", Bytes::new()).unwrap();
    assert!(events
        .wait_for(
            T,
            |e| matches!(e, ServerEvent::NoRoute { act, .. } if act == "fire-and-forget")
        )
        .await
        .is_some());
    c.close();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_round_robin_and_restores_subscriptions() {
    let _watchdog = common::watchdog("client_reconnects_round_robin_and_restores_subscriptions");
    let a = start("a").await;
    let b = start("b").await;
    a.add_clone("b", b.url(), None).await.unwrap();
    eventually("linked", || async { linked_ids(&a).await == ["b"] }).await;
    let mut cc = ClientConfig::new([a.url(), b.url()]);
    cc.reconnect_min = Duration::from_millis(10);
    cc.reconnect_max = Duration::from_millis(50);
    let c = Client::connect(cc).await.unwrap();
    assert_eq!(c.info().connected_to.as_deref(), Some(a.url()));
    let mut inbox = c.deliveries().unwrap();
    c.subscribe(&["g", "h"]).unwrap();
    eventually("subscribed on a", || async {
        a.groups().await.unwrap().len() == 2
    })
    .await;
    assert_eq!(c.my_groups(), ["g", "h"]);
    a.stop().await;
    assert!(c.wait_connections(1, T).await, "reconnected");
    assert_eq!(c.info().connected_to.as_deref(), Some(b.url()));
    eventually("subscriptions restored on b", || async {
        b.groups()
            .await
            .unwrap()
            .iter()
            .filter(|g| g.subscribers == 1)
            .count()
            == 2
    })
    .await;
    b.publish(Groups::one("h"), &b"after reconnect"[..], None)
        .unwrap();
    let d = tokio::time::timeout(T, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (d.group.as_str(), &d.data[..]),
        ("h", &b"after reconnect"[..])
    );
    // next_url moves on (back to b, the only live one, after failing on a)
    c.unsubscribe(&["h"]).unwrap();
    c.next_url();
    assert!(c.wait_connections(2, T).await);
    assert_eq!(c.my_groups(), ["g"]);
    c.close();
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_not_to_me_all_and_cluster_wide_delete() {
    let _watchdog = common::watchdog("groups_not_to_me_all_and_cluster_wide_delete");
    let a = start("a").await;
    let b = start("b").await;
    a.add_clone("b", b.url(), None).await.unwrap();
    eventually("linked", || async { linked_ids(&b).await == ["a"] }).await;
    let mut events_b = b.events();
    let pa = client(a.url()).await;
    let pb = client(b.url()).await;
    let mut ia = pa.deliveries().unwrap();
    let mut ib = pb.deliveries().unwrap();
    pa.subscribe(&["g1"]).unwrap();
    pb.subscribe(&["g1", "g2"]).unwrap();
    a.create_group("room", &b"topic"[..]).unwrap();
    eventually("groups", || async {
        a.groups().await.unwrap().len() == 2 && b.groups().await.unwrap().len() == 2
    })
    .await;
    // let interest reach the other clone
    tokio::time::sleep(Duration::from_millis(300)).await;
    // not_to_me: the publisher does not get its own message
    pa.publish(
        Groups::Some(vec!["g1".into(), "g2".into()]),
        &b"m1"[..],
        true,
    )
    .unwrap();
    let d = tokio::time::timeout(T, ib.recv()).await.unwrap().unwrap();
    assert_eq!((&d.data[..], d.from.as_str()), (&b"m1"[..], pa.id()));
    // all groups, once per client
    b.publish(Groups::All, &b"m2"[..], None).unwrap();
    assert_eq!(
        &tokio::time::timeout(T, ia.recv())
            .await
            .unwrap()
            .unwrap()
            .data[..],
        b"m2"
    );
    assert_eq!(
        &tokio::time::timeout(T, ib.recv())
            .await
            .unwrap()
            .unwrap()
            .data[..],
        b"m2"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        ia.try_recv().is_none() && ib.try_recv().is_none(),
        "no extra deliveries"
    );
    // delete on a propagates to b
    a.delete_group("g1").unwrap();
    let ev = events_b
        .wait_for(T, |e| {
            matches!(e, ServerEvent::Mesh(CoreEvent::GroupDeleted { .. }))
        })
        .await;
    assert!(ev.is_some());
    eventually("g1 gone everywhere", || async {
        !b.groups().await.unwrap().iter().any(|g| g.name == "g1")
            && !a.groups().await.unwrap().iter().any(|g| g.name == "g1")
    })
    .await;
    let clients = b.clients().await.unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].groups, ["g2"]);
    // an empty implicit group vanishes
    pb.unsubscribe(&["g2"]).unwrap();
    eventually("empty group gone", || async {
        b.groups().await.unwrap().is_empty()
    })
    .await;
    a.stop().await;
    b.stop().await;
}
