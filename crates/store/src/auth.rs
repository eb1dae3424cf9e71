//! Logins (Argon2id hashes), the pool that checks passwords, and bans.
//!
//! Every password check of a process runs on a [`CheckPool`]: a few
//! dedicated threads (never the async runtime's), each with its own reused
//! Argon2 memory, fed from one bounded queue ordered by priority (addresses
//! that logged in before first, then by how often the address failed).
//! The [`Gate`](crate::Gate) decides the priority, lets each address have one
//! check at a time and counts the failures.

use std::cell::RefCell;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use argon2::password_hash::{Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::time::Instant;

/// A login table: user names and Argon2id password hashes. Plaintext
/// passwords given to [`Logins::add`] are hashed at once and never kept.
#[derive(Clone, Default)]
pub struct Logins {
    users: HashMap<String, String>,
    /// A hash of a random password with the same parameters, verified for
    /// unknown users so that they take as long as known ones.
    dummy: Option<String>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logins")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A login could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoginError {
    /// The string is not an Argon2id PHC hash.
    #[error("not an Argon2id PHC string: {0}")]
    BadHash(String),
    /// Hashing failed (bad parameters).
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// Argon2 cost parameters (memory in KiB, passes, lanes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory in KiB (default 7,168).
    pub memory_kib: u32,
    /// Passes (default 5).
    pub iterations: u32,
    /// Lanes (default 1).
    pub parallelism: u32,
}

/// OWASP's Argon2id settings with the smallest memory (7 MiB, 5 passes,
/// 1 lane), as strong as its 19 MiB / 2 passes alternative: servers verify
/// logins one at a time, so memory per verification is what stays resident.
impl Default for HashCost {
    fn default() -> Self {
        HashCost {
            memory_kib: 7 * 1024,
            iterations: 5,
            parallelism: 1,
        }
    }
}

/// Argon2 computations (hashes and verifications) run by this process.
static ARGON2_RUNS: AtomicU64 = AtomicU64::new(0);

/// How many Argon2 computations (hashes made and passwords checked,
/// including the dummy checks of unknown users) this process has run: for
/// metrics, and for tests that check that every login path pays the same
/// cost.
pub fn argon2_runs() -> u64 {
    ARGON2_RUNS.load(Ordering::Relaxed)
}

thread_local! {
    /// The Argon2 working memory of a [`CheckPool`] thread, reused by each
    /// check it runs (allocating 7 MiB per login and freeing it left the
    /// memory with the allocator's arenas: about 36 MiB of resident memory
    /// after a few logins). Other threads (hashing at start-up) allocate
    /// theirs for the one computation.
    static POOL_MEMORY: RefCell<Option<Vec<Block>>> = const { RefCell::new(None) };
}

/// Raw Argon2id of `password` with `salt` into `out`.
fn argon2id_into(
    params: Params,
    version: Version,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    ARGON2_RUNS.fetch_add(1, Ordering::Relaxed);
    let n = params.block_count();
    let argon = Argon2::new(Algorithm::Argon2id, version, params);
    POOL_MEMORY.with(|m| match m.borrow_mut().as_mut() {
        Some(memory) => {
            if memory.len() < n {
                memory.resize(n, Block::default());
            }
            argon.hash_password_into_with_memory(password, salt, out, &mut memory[..n])
        }
        None => {
            let mut memory = vec![Block::default(); n];
            argon.hash_password_into_with_memory(password, salt, out, &mut memory)
        }
    })
}

/// Hashes a password as an Argon2id PHC string (`$argon2id$v=19$...`), for
/// configuration files that should hold no plaintext.
pub fn hash_password(password: &str, cost: HashCost) -> Result<String, LoginError> {
    let err = |e: &dyn std::fmt::Display| LoginError::Hash(e.to_string());
    let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
        .map_err(|e| err(&e))?;
    let salt_bytes = rand::random::<[u8; 16]>();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| err(&e))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2id_into(
        params.clone(),
        Version::V0x13,
        password.as_bytes(),
        &salt_bytes,
        &mut out,
    )
    .map_err(|e| err(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| err(&e))?,
        salt: Some(Salt::from(&salt)),
        hash: Some(Output::new(&out).map_err(|e| err(&e))?),
    };
    Ok(phc.to_string())
}

