//! Shared pieces of the `mesh-*` scenarios: the clone child role (a
//! `replimesh_mesh::Server` in its own process, driven through `ctl` routes)
//! and helpers to start and drive a set of clones.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use mesh::{Client, ClientConfig, RouteError, Server, ServerConfig};
use replimesh_benches::{exit_when_parent_goes, tell_parent, ChildRole};

/// Child role `clone <id>`: starts a clone on 127.0.0.1, prints its url,
/// serves `ctl/add` ("id url"), `ctl/linked`, `ctl/rss`, `echo/*`.
pub(crate) fn clone_child(args: &[String]) -> Result<()> {
    exit_when_parent_goes(Duration::from_secs(120));
    let id = args.get(1).context("clone id")?.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut cfg = ServerConfig::new(id, "tcp://127.0.0.1:0");
        cfg.transport.max_queue_bytes = 256 << 20;
        let server = Server::start(cfg).await?;
        let s = server.clone();
        server.route("ctl", "add", move |ctx| {
            let s = s.clone();
            async move {
                let text = String::from_utf8_lossy(&ctx.data).to_string();
                let (id, url) = text
                    .split_once(' ')
                    .ok_or_else(|| RouteError::new(400, "id url"))?;
                s.add_clone(id, url, None)
                    .await
                    .map_err(|e| RouteError::new(500, e.to_string()))?;
                Ok(Bytes::new())
            }
        });
        let s = server.clone();
        server.route("ctl", "linked", move |_| {
            let s = s.clone();
            async move {
                let n = s
                    .clones()
                    .await
                    .map_err(|e| RouteError::new(500, e.to_string()))?
                    .iter()
                    .filter(|c| c.linked && c.up)
                    .count();
                Ok(Bytes::from((n as u64).to_be_bytes().to_vec()))
            }
        });
        server.route("ctl", "rss", |_| async move {
            Ok(Bytes::from(rss_bytes().to_be_bytes().to_vec()))
        });
        server.route("echo", "", |ctx| async move { Ok(ctx.data) });
        tell_parent(server.url());
        std::future::pending::<()>().await;
        Ok::<_, anyhow::Error>(())
    })
}

/// Resident set size of this process in bytes (0 when unknown).
pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A clone running in a child process, with a control client.
pub(crate) struct CloneProc {
    pub(crate) id: String,
    pub(crate) url: String,
    pub(crate) ctl: Client,
    _child: ChildRole,
}

/// Starts `n` clone processes named `clone1..clonen`.
pub(crate) async fn start_clones(n: usize) -> Result<Vec<CloneProc>> {
    let mut v = Vec::new();
    for i in 1..=n {
        let id = format!("clone{i}");
        let mut child = ChildRole::spawn(&["clone", &id])?;
        let url = tokio::task::block_in_place(|| child.read_line())?;
        let ctl = Client::connect(ClientConfig::new([url.clone()])).await?;
        v.push(CloneProc {
            id,
            url,
            ctl,
            _child: child,
        });
    }
    Ok(v)
}

impl CloneProc {
    pub(crate) async fn add(&self, other: &CloneProc) -> Result<()> {
        self.ctl
            .request("ctl", "add", format!("{} {}", other.id, other.url))
            .await?;
        Ok(())
    }

    pub(crate) async fn linked(&self) -> Result<u64> {
        let b = self.ctl.request("ctl", "linked", Bytes::new()).await?;
        Ok(u64::from_be_bytes(b[..8].try_into()?))
    }

    pub(crate) async fn rss(&self) -> Result<u64> {
        let b = self.ctl.request("ctl", "rss", Bytes::new()).await?;
        Ok(u64::from_be_bytes(b[..8].try_into()?))
    }
}

/// Waits until every clone is linked to all others (polling every 200 µs).
pub(crate) async fn wait_full_mesh(clones: &[CloneProc], limit: Duration) -> Result<()> {
    let end = tokio::time::Instant::now() + limit;
    let want = clones.len() as u64 - 1;
    loop {
        let mut done = true;
        for c in clones {
            if c.linked().await? != want {
                done = false;
                break;
            }
        }
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() > end {
            bail!("no full mesh after {limit:?}");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}
