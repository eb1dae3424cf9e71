//! Writing the journal: accounting recorded actions, switching segments, sealing the pending
//! batch into records and fsyncing them, and the background thread of the interval policies.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use super::{lock, Due, JState, OpenSegment, Shared, WState, FLUSH_THRESHOLD};
use crate::fsutil;
use crate::journal::{push_entry, segment_path, SegmentEncoder};
use crate::{Error, FsyncPolicy};

impl Shared {
    pub(super) fn check_failed(&self) -> Result<(), Error> {
        match &*lock(&self.failed) {
            Some(msg) => Err(Error::Failed(msg.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn fail(&self, e: Error) -> Error {
        tracing::error!(error = %e, "backup journal failed");
        lock(&self.failed).get_or_insert_with(|| e.to_string());
        e
    }

    /// Checks and accounts a recorded action; for policies other than `Always` also appends it
    /// to the batch (and sets `inline_flush` when the batch is large). Returns whether a
    /// snapshot is due.
    pub(super) fn account(
        &self,
        seq: u64,
        inline_flush: Option<&mut bool>,
        action: &[u8],
    ) -> Result<Due, Error> {
        let mut j = lock(&self.j);
        if j.closed {
            return Err(Error::Closed);
        }
        if !j.started {
            return Err(Error::NotStarted);
        }
        if seq <= j.last_seq {
            return Err(Error::SeqOutOfOrder {
                last: j.last_seq,
                got: seq,
            });
        }
        if let Some(flag) = inline_flush {
            if self.policy.is_some() {
                push_entry(&mut j.batch, seq, action)?;
                *flag = j.batch.len() >= FLUSH_THRESHOLD;
            }
        }
        j.last_seq = seq;
        j.since_snapshot += 1;
        if self.timeout.is_some() && j.first_change.is_none() {
            j.first_change = Some(Instant::now());
        }
        Ok(if self.count.is_some_and(|c| j.since_snapshot >= c) {
            Due::Snapshot
        } else {
            Due::No
        })
    }

    /// Closes the current segment (writing out the pending batch) and starts a new one after
    /// `base`.
    pub(super) fn switch_segment(
        &self,
        w: &mut WState,
        j: &mut JState,
        base: u64,
    ) -> Result<(), Error> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        if let Some(mut old) = w.seg.take() {
            w.out.clear();
            let r = old.enc.encode_batch(&j.batch, &mut w.out);
            j.batch.clear();
            r?;
            let wrote = !w.out.is_empty();
            if wrote {
                let mut file = &old.file;
                file.write_all(&w.out)
                    .map_err(|e| self.fail(Error::io(&self.path, e)))?;
            }
            // Under `Always`, a batch of appended actions (`Backup::append`) written here is
            // fsynced by the next `commit`.
            if policy != FsyncPolicy::Always || wrote || w.unsynced {
                w.to_sync.push(old.file);
            }
        }
        let path = segment_path(&self.path, base);
        let enc = SegmentEncoder::new(base, j.history_id, self.write_key.clone())?;
        let tmp = fsutil::temp_path(&self.path);
        let file = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(enc.header())?;
            if policy == FsyncPolicy::Always {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            if policy == FsyncPolicy::Always {
                fsutil::sync_dir(&self.dir)?;
            }
            Ok(f)
        })()
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&path, e)
        })?;
        if policy != FsyncPolicy::Always {
            w.dir_dirty = true;
            w.unsynced = true;
        }
        w.seg = Some(OpenSegment { enc, file });
        Ok(())
    }

    /// Writes the pending batch as one record; with `sync`, fsyncs closed segments, the
    /// directory and the current segment.
    pub(super) fn flush_journal(&self, sync: bool) -> Result<(), Error> {
        if self.policy.is_none() {
            return Ok(());
        }
        let mut guard = lock(&self.w);
        let w = &mut *guard;
        std::mem::swap(&mut w.batch, &mut lock(&self.j).batch);
        let Some(seg) = w.seg.as_mut() else {
            w.batch.clear();
            return Ok(());
        };
        w.out.clear();
        let r = seg.enc.encode_batch(&w.batch, &mut w.out);
        w.batch.clear();
        r?;
        let r = (|| {
            if !w.out.is_empty() {
                let mut file = &seg.file;
                file.write_all(&w.out)?;
                w.unsynced = true;
            }
            if sync {
                for f in w.to_sync.drain(..) {
                    f.sync_data()?;
                }
                if w.dir_dirty {
                    fsutil::sync_dir(&self.dir)?;
                    w.dir_dirty = false;
                }
                if w.unsynced {
                    seg.file.sync_data()?;
                    w.unsynced = false;
                }
            }
            Ok(())
        })();
        if w.out.capacity() > 4 * FLUSH_THRESHOLD {
            w.out = Vec::new();
        }
        r.map_err(|e| self.fail(Error::io(&self.path, e)))
    }

    pub(super) fn wait_stop(&self, timeout: Duration) -> bool {
        let stop = lock(&self.stop);
        if *stop {
            return true;
        }
        let (stop, _) = self
            .stop_cv
            .wait_timeout(stop, timeout)
            .unwrap_or_else(|e| e.into_inner());
        *stop
    }
}

pub(super) fn flusher(sh: &Shared, interval: Duration) {
    let sync = matches!(sh.policy, Some(FsyncPolicy::Every(_)));
    loop {
        let stop = sh.wait_stop(interval);
        if let Err(e) = sh.flush_journal(sync || stop) {
            tracing::error!(error = %e, "journal flush failed");
            return;
        }
        if stop {
            return;
        }
    }
}
