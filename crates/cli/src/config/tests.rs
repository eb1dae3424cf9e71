//! Unit tests of the configuration parser.

use super::*;

fn err(text: &str) -> ConfigError {
    NodeConfig::parse(text, Path::new("/nonexistent")).unwrap_err()
}

#[test]
fn minimal_and_full() {
    let c = NodeConfig::parse("", Path::new(".")).unwrap();
    assert!(c.id.starts_with("clone-"));
    assert!(c.listen.is_empty());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
    std::fs::write(dir.path().join("bk.key"), "pass\n").unwrap();
    let c = NodeConfig::parse(
        r#"
        id = "n1"
        admin = "127.0.0.1:0"
        [[listen]]
        url = "tcp://127.0.0.1:0"
        [[listen]]
        url = "ws://127.0.0.1:0/"
        [[peer]]
        id = "n2"
        url = "tcp://127.0.0.1:7002"
        [auth]
        token_file = "token"
        [limits]
        max_frame = 65536
        idle_timeout_ms = 0
        [[store]]
        name = "counter"
        reducer = "counter"
        mode = "digest"
        resync = 10
        logins = { web = "pw" }
        [store.backup]
        path = "counter.backup"
        key_file = "bk.key"
        every = 5
        journal = "never"
        "#,
        dir.path(),
    )
    .unwrap();
    assert_eq!(c.id, "n1");
    assert_eq!(c.token.as_deref(), Some("s3cret"));
    assert_eq!(c.listen[1].url, "ws://127.0.0.1:0/");
    assert_eq!(c.limits.max_frame, 65536);
    assert_eq!(c.limits.idle_timeout, None);
    let s = &c.stores[0];
    assert_eq!(
        (s.reducer.clone(), s.mode, s.resync),
        (ReducerKind::Counter, Mode::Digest, 10)
    );
    let b = s.backup.as_ref().unwrap();
    assert_eq!(b.path, dir.path().join("counter.backup"));
    assert_eq!((b.every, b.journal), (5, Journal::Never));
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("[[listen]]\nurl = \"http://x:1\"", "listen[0].url"),
        ("[[listen]]\nurl = \"tcp://x\"", "listen[0].url"),
        ("[[listen]]\nurl = \"wss://x:1/\"", "listen[0].cert"),
        (
            "[[listen]]\nurl = \"tcp://x:1\"\nserves = \"store\"",
            "listen[0].serves",
        ),
        ("admin = \"nope\"", "admin"),
        (
            "id = \"a\"\n[[peer]]\nid = \"a\"\nurl = \"tcp://x:1\"",
            "peer[0].id",
        ),
        ("[auth]", "auth"),
        ("[auth]\ntoken_file = \"missing\"", "auth.token_file"),
        ("[tls]\nca_file = \"missing.pem\"", "tls.ca_file"),
        ("[limits]\nmax_frame = 1", "limits.max_frame"),
        ("[limits]\nlogin_threads = 0", "limits.login_threads"),
        (
            "[limits]\nmax_requests_in_flight = 0",
            "limits.max_requests_in_flight",
        ),
        (
            "[limits]\nlogins_per_address = 0",
            "limits.logins_per_address",
        ),
        ("[security]\nclone_auth = \"maybe\"", "security.clone_auth"),
        ("[security]\nclone_auth = \"token\"", "security.clone_auth"),
        (
            "[auth]\ntoken = \"t\"\n[security]\nclone_auth = \"none\"",
            "security.clone_auth",
        ),
        ("[security]\nbans = \"some\"", "security.bans"),
        ("[security]\nnode_info = \"all\"", "security.node_info"),
        ("[limits]\nslow_consumer = \"drop\"", "limits.slow_consumer"),
        ("[[store]]\nname = \"s\"\nmode = \"fast\"", "store[0].mode"),
        (
            "[[store]]\nname = \"s\"\nreducer = \"js\"",
            "store[0].reducer",
        ),
        ("[[store]]\nname = \"s\"\nresync = 0", "store[0].resync"),
        ("[[store]]\nname = \"s\"\nreducer = 5", "store[0].reducer"),
        (
            "[[store]]\nname = \"s\"\nreducer = {}",
            "store[0].reducer.js",
        ),
        (
            "[[store]]\nname = \"s\"\nreducer = { js = \"r.js\", time_limit_ms = 0 }",
            "store[0].reducer.time_limit_ms",
        ),
        (
            "[[store]]\nname = \"s\"\nreducer = { js = \"r.js\", memory = 1 }",
            "store[0].reducer.memory",
        ),
        (
            "[[store]]\nname = \"s\"\n[[store]]\nname = \"s\"",
            "store[1].name",
        ),
        (
            "[[store]]\nname = \"s\"\n[store.backup]\npath = \"/nonexistent/dir/x\"",
            "store[0].backup.path",
        ),
    ];
    for (text, key) in cases {
        let e = err(text);
        assert_eq!(&e.key, key, "{text}: {e}");
        assert!(!e.problem.is_empty());
    }
}

#[test]
fn a_javascript_reducer_is_a_table() {
    let c = NodeConfig::parse(
        "[[store]]\nname = \"t\"\nreducer = { js = \"r/todos.js\", schema = 7, time_limit_ms = 20, memory_limit_mib = 8 }\n[[store]]\nname = \"u\"\nreducer = { js = \"/abs/u.js\" }",
        Path::new("/etc/rm"),
    )
    .unwrap();
    assert_eq!(
        c.stores[0].reducer,
        ReducerKind::Js(JsReducerSettings {
            path: "/etc/rm/r/todos.js".into(),
            schema: Some(7),
            time_limit: Duration::from_millis(20),
            memory_limit: 8 << 20,
        })
    );
    assert_eq!(
        c.stores[1].reducer,
        ReducerKind::Js(JsReducerSettings {
            path: "/abs/u.js".into(),
            schema: None,
            time_limit: Duration::from_millis(100),
            memory_limit: 64 << 20,
        })
    );
    assert_eq!(c.stores[1].reducer.label(), "js");
}

#[test]
fn the_example_file_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let c = NodeConfig::load(&dir.join("node.toml")).unwrap();
    assert_eq!(c.id, "node-1");
    assert_eq!(c.listen.len(), 2);
    assert_eq!(c.stores[0].logins["web"], "secret");
}

#[test]
fn unknown_keys_are_named() {
    let e = err("[[listen]]\nurl = \"tcp://x:1\"\nport = 3");
    assert!(e.to_string().contains("port"), "{e}");
    let e = err("colour = 3");
    assert!(e.to_string().contains("colour"), "{e}");
    let e = err("[limits]\nmax_frame = \"big\"");
    assert!(e.to_string().contains("max_frame"), "{e}");
}
