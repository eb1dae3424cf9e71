//! The stores a node hosts: the reducer-erased [`HostedStore`], its backup
//! with the write and failure counts the metrics show, and how both are
//! built from a `[[store]]` table.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use replimesh::backup::{self, BackupConfig, FsyncPolicy};
use replimesh::store::{self, Reducer, Store, StoreConfig};

use crate::config::{Journal, Mode, ReducerKind, StoreSettings};
use crate::metrics::{Counter, Registry};
use crate::reducers::{CounterReducer, Kv};
use js::JsReducer;

/// A store hosted by a node, whatever its reducer.
#[derive(Clone)]
pub enum HostedStore {
    /// A [`CounterReducer`] store.
    Counter(Store<CounterReducer>),
    /// A [`Kv`] store.
    Kv(Store<Kv>),
    /// A store with a JavaScript reducer.
    Js(Store<JsReducer>),
}

macro_rules! with_store {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            HostedStore::Counter($s) => $e,
            HostedStore::Kv($s) => $e,
            HostedStore::Js($s) => $e,
        }
    };
}

impl HostedStore {
    /// The store's name.
    pub fn name(&self) -> String {
        with_store!(self, s => s.name().to_owned())
    }
    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        with_store!(self, s => s.seq())
    }
    /// The state as JSON.
    #[allow(clippy::needless_borrows_for_generic_args)] // `&*` is needed for the non-Copy states
    pub fn state_json(&self) -> serde_json::Value {
        with_store!(self, s => serde_json::to_value(&*s.state()).unwrap_or(serde_json::Value::Null))
    }
    /// Whether it is the authority.
    pub fn is_authority(&self) -> bool {
        with_store!(self, s => s.is_authority())
    }
    /// Whether it is connected (an authority always is).
    pub fn connected(&self) -> bool {
        with_store!(self, s => s.connected())
    }
    pub(super) async fn shutdown(&self) {
        with_store!(self, s => s.shutdown().await)
    }
    pub(super) fn add_to(&self, server: &store::Server) {
        with_store!(self, s => { server.add(s); })
    }
    pub(super) async fn connect(
        &self,
        url: &str,
        config: store::ClientConfig,
    ) -> Result<store::Client, store::ConnectError> {
        with_store!(self, s => s.connect_with(url, config).await)
    }
}

/// The backup of one hosted store: what the metrics and the status show.
pub(super) struct BackupState {
    pub(super) last_write: Mutex<Option<Instant>>,
    pub(super) failures: Counter,
    pub(super) writes: Counter,
}

impl BackupState {
    fn wrote(&self) {
        self.writes.inc();
        *self.last_write.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }
    pub(super) fn age(&self) -> Option<f64> {
        self.last_write
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_secs_f64())
    }
    fn count<T>(&self, r: Result<T, store::PersistError>) -> Result<T, store::PersistError> {
        if r.is_err() {
            self.failures.inc();
        }
        r
    }
    fn count_write(&self, r: Result<(), store::PersistError>) -> Result<(), store::PersistError> {
        if r.is_ok() {
            self.wrote();
        }
        self.count(r)
    }
}

/// The store crate's [`store::BackupPersistence`] (the backup's policies,
/// the journal, and the origins that keep dispatches exactly-once across
/// restarts), counting writes and failures for the metrics.
struct CountedBackup {
    inner: store::BackupPersistence,
    state: Arc<BackupState>,
}

impl store::Persistence for CountedBackup {
    fn load(&mut self) -> Result<store::Recovered, store::PersistError> {
        self.inner.load()
    }
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[store::Origin],
    ) -> Result<bool, store::PersistError> {
        self.state
            .count(self.inner.record(history_id, first_seq, actions, origins))
    }
    fn snapshot(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.state
            .count_write(self.inner.snapshot(history_id, seq, state, origins))
    }
    fn deadline(&self) -> Option<std::time::Instant> {
        self.inner.deadline()
    }
    fn shutdown(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.state
            .count_write(self.inner.shutdown(history_id, seq, state, origins))
    }
}

/// One hosted store with its backup and upstream link.
pub(super) struct Hosted {
    pub(super) settings: StoreSettings,
    pub(super) store: HostedStore,
    pub(super) backup: Option<Arc<BackupState>>,
    pub(super) upstream: Mutex<Option<store::Client>>,
}

