//! `sluice-control`: the gRPC server over the desired state.
//!
//! [`Control`] owns the store, the cluster CA and the in-memory state. Reads
//! are served from memory; every change is drafted, committed durably in one
//! store transaction (only then acknowledged), then published: the new state
//! replaces the old and the view update (if the change altered what nodes
//! must program) is broadcast to the agents' watch streams.
//!
//! Modules: [`auth`] (who is calling), [`resources`] (services, endpoints,
//! grants), [`cluster`] (tokens, users, nodes), [`nodes`] (the agents' API),
//! [`state`] (the state and its drafts).

pub mod auth;
pub mod cluster;
pub mod dashboard;
pub mod describe;
#[cfg(test)]
mod etcd_tests;
pub mod flows;
pub mod health;
pub mod history;
pub mod metrics;
pub mod migrate;
pub mod nodes;
pub mod peers;
pub mod replicas;
pub mod resources;
pub mod secrets;
pub mod state;
#[cfg(test)]
mod testkit;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use sluice_api::{MAX_MESSAGE_BYTES, v1};
use sluice_pki::{self as pki, ClusterCa};
use tokio::sync::broadcast;
use tracing::info;

use crate::{
    client_config::ClientConfig,
    error::ApiError,
    rbac::ADMIN_GROUP,
    sealing::{self, Keyring},
    store::{EtcdStore, Key, RedbStore, Store, StoreError, StoreExt as _},
    vip::VipPool,
};
use state::{Committed, Draft, State};

#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Range VIPs are allocated from.
    pub vip_cidr: String,
    /// Names and addresses clients use to reach this service (they go into
    /// its certificate); the first one goes into the admin config.
    pub advertise: Vec<String>,
    pub node_cert_ttl: Duration,
    pub user_cert_ttl: Duration,
    /// Where the first admin's credentials are written on first start (not
    /// in the data directory: it holds a private key in plain text, for
    /// `sluicectl`).
    pub admin_config: PathBuf,
    /// The key-encryption keys that seal secrets at rest
    /// ([`crate::sealing`]); `None`: a key generated in the data directory
    /// (embedded store only: replicas on etcd must share one key file).
    pub encryption_key_file: Option<PathBuf>,
    pub store: StoreConfig,
}

/// Where the desired state is kept.
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// The embedded store, `state.redb` in the data directory: one machine.
    #[default]
    Embedded,
    /// An etcd cluster, all under `prefix`.
    Etcd {
        endpoints: Vec<String>,
        tls: Option<crate::store::EtcdTls>,
        prefix: String,
    },
}

/// How long one change is drafted again after races with other replicas
/// before the race is the caller's error. Every write of a shared store
/// compares one key (see [`crate::store`]), so replicas writing at once take
/// turns; under a burst (a thousand nodes joining) a write may lose many
/// turns in a row, and a bound in time rather than in attempts keeps it
/// trying while the others make progress.
const RACE_BUDGET: Duration = Duration::from_secs(15);

/// A random pause before drafting again after the `attempt`th race: up to
/// 5 ms per attempt, at most 50 ms, so that racing replicas spread out.
fn race_pause(attempt: u32) -> Duration {
    let mut noise = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise);
    let max_us = (u64::from(attempt) * 5_000).min(50_000);
    Duration::from_micros(u64::from(u16::from_le_bytes(noise)) * max_us / u64::from(u16::MAX))
}

