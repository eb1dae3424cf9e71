//! The JSON encoding (`replimesh.v1.json`) as a third-party client sees it
//! over a real WebSocket, with hand-written JSON text: close codes arrive by
//! name, and a bad value in a store frame is answered with a `storeError` for
//! that store while the connection (and its mesh subscriptions) goes on. The
//! same for a bad enum value in a binary `StoreHello` over TCP.

mod common;

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replimesh::proto::{self, frame::Body, Frame, PeerKind};
use replimesh::store;
use replimesh::transport;
use replimesh_cli::config::NodeConfig;
use replimesh_cli::node::Node;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const T: Duration = Duration::from_secs(20);

/// The node's listener URL of `scheme`.
fn url(node: &Node, scheme: &str) -> String {
    node.urls()
        .iter()
        .find(|u| u.starts_with(scheme))
        .cloned()
        .unwrap_or_else(|| panic!("no {scheme} listener"))
}

async fn start_node() -> Node {
    let config = NodeConfig::parse(
        &format!(
            r#"
            id = "json"
            [[listen]]
            url = "ws://127.0.0.1:0/"
            [[listen]]
            url = "tcp://127.0.0.1:0"
            [[store]]
            name = "counter"
            reducer = "counter"
            logins = {{ app = "{}" }}
            "#,
            common::cheap_phc("secret")
        ),
        Path::new("."),
    )
    .unwrap();
    tokio::time::timeout(T, Node::start(config))
        .await
        .expect("node start timed out")
        .unwrap()
}

struct Json {
    ws: WebSocketStream<TcpStream>,
}

impl Json {
    /// Opens a WebSocket with the `replimesh.v1.json` subprotocol.
    async fn connect(url: &str) -> Json {
        let hostport = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "replimesh.v1.json".parse().unwrap(),
        );
        let tcp = tokio::time::timeout(T, TcpStream::connect(&hostport))
            .await
            .expect("connect timed out")
            .unwrap();
        let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::client_async(req, tcp))
            .await
            .expect("upgrade timed out")
            .unwrap();
        assert_eq!(
            resp.headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap()),
            Some("replimesh.v1.json")
        );
        Json { ws }
    }

    async fn send(&mut self, frame: Value) {
        tokio::time::timeout(T, self.ws.send(Message::Text(frame.to_string().into())))
            .await
            .expect("send timed out")
            .unwrap();
    }

    /// The next frame other than a ping (answered); `None` when the
    /// connection ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(T, self.ws.next())
                .await
                .expect("timed out waiting for a frame")?;
            let text = match m {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            };
            let v: Value = serde_json::from_str(text.as_str())
                .unwrap_or_else(|e| panic!("not JSON: {e}: {text}"));
            if let Some(p) = v.get("ping") {
                let nonce = p.get("nonce").cloned().unwrap_or(json!("0"));
                self.send(json!({"pong": {"nonce": nonce}})).await;
                continue;
            }
            return Some(v);
        }
    }

    /// The next frame of kind `kind`, skipping store catch-up frames.
    async fn expect(&mut self, kind: &str) -> Value {
        loop {
            let v = self
                .next()
                .await
                .unwrap_or_else(|| panic!("connection ended waiting for {kind}"));
            if let Some(body) = v.get(kind) {
                return body.clone();
            }
            let skip = ["snapshot", "actions", "storeWelcome", "committed"];
            assert!(
                skip.iter().any(|k| v.get(k).is_some()),
                "waiting for {kind}, got {v}"
            );
        }
    }
}

