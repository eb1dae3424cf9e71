//! The admin server: read routes, the write endpoints, tokens and bad input.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::Method;
use replimesh::mesh;
use serde_json::{json, Value};

use super::*;

const T: Duration = Duration::from_secs(10);
const WRITE: &str = "wr1te-token";

struct Fake {
    healthy: AtomicBool,
    ready: AtomicBool,
    mesh: Option<mesh::Server>,
    write: Option<String>,
}

impl AdminSource for Fake {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({"id": "x"})
    }
    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn write_token(&self) -> Option<String> {
        self.write.clone()
    }
    fn mesh(&self) -> Option<&mesh::Server> {
        self.mesh.as_ref()
    }
}

fn fake(mesh: Option<mesh::Server>, write: Option<&str>) -> Arc<Fake> {
    Arc::new(Fake {
        healthy: true.into(),
        ready: true.into(),
        mesh,
        write: write.map(str::to_owned),
    })
}

/// Sends raw bytes, returns the whole answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(a: SocketAddr, path: &str) -> (u16, String) {
    tokio::time::timeout(T, http_get(a, path))
        .await
        .unwrap()
        .unwrap()
}

#[testkit::test]
async fn serves_routes() {
    let reg = Registry::new();
    let fake = fake(None, None);
    let server = AdminServer::start("127.0.0.1:0", reg.clone(), fake.clone())
        .await
        .unwrap();
    let a = server.addr();
    assert_eq!(get(a, "/health").await.0, 200);
    assert_eq!(
        get(a, "/ready").await,
        (200, "{\"status\":\"ready\"}\n".into())
    );
    let (code, body) = get(a, "/metrics").await;
    assert_eq!(code, 200);
    let samples = crate::metrics::parse_text(&body).unwrap();
    assert!(samples
        .iter()
        .any(|s| s.0 == "replimesh_admin_requests_total" && s.2 >= 2.0));
    let (code, body) = get(a, "/api/status").await;
    assert_eq!((code, body.as_str()), (200, "{\"id\":\"x\"}"));
    let (code, body) = get(a, "/").await;
    assert_eq!(code, 200);
    assert!(body.contains("<html"));
    let (code, body) = get(a, "/replimesh.js").await;
    assert_eq!(code, 200);
    assert!(body.contains("export"));
    assert_eq!(get(a, "/nope").await.0, 404);
    fake.ready.store(false, Ordering::Relaxed);
    assert_eq!(get(a, "/ready").await.0, 503);
    fake.healthy.store(false, Ordering::Relaxed);
    assert_eq!(get(a, "/health").await.0, 503);
    let (code, body) = get(a, "/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("stopping"), "{body}");
    // Non-GET methods, garbage and huge heads are refused.
    let out = raw(
        a,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("cache-control: no-store"),
        "{out}"
    );
    let out = raw(a, b"GARBAGE\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 32 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    let out = raw(a, &big).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // HEAD: the head only.
    let out = raw(a, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.ends_with("\r\n\r\n"), "{out}");
}

#[testkit::test]
async fn write_endpoints_are_off_without_a_write_token() {
    let m = mesh::Server::start(mesh::ServerConfig::new("n1", "tcp://127.0.0.1:0"))
        .await
        .unwrap();
    let server = AdminServer::start("127.0.0.1:0", Registry::new(), fake(Some(m.clone()), None))
        .await
        .unwrap();
    let c = AdminClient::new(&server.dashboard_url(), Some("anything".into())).unwrap();
    let err = c.create_group("g", "").await.unwrap_err();
    assert!(
        matches!(&err, AdminClientError::Refused { status: 404, message } if message.contains("admin_write_token")),
        "{err}"
    );
    assert!(m.groups().await.unwrap().is_empty());
    m.shutdown().await;
}

/// A node with a write token, its admin server and a client holding the token.
async fn writable() -> (mesh::Server, Registry, AdminServer, AdminClient) {
    let m = mesh::Server::start(mesh::ServerConfig::new("n1", "tcp://127.0.0.1:0"))
        .await
        .unwrap();
    let reg = Registry::new();
    let server = AdminServer::start(
        "127.0.0.1:0",
        reg.clone(),
        fake(Some(m.clone()), Some(WRITE)),
    )
    .await
    .unwrap();
    let c = AdminClient::new(&server.dashboard_url(), Some(WRITE.into())).unwrap();
    (m, reg, server, c)
}

fn changes(reg: &Registry, action: &str) -> f64 {
    reg.value("replimesh_admin_changes_total", &[("action", action)])
        .unwrap_or(0.0)
}

#[testkit::test]
async fn a_missing_or_wrong_token_changes_nothing() {
    let (m, reg, server, _) = writable().await;
    let url = server.dashboard_url();
    for token in [None, Some("wrong".to_owned()), Some(format!("{WRITE}x"))] {
        let c = AdminClient::new(&url, token).unwrap();
        let calls: Vec<(Method, &str, Option<Value>)> = vec![
            (
                Method::POST,
                "/api/clones",
                Some(json!({"id": "b", "url": "tcp://127.0.0.1:9"})),
            ),
            (Method::DELETE, "/api/clones/b", None),
            (Method::PUT, "/api/auth-out", Some(json!({"value": "v"}))),
            (Method::POST, "/api/groups", Some(json!({"name": "g"}))),
            (Method::DELETE, "/api/groups/g", None),
            (
                Method::POST,
                "/api/publish",
                Some(json!({"all": true, "data": "x"})),
            ),
            (Method::GET, "/api/clients", None),
            (Method::DELETE, "/api/clients/1", None),
        ];
        for (method, path, body) in calls {
            let (status, answer) = c.send(method.clone(), path, body.as_ref()).await.unwrap();
            assert_eq!(status.as_u16(), 401, "{method} {path}: {answer:?}");
        }
    }
    assert!(m.clones().await.unwrap().is_empty());
    assert!(m.groups().await.unwrap().is_empty());
    assert_eq!(m.stats().published, 0);
    let refused = reg
        .value(
            "replimesh_admin_refused_total",
            &[("reason", "unauthorized")],
        )
        .unwrap();
    assert_eq!(refused, 24.0);
    assert_eq!(changes(&reg, "group_create"), 0.0);
    // The token is not taken from the query string for writes.
    let (status, _) = AdminClient::new(&url, None)
        .unwrap()
        .send(
            Method::POST,
            &format!("/api/groups?token={WRITE}"),
            Some(&json!({"name": "g"})),
        )
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 401);
    m.shutdown().await;
}

#[testkit::test]
async fn bad_input_is_refused_naming_the_field() {
    let (m, reg, _server, c) = writable().await;
    let cases: Vec<(Method, &str, Value, &str)> = vec![
        (
            Method::POST,
            "/api/clones",
            json!({"url": "tcp://127.0.0.1:9"}),
            "field `id`: missing",
        ),
        (
            Method::POST,
            "/api/clones",
            json!({"id": "b"}),
            "field `url`: missing",
        ),
        (
            Method::POST,
            "/api/clones",
            json!({"id": "b", "url": "http://x:1"}),
            "field `url`",
        ),
        (
            Method::POST,
            "/api/clones",
            json!({"id": "n1", "url": "tcp://127.0.0.1:9"}),
            "own id",
        ),
        (
            Method::POST,
            "/api/clones",
            json!({"id": 5, "url": "tcp://127.0.0.1:9"}),
            "field `id`: must be a string",
        ),
        (
            Method::POST,
            "/api/clones",
            json!({"id": "b", "url": "tcp://127.0.0.1:9", "x": 1}),
            "field `x`: unknown",
        ),
        (
            Method::PUT,
            "/api/auth-out",
            json!({}),
            "field `value`: missing",
        ),
        (
            Method::POST,
            "/api/groups",
            json!({"name": ""}),
            "field `name`: must not be empty",
        ),
        (
            Method::POST,
            "/api/groups",
            json!({"name": "g", "data": 1}),
            "field `data`",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"data": "x"}),
            "field `groups`: missing",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"groups": ["a"]}),
            "field `data`: missing",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"groups": ["a", 3], "data": "x"}),
            "field `groups[1]`",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"groups": [], "data": "x"}),
            "field `groups`: must not be empty",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"groups": ["a"], "all": true, "data": "x"}),
            "field `groups`",
        ),
        (
            Method::POST,
            "/api/publish",
            json!({"all": "yes", "data": "x"}),
            "field `all`",
        ),
        (
            Method::POST,
            "/api/groups",
            json!(["g"]),
            "body: not a JSON object",
        ),
    ];
    let n = cases.len() as f64;
    for (method, path, body, want) in cases {
        let err = c.call(method.clone(), path, Some(&body)).await.unwrap_err();
        assert!(
            matches!(&err, AdminClientError::Refused { status: 400, message } if message.contains(want)),
            "{method} {path} {body}: {err}"
        );
    }
    let (status, answer) = c.send(Method::POST, "/api/groups", None).await.unwrap();
    assert_eq!(status.as_u16(), 400, "{answer:?}");
    assert!(String::from_utf8_lossy(&answer).contains("body: not JSON"));
    let err = c
        .call(Method::DELETE, "/api/clients/abc", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminClientError::Refused { status: 400, message } if message.contains("field `key`")),
        "{err}"
    );
    assert!(m.clones().await.unwrap().is_empty());
    assert!(m.groups().await.unwrap().is_empty());
    assert_eq!(m.stats().published, 0);
    let refused = reg
        .value(
            "replimesh_admin_refused_total",
            &[("reason", "bad_request")],
        )
        .unwrap();
    assert_eq!(refused, n + 2.0);
    // A body past the limit: 413.
    let big = json!({"name": "g", "data": "x".repeat(MAX_BODY)});
    let (status, _) = c
        .send(Method::POST, "/api/groups", Some(&big))
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 413);
    m.shutdown().await;
}