/// Live status an agent reports; not stored (it is re-reported after a restart).
#[derive(Clone, Debug, Default)]
pub struct NodeLive {
    pub applied_version: u64,
    pub last_report: Option<std::time::SystemTime>,
    pub watchers: u32,
    pub counters: Vec<sluice_model::observe::FrontendCounters>,
    /// The backends this node probes and finds unhealthy, as last reported.
    pub unhealthy: health::Unhealthy,
    pub policy_counters: Vec<sluice_model::observe::PolicyCounter>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("creating the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Vip(#[from] crate::vip::VipError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Config(#[from] crate::client_config::ConfigError),
    #[error("corrupt CA record in the store")]
    CaRecord,
    #[error(transparent)]
    Seal(#[from] crate::sealing::SealError),
    #[error(
        "--encryption-key-file is required with an etcd store: every replica must open the \
         secrets the others seal (create one with `openssl rand -hex 32`, mode 0600)"
    )]
    KeyFileRequired,
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

pub struct Control {
    store: Arc<dyn Store>,
    ca: ClusterCa,
    pool: VipPool,
    options: Options,
    state: RwLock<Arc<State>>,
    /// Serializes read-validate-commit sequences.
    writes: tokio::sync::Mutex<()>,
    updates: broadcast::Sender<Arc<v1::ViewUpdate>>,
    removed_nodes: broadcast::Sender<String>,
    live: Mutex<BTreeMap<String, NodeLive>>,
    /// The probers' verdicts (see [`health`]).
    health: tokio::sync::watch::Sender<Arc<health::Unhealthy>>,
    started: std::time::Instant,
    flows: flows::Flows,
    metrics: metrics::ControlMetrics,
    /// Dashboard tokens and rate samples (see [`dashboard`]).
    dashboard: dashboard::Dashboard,
    /// The other replicas' nodes (see [`peers`]).
    peers: peers::Peers,
}

impl Control {
    /// Opens (or creates) the data directory: the store, the CA, and on first
    /// start the first admin's credentials (`admin.conf`).
    pub fn open(options: Options) -> Result<Arc<Self>, StartError> {
        sluice_pki::install_crypto_provider();
        let store: Arc<dyn Store>;
        let keyring;
        match &options.store {
            StoreConfig::Embedded => {
                secrets::private_data_dir(&options.data_dir)?;
                keyring = match &options.encryption_key_file {
                    Some(path) => Keyring::load(path)?,
                    None => Keyring::load_or_generate(
                        &options.data_dir.join(sealing::GENERATED_KEY_FILE),
                    )?,
                };
                store = Arc::new(RedbStore::open(options.data_dir.join("state.redb"))?);
                secrets::restrict_files(&options.data_dir)?;
            }
            StoreConfig::Etcd {
                endpoints,
                tls,
                prefix,
            } => {
                // Every replica must open what another sealed.
                let path = options
                    .encryption_key_file
                    .as_ref()
                    .ok_or(StartError::KeyFileRequired)?;
                keyring = Keyring::load(path)?;
                store = Arc::new(EtcdStore::connect(endpoints, tls.clone(), prefix)?);
            }
        }
        let ca = secrets::load_or_create_ca(store.as_ref(), &keyring)?;
        let pool = VipPool::new(&options.vip_cidr)?;
        let state = State::load(store.as_ref())?;
        info!(
            revision = state.revision,
            services = state.objects.count(sluice_model::ObjectKind::Service),
            endpoints = state.objects.count(sluice_model::ObjectKind::Endpoint),
            nodes = state.nodes.len(),
            view_version = state.view.version,
            "state loaded"
        );
        let (updates, _) = broadcast::channel(1024);
        let (removed_nodes, _) = broadcast::channel(64);
        let control = Arc::new(Self {
            store,
            ca,
            pool,
            options,
            state: RwLock::new(Arc::new(state)),
            writes: tokio::sync::Mutex::new(()),
            updates,
            removed_nodes,
            live: Mutex::new(BTreeMap::new()),
            health: tokio::sync::watch::Sender::new(Arc::default()),
            started: std::time::Instant::now(),
            flows: flows::Flows::default(),
            metrics: metrics::ControlMetrics::default(),
            dashboard: dashboard::Dashboard::default(),
            peers: peers::Peers::default(),
        });
        control.write_admin_config_once()?;
        Ok(control)
    }

    /// A control service with its state in `dir`, for unit tests.
    #[cfg(test)]
    pub(crate) fn open_for_tests(dir: &std::path::Path) -> Arc<Self> {
        Self::open(Options {
            listen: "127.0.0.1:7443".parse().expect("addr"),
            data_dir: dir.join("data"),
            vip_cidr: "198.18.100.0/28".into(),
            advertise: vec![],
            node_cert_ttl: Duration::from_secs(3600),
            user_cert_ttl: Duration::from_secs(3600),
            admin_config: dir.join("admin.conf"),
            encryption_key_file: None,
            store: StoreConfig::Embedded,
        })
        .expect("opening a control service")
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    pub fn server_url(&self) -> String {
        let host = self
            .options
            .advertise
            .first()
            .cloned()
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host,
        };
        format!("https://{host}:{}", self.options.listen.port())
    }

