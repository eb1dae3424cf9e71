//! Logins (Argon2id hashes) and bans.

use std::collections::HashMap;
use std::sync::Mutex;
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

/// The process's one Argon2 working memory, reused by every hash and
/// verification (they run one at a time: at start-up, then on the login
/// thread). Allocating 7 MiB per login and freeing it left the memory with
/// the allocator's arenas: about 36 MiB of resident memory after a few
/// logins, against 7 MiB now.
static MEMORY: Mutex<Vec<Block>> = Mutex::new(Vec::new());

/// Raw Argon2id of `password` with `salt` into `out`, in [`MEMORY`].
fn argon2id_into(
    params: Params,
    version: Version,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), argon2::Error> {
    let n = params.block_count();
    let argon = Argon2::new(Algorithm::Argon2id, version, params);
    let mut memory = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if memory.len() < n {
        memory.resize(n, Block::default());
    }
    argon.hash_password_into_with_memory(password, salt, out, &mut memory[..n])
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

    /// Checks a login (slow on purpose: run it off the async threads).
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

/// Addresses whose failed logins are counted at once; past that the counts
/// start again (bans are kept), so a flood of addresses takes bounded memory.
const MAX_COUNTED: usize = 100_000;

/// Failed-login counting and bans per address.
pub(crate) struct Bans {
    max_failures: u32,
    duration: Duration,
    failures: HashMap<String, u32>,
    banned: HashMap<String, Instant>,
}

impl Bans {
    pub(crate) fn new(max_failures: u32, duration: Duration) -> Self {
        Bans {
            max_failures: max_failures.max(1),
            duration,
            failures: HashMap::new(),
            banned: HashMap::new(),
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