/// Checks `password` against an Argon2id PHC hash (constant-time compare).
fn verify_phc(phc: &PasswordHash<'_>, password: &[u8]) -> bool {
    if phc.algorithm != Algorithm::Argon2id.ident() {
        return false;
    }
    let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(phc) else {
        return false;
    };
    let version = match phc.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    if argon2id_into(params, version, password, salt, &mut out).is_err() {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(&out).is_ok_and(|o| o == expected)
}

impl Logins {
    /// An empty table (nobody can log in).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a user with a plaintext password, hashed now with `cost`.
    pub fn add_with_cost(
        &mut self,
        user: &str,
        password: &str,
        cost: HashCost,
    ) -> Result<&mut Self, LoginError> {
        let h = hash_password(password, cost)?;
        if self.dummy.is_none() {
            self.dummy = Some(hash_password(
                &format!("{:x}", rand::random::<u128>()),
                cost,
            )?);
        }
        self.users.insert(user.to_owned(), h);
        Ok(self)
    }

    /// Adds a user with a plaintext password (hashed now with default cost).
    pub fn add(&mut self, user: &str, password: &str) -> Result<&mut Self, LoginError> {
        self.add_with_cost(user, password, HashCost::default())
    }

    /// Adds a user with an Argon2id PHC string (no plaintext anywhere).
    pub fn add_hash(&mut self, user: &str, phc: &str) -> Result<&mut Self, LoginError> {
        let parsed = PasswordHash::new(phc).map_err(|e| LoginError::BadHash(e.to_string()))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(LoginError::BadHash(format!(
                "algorithm {} (only argon2id)",
                parsed.algorithm
            )));
        }
        if self.dummy.is_none() {
            self.dummy = Some(phc.to_owned());
        }
        self.users.insert(user.to_owned(), phc.to_owned());
        Ok(self)
    }

    /// Adds a user from a config value: a PHC string (`$argon2id$...`) is
    /// taken as a hash, anything else as a plaintext password.
    pub fn add_config(&mut self, user: &str, value: &str) -> Result<&mut Self, LoginError> {
        if value.starts_with("$argon2") {
            self.add_hash(user, value)
        } else {
            self.add(user, value)
        }
    }

    /// Whether no user is configured.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Checks a login (slow on purpose: run it off the async threads, e.g.
    /// on a [`CheckPool`]). An unknown user is checked against a dummy hash
    /// of the same cost, so that it takes as long as a known one (a table
    /// without users refuses at once: there is nobody to find).
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => match &self.dummy {
                Some(d) => (d.as_str(), false),
                None => return false,
            },
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let ok = verify_phc(&parsed, password.as_bytes());
        ok && known
    }
}

/// A password check could not run: the [`CheckPool`]'s queue was full of
/// checks with a better priority, or the pool stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks waiting")]
pub struct Busy;

/// One queued check: lower `priority` first, then first come first served.
struct Job {
    priority: u32,
    seq: u64,
    run: Box<dyn FnOnce() + Send>,
}

impl Job {
    fn key(&self) -> (u32, u64) {
        (self.priority, self.seq)
    }
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Job {}
impl PartialOrd for Job {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Job {
    /// The heap pops the greatest: the lowest priority value, then the oldest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.key().cmp(&self.key())
    }
}

struct PoolState {
    queue: BinaryHeap<Job>,
    next_seq: u64,
    spawned: usize,
    closed: bool,
}

struct PoolInner {
    state: Mutex<PoolState>,
    ready: Condvar,
    threads: usize,
    max_queue: usize,
}

impl PoolInner {
    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pool thread: runs jobs until the pool closes.
    fn work(&self) {
        POOL_MEMORY.with(|m| *m.borrow_mut() = Some(Vec::new()));
        loop {
            let job = {
                let mut st = self.state();
                loop {
                    if let Some(j) = st.queue.pop() {
                        break j;
                    }
                    if st.closed {
                        return;
                    }
                    st = self.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            (job.run)();
        }
    }
}

/// Closes the pool when the last [`CheckPool`] handle goes: its threads end
/// once the queue is empty.
struct PoolHandle(Arc<PoolInner>);

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.0.state().closed = true;
        self.0.ready.notify_all();
    }
}

/// The budget of password checks (Argon2 work) of a process or a server:
/// at most `threads` checks run at once, each on a dedicated thread with
/// its own reused Argon2 memory (so memory is `threads` × one hash's
/// memory), and at most `max_queue` wait. Waiting checks run by priority
/// (lower first), equal priorities in arrival order. When the queue is full,
/// a new check with a better priority than the worst waiting one takes its
/// place (that one fails with [`Busy`]); otherwise the new one fails with
/// [`Busy`]. A check whose caller stopped waiting is skipped.
///
/// Cheap to clone (clones share the pool); the threads start at the first
/// check and end when the last clone is dropped.
#[derive(Clone)]
pub struct CheckPool {
    inner: Arc<PoolHandle>,
}

impl std::fmt::Debug for CheckPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckPool")
            .field("threads", &self.inner.0.threads)
            .field("max_queue", &self.inner.0.max_queue)
            .finish()
    }
}