#[testkit::test]
async fn clones_and_auth_out_change_the_mesh() {
    let (a, reg, _server, c) = writable().await;
    let b = mesh::Server::start(
        mesh::ServerConfig::new("n2", "tcp://127.0.0.1:0").auth_in(|v| v == b"s3cret"),
    )
    .await
    .unwrap();
    let answer = c.add_clone("n2", b.url()).await.unwrap();
    assert_eq!(answer["added"], "n2");
    assert_eq!(changes(&reg, "clone_add"), 1.0);
    // b wants a token a does not send yet: known, not linked.
    let linked = || async {
        a.clones()
            .await
            .unwrap()
            .iter()
            .any(|x| x.id == "n2" && x.linked)
    };
    assert!(a.clones().await.unwrap().iter().any(|x| x.id == "n2"));
    c.set_auth_out("s3cret").await.unwrap();
    assert_eq!(changes(&reg, "auth_out_set"), 1.0);
    assert!(
        testkit::eventually(T, linked).await,
        "never linked with the new auth value"
    );
    assert_eq!(c.delete_clone("n2").await.unwrap()["deleted"], "n2");
    assert!(a.clones().await.unwrap().iter().all(|x| x.id != "n2"));
    let err = c.delete_clone("n2").await.unwrap_err();
    assert!(
        matches!(err, AdminClientError::Refused { status: 404, .. }),
        "{err}"
    );
    assert_eq!(changes(&reg, "clone_delete"), 1.0);
    b.shutdown().await;
    a.shutdown().await;
}

