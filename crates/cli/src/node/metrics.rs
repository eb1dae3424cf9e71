//! The metrics a node exports besides its own counters: uptime, health,
//! the mesh's counters and per-store gauges, read at each scrape.

use std::sync::Arc;

use replimesh::mesh;

use super::shared::Shared;
use crate::admin::AdminSource;

/// Registers the node's gauges and the mesh's counters in its registry.
pub(super) fn register_metrics(shared: &Arc<Shared>) {
    let r = &shared.registry;
    let started = shared.started;
    r.gauge_fn(
        "replimesh_uptime_seconds",
        "Seconds since the node started",
        &[],
        move || started.elapsed().as_secs_f64(),
    );
    r.gauge_fn(
        "replimesh_up",
        "1 while the node accepts work, 0 while draining",
        &[],
        {
            let w = Arc::downgrade(shared);
            move || w.upgrade().map_or(0.0, |s| s.healthy() as u8 as f64)
        },
    );
    // The mesh's own counters, read at each scrape.
    type Stat = fn(&mesh::ServerStats) -> u64;
    type MeshCounter = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Stat,
    );
    let mesh_counters: [MeshCounter; 6] = [
        (
            "replimesh_messages_published_total",
            "Group messages published on this clone",
            &[],
            |s| s.published,
        ),
        (
            "replimesh_messages_delivered_total",
            "Group messages queued to this clone's subscribers",
            &[],
            |s| s.delivered,
        ),
        (
            "replimesh_messages_dropped_total",
            "Group messages for this clone's subscribers that could not be queued (slow or closing connections)",
            &[],
            |s| s.dropped,
        ),
        (
            "replimesh_clone_frames_total",
            "Frames on clone links",
            &[("dir", "in")],
            |s| s.clone_frames_in,
        ),
        (
            "replimesh_clone_frames_total",
            "Frames on clone links",
            &[("dir", "out")],
            |s| s.clone_frames_out,
        ),
        (
            "replimesh_unknown_frames_total",
            "Frames of unknown kinds from clients and clones (ignored; a newer peer's)",
            &[],
            |s| s.unknown_frames,
        ),
    ];
    for (name, help, labels, f) in mesh_counters {
        let w = Arc::downgrade(shared);
        r.counter_fn(name, help, labels, move || {
            w.upgrade().map_or(0.0, |s| f(&s.mesh.stats()) as f64)
        });
    }
    for (i, h) in shared.stores.iter().enumerate() {
        let labels = [("store", h.settings.name.as_str())];
        let w = Arc::downgrade(shared);
        r.gauge_fn(
            "replimesh_store_seq",
            "Last committed/applied sequence number",
            &labels,
            move || w.upgrade().map_or(0.0, |s| s.stores[i].store.seq() as f64),
        );
        let w = Arc::downgrade(shared);
        r.gauge_fn(
            "replimesh_store_connected",
            "1 when the store is connected to its authority (or is it)",
            &labels,
            move || {
                w.upgrade()
                    .map_or(0.0, |s| s.stores[i].store.connected() as u8 as f64)
            },
        );
        if h.backup.is_some() {
            let w = Arc::downgrade(shared);
            r.gauge_fn(
                "replimesh_backup_age_seconds",
                "Seconds since the last backup snapshot was written (-1: none yet)",
                &labels,
                move || {
                    w.upgrade()
                        .and_then(|s| s.stores[i].backup.as_ref().and_then(|b| b.age()))
                        .unwrap_or(-1.0)
                },
            );
        }
    }
}