    /// `--admin-config`: credentials of a member of the admin group,
    /// written once, readable by the owner only.
    fn write_admin_config_once(&self) -> Result<(), StartError> {
        let path = &self.options.admin_config;
        if path.exists() {
            return Ok(());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let key = sluice_pki::new_key_and_csr("admin")?;
        let issued = self.ca.sign_user(
            &key.csr_pem,
            "admin",
            &[ADMIN_GROUP.to_string()],
            self.options.user_cert_ttl,
        )?;
        ClientConfig {
            server: self.server_url(),
            ca: self.ca.cert_pem(),
            certificate: issued.pem,
            key: key.key_pem,
        }
        .save(path)?;
        info!(path = %path.display(), "wrote the first admin's credentials");
        Ok(())
    }

    /// The current state (cheap: shared).
    pub fn state(&self) -> Arc<State> {
        self.state
            .read()
            .map_or_else(|p| p.into_inner().clone(), |s| s.clone())
    }

    /// Drafts a change with `edit`, commits it durably, publishes it. With
    /// `dry_run` the draft is validated and discarded. Returns what `edit`
    /// returned.
    pub async fn mutate<T: Send + 'static>(
        &self,
        dry_run: bool,
        mut edit: impl FnMut(&mut Draft) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut serial = self.writes.lock().await;
        let mut attempt = 1;
        let racing_since = std::time::Instant::now();
        loop {
            let mut draft = Draft::new(&self.state());
            let out = edit(&mut draft)?;
            if dry_run || draft.is_empty() {
                return Ok(out);
            }
            let store = self.store.clone();
            let committing = std::time::Instant::now();
            let committed = tokio::task::spawn_blocking(move || draft.commit(store.as_ref()))
                .await
                .map_err(|e| ApiError::Invalid {
                    message: format!("commit task failed: {e}"),
                })?;
            let committed = match committed {
                // Another replica wrote since this copy: catch up, draft again.
                Err(ApiError::Store(StoreError::Raced { base, winner }))
                    if racing_since.elapsed() < RACE_BUDGET =>
                {
                    tracing::debug!(
                        base,
                        winner,
                        attempt,
                        "raced another replica; drafting again"
                    );
                    attempt += 1;
                    // Let the follower take the winner's changes in (it
                    // needs the write lock), after a random pause so that
                    // replicas racing each other do not meet again.
                    drop(serial);
                    tokio::time::sleep(race_pause(attempt)).await;
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                    while self.state().revision < winner && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    serial = self.writes.lock().await;
                    if self.state().revision < winner {
                        self.reload().await?;
                    }
                    continue;
                }
                other => other?,
            };
            self.metrics.record_commit(committing.elapsed());
            let Committed { state, update } = committed;
            let revision = state.revision;
            *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
            if let Some(update) = update {
                info!(
                    revision,
                    view_version = update.version,
                    upserts = update.upsert.len(),
                    removes = update.remove.len(),
                    "view changed"
                );
                self.publish(&update);
            }
            return Ok(out);
        }
    }

    /// Sends a view update to every watching agent (encoded once for all; no
    /// receivers is fine), and judges health again: probers may have moved,
    /// or backends gone.
    pub(crate) fn publish(&self, update: &sluice_model::view::ViewUpdate) {
        let _ = self.updates.send(Arc::new(v1::ViewUpdate::from(update)));
        self.judge_health();
    }

    /// Reads a stored value outside the in-memory state (tokens).
    pub fn read_raw(&self, key: &Key) -> Result<Option<(u64, Vec<u8>)>, ApiError> {
        let (value, _) = self
            .store
            .read(|tx| -> Result<_, ApiError> { Ok(tx.get(key)?) })?;
        Ok(value.map(|v| (v.version, v.value)))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeLive>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the API on `listener` (bound to `options.listen`) until
    /// `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        self.serve_with_dashboard(listener, None, shutdown).await
    }

