//! The control service's secrets in the store: the cluster CA, its private
//! key sealed with the key-encryption keys ([`crate::sealing`]), and the
//! data directory's permissions.
//!
//! Replicas share the CA through the store: the first to start creates it
//! (`Expect::Absent`, so two racing on a fresh store cannot both win), the
//! others read it. A record written before secrets were sealed, or sealed
//! with a key that is no longer the first of the key file, is sealed again
//! with the current key when read (compare-and-swap on its version).

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use sluice_pki::ClusterCa;
use tracing::info;

use super::StartError;
use super::state::{CaRecord, tables};
use crate::error::ApiError;
use crate::sealing::{self, Keyring};
use crate::store::{Expect, Key, Store, StoreExt as _};

fn ca_key() -> Key {
    Key::cluster(tables::PKI, "ca")
}

/// The associated data a sealed record is bound to: its place in the store.
fn record_name(key: &Key) -> String {
    key.to_string()
}

/// What the store holds for the CA, opened; `true` if it must be sealed
/// again (plain text from before sealing, or an older key).
fn open_ca(keyring: &Keyring, key: &Key, value: &[u8]) -> Result<(CaRecord, bool), StartError> {
    let (plain, stale) = if sealing::is_sealed(value) {
        keyring.open(&record_name(key), value)?
    } else {
        (value.to_vec(), true)
    };
    let record = serde_json::from_slice(&plain).map_err(|_| StartError::CaRecord)?;
    Ok((record, stale))
}

fn seal_ca(keyring: &Keyring, key: &Key, record: &CaRecord) -> Result<Vec<u8>, StartError> {
    let plain = serde_json::to_vec(record).map_err(|_| StartError::CaRecord)?;
    Ok(keyring.seal(&record_name(key), &plain)?)
}

/// The cluster CA from the store, created on first start; sealed again
/// with the current key when it was not.
pub(super) fn load_or_create_ca(
    store: &dyn Store,
    keyring: &Keyring,
) -> Result<ClusterCa, StartError> {
    let key = ca_key();
    let (existing, _) = store.read(|tx| -> Result<_, ApiError> { Ok(tx.get(&key)?) })?;
    if let Some(stored) = existing {
        let (record, stale) = open_ca(keyring, &key, &stored.value)?;
        let ca = ClusterCa::from_pem(&record.cert_pem, &record.key_pem)?;
        if stale {
            let sealed = seal_ca(keyring, &key, &record)?;
            // Another replica may be doing the same; either seal is good.
            let result = store.write(|tx| -> Result<(), ApiError> {
                tx.put(&key, &sealed, Expect::Version(stored.version))?;
                Ok(())
            });
            match result {
                Ok(_) => {
                    info!(key = %keyring.sealing_key_id(), "sealed the cluster CA's key with the current encryption key")
                }
                Err(ApiError::Store(crate::store::StoreError::Conflict { .. })) => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(ca);
    }
    let ca = ClusterCa::generate()?;
    let record = CaRecord {
        cert_pem: ca.cert_pem(),
        key_pem: ca.key_pem(),
    };
    let sealed = seal_ca(keyring, &key, &record)?;
    store.write(|tx| -> Result<(), ApiError> {
        tx.put(&key, &sealed, Expect::Absent)?;
        Ok(())
    })?;
    info!(pin = %ca.pin(), key = %keyring.sealing_key_id(), "created the cluster CA (its key sealed)");
    Ok(ca)
}

/// Seals every secret in the store again with the keyring's first key
/// (`sluice-control rotate-key`); returns how many records were rewritten.
pub fn reseal(store: &dyn Store, keyring: &Keyring) -> Result<usize, StartError> {
    let key = ca_key();
    let (rewritten, _) = store.write(|tx| -> Result<usize, StartError> {
        let Some(stored) = tx.get(&key)? else {
            return Ok(0);
        };
        let (record, _) = open_ca(keyring, &key, &stored.value)?;
        let sealed = seal_ca(keyring, &key, &record)?;
        tx.put(&key, &sealed, Expect::Version(stored.version))?;
        Ok(1)
    })?;
    Ok(rewritten)
}

/// Creates the data directory owner-only, and makes it and every file in
/// it so: the store holds the cluster's state, the generated key file the
/// key that opens its secrets.
pub(super) fn private_data_dir(dir: &Path) -> Result<(), StartError> {
    let failed = |source| StartError::DataDir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(failed)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(failed)?;
    restrict_files(dir)
}

/// Every regular file in `dir` made owner-only (those the store library
/// created with the process umask included).
pub(super) fn restrict_files(dir: &Path) -> Result<(), StartError> {
    let failed = |source| StartError::DataDir {
        path: dir.to_owned(),
        source,
    };
    for entry in fs::read_dir(dir).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        let meta = entry.metadata().map_err(failed)?;
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600)).map_err(failed)?;
        }
    }
    Ok(())
}
