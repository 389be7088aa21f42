//! The file `sluicectl` reads to reach the control service as an admin: like
//! a kubeconfig, it carries the server address, the cluster CA, and the
//! admin's certificate and key. `sluice-control` writes the first one
//! (`<data-dir>/admin.conf`); `sluicectl user create` writes the others.

use std::{io, path::Path};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `https://HOST:PORT`.
    pub server: String,
    /// PEM of the cluster CA, which the server certificate must chain to.
    pub ca: String,
    /// PEM of the admin's certificate.
    pub certificate: String,
    /// PEM of the admin's private key.
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a sluicectl config: {reason}")]
    Parse { path: String, reason: String },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown,
            reason: e.to_string(),
        })
    }

    /// Writes the file readable by its owner only: it holds a private key.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let shown = path.display().to_string();
        let text = serde_saphyr::to_string(self).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let write = || -> io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()
        };
        write().map_err(|source| ConfigError::Write {
            path: shown,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn round_trips_with_owner_only_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.conf");
        let config = ClientConfig {
            server: "https://127.0.0.1:7443".into(),
            ca: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            certificate: "cert".into(),
            key: "key".into(),
        };
        config.save(&path).expect("save");
        assert_eq!(ClientConfig::load(&path).expect("load"), config);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