    /// [`Self::serve`], and the web dashboard on `dashboard` (HTTPS, with
    /// the same server certificate) if given.
    pub async fn serve_with_dashboard(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        dashboard: Option<tokio::net::TcpListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        // Other replicas' writes and nodes, on a shared store.
        self.follow_store();
        self.join_peers(self.peer_url(&listener));
        let (dns, mut ips) = self.certificate_names();
        // A dashboard on an address of its own is reached by that address too.
        if let Some(ip) = dashboard
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified() && !ips.contains(ip))
        {
            ips.push(ip);
        }
        let (cert_pem, key_pem) = self.ca.issue_server(&dns, &ips)?;
        let tls = pki::server_tls_config(&self.ca, &cert_pem, &key_pem)?;
        // Aborted when the API stops serving.
        let _dashboard = match dashboard {
            Some(l) => {
                let config = dashboard::tls_config(&self.ca, &cert_pem, &key_pem)?;
                let task = tokio::spawn(self.clone().serve_dashboard(l, config));
                Some(AbortOnDrop(task))
            }
            None => None,
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<v1::resources_server::ResourcesServer<resources::ResourcesApi>>()
            .await;
        health
            .set_serving::<v1::cluster_server::ClusterServer<cluster::ClusterApi>>()
            .await;
        health
            .set_serving::<v1::node_agent_server::NodeAgentServer<nodes::NodeAgentApi>>()
            .await;
        health
            .set_serving::<v1::replica_server::ReplicaServer<peers::ReplicaApi>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        info!(listen = %self.options.listen, names = ?dns, ips = ?ips, "serving the control API (TLS only)");
        tonic::transport::Server::builder()
            .tls_config(tls)?
            .layer(metrics::ApiMetricsLayer(self.clone()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                v1::resources_server::ResourcesServer::new(resources::ResourcesApi(self.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                v1::cluster_server::ClusterServer::new(cluster::ClusterApi(self.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                v1::node_agent_server::NodeAgentServer::new(nodes::NodeAgentApi(self.clone()))
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                v1::replica_server::ReplicaServer::new(peers::ReplicaApi(self.clone()))
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY a small view update can wait for the
                // peer's delayed ACK (40 ms) behind the previous one.
                tokio_stream::StreamExt::map(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    |accepted| {
                        accepted.inspect(|stream| {
                            if let Err(e) = stream.set_nodelay(true) {
                                tracing::debug!("TCP_NODELAY: {e}");
                            }
                        })
                    },
                ),
                shutdown,
            )
            .await?;
        Ok(())
    }

    /// Where other replicas reach this one: the first advertised name, or
    /// the address it listens on.
    fn peer_url(&self, listener: &tokio::net::TcpListener) -> String {
        let port = listener
            .local_addr()
            .map_or(self.options.listen.port(), |a| a.port());
        let host = match (self.options.advertise.first(), self.options.listen.ip()) {
            (Some(name), _) => name.clone(),
            (None, ip) if !ip.is_unspecified() => ip.to_string(),
            (None, _) => {
                if matches!(self.options.store, StoreConfig::Etcd { .. }) {
                    tracing::warn!(
                        "listening on every address without --advertise: replicas on other \
                         machines cannot reach this one (they are told 127.0.0.1)"
                    );
                }
                "127.0.0.1".to_owned()
            }
        };
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host,
        };
        format!("https://{host}:{port}")
    }

    /// Names for the server certificate: the advertised ones, the listen
    /// address if specific, and every local address if it is not.
    fn certificate_names(&self) -> (Vec<String>, Vec<IpAddr>) {
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for a in &self.options.advertise {
            match a.parse::<IpAddr>() {
                Ok(ip) => ips.push(ip),
                Err(_) => dns.push(a.clone()),
            }
        }
        let listen = self.options.listen.ip();
        if listen.is_unspecified() {
            ips.extend(local_addresses());
        } else {
            ips.push(listen);
        }
        ips.sort();
        ips.dedup();
        (dns, ips)
    }
}

/// Aborts a task when dropped (a server's accept loop).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// IPv4 and IPv6 addresses of local interfaces (for the server certificate
/// when listening on every address).
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifaddrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut ifaddrs) } != 0 {
        return out;
    }
    let mut cursor = ifaddrs;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freed.
        let entry = unsafe { &*cursor };
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family tells its type.
            let family = unsafe { (*entry.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            } else if family == libc::AF_INET6 {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs returned, once.
    unsafe { libc::freeifaddrs(ifaddrs) };
    out
}