impl Default for CheckPool {
    /// One thread, 256 waiting checks.
    fn default() -> Self {
        CheckPool::new(1, 256)
    }
}

impl CheckPool {
    /// A pool of `threads` (at least 1) checks at a time and `max_queue`
    /// (at least 1) waiting ones.
    pub fn new(threads: usize, max_queue: usize) -> CheckPool {
        CheckPool {
            inner: Arc::new(PoolHandle(Arc::new(PoolInner {
                state: Mutex::new(PoolState {
                    queue: BinaryHeap::new(),
                    next_seq: 0,
                    spawned: 0,
                    closed: false,
                }),
                ready: Condvar::new(),
                threads: threads.max(1),
                max_queue: max_queue.max(1),
            }))),
        }
    }

    /// The process's shared pool (the default one: 1 thread, 256 waiting).
    pub fn global() -> CheckPool {
        static GLOBAL: std::sync::OnceLock<CheckPool> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(CheckPool::default).clone()
    }

    /// Checks waiting now.
    pub fn waiting(&self) -> usize {
        self.inner.0.state().queue.len()
    }

    /// Runs `check` on one of the pool's threads with `priority` (lower
    /// runs first) and returns its result; [`Busy`] when it was refused or
    /// pushed out of a full queue.
    pub async fn run<T: Send + 'static>(
        &self,
        priority: u32,
        check: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = Box::new(move || {
            // Skipped when nobody waits for the answer any more.
            if !tx.is_closed() {
                let _ = tx.send(check());
            }
        });
        let inner = &self.inner.0;
        {
            let mut st = inner.state();
            if st.closed {
                return Err(Busy);
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            let job = Job { priority, seq, run };
            if st.queue.len() >= inner.max_queue {
                // Full: the worst waiting job (the smallest in the heap's
                // order) makes room if the new one is better.
                let mut jobs = std::mem::take(&mut st.queue).into_vec();
                let worst = jobs
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.cmp(b.1))
                    .map(|(i, _)| i);
                match worst {
                    Some(i) if jobs[i] < job => {
                        jobs.swap_remove(i);
                        jobs.push(job);
                    }
                    _ => {
                        st.queue = BinaryHeap::from(jobs);
                        return Err(Busy);
                    }
                }
                st.queue = BinaryHeap::from(jobs);
            } else {
                st.queue.push(job);
            }
            if st.spawned < inner.threads {
                let worker = inner.clone();
                let spawned = std::thread::Builder::new()
                    .name("password-check".into())
                    .spawn(move || worker.work());
                match spawned {
                    Ok(_) => st.spawned += 1,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a password-check thread");
                        if st.spawned == 0 {
                            st.queue.clear();
                            return Err(Busy);
                        }
                    }
                }
            }
        }
        inner.ready.notify_one();
        rx.await.map_err(|_| Busy)
    }
}

/// Addresses whose failed logins are counted at once; past that the counts
/// start again (bans are kept), so a flood of addresses takes bounded memory.
const MAX_COUNTED: usize = 100_000;

/// How long an address that logged in is remembered as known (its checks
/// go first in the [`CheckPool`]).
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// Logins of one address in progress: the turn (one check at a time) and
/// how many wait for it, the running one included.
struct InFlight {
    turn: Arc<tokio::sync::Mutex<()>>,
    count: usize,
}

/// Failed-login counting, bans, logins in progress and known addresses,
/// per address.
pub(crate) struct Bans {
    max_failures: u32,
    duration: Duration,
    failures: HashMap<String, u32>,
    banned: HashMap<String, Instant>,
    in_flight: HashMap<String, InFlight>,
    known: HashMap<String, Instant>,
}

impl Bans {
    pub(crate) fn new(max_failures: u32, duration: Duration) -> Self {
        Bans {
            max_failures: max_failures.max(1),
            duration,
            failures: HashMap::new(),
            banned: HashMap::new(),
            in_flight: HashMap::new(),
            known: HashMap::new(),
        }
    }

