//! scratch throughput check (not committed)
use bytes::Bytes;
use replimesh_transport::{connect, listen, proto::Frame, Config};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let role = args[1].as_str();
    let url = args[2].clone();
    let size: usize = args[3].parse().unwrap();
    let n: usize = args[4].parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let config = Config::default();
        if role == "recv" {
            let l = listen(&url, &config).await.unwrap();
            println!("{}", l.local_url());
            let mut c = l.accept().await.unwrap();
            let _ = c.recv().await.unwrap();
            let t = Instant::now();
            for _ in 1..n {
                c.recv().await.unwrap();
            }
            let dt = t.elapsed().as_secs_f64();
            eprintln!(
                "recv {} frames of {} B: {:.0} frames/s {:.1} MB/s",
                n,
                size,
                n as f64 / dt,
                (n * size) as f64 / dt / 1e6
            );
        } else {
            let c = connect(&url, &config).await.unwrap();
            let payload = Bytes::from(vec![7u8; size]);
            for _ in 0..n {
                c.sender()
                    .send_wait(&Frame::data(payload.clone()))
                    .await
                    .unwrap();
            }
            c.sender().closed().await;
        }
    });
}
