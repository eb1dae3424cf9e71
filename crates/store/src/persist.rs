//! Persistence of an authority's history (backups plug in here).

use bytes::Bytes;

pub use crate::core::Recovered;

/// Where an authority keeps its history so that it survives a restart.
///
/// The store calls it synchronously while committing (keep `record` cheap:
/// buffer and write in the background if needed). All payloads are the
/// binary (`postcard`) encodings of actions and states.
pub trait Persistence: Send + 'static {
    /// What was persisted before (history id 0 when nothing).
    fn load(&mut self) -> Result<Recovered, PersistError>;
    /// Committed actions `first_seq, first_seq + 1, ...` of `history_id`.
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
    ) -> Result<(), PersistError>;
    /// The state after action `seq` of `history_id`; what came before it
    /// may be discarded.
    fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError>;
}

/// A persistence failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("persistence: {0}")]
pub struct PersistError(pub String);

impl PersistError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        PersistError(message.into())
    }
}

/// An in-memory [`Persistence`], for tests and examples. Clones share the
/// same storage, so a "restarted" authority can load what the first one kept.
#[derive(Debug, Clone, Default)]
pub struct MemoryPersistence {
    inner: std::sync::Arc<std::sync::Mutex<Recovered>>,
}

impl MemoryPersistence {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Persistence for MemoryPersistence {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
    ) -> Result<(), PersistError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.history_id = history_id;
        for (i, a) in actions.iter().enumerate() {
            g.actions.push((first_seq + i as u64, a.clone()));
        }
        Ok(())
    }

    fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.history_id = history_id;
        g.snapshot = Some((seq, state.clone()));
        g.actions.retain(|(s, _)| *s > seq);
        Ok(())
    }
}