#[testkit::test]
async fn groups_publish_and_clients() {
    let (m, reg, _server, c) = writable().await;
    c.create_group("room/1", "hello").await.unwrap();
    assert!(m.groups().await.unwrap().iter().any(|g| g.name == "room/1"));
    let client = mesh::Client::connect(mesh::ClientConfig::new([m.url().to_owned()]))
        .await
        .unwrap();
    let mut inbox = client.deliveries().unwrap();
    client.subscribe(&["room/1"]).unwrap();
    let subscribed = || async {
        m.clients()
            .await
            .unwrap()
            .iter()
            .any(|c| c.groups.iter().any(|g| g == "room/1"))
    };
    assert!(testkit::eventually(T, subscribed).await);
    let answer = c.publish(&["room/1".to_owned()], "hi").await.unwrap();
    assert_eq!(answer["published"], 2);
    let d = tokio::time::timeout(T, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.group.as_str(), &d.data[..]), ("room/1", &b"hi"[..]));
    c.publish(&[], "to all").await.unwrap();
    let d = tokio::time::timeout(T, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&d.data[..], b"to all");
    assert_eq!(changes(&reg, "publish"), 2.0);

    let list = c.clients().await.unwrap();
    let rows = list["clients"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{list}");
    assert_eq!(rows[0]["groups"], json!(["room/1"]));
    let key = rows[0]["key"].as_u64().unwrap();
    c.disconnect_client(key).await.unwrap();
    assert_eq!(changes(&reg, "client_disconnect"), 1.0);
    let gone = || async { m.clients().await.unwrap().iter().all(|c| c.key != key) };
    assert!(testkit::eventually(T, gone).await);
    let err = c.disconnect_client(key).await.unwrap_err();
    assert!(
        matches!(err, AdminClientError::Refused { status: 404, .. }),
        "{err}"
    );

    client.close();
    c.delete_group("room/1").await.unwrap();
    let deleted = || async { m.groups().await.unwrap().iter().all(|g| g.name != "room/1") };
    assert!(testkit::eventually(T, deleted).await);
    assert_eq!(changes(&reg, "group_create"), 1.0);
    assert_eq!(changes(&reg, "group_delete"), 1.0);
    m.shutdown().await;
}