    pub(crate) fn is_banned(&mut self, key: &str) -> bool {
        match self.banned.get(key) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                self.banned.remove(key);
                false
            }
            None => false,
        }
    }

    /// Records a failure; true when the address is now banned.
    pub(crate) fn fail(&mut self, key: &str) -> bool {
        if self.failures.len() >= MAX_COUNTED {
            // Bounded memory: forget the plain failure counts, keep the bans.
            self.failures.clear();
        }
        let n = self.failures.entry(key.to_owned()).or_insert(0);
        *n += 1;
        if *n >= self.max_failures {
            self.failures.remove(key);
            self.banned
                .insert(key.to_owned(), Instant::now() + self.duration);
            // Forget expired bans now and then.
            let now = Instant::now();
            self.banned.retain(|_, until| *until > now);
            return true;
        }
        false
    }

    pub(crate) fn success(&mut self, key: &str) {
        self.failures.remove(key);
        if self.known.len() >= MAX_COUNTED {
            let now = Instant::now();
            self.known.retain(|_, until| *until > now);
            if self.known.len() >= MAX_COUNTED {
                self.known.clear();
            }
        }
        self.known
            .insert(key.to_owned(), Instant::now() + KNOWN_FOR);
    }

    /// The priority of the address's next password check (lower first):
    /// 0 for an address that logged in within a day, else 1 plus its
    /// failures so far.
    pub(crate) fn priority(&self, key: &str) -> u32 {
        match self.known.get(key) {
            Some(until) if Instant::now() < *until => 0,
            _ => 1 + self.failures.get(key).copied().unwrap_or(0),
        }
    }

    /// A login of `key` starts: the turn to wait for, or `None` when `max`
    /// logins of this address are in progress already.
    pub(crate) fn enter(&mut self, key: &str, max: usize) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let e = self
            .in_flight
            .entry(key.to_owned())
            .or_insert_with(|| InFlight {
                turn: Arc::new(tokio::sync::Mutex::new(())),
                count: 0,
            });
        if e.count >= max.max(1) {
            return None;
        }
        e.count += 1;
        Some(e.turn.clone())
    }

    /// A login of `key` that [`Bans::enter`] admitted is over.
    pub(crate) fn leave(&mut self, key: &str) {
        if let Some(e) = self.in_flight.get_mut(key) {
            e.count -= 1;
            if e.count == 0 {
                self.in_flight.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordHasher;

    const CHEAP: HashCost = HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };

    /// The pool runs better priorities first, equal ones in arrival order,
    /// and a full queue keeps the best checks.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_pool_orders_by_priority_and_bounds_its_queue() {
        let pool = CheckPool::new(1, 3);
        let order = Arc::new(Mutex::new(Vec::new()));
        // Hold the only thread until every check is queued.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = tokio::spawn({
            let (pool, started) = (pool.clone(), started.clone());
            async move {
                pool.run(0, move || {
                    started.store(true, Ordering::SeqCst);
                    hold.recv().is_ok()
                })
                .await
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !started.load(Ordering::SeqCst) {
            assert!(
                std::time::Instant::now() < deadline,
                "the pool did not start"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut tasks = Vec::new();
        for (name, priority) in [("late", 5u32), ("a", 1), ("b", 1), ("known", 0)] {
            let (p, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                p.run(priority, move || order.lock().unwrap().push(name))
                    .await
            }));
            // Queued in this order.
            let want = tasks.len().min(3);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while pool.waiting() < want {
                assert!(std::time::Instant::now() < deadline, "not queued");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // "late" is pushed out of the full queue by "known".
        let late = tasks.remove(0);
        let late = tokio::time::timeout(Duration::from_secs(10), late).await;
        assert_eq!(late.expect("late was not pushed out").unwrap(), Err(Busy));
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(true));
        let results: Vec<_> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(results, vec![Ok(()), Ok(()), Ok(())]);
        assert_eq!(*order.lock().unwrap(), vec!["known", "a", "b"]);
    }

    #[test]
    fn hash_and_verify() {
        let mut l = Logins::new();
        l.add_with_cost("alice", "right", CHEAP).unwrap();
        assert!(l.verify("alice", "right"));
        assert!(!l.verify("alice", "wrong"));
        assert!(!l.verify("bob", "right"), "unknown user");
        let phc = hash_password("pw", CHEAP).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
    }

    /// Hashes made by other Argon2id implementations (the argon2 crate's
    /// own hasher, other parameters and lanes) verify, and the bytes matter.
    #[test]
    fn verifies_standard_phc_strings() {
        for (m, t, p) in [(64, 1, 1), (256, 2, 2), (7 * 1024, 1, 1)] {
            let params = Params::new(m, t, p, None).unwrap();
            let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
            let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
            let phc = argon.hash_password(b"secret", &salt).unwrap().to_string();
            let mut l = Logins::new();
            l.add_hash("u", &phc).unwrap();
            assert!(l.verify("u", "secret"), "{phc}");
            assert!(!l.verify("u", "secreT"), "{phc}");
        }
        // Another algorithm is refused when added.
        let argon = Argon2::new(Algorithm::Argon2i, Version::V0x13, Params::default());
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = argon.hash_password(b"x", &salt).unwrap().to_string();
        assert!(Logins::new().add_hash("u", &phc).is_err());
    }
}
