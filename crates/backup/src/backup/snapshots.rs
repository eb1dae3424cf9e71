//! Handing snapshots to the background writer ([`Backup::snapshot`] and its variants), and
//! the writer thread itself, which coalesces queued snapshots and deletes the journal segments
//! a durable one covers.

use std::sync::mpsc;

use super::{lock, Backup, Job, Shared};
use crate::fsutil;
use crate::journal::list_segments;
use crate::snapshot::{write_snapshot, Snapshot};
use crate::{Error, FsyncPolicy};

impl Backup {
    pub(super) fn submit(
        &self,
        seq: u64,
        history_id: Option<u64>,
        make: Box<dyn FnOnce() -> Snapshot + Send>,
        wait: bool,
    ) -> Result<(), Error> {
        let sh = &*self.shared;
        sh.check_failed()?;
        let mut make = Some(make);
        let mut wait = wait;
        let mut old_history_segments = Vec::new();
        let first = {
            let mut w = lock(&sh.w);
            let mut j = lock(&sh.j);
            if j.closed {
                return Err(Error::Closed);
            }
            if j.started && history_id.is_some_and(|h| h != j.history_id) {
                // A new history starts over: its snapshot replaces everything (written before
                // this returns; the old history's segments are deleted after it).
                wait = true;
                j.last_seq = seq;
                j.snap_seq = seq;
                old_history_segments = list_segments(&sh.path)?
                    .into_iter()
                    .filter(|(base, _)| *base != seq)
                    .collect();
            }
            if seq < j.snap_seq {
                return Err(Error::SeqOutOfOrder {
                    last: j.snap_seq,
                    got: seq,
                });
            }
            if !j.started {
                // First snapshot: write it synchronously, then start the journal.
                drop(j);
                let snap = make.take().ok_or(Error::Closed)?();
                write_snapshot(&sh.path, &snap, sh.write_key.as_deref(), sh.chunk_size)?;
                let mut j = lock(&sh.j);
                j.history_id = snap.history_id;
                j.last_seq = snap.seq;
                j.snap_seq = snap.seq;
                j.started = true;
                j.since_snapshot = 0;
                j.first_change = None;
                sh.switch_segment(&mut w, &mut j, snap.seq)?;
                true
            } else {
                if let Some(h) = history_id {
                    j.history_id = h;
                }
                if seq > j.last_seq && sh.policy == Some(FsyncPolicy::Always) {
                    // The snapshot holds actions the journal does not: make it durable now.
                    wait = true;
                }
                // The new segment starts after the last recorded action; the old one (up to
                // that action) stays until a snapshot covers all of it.
                let base = seq.max(j.last_seq);
                j.last_seq = base;
                j.snap_seq = seq;
                j.since_snapshot = 0;
                j.first_change = None;
                sh.switch_segment(&mut w, &mut j, base)?;
                false
            }
        };
        let make = match make {
            Some(m) if !first => m,
            _ => return Ok(()),
        };
        let (tx, rx) = if wait {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let jobs = lock(&self.jobs);
            let sender = jobs.as_ref().ok_or(Error::Closed)?;
            sender
                .send(Job::Snapshot(make, seq, tx))
                .map_err(|_| Error::Closed)?;
        }
        match rx {
            Some(rx) => rx.recv().map_err(|_| Error::Closed)??,
            None => return Ok(()),
        }
        for (_, p) in old_history_segments {
            fsutil::remove_if_exists(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }
}

impl Shared {
    /// Deletes the journal segments covered by a durable snapshot at `seq`.
    ///
    /// A segment holds the actions after its base up to the next segment's base, so it is
    /// covered when the next segment's base is at most `seq`. The last segment is never
    /// deleted.
    fn delete_covered(&self, seq: u64) -> Result<(), Error> {
        let segments = list_segments(&self.path)?;
        for pair in segments.windows(2) {
            let ((_, p), (next_base, _)) = (&pair[0], &pair[1]);
            if *next_base <= seq {
                fsutil::remove_if_exists(p).map_err(|e| Error::io(p, e))?;
            }
        }
        Ok(())
    }
}

pub(super) fn snapshot_worker(sh: &Shared, rx: &mpsc::Receiver<Job>) {
    while let Ok(Job::Snapshot(mut make, mut seq, waiter)) = rx.recv() {
        let mut waiters: Vec<_> = waiter.into_iter().collect();
        // Coalesce: only the newest queued snapshot is worth writing.
        while let Ok(Job::Snapshot(m, s, w)) = rx.try_recv() {
            make = m;
            seq = s;
            waiters.extend(w);
        }
        let snap = make();
        let result = if snap.seq != seq {
            Err(Error::SeqOutOfOrder {
                last: seq,
                got: snap.seq,
            })
        } else {
            write_snapshot(&sh.path, &snap, sh.write_key.as_deref(), sh.chunk_size)
                .and_then(|_| sh.delete_covered(seq))
        };
        drop(snap);
        if let Err(e) = &result {
            tracing::error!(error = %e, seq, "writing the backup snapshot failed (the journal keeps the actions)");
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}
