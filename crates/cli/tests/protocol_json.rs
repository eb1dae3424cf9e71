//! The JSON encoding (`replimesh.v1.json`) as a third-party client sees it
//! over a real WebSocket, with hand-written JSON text: close codes arrive by
//! name.

mod common;

use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replimesh_cli::config::NodeConfig;
use replimesh_cli::node::Node;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const T: Duration = Duration::from_secs(20);

async fn start_node() -> Node {
    let config = NodeConfig::parse(
        &format!(
            r#"
            id = "json"
            [[listen]]
            url = "ws://127.0.0.1:0/"
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
    let url = node.urls()[0].clone();

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
