//! Property test of the read loop, with a reader task and inline: frames of
//! random sizes (small ones and ones over the large-frame threshold), with
//! pings among them, through an in-memory pipe of random capacity that cuts
//! the stream at arbitrary points, arrive whole, in order, and only once.

use std::time::Duration;

use proptest::prelude::*;
use replimesh_transport::proto::{CloseCode, Frame};
use replimesh_transport::{Config, RecvError};

/// Per frame: whether a ping goes just before it, and its payload size.
fn arb_frames() -> impl Strategy<Value = Vec<(bool, usize)>> {
    prop::collection::vec(
        (
            any::<bool>(),
            prop_oneof![3 => 0usize..2048, 1 => 16_384usize..90_000],
        ),
        1..30,
    )
}

fn payload(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|j| (i * 7 + j) as u8).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn frames_cut_anywhere_arrive_whole_in_order_once(
        frames in arb_frames(),
        pipe in 64usize..20_000,
        inline_reads: bool,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config = Config {
                inline_reads,
                ..Config::default()
            };
            let (a, b) = replimesh_transport::pair(&config, pipe);
            let (a_tx, mut a_rx) = a.split();
            let (_b_tx, mut b_rx) = b.split();
            // The sending side reads too (the pongs), as a real peer does.
            let drain = tokio::spawn(async move { while a_rx.recv().await.is_ok() {} });
            let to_send = frames.clone();
            let sender = tokio::spawn(async move {
                for (i, &(ping, n)) in to_send.iter().enumerate() {
                    if ping {
                        a_tx.send_wait(&Frame::ping(i as u64)).await.unwrap();
                    }
                    a_tx.send_wait(&Frame::data(payload(i, n))).await.unwrap();
                }
                a_tx
            });
            for (i, &(_, n)) in frames.iter().enumerate() {
                let got = tokio::time::timeout(Duration::from_secs(10), b_rx.recv())
                    .await
                    .expect("recv timed out")
                    .expect("recv failed");
                assert_eq!(got, Frame::data(payload(i, n)), "frame {i}");
            }
            // Nothing more, nothing twice.
            assert!(b_rx.try_recv().is_none());
            sender.await.unwrap().close(CloseCode::Normal, "done");
            let end = tokio::time::timeout(Duration::from_secs(10), b_rx.recv()).await;
            assert!(matches!(end, Ok(Err(RecvError::Closed { .. }))), "{end:?}");
            drain.await.unwrap();
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the bytes and however they are cut, the stream reader ends
    /// (with an error or at the end of the bytes) and never panics.
    #[test]
    fn any_bytes_end_without_a_panic(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
        max in 0usize..70_000,
    ) {
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        let (frames, _end) = replimesh_transport::fuzz::split_stream(&chunks, max);
        let delivered: usize = frames.iter().map(|f| f.len() + 4).sum();
        prop_assert!(delivered <= total);
        prop_assert!(frames.iter().all(|f| f.len() <= max));
    }
}
