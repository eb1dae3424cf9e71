//! Passphrase-derived keys: Argon2id parameters, [`Key`] and the per-open [`KeyRing`] cache.

use std::fmt;
use std::sync::{Arc, Mutex};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

use crate::Error;

/// Length of the random salt stored in every file header.
pub const SALT_LEN: usize = 16;
/// Length of the key check value stored in every encrypted file header.
pub(crate) const CHECK_LEN: usize = 16;
/// Length of an AES-256-GCM nonce.
pub(crate) const NONCE_LEN: usize = 12;
/// Length of an AES-256-GCM authentication tag.
pub(crate) const TAG_LEN: usize = 16;

/// Argon2id cost parameters, stored in each file header so a file can always be opened with the
/// passphrase alone.
///
/// The default (19 MiB, 2 passes, 1 lane) is the OWASP recommendation for Argon2id. Tests and
/// benchmarks of the write path may use [`KdfParams::insecure_fast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KdfParams {
    /// Memory cost in KiB (at least 8 × `p_cost`).
    pub m_cost_kib: u32,
    /// Number of passes (at least 1).
    pub t_cost: u32,
    /// Degree of parallelism (lanes, at least 1).
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            m_cost_kib: 19 * 1024,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// The cheapest parameters Argon2id accepts (8 KiB, 1 pass). They offer no protection
    /// against passphrase guessing: for tests only.
    pub const fn insecure_fast() -> Self {
        Self {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }

    fn argon2(&self) -> Result<argon2::Argon2<'static>, Error> {
        let params = argon2::Params::new(
            self.m_cost_kib,
            self.t_cost,
            self.p_cost,
            Some(32 + CHECK_LEN),
        )
        .map_err(|e| Error::InvalidKdfParams(e.to_string()))?;
        Ok(argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            params,
        ))
    }
}

/// An AES-256-GCM key derived from a passphrase with Argon2id.
///
/// Argon2id produces 48 bytes: the first 32 are the AES key, the last 16 are the *key check*
/// stored in the header of every file written with this key, which lets a reader tell a wrong
/// passphrase apart from a corrupted file. Guessing the passphrase from the check costs one
/// Argon2id evaluation per guess, the same as trying to decrypt.
pub struct Key {
    cipher: LessSafeKey,
    check: [u8; CHECK_LEN],
    salt: [u8; SALT_LEN],
    params: KdfParams,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Derives a key (this is the expensive step: tens of milliseconds with default params).
    pub fn derive(
        passphrase: &[u8],
        salt: [u8; SALT_LEN],
        params: KdfParams,
    ) -> Result<Self, Error> {
        let mut out = [0u8; 32 + CHECK_LEN];
        params
            .argon2()?
            .hash_password_into(passphrase, &salt, &mut out)
            .map_err(|e| Error::InvalidKdfParams(e.to_string()))?;
        let cipher = UnboundKey::new(&AES_256_GCM, &out[..32])
            .map(LessSafeKey::new)
            .map_err(|_| Error::InvalidKdfParams("AES key setup failed".into()))?;
        let mut check = [0u8; CHECK_LEN];
        check.copy_from_slice(&out[32..]);
        out.fill(0);
        Ok(Self {
            cipher,
            check,
            salt,
            params,
        })
    }

    /// Derives a key with a fresh random salt.
    pub fn generate(passphrase: &[u8], params: KdfParams) -> Result<Self, Error> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)
            .map_err(|e| Error::io(std::path::Path::new("<system random generator>"), e))?;
        Self::derive(passphrase, salt, params)
    }

    /// The salt this key was derived with.
    pub fn salt(&self) -> &[u8; SALT_LEN] {
        &self.salt
    }

    /// The Argon2id parameters this key was derived with.
    pub fn params(&self) -> KdfParams {
        self.params
    }

    pub(crate) fn check(&self) -> &[u8; CHECK_LEN] {
        &self.check
    }

    pub(crate) fn encrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        let nonce = Nonce::assume_unique_for_key(*nonce);
        match self
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(aad), buf)
        {
            Ok(tag) => {
                let mut t = [0u8; TAG_LEN];
                t.copy_from_slice(tag.as_ref());
                t
            }
            Err(_) => too_large(),
        }
    }

    pub(crate) fn decrypt(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8],
    ) -> bool {
        let Ok(tag) = <[u8; TAG_LEN]>::try_from(tag) else {
            return false;
        };
        let nonce = Nonce::assume_unique_for_key(*nonce);
        self.cipher
            .open_in_place_separate_tag(nonce, Aad::from(aad), Tag::from(tag), buf, 0..)
            .is_ok()
    }
}

#[cold]
fn too_large() -> [u8; TAG_LEN] {
    // AES-GCM refuses messages longer than 2^36 - 32 bytes; chunks are at most 64 MiB and
    // journal records at most 4 GiB.
    panic!("AES-GCM message too large")
}

/// A passphrase plus the keys derived from it, cached by (salt, params).
///
/// Every file header stores its salt and Argon2id parameters. A `KeyRing` derives the key for a
/// given salt once and reuses it for every further file with the same salt, so opening a backup
/// (snapshot plus journal segments written by the same process) costs one derivation, and
/// writing costs none: [`KeyRing::write_key`] reuses the key of the file that was loaded when its
/// parameters match the configured ones, and derives a new one with a fresh salt only otherwise.
pub struct KeyRing {
    passphrase: Vec<u8>,
    params: KdfParams,
    keys: Mutex<Vec<Arc<Key>>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Drop for KeyRing {
    fn drop(&mut self) {
        // Best effort: do not leave the passphrase in freed memory.
        self.passphrase.fill(0);
        std::hint::black_box(&self.passphrase);
    }
}

impl KeyRing {
    /// A key ring for `passphrase`; new keys are derived with `params`.
    pub fn new(passphrase: impl AsRef<[u8]>, params: KdfParams) -> Self {
        Self {
            passphrase: passphrase.as_ref().to_vec(),
            params,
            keys: Mutex::new(Vec::new()),
        }
    }

    /// The key for a file with this salt and these parameters (derived on first use).
    pub fn key_for(&self, salt: &[u8; SALT_LEN], params: KdfParams) -> Result<Arc<Key>, Error> {
        if let Some(k) = self.find(|k| k.salt == *salt && k.params == params) {
            return Ok(k);
        }
        let key = Arc::new(Key::derive(&self.passphrase, *salt, params)?);
        self.lock().push(key.clone());
        Ok(key)
    }

    /// The key to write new files with: a cached key with the configured parameters, or a new
    /// one with a fresh random salt.
    pub fn write_key(&self) -> Result<Arc<Key>, Error> {
        let params = self.params;
        if let Some(k) = self.find(|k| k.params == params) {
            return Ok(k);
        }
        let key = Arc::new(Key::generate(&self.passphrase, params)?);
        self.lock().push(key.clone());
        Ok(key)
    }

    fn find(&self, f: impl Fn(&Key) -> bool) -> Option<Arc<Key>> {
        self.lock().iter().rev().find(|k| f(k)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Key>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Fills `buf` from the operating system's random generator.
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| std::io::Error::other("the system random generator failed"))
}

pub(crate) fn random_nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    fill_random(&mut n)?;
    Ok(n)
}

/// The nonce of chunk or record `index`: the file's random base nonce with the index XORed into
/// its last 8 bytes (little endian).
pub(crate) fn nonce_at(base: &[u8; NONCE_LEN], index: u64) -> [u8; NONCE_LEN] {
    let mut n = *base;
    for (b, x) in n[4..].iter_mut().zip(index.to_le_bytes()) {
        *b ^= x;
    }
    n
}