fn hello(login: &str, password: &str) -> Value {
    json!({"hello": {
        "version": 1,
        "kind": "PEER_KIND_CLIENT",
        "id": "json-client",
        "login": login,
        "password": password,
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_arrive_by_name() {
    let node = start_node().await;
    let url = url(&node, "ws://");

    // Another protocol version.
    let mut c = Json::connect(&url).await;
    c.send(json!({"hello": {"version": 99, "kind": "PEER_KIND_CLIENT"}}))
        .await;
    let close = c.expect("close").await;
    assert_eq!(close["code"], json!("CLOSE_CODE_UNSUPPORTED_VERSION"));

    // A wrong password.
    let mut c = Json::connect(&url).await;
    c.send(hello("app", "wrong")).await;
    let close = c.expect("close").await;
    assert_eq!(close["code"], json!("CLOSE_CODE_AUTH_FAILED"), "{close}");

    // Something other than a hello first.
    let mut c = Json::connect(&url).await;
    c.send(json!({"subscribe": {"groups": ["g"]}})).await;
    let close = c.expect("close").await;
    assert_eq!(close["code"], json!("CLOSE_CODE_PROTOCOL_ERROR"), "{close}");

    // The server going away.
    let mut c = Json::connect(&url).await;
    c.send(hello("", "")).await;
    c.expect("welcome").await;
    tokio::time::timeout(T, node.shutdown())
        .await
        .expect("shutdown timed out")
        .unwrap();
    let close = c.expect("close").await;
    assert_eq!(close["code"], json!("CLOSE_CODE_GOING_AWAY"), "{close}");
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_in_a_store_frame_is_an_error_for_that_store() {
    let node = start_node().await;
    let url = url(&node, "ws://");
    let mut c = Json::connect(&url).await;
    c.send(hello("app", "secret")).await;
    c.expect("welcome").await;
    c.send(json!({"subscribe": {"groups": ["room"]}})).await;

    // An enum name the schema does not have.
    c.send(json!({"storeHello": {
        "store": "counter", "schema": 1, "clientId": "py-1",
        "encoding": "ENCODING_XML",
    }}))
    .await;
    let e = c.expect("storeError").await;
    assert_eq!(e["store"], json!("counter"), "{e}");
    assert_eq!(
        e["error"]["code"],
        json!(store::ErrorCode::BadFrame.as_u32()),
        "{e}"
    );
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("ENCODING_XML"), "{message}");

    // An enum number the schema does not have (what a binary peer can send).
    c.send(json!({"storeHello": {
        "store": "counter", "schema": 1, "clientId": "py-1", "encoding": 7,
    }}))
    .await;
    let e = c.expect("storeError").await;
    assert_eq!(
        (e["store"].clone(), e["error"]["code"].clone()),
        (json!("counter"), json!(store::ErrorCode::BadFrame.as_u32())),
        "{e}"
    );

    // A value of the wrong type in a dispatch: the error names its op id.
    c.send(json!({"storeHello": {
        "store": "counter", "schema": 1, "clientId": "py-1", "encoding": "ENCODING_JSON",
    }}))
    .await;
    c.expect("storeWelcome").await;
    c.send(json!({"dispatch": {
        "store": "counter", "opId": "1", "action": "eyJBZGQiOjJ9", "more": 5,
    }}))
    .await;
    let e = c.expect("storeError").await;
    assert_eq!(
        (e["store"].clone(), e["opId"].clone()),
        (json!("counter"), json!("1")),
        "{e}"
    );

    // The connection goes on: the mesh subscription still delivers, and the
    // store still commits.
    c.send(json!({"publish": {"groups": ["room"], "data": "aGk="}}))
        .await;
    let d = c.expect("deliver").await;
    assert_eq!(
        (d["group"].clone(), d["data"].clone()),
        (json!("room"), json!("aGk="))
    );
    // {"Add":2}
    c.send(json!({"dispatch": {"store": "counter", "opId": "1", "action": "eyJBZGQiOjJ9"}}))
        .await;
    let done = c.expect("committed").await;
    assert_eq!(done["opId"], json!("1"), "{done}");
    assert_eq!(node.store("counter").unwrap().state_json(), json!(2));

    tokio::time::timeout(T, node.shutdown())
        .await
        .expect("shutdown timed out")
        .unwrap();
}

/// The next frame's body on a binary connection.
async fn recv_body(c: &mut transport::Connection) -> Body {
    tokio::time::timeout(T, c.recv())
        .await
        .expect("timed out waiting for a frame")
        .expect("connection ended")
        .body
        .expect("empty frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_enum_value_in_a_binary_store_hello_is_an_error_for_that_store() {
    let node = start_node().await;
    let mut c = tokio::time::timeout(
        T,
        transport::connect(&url(&node, "tcp://"), &transport::Config::default()),
    )
    .await
    .expect("connect timed out")
    .unwrap();
    c.send(&Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        id: "binary".into(),
        login: "app".into(),
        password: "secret".into(),
        ..Default::default()
    })))
    .unwrap();
    assert!(matches!(recv_body(&mut c).await, Body::Welcome(_)));
    c.send(&Frame::new(Body::Subscribe(proto::Subscribe {
        groups: vec!["room".into()],
    })))
    .unwrap();
    c.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: 1,
        client_id: "binary-1".into(),
        encoding: 7,
        ..Default::default()
    })))
    .unwrap();
    match recv_body(&mut c).await {
        Body::StoreError(e) => {
            assert_eq!(e.store, "counter");
            let info = e.error.unwrap();
            assert_eq!(info.code, store::ErrorCode::BadFrame.as_u32());
            assert!(info.message.contains("encoding 7"), "{}", info.message);
        }
        other => panic!("expected a store error, got {other:?}"),
    }
    // The connection and its subscription go on.
    c.send(&Frame::new(Body::Publish(proto::Publish {
        groups: vec!["room".into()],
        data: b"hi".to_vec().into(),
        ..Default::default()
    })))
    .unwrap();
    match recv_body(&mut c).await {
        Body::Deliver(d) => assert_eq!((d.group.as_str(), &d.data[..]), ("room", &b"hi"[..])),
        other => panic!("expected a deliver, got {other:?}"),
    }
    tokio::time::timeout(T, node.shutdown())
        .await
        .expect("shutdown timed out")
        .unwrap();
}
