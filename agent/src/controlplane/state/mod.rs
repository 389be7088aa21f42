//! The node's state directory: its identity and the last view it applied.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `node.key` | the node's private key (PKCS#8 PEM) | 0600 |
//! | `node.crt` | its certificate | 0644 |
//! | `ca.crt` | the cluster CA, as pinned at join | 0644 |
//! | `control` | the control service's URL | 0644 |
//! | `zone` | the node's zone as given at join (may be empty) | 0644 |
//! | `node` | the node's name; written last, so it marks a complete join | 0644 |
//! | `view.json` | the last view applied, for restarts while the control service is down | 0600 |
//!
//! The directory itself is 0700. Every file is replaced by writing a
//! temporary file, syncing it and renaming it over the old one, so a crash
//! leaves the old or the new content, never a mix. Key and certificate are two
//! files that must change together; a renewal stages both, then renames the
//! key and then the certificate, and [`NodeState::load`] reads a renewal
//! interrupted between the two renames as the new pair.

mod view_file;

use std::{
    fmt,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use sluice_model::view::View;
use sluice_pki::{self as pki, Identity};

use super::ControlError;

const KEY: &str = "node.key";
const CERT: &str = "node.crt";
const CA: &str = "ca.crt";
const CONTROL: &str = "control";
const NODE: &str = "node";
const ZONE: &str = "zone";
const VIEW: &str = "view.json";
/// A renewal's new key and certificate before they replace the old ones.
const STAGED_KEY: &str = "node.key.next";
const STAGED_CERT: &str = "node.crt.next";

const DIR_MODE: u32 = 0o700;
const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

/// Serializes identity reads and writes in this process (the view follower
/// and the certificate renewer run side by side), so a `load` never reads a
/// renewal half done.
static IDENTITY: Mutex<()> = Mutex::new(());

fn identity_lock() -> MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic elsewhere cannot have left it inconsistent.
    IDENTITY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where a joined node keeps its identity and its last view.
#[derive(Clone, Debug)]
pub struct NodeState {
    dir: PathBuf,
}

/// What a node needs to talk to the control service, as [`super::join`] saved it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The control service's URL (`https://host:port`).
    pub control: String,
    /// The node's name, as its certificate carries it.
    pub node: String,
    /// The node's zone, as given at join; empty: none. Topology-aware
    /// services prefer backends of this zone.
    pub zone: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("control", &self.control)
            .field("node", &self.node)
            .field("zone", &self.zone)
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

impl NodeState {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NodeState { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether a join completed here (its last file, the node's name, exists).
    pub fn is_joined(&self) -> bool {
        self.path(NODE).exists()
    }

    /// The saved credentials, checked: the CA and key parse, and the
    /// certificate names this node.
    pub fn load(&self) -> Result<Credentials, ControlError> {
        let _guard = identity_lock();
        if !self.is_joined() {
            return Err(ControlError::NotJoined {
                dir: self.dir.clone(),
            });
        }
        let node = self.read_line(NODE)?;
        let control = self.read_line(CONTROL)?;
        // Absent in a state directory from before zones were kept.
        let zone = if self.path(ZONE).exists() {
            read(&self.path(ZONE))?.trim().to_owned()
        } else {
            String::new()
        };
        let ca_pem = read(&self.path(CA))?;
        let (key_path, cert_path) = self.identity_paths();
        let key_pem = read(&key_path)?;
        let cert_pem = read(&cert_path)?;

        let corrupt = |path: PathBuf, reason: String| ControlError::Corrupt { path, reason };
        pki::certs_from_pem(&ca_pem).map_err(|e| corrupt(self.path(CA), e.to_string()))?;
        pki::key_from_pem(&key_pem).map_err(|e| corrupt(key_path, e.to_string()))?;
        let info =
            pki::parse_cert(&cert_pem).map_err(|e| corrupt(cert_path.clone(), e.to_string()))?;
        if info.identity.name() != node || !matches!(info.identity, Identity::Node { .. }) {
            return Err(corrupt(
                cert_path,
                format!(
                    "the certificate is for {}, this is node {node:?}",
                    info.identity
                ),
            ));
        }
        Ok(Credentials {
            control,
            node,
            zone,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Which key and certificate files hold the current identity. A renewal
    /// stages `node.key.next` and `node.crt.next`, then renames the key, then
    /// the certificate (syncing the directory in between, so the renames
    /// reach the disk in that order). After a crash:
    /// * `node.key.next` still there: the swap had not begun; the old pair
    ///   (`node.key`, `node.crt`) is current and the staged files may be partial.
    /// * only `node.crt.next` there: the key was swapped, the certificate not
    ///   yet; the new pair is `node.key` with `node.crt.next`.
    fn identity_paths(&self) -> (PathBuf, PathBuf) {
        if !self.path(STAGED_KEY).exists() && self.path(STAGED_CERT).exists() {
            (self.path(KEY), self.path(STAGED_CERT))
        } else {
            (self.path(KEY), self.path(CERT))
        }
    }

    /// Creates the directory and checks that files can be written in it.
    pub(super) fn prepare(&self) -> Result<(), ControlError> {
        self.create_dir()?;
        let probe = self.path(".probe.tmp");
        remove_if_present(&probe)?;
        write_synced(&probe, b"", SECRET_MODE)?;
        remove_if_present(&probe)
    }

    /// Saves a new identity (at join): key, certificate, CA and URL, then the
    /// node's name, which marks the join complete.
    pub(super) fn save_credentials(&self, creds: &Credentials) -> Result<(), ControlError> {
        let Credentials {
            control,
            node,
            zone,
            ca_pem,
            cert_pem,
            key_pem,
        } = creds;
        let _guard = identity_lock();
        self.create_dir()?;
        for staged in [STAGED_KEY, STAGED_CERT] {
            remove_if_present(&self.path(staged))?;
        }
        self.write_atomic(KEY, key_pem.as_bytes(), SECRET_MODE)?;
        self.write_atomic(CERT, cert_pem.as_bytes(), PUBLIC_MODE)?;
        self.write_atomic(CA, ca_pem.as_bytes(), PUBLIC_MODE)?;
        self.write_atomic(CONTROL, format!("{control}\n").as_bytes(), PUBLIC_MODE)?;
        self.write_atomic(ZONE, format!("{zone}\n").as_bytes(), PUBLIC_MODE)?;
        self.write_atomic(NODE, format!("{node}\n").as_bytes(), PUBLIC_MODE)
    }

    /// Replaces the key and certificate (at renewal) so that, whenever the
    /// process stops, [`NodeState::load`] finds either the old pair or the new.
    pub(super) fn save_identity(&self, key_pem: &str, cert_pem: &str) -> Result<(), ControlError> {
        let _guard = identity_lock();
        self.create_dir()?;
        // Finish a swap a crash interrupted after the key's rename, before
        // anything below deletes the certificate that goes with that key.
        let (staged_key, staged_cert) = (self.path(STAGED_KEY), self.path(STAGED_CERT));
        if !staged_key.exists() && staged_cert.exists() {
            rename(&staged_cert, &self.path(CERT))?;
            sync_dir(&self.dir)?;
        }
        remove_if_present(&staged_key)?;
        remove_if_present(&staged_cert)?;
        write_synced(&staged_key, key_pem.as_bytes(), SECRET_MODE)?;
        write_synced(&staged_cert, cert_pem.as_bytes(), PUBLIC_MODE)?;
        sync_dir(&self.dir)?;
        rename(&staged_key, &self.path(KEY))?;
        sync_dir(&self.dir)?;
        rename(&staged_cert, &self.path(CERT))?;
        sync_dir(&self.dir)
    }

    /// Saves the view the agent has applied (atomically: a crash leaves the
    /// previous view or this one).
    pub fn save_view(&self, view: &View) -> Result<(), ControlError> {
        let json = view_file::encode(view).map_err(|e| ControlError::Corrupt {
            path: self.path(VIEW),
            reason: format!("cannot encode the view: {e}"),
        })?;
        self.create_dir()?;
        self.write_atomic(VIEW, &json, SECRET_MODE)
    }

    /// The view last saved, if any.
    pub fn load_view(&self) -> Result<Option<View>, ControlError> {
        let path = self.path(VIEW);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ControlError::Io {
                    op: "read",
                    path,
                    source,
                });
            }
        };
        view_file::decode(&bytes)
            .map(Some)
            .map_err(|reason| ControlError::Corrupt { path, reason })
    }

    /// Creates the directory 0700, and tightens it to 0700 if it exists.
    fn create_dir(&self) -> Result<(), ControlError> {
        let io_err = |op| {
            let path = self.dir.clone();
            move |source| ControlError::Io { op, path, source }
        };
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
            .map_err(io_err("create"))?;
        let mode = fs::metadata(&self.dir)
            .map_err(io_err("inspect"))?
            .permissions()
            .mode();
        if mode & 0o777 != DIR_MODE {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(io_err("set mode 0700 on"))?;
        }
        Ok(())
    }

    /// Writes `name` through a synced temporary file renamed over it.
    fn write_atomic(&self, name: &str, contents: &[u8], mode: u32) -> Result<(), ControlError> {
        let tmp = self.path(&format!(".{name}.tmp"));
        remove_if_present(&tmp)?;
        write_synced(&tmp, contents, mode)?;
        rename(&tmp, &self.path(name))?;
        sync_dir(&self.dir)
    }

    fn read_line(&self, name: &str) -> Result<String, ControlError> {
        let path = self.path(name);
        let text = read(&path)?;
        let line = text.trim();
        if line.is_empty() {
            return Err(ControlError::Corrupt {
                path,
                reason: "empty".into(),
            });
        }
        Ok(line.to_owned())
    }
}

fn read(path: &Path) -> Result<String, ControlError> {
    fs::read_to_string(path).map_err(|source| ControlError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` (which must not exist) with `mode` from the start, so a
/// key is never readable by others, not even between create and chmod
/// (the umask can only take permissions away).
fn write_synced(path: &Path, contents: &[u8], mode: u32) -> Result<(), ControlError> {
    let io_err = |op| {
        move |source| ControlError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create"))?;
    file.write_all(contents).map_err(io_err("write"))?;
    file.sync_all().map_err(io_err("sync"))
}

fn rename(from: &Path, to: &Path) -> Result<(), ControlError> {
    fs::rename(from, to).map_err(|source| ControlError::Io {
        op: "rename into place",
        path: to.to_owned(),
        source,
    })
}

/// Makes the directory's entries (renames) durable.
fn sync_dir(dir: &Path) -> Result<(), ControlError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ControlError::Io {
            op: "sync",
            path: dir.to_owned(),
            source,
        })
}

fn remove_if_present(path: &Path) -> Result<(), ControlError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ControlError::Io {
            op: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
