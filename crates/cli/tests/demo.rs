//! The demo runs with no set-up and checks its own invariants.

use std::time::Duration;

use replimesh_cli::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_delivers_everything_once_and_backs_up() {
    let opts = DemoOptions {
        duration: Duration::from_millis(1500),
        rate: 500,
        ..DemoOptions::default()
    };
    let s = run(opts).await.unwrap();
    assert!(s.published > 0 && s.actions > 0, "{s:?}");
    assert_eq!(s.expected, s.published * 6, "{s:?}");
    assert_eq!((s.lost, s.duplicates), (0, 0), "{s:?}");
    assert_eq!(s.seq, s.actions, "{s:?}");
    assert!(s.replicas_equal && s.backup_ok, "{s:?}");
    assert!(s.ok());
}
