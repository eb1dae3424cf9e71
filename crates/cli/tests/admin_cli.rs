//! The admin subcommands (`replimesh clone add`, `group create`, ...) against
//! a node started in this process, through its admin write endpoints.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use replimesh_cli::config::NodeConfig;
use replimesh_cli::node::Node;

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");
const T: Duration = Duration::from_secs(30);

/// Runs the binary with `args` plus `--admin URL --token-file F`.
async fn run(args: &[&str], admin: &str, token_file: &Path) -> Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .arg("--admin")
        .arg(admin)
        .arg("--token-file")
        .arg(token_file)
        .kill_on_drop(true);
    tokio::time::timeout(T, cmd.output())
        .await
        .expect("the command did not end")
        .unwrap()
}

fn stdout(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_change_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::parse(
        r#"
        id = "n1"
        admin = "127.0.0.1:0"
        [[listen]]
        url = "tcp://127.0.0.1:0"
        [security]
        admin_write_token = "s3cret-w"
        "#,
        Path::new("."),
    )
    .unwrap();
    let node = Node::start(config).await.unwrap();
    let admin = format!("http://{}", node.admin_addr().unwrap());
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-w\n").unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();

    // A wrong token: exit 1, the node's reason, nothing changed.
    let o = run(&["group", "create", "lobby"], &admin, &wrong).await;
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("401") && err.contains("write token"), "{err}");
    assert!(node.mesh().groups().await.unwrap().is_empty());

    let v = stdout(&run(&["group", "create", "lobby", "--data", "d"], &admin, &token).await);
    assert_eq!(v["created"], "lobby");
    assert!(node
        .mesh()
        .groups()
        .await
        .unwrap()
        .iter()
        .any(|g| g.name == "lobby"));
    let v = stdout(&run(&["publish", "lobby", "--data", "hi"], &admin, &token).await);
    assert_eq!(v["published"], 2);
    stdout(&run(&["publish", "--all", "--data", "x"], &admin, &token).await);
    assert_eq!(node.mesh().stats().published, 2);
    stdout(&run(&["group", "delete", "lobby"], &admin, &token).await);

    let v = stdout(&run(&["clone", "add", "n2", "tcp://127.0.0.1:9"], &admin, &token).await);
    assert_eq!(v["added"], "n2");
    assert!(node
        .mesh()
        .clones()
        .await
        .unwrap()
        .iter()
        .any(|c| c.id == "n2"));
    stdout(&run(&["clone", "delete", "n2"], &admin, &token).await);
    assert!(node.mesh().clones().await.unwrap().is_empty());
    // Bad input: the field is named.
    let o = run(&["clone", "add", "n2", "http://x:1"], &admin, &token).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("field `url`"));

    let value = dir.path().join("value");
    std::fs::write(&value, "new-value\n").unwrap();
    let o = run(
        &["auth-out", "set", "--value-file", value.to_str().unwrap()],
        &admin,
        &token,
    )
    .await;
    assert_eq!(stdout(&o)["updated"], "auth_out");

    let v = stdout(&run(&["clients", "list"], &admin, &token).await);
    assert_eq!(v["clients"], serde_json::json!([]));
    let o = run(&["clients", "disconnect", "77"], &admin, &token).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"));
    node.shutdown().await.unwrap();
}
