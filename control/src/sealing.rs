//! Secrets at rest: what the control service keeps that must stay secret
//! (the cluster CA's private key) is sealed before it reaches the store,
//! embedded or etcd alike, with a key-encryption key the store never holds.
//!
//! # The key file
//! `--encryption-key-file` names a file of 256-bit keys, one per line as 64
//! hex digits (`openssl rand -hex 32`); `#` starts a comment. The first key
//! seals everything written from now on; every key in the file opens what it
//! sealed. So a rotation is: put a new key first, keep the old one below it
//! until every secret is sealed again (`sluice-control rotate-key` does both
//! steps and then drops the old keys). Replicas must share the file. The
//! file must be readable by its owner only: a key file others can read is
//! refused, since whoever reads it can open the CA key and mint certificates.
//! Without a key file the embedded store's control service generates one in
//! its data directory (`encryption.key`), so a single machine is protected
//! against a copied store file or backup, not against its own root.
//!
//! # The sealed form
//! `sluice-sealed-1` ‖ key id (4 bytes, the start of the key's SHA-256) ‖
//! nonce (12 random bytes) ‖ AES-256-GCM ciphertext and tag, with the store
//! key the value lives under as associated data, so a sealed value cannot be
//! moved to another record. AES-256-GCM comes from `ring`, the library
//! rustls already uses for TLS here: no second implementation of the
//! cipher. Random nonces are safe at this volume (a handful of seals per
//! key, far from GCM's 2³² limit per key).

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

const MAGIC: &[u8] = b"sluice-sealed-1";
const KEY_ID_LEN: usize = 4;
const KEY_LEN: usize = 32;

/// Where the generated key goes when the control service keeps its state
/// in a data directory and no key file is given.
pub const GENERATED_KEY_FILE: &str = "encryption.key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("reading the encryption key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the encryption key file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the encryption key file {path} is readable by others (mode {mode:04o}); \
         it must be readable by its owner only: chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "the encryption key file {path}, line {line}: expected 64 hex digits (a 256-bit key, \
         e.g. from `openssl rand -hex 32`), found {found}"
    )]
    BadKey {
        path: PathBuf,
        line: usize,
        found: String,
    },
    #[error("the encryption key file {path} holds no key")]
    NoKey { path: PathBuf },
    #[error(
        "{what} was sealed with key {key_id}, which the encryption key file does not hold \
         (keys: {known}); give the key file it was sealed with"
    )]
    UnknownKey {
        what: String,
        key_id: String,
        known: String,
    },
    #[error("{what} does not open with key {key_id}: it was altered, or moved from another record")]
    Tampered { what: String, key_id: String },
    #[error("{what} is not a sealed value")]
    NotSealed { what: String },
    #[error("no randomness for a nonce or key")]
    Random,
}

struct Kek {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl Kek {
    fn new(bytes: &[u8; KEY_LEN]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut id = [0; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        // A 32-byte key is exactly what AES-256 takes.
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!());
        Self {
            id,
            key: LessSafeKey::new(unbound),
        }
    }
}

/// The key-encryption keys: the first seals, all open.
pub struct Keyring {
    keys: Vec<Kek>,
    rng: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.key_ids())
            .finish()
    }
}

impl Keyring {
    /// Reads a key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let read = |source| SealError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SealError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read)?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SealError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bytes: Option<[u8; KEY_LEN]> =
                hex::decode(line).ok().and_then(|b| b.try_into().ok());
            let Some(bytes) = bytes else {
                return Err(SealError::BadKey {
                    path: path.to_owned(),
                    line: i + 1,
                    found: match line.len() {
                        64 => "a line that is not hex".to_owned(),
                        n => format!("{n} characters"),
                    },
                });
            };
            keys.push(Kek::new(&bytes));
        }
        if keys.is_empty() {
            return Err(SealError::NoKey {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// The key file at `path`, created with one new key (mode 0600) if it
    /// does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, SealError> {
        if !path.exists() {
            let key = new_key_line()?;
            write_key_file(path, &[key])?;
            tracing::info!(path = %path.display(), "generated the encryption key for secrets at rest");
        }
        Self::load(path)
    }

    /// The key ids, the sealing one first (for messages and logs).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex::encode(k.id)).collect()
    }

    /// The id of the key that seals.
    pub fn sealing_key_id(&self) -> String {
        hex::encode(self.keys[0].id)
    }

    /// `plaintext` sealed with the first key, bound to `record` (the store
    /// key it is written under).
    pub fn seal(&self, record: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let kek = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut sealed = Vec::with_capacity(
            MAGIC.len() + KEY_ID_LEN + NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len(),
        );
        sealed.extend_from_slice(MAGIC);
        sealed.extend_from_slice(&kek.id);
        sealed.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        kek.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(record.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Random)?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    /// Opens what [`Self::seal`] sealed under `record`; also says whether it
    /// was sealed with a key other than the sealing one (then it should be
    /// sealed again).
    pub fn open(&self, record: &str, sealed: &[u8]) -> Result<(Vec<u8>, bool), SealError> {
        let Some(rest) = sealed.strip_prefix(MAGIC) else {
            return Err(SealError::NotSealed {
                what: record.to_owned(),
            });
        };
        if rest.len() < KEY_ID_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Tampered {
                what: record.to_owned(),
                key_id: hex::encode(rest.get(..KEY_ID_LEN).unwrap_or(rest)),
            });
        }
        let (id, rest) = rest.split_at(KEY_ID_LEN);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let Some(position) = self.keys.iter().position(|k| k.id == id) else {
            return Err(SealError::UnknownKey {
                what: record.to_owned(),
                key_id: hex::encode(id),
                known: self.key_ids().join(", "),
            });
        };
        let mut nonce_bytes = [0u8; NONCE_LEN];
        nonce_bytes.copy_from_slice(nonce);
        let mut body = body.to_vec();
        let plain = self.keys[position]
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(record.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Tampered {
                what: record.to_owned(),
                key_id: hex::encode(id),
            })?;
        Ok((plain.to_vec(), position != 0))
    }
}

/// Whether `value` is in the sealed form (rather than a record written
/// before secrets were sealed).
pub fn is_sealed(value: &[u8]) -> bool {
    value.starts_with(MAGIC)
}

/// A new random key as a key-file line.
pub fn new_key_line() -> Result<String, SealError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SealError::Random)?;
    Ok(hex::encode(key))
}

/// The key lines of the file at `path`, in order.
pub fn key_lines(path: &Path) -> Result<Vec<String>, SealError> {
    // Validates the file (and its mode) first.
    Keyring::load(path)?;
    let text = fs::read_to_string(path).map_err(|source| SealError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Replaces the key file at `path` with `keys` (mode 0600), atomically: a
/// crash leaves the old file or the new one, never a mix.
pub fn write_key_file(path: &Path, keys: &[String]) -> Result<(), SealError> {
    let write = |source| SealError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    // An existing temporary file keeps its mode; make sure of ours.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(write)?;
    let mut text = String::from("# Sluice key-encryption keys: the first seals, all open.\n");
    for key in keys {
        text.push_str(key);
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(write)?;
    file.sync_all().map_err(write)?;
    fs::rename(&tmp, path).map_err(write)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
