//! Logins (Argon2id hashes) and bans.

use std::collections::HashMap;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
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

/// Hashes a password as an Argon2id PHC string (`$argon2id$v=19$...`), for
/// configuration files that should hold no plaintext.
pub fn hash_password(password: &str, cost: HashCost) -> Result<String, LoginError> {
    let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
        .map_err(|e| LoginError::Hash(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| LoginError::Hash(e.to_string()))?;
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| LoginError::Hash(e.to_string()))
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
        let ok = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        ok && known
    }
}

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