impl Hosted {
    /// Stops the store and waits for it; an authority with a backup writes
    /// its final state there (through [`CountedBackup`]) and releases the
    /// backup's lock.
    pub(super) async fn shutdown(&self) -> anyhow::Result<()> {
        let failures = self.backup.as_ref().map(|b| b.failures.get());
        self.store.shutdown().await;
        match (&self.backup, failures) {
            (Some(b), Some(before)) if b.failures.get() > before => Err(anyhow::anyhow!(
                "final backup of store {} failed (see the log)",
                self.settings.name
            )),
            _ => Ok(()),
        }
    }
}

fn make_store(s: &StoreSettings) -> StoreConfig {
    let mode = match s.mode {
        Mode::Action => store::SyncMode::Action,
        Mode::Snapshot => store::SyncMode::Snapshot,
        Mode::Digest => store::SyncMode::Digest,
    };
    StoreConfig::default().mode(mode).resync(s.resync)
}

type OpenedBackup = (Arc<BackupState>, Box<dyn store::Persistence>);

fn open_backup(
    s: &StoreSettings,
    schema: u32,
    registry: &Registry,
) -> anyhow::Result<Option<OpenedBackup>> {
    let Some(b) = &s.backup else { return Ok(None) };
    let mut bc = BackupConfig::new(&b.path);
    if let Some(k) = &b.key_file {
        bc = bc.key(crate::config::read_secret("backup.key_file", k)?);
    }
    if let Some((m, t)) = b.kdf {
        bc = bc.kdf(backup::KdfParams {
            m_cost_kib: m,
            t_cost: t,
            p_cost: 1,
        });
    }
    if b.every > 0 {
        bc = bc.count(b.every);
    }
    if let Some(t) = b.after {
        bc = bc.timeout(t);
    }
    bc = match b.journal {
        Journal::Off => bc,
        Journal::Always => bc.journal(FsyncPolicy::Always),
        Journal::Interval => bc.journal(FsyncPolicy::Every(Duration::from_millis(200))),
        Journal::Never => bc.journal(FsyncPolicy::Never),
    };
    let inner = store::BackupPersistence::open(bc, &s.name, schema)
        .map_err(|e| anyhow::anyhow!("opening the backup of store {}: {e}", s.name))?;
    let labels = [("store", s.name.as_str())];
    let state = Arc::new(BackupState {
        last_write: Mutex::new(None),
        failures: registry.counter(
            "replimesh_backup_failures_total",
            "Failed backup writes",
            &labels,
        ),
        writes: registry.counter(
            "replimesh_backup_writes_total",
            "Backup snapshots written",
            &labels,
        ),
    });
    let p = CountedBackup {
        inner,
        state: state.clone(),
    };
    Ok(Some((state, Box::new(p))))
}

pub(super) fn host_store(s: &StoreSettings, registry: &Registry) -> anyhow::Result<Hosted> {
    let cfg = make_store(s);
    macro_rules! build {
        ($reducer:expr, $variant:ident) => {{
            let reducer = $reducer;
            let schema = reducer.schema();
            if s.upstream.is_some() {
                (HostedStore::$variant(Store::replica(reducer, cfg)), None)
            } else {
                match open_backup(s, schema, registry)? {
                    Some((b, p)) => (
                        HostedStore::$variant(
                            Store::authority_with_persistence(reducer, cfg, p)
                                .map_err(|e| anyhow::anyhow!("store {}: {e}", s.name))?,
                        ),
                        Some(b),
                    ),
                    None => (HostedStore::$variant(Store::authority(reducer, cfg)), None),
                }
            }
        }};
    }
    let name = s.name.clone();
    let (store, backup) = match &s.reducer {
        ReducerKind::Counter => build!(CounterReducer { name }, Counter),
        ReducerKind::Kv => build!(Kv { name }, Kv),
        ReducerKind::Js(js) => {
            let limits = js::Limits {
                time: js.time_limit,
                memory: js.memory_limit,
            };
            let reducer = JsReducer::load(&name, &js.path, js.schema, limits)
                .map_err(|e| anyhow::anyhow!("store {name}: JavaScript reducer {e}"))?;
            tracing::info!(store = %name, schema = reducer.schema(), file = %js.path.display(), "JavaScript reducer loaded");
            build!(reducer, Js)
        }
    };
    Ok(Hosted {
        settings: s.clone(),
        store,
        backup,
        upstream: Mutex::new(None),
    })
}
