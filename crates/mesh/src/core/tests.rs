//! Unit tests of the core: link dedup between simultaneous dials, group
//! deletes reaching clones that were unreachable, tombstone bounds, deleted
//! clones refused until they restart.

use super::*;

fn info(c: &Core) -> PeerInfo {
    PeerInfo {
        id: c.id().to_string(),
        url: c.url().to_string(),
        incarnation: c.incarnation(),
    }
}

fn dial_of(c: &mut Core) -> LinkId {
    loop {
        match c.poll_action() {
            Some(Action::Dial { link, .. }) => return link,
            Some(_) => {}
            None => panic!("no dial"),
        }
    }
}

#[test]
fn simultaneous_dials_keep_the_link_of_the_lower_id() {
    let t = Duration::ZERO;
    let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
    let mut b = Core::new(CoreConfig::new("b", "x://b", 1), t);
    a.add_clone("b", "x://b", t).unwrap();
    b.add_clone("a", "x://a", t).unwrap();
    let da = dial_of(&mut a);
    let db = dial_of(&mut b);
    // both hellos arrive before either welcome
    let la = a.new_link_id();
    assert_eq!(a.accept(la, info(&b), t), Err(LinkRefusal::Duplicate));
    let lb = b.new_link_id();
    assert_eq!(b.accept(lb, info(&a), t), Ok(()));
    assert_eq!(a.dial_ok(da, info(&b), t), Ok(()));
    b.link_down(db, t); // refused by a
    assert_eq!(a.link_peer(da), Some("b"));
    assert_eq!(b.link_peer(lb), Some("a"));
    assert_eq!(a.link_count(), 1);
    assert_eq!(b.link_count(), 1);
    assert_eq!(a.add_clone("a", "x://a", t), Err(CoreError::AddSelf));
}

/// Links `dialer` to `acceptor`; returns (dialer's link, acceptor's link).
fn link(dialer: &mut Core, acceptor: &mut Core, t: Duration) -> (LinkId, LinkId) {
    dialer
        .add_clone(acceptor.id(), acceptor.url(), t)
        .expect("add");
    let d = dial_of(dialer);
    let a = acceptor.new_link_id();
    acceptor.accept(a, info(dialer), t).expect("accept");
    dialer.dial_ok(d, info(acceptor), t).expect("dial_ok");
    (d, a)
}

/// The frames `c` queued for `link` (other actions are dropped).
fn sent_on(c: &mut Core, link: LinkId) -> Vec<CloneFrame> {
    let mut v = Vec::new();
    while let Some(a) = c.poll_action() {
        if let Action::Send { links, frame } = a {
            if links.contains(&link) {
                v.push(frame);
            }
        }
    }
    v
}

/// Feeds what `from` sent on `out` into `to` on `inn`.
fn pump(from: &mut Core, out: LinkId, to: &mut Core, inn: LinkId, t: Duration) {
    for f in sent_on(from, out) {
        to.on_frame(inn, f, t);
    }
}

fn group_names(c: &Core) -> Vec<String> {
    c.groups().into_iter().map(|g| g.name).collect()
}

#[test]
fn group_delete_reaches_a_clone_that_was_unreachable_and_applies_once() {
    let t = Duration::ZERO;
    let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
    let mut b = Core::new(CoreConfig::new("b", "x://b", 1), t);
    let mut c = Core::new(CoreConfig::new("c", "x://c", 1), t);
    for x in [&mut b, &mut c] {
        x.client_connected(1, "client");
        x.subscribe(1, &["g".to_string()]);
    }
    let (ba, ab) = link(&mut b, &mut a, t);
    let _ = sent_on(&mut b, ba);
    let _ = sent_on(&mut a, ab);
    a.delete_group("g", t);
    pump(&mut a, ab, &mut b, ba, t);
    assert!(group_names(&b).is_empty(), "b was linked: deleted at once");
    assert_eq!(group_names(&c), ["g"], "c was unreachable");
    // c becomes reachable (through b): b re-sends the delete it learned
    let t1 = Duration::from_secs(10);
    let (cb, bc) = link(&mut c, &mut b, t1);
    pump(&mut b, bc, &mut c, cb, t1);
    assert!(group_names(&c).is_empty(), "the delete reached c later");
    // applied once: a group created again is not deleted by re-sends
    c.subscribe(1, &["g".to_string()]);
    let _ = sent_on(&mut c, cb);
    b.tick(t1 + Duration::from_secs(3)); // anti-entropy round re-sends it
    pump(&mut b, bc, &mut c, cb, t1 + Duration::from_secs(3));
    assert_eq!(group_names(&c), ["g"]);
    // re-sending stops after the ttl
    let late = Duration::from_secs(400);
    b.tick(late);
    assert!(sent_on(&mut b, bc)
        .iter()
        .all(|f| !matches!(f, CloneFrame::GroupDelete { .. })));
}

#[test]
fn group_tombstones_are_bounded() {
    let t = Duration::ZERO;
    let mut cfg = CoreConfig::new("a", "x://a", 1);
    cfg.max_group_tombstones = 3;
    let mut a = Core::new(cfg, t);
    for i in 0..10 {
        a.delete_group(&format!("g{i}"), t);
    }
    assert_eq!(a.group_tombstone_count(), 3);
}

#[test]
fn deleted_clone_is_refused_until_it_restarts_or_is_added() {
    let t = Duration::ZERO;
    let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
    let b = Core::new(CoreConfig::new("b", "x://b", 5), t);
    let l = a.new_link_id();
    a.accept(l, info(&b), t).unwrap();
    assert!(a.delete_clone("b", t));
    assert!(a.clones().is_empty());
    let l2 = a.new_link_id();
    assert_eq!(a.accept(l2, info(&b), t), Err(LinkRefusal::Deleted));
    let b6 = Core::new(CoreConfig::new("b", "x://b", 6), t);
    let l3 = a.new_link_id();
    assert_eq!(a.accept(l3, info(&b6), t), Ok(()));
    assert_eq!(a.clones().len(), 1);
}
