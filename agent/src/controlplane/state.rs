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

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, DirBuilder, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use serde::{Deserialize, Serialize};
use sluice_api::v1;
use sluice_model::policy::compiled::CompiledPolicy;
use sluice_model::view::{Frontend, Frontends, View};
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
        use prost::Message as _;
        let file = ViewFile {
            version: view.version,
            frontends: view
                .frontends
                .values()
                .map(|f| FrontendFile::from(&v1::FrontendView::from(f)))
                .collect(),
            policy: to_hex(&v1::PolicyView::from(&view.policy).encode_to_vec()),
        };
        let path = self.path(VIEW);
        let json = serde_json::to_vec_pretty(&file).map_err(|e| ControlError::Corrupt {
            path,
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
        let corrupt = |reason: String| ControlError::Corrupt {
            path: path.clone(),
            reason,
        };
        let file: ViewFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        // Read as the stream is: a view saved by an older agent may carry
        // the wire's zero-means-default values, which this applies.
        // A frontend that does not read (saved by a version that knew more)
        // is left out, as the stream leaves it out.
        let frontends: Frontends = file
            .frontends
            .into_iter()
            .filter_map(|f| {
                let read = v1::FrontendView::try_from(f)
                    .and_then(|message| Frontend::try_from(message).map_err(|e| e.to_string()));
                read.inspect_err(|e| tracing::warn!("the saved view: skipping a frontend: {e}"))
                    .ok()
            })
            .map(|f| (f.key, f))
            .collect();
        use prost::Message as _;
        let policy = from_hex(&file.policy)
            .and_then(|bytes| v1::PolicyView::decode(bytes.as_slice()).ok())
            .ok_or_else(|| corrupt("the saved network policy does not decode".to_owned()))?;
        let policy = CompiledPolicy::try_from(policy).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(View {
            version: file.version,
            frontends,
            policy,
        }))
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

// ---- view.json -----------------------------------------------------------------

/// view.json: the view in plain JSON (the generated protobuf types have no
/// serde), enums by their protobuf names so an operator can read it.
#[derive(Debug, Serialize, Deserialize)]
struct ViewFile {
    version: u64,
    frontends: Vec<FrontendFile>,
    /// The compiled network policy: its protobuf encoding, in hex (an
    /// operator reads it with `sluicectl get networkpolicies` instead).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    policy: String,
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct FrontendFile {
    service: String,
    vip: String,
    port: u32,
    protocol: String,
    target_port: u32,
    algorithm: String,
    backends: Vec<BackendFile>,
    #[serde(default, skip_serializing_if = "is_zero")]
    maglev_table_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health_check: Option<HealthCheckFile>,
    #[serde(default, skip_serializing_if = "is_zero")]
    drain_timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    session_affinity_seconds: u32,
    /// Zone → weights aligned with `backends`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    zones: BTreeMap<String, Vec<u32>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Serialize, Deserialize)]
struct BackendFile {
    address: String,
    weight: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    draining: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    probers: Vec<String>,
}

/// The API's health check, zeros and all (validated when applied, as sent).
#[derive(Debug, Serialize, Deserialize)]
struct HealthCheckFile {
    /// `None`: a TCP probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_path: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    port: u32,
    interval_ms: u32,
    timeout_ms: u32,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    fail_closed: bool,
}

impl From<&v1::HealthCheck> for HealthCheckFile {
    fn from(check: &v1::HealthCheck) -> Self {
        use v1::health_check::Probe;
        let (http_path, port) = match &check.probe {
            Some(Probe::Http(http)) => (Some(http.path.clone()), http.port),
            Some(Probe::Tcp(tcp)) => (None, tcp.port),
            None => (None, 0),
        };
        Self {
            http_path,
            port,
            interval_ms: check.interval_ms,
            timeout_ms: check.timeout_ms,
            unhealthy_threshold: check.unhealthy_threshold,
            healthy_threshold: check.healthy_threshold,
            fail_closed: check.fail_closed,
        }
    }
}

impl From<HealthCheckFile> for v1::HealthCheck {
    fn from(file: HealthCheckFile) -> Self {
        use v1::health_check::Probe;
        let probe = match file.http_path {
            Some(path) => Probe::Http(v1::HttpProbe {
                path,
                port: file.port,
            }),
            None => Probe::Tcp(v1::TcpProbe { port: file.port }),
        };
        Self {
            probe: Some(probe),
            interval_ms: file.interval_ms,
            timeout_ms: file.timeout_ms,
            unhealthy_threshold: file.unhealthy_threshold,
            healthy_threshold: file.healthy_threshold,
            fail_closed: file.fail_closed,
        }
    }
}

impl From<&v1::FrontendView> for FrontendFile {
    fn from(view: &v1::FrontendView) -> Self {
        // Destructured, so a new field in the API breaks this until it is saved too.
        let v1::FrontendView {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            backends,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
        } = view;
        FrontendFile {
            service: service.clone(),
            vip: vip.clone(),
            port: *port,
            protocol: v1::Protocol::try_from(*protocol)
                .map_or_else(|_| protocol.to_string(), |p| p.as_str_name().to_owned()),
            target_port: *target_port,
            algorithm: v1::Algorithm::try_from(*algorithm)
                .map_or_else(|_| algorithm.to_string(), |a| a.as_str_name().to_owned()),
            backends: backends
                .iter()
                .map(
                    |v1::ViewBackend {
                         address,
                         weight,
                         draining,
                         probers,
                     }| BackendFile {
                        address: address.clone(),
                        weight: *weight,
                        draining: *draining,
                        probers: probers.clone(),
                    },
                )
                .collect(),
            maglev_table_size: *maglev_table_size,
            health_check: health_check.as_ref().map(HealthCheckFile::from),
            drain_timeout_seconds: *drain_timeout_seconds,
            session_affinity_seconds: *session_affinity_seconds,
            zones: zones
                .iter()
                .map(|z| (z.zone.clone(), z.weights.clone()))
                .collect(),
        }
    }
}

impl TryFrom<FrontendFile> for v1::FrontendView {
    type Error = String;

    fn try_from(file: FrontendFile) -> Result<Self, String> {
        let FrontendFile {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            backends,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
        } = file;
        // A value this build does not know (from a newer control service)
        // was saved as its number.
        let protocol = v1::Protocol::from_str_name(&protocol)
            .map(|p| p as i32)
            .or_else(|| protocol.parse().ok())
            .ok_or_else(|| format!("unknown protocol {protocol:?}"))?;
        let algorithm = v1::Algorithm::from_str_name(&algorithm)
            .map(|a| a as i32)
            .or_else(|| algorithm.parse().ok())
            .ok_or_else(|| format!("unknown algorithm {algorithm:?}"))?;
        Ok(v1::FrontendView {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            maglev_table_size,
            health_check: health_check.map(v1::HealthCheck::from),
            drain_timeout_seconds,
            session_affinity_seconds,
            zones: zones
                .into_iter()
                .map(|(zone, weights)| v1::ZoneWeights { zone, weights })
                .collect(),
            backends: backends
                .into_iter()
                .map(
                    |BackendFile {
                         address,
                         weight,
                         draining,
                         probers,
                     }| v1::ViewBackend {
                        address,
                        weight,
                        draining,
                        probers,
                    },
                )
                .collect(),
        })
    }
}
