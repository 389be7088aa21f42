//! The node state on disk, and the agent's side of the control plane against
//! the real control service (`sluice-control`), run in-process on 127.0.0.1
//! with a data directory and a cluster CA of its own.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::{
    fs,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sluice_api::v1::{self, cluster_client::ClusterClient, resources_client::ResourcesClient};
use sluice_control::{
    client_config::ClientConfig,
    server::{Control, Options, StoreConfig},
    testing::EtcdCluster,
};
use sluice_model::view::{Frontend, View, ViewUpdate};
use sluice_pki::{self as pki, ClusterCa, Identity, PkiError};
use tokio::{runtime::Runtime, sync::mpsc};
use tonic::{Code, transport::Channel};

use super::*;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sluice-controlplane-{name}-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// Removes the directory when the test ends, pass or fail.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        TempDir(temp_dir(name))
    }

    fn state(&self) -> NodeState {
        NodeState::new(&self.0)
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Credentials for `node` signed by `ca`, as a join would have saved them,
/// for the tests of the state directory alone.
fn credentials(ca: &ClusterCa, control: &str, node: &str) -> Credentials {
    let kc = pki::new_key_and_csr(node).unwrap();
    Credentials {
        control: control.to_owned(),
        node: node.to_owned(),
        ca_pem: ca.cert_pem(),
        cert_pem: ca
            .sign_node(&kc.csr_pem, node, Duration::from_secs(3600))
            .unwrap()
            .pem,
        key_pem: kc.key_pem,
        zone: Default::default(),
    }
}

fn frontend(service: &str, port: u32) -> v1::FrontendView {
    v1::FrontendView {
        maglev_table_size: 0,
        service: service.to_owned(),
        vip: "10.96.0.10".into(),
        port,
        protocol: v1::Protocol::Tcp as i32,
        target_port: 8080,
        algorithm: v1::Algorithm::WeightedLeastConnections as i32,
        backends: vec![
            v1::ViewBackend {
                address: "10.0.0.1".into(),
                weight: 1,
                draining: Default::default(),
                probers: Default::default(),
            },
            v1::ViewBackend {
                address: "10.0.0.2".into(),
                weight: 3,
                draining: Default::default(),
                probers: Default::default(),
            },
        ],
        drain_timeout_seconds: Default::default(),
        health_check: Default::default(),
        session_affinity_seconds: Default::default(),
        zones: Default::default(),
    }
}

// ---- NodeState ---------------------------------------------------------------------

#[test]
fn credentials_round_trip_with_private_modes() {
    let dir = TempDir::new("creds");
    // A pre-existing, too open directory is tightened.
    fs::create_dir_all(&dir.0).unwrap();
    fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.state();
    assert!(!state.is_joined());
    assert!(matches!(state.load(), Err(ControlError::NotJoined { .. })));

    let ca = ClusterCa::generate().unwrap();
    let creds = credentials(&ca, "https://control.example:7443", "node-1");
    state.save_credentials(&creds).unwrap();
    assert!(state.is_joined());
    assert_eq!(state.load().unwrap(), creds);
    assert_eq!(mode(&dir.0), 0o700);
    assert_eq!(mode(&dir.path("node.key")), 0o600);
    assert_eq!(fs::read_to_string(dir.path("node")).unwrap(), "node-1\n");
    let names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(names.is_empty(), "temporary files left: {names:?}");
    assert!(
        !format!("{creds:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );
}

#[test]
fn a_certificate_for_another_node_is_corrupt_state() {
    let dir = TempDir::new("other-node");
    let state = dir.state();
    let ca = ClusterCa::generate().unwrap();
    let mut creds = credentials(&ca, "https://control.example", "node-1");
    creds.cert_pem = credentials(&ca, "https://control.example", "node-2").cert_pem;
    state.save_credentials(&creds).unwrap();
    let err = state.load().unwrap_err();
    assert!(matches!(err, ControlError::Corrupt { .. }), "{err:?}");
    assert!(err.is_refusal());
    assert!(err.to_string().contains("node-2"), "{err}");
}

/// The view of `frontends` (as the stream carries them) and `policy`.
fn domain_view(version: u64, frontends: &[v1::FrontendView], policy: v1::PolicyView) -> View {
    View {
        version,
        frontends: frontends
            .iter()
            .map(|f| {
                let f = Frontend::try_from(f.clone()).unwrap();
                (f.key, f)
            })
            .collect(),
        policy: policy.try_into().unwrap(),
    }
}

#[test]
fn views_round_trip_and_a_torn_temp_file_is_ignored() {
    let dir = TempDir::new("view");
    let state = dir.state();
    assert_eq!(state.load_view().unwrap(), None);

    let mut frontends = vec![frontend("web/api", 80), frontend("web/dns", 53)];
    frontends[1].protocol = v1::Protocol::Udp as i32;
    frontends[1].algorithm = v1::Algorithm::Unspecified as i32;
    frontends[1].backends.clear();
    let policy = v1::PolicyView {
        identities: vec![v1::PolicyIdentity {
            prefix: "198.19.0.11/32".into(),
            identity: 256,
            enforced: true,
            stats_slot: 2,
            egress_enforced: Default::default(),
            egress_slot: Default::default(),
        }],
        rules: Vec::new(),
        slots: vec![
            v1::PolicySlot::default(),
            v1::PolicySlot {
                counts: Some(v1::policy_slot::Counts::AllowedBy(v1::ObjectName {
                    namespace: "shop".into(),
                    name: "web".into(),
                })),
            },
        ],
    };
    let view = domain_view(7, &frontends, policy);
    state.save_view(&view).unwrap();
    assert_eq!(state.load_view().unwrap(), Some(view.clone()));
    assert_eq!(mode(&dir.path("view.json")), 0o600);
    let text = fs::read_to_string(dir.path("view.json")).unwrap();
    assert!(text.contains("PROTOCOL_UDP"), "readable enums: {text}");

    // A crash while writing the next view leaves a partial temp file: the
    // saved view is unaffected and the next save replaces the leftover.
    fs::write(dir.path(".view.json.tmp"), b"{\"version\": 8, \"fronte").unwrap();
    assert_eq!(state.load_view().unwrap(), Some(view.clone()));
    let next = domain_view(8, &frontends[..1], v1::PolicyView::default());
    state.save_view(&next).unwrap();
    assert_eq!(state.load_view().unwrap(), Some(next));
    assert!(!dir.path(".view.json.tmp").exists());

    // A frontend this build cannot read (saved by a version that knew a
    // newer protocol) is left out, as the stream leaves it out.
    let text = fs::read_to_string(dir.path("view.json")).unwrap();
    let newer = text.replace("PROTOCOL_TCP", "99");
    assert_ne!(newer, text);
    fs::write(dir.path("view.json"), newer).unwrap();
    let loaded = state.load_view().unwrap().unwrap();
    assert_eq!((loaded.version, loaded.frontends.len()), (8, 0));

    fs::write(dir.path("view.json"), b"{\"version\": 8, \"fronte").unwrap();
    let err = state.load_view().unwrap_err();
    assert!(matches!(err, ControlError::Corrupt { .. }), "{err:?}");
}

#[test]
fn an_interrupted_renewal_leaves_a_matching_pair() {
    let dir = TempDir::new("swap");
    let state = dir.state();
    let ca = ClusterCa::generate().unwrap();
    let old = credentials(&ca, "https://control.example", "node-1");
    state.save_credentials(&old).unwrap();
    let new = credentials(&ca, "https://control.example", "node-1");

    // Crashed while staging: the old pair stands, the staged files are ignored.
    fs::write(dir.path("node.key.next"), &new.key_pem[..20]).unwrap();
    fs::write(dir.path("node.crt.next"), &new.cert_pem[..20]).unwrap();
    assert_eq!(state.load().unwrap(), old);

    // Crashed between the key's rename and the certificate's: the new pair.
    fs::remove_file(dir.path("node.key.next")).unwrap();
    fs::write(dir.path("node.key"), &new.key_pem).unwrap();
    fs::write(dir.path("node.crt.next"), &new.cert_pem).unwrap();
    assert_eq!(state.load().unwrap(), new);

    // The next renewal completes that swap first, then makes its own.
    let newest = credentials(&ca, "https://control.example", "node-1");
    state
        .save_identity(&newest.key_pem, &newest.cert_pem)
        .unwrap();
    assert_eq!(state.load().unwrap(), newest);
    assert!(!dir.path("node.key.next").exists());
    assert!(!dir.path("node.crt.next").exists());
    assert_eq!(mode(&dir.path("node.key")), 0o600);
}

// ---- The real control service -------------------------------------------------------

/// Any free port on loopback.
const ANY_PORT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// `sluice-control` on 127.0.0.1, serving from a data directory that outlives
/// its restarts. It runs in a tokio runtime of its own so that stopping it is
/// a crash: the runtime's end drops every connection and watch stream at once
/// and releases the store, as the process dying would (aborting the serve
/// task would leave tonic's connection tasks, and so the watches, running).
struct ControlService {
    data: TempDir,
    node_cert_ttl: Duration,
    /// Where it serves, or last served.
    addr: SocketAddr,
    url: String,
    runtime: Option<Runtime>,
    /// The embedded store in `data`, or a replica's etcd with its key file.
    store: StoreConfig,
    key_file: Option<std::path::PathBuf>,
}

impl ControlService {
    /// A replica of a control plane on `cluster`, sealing with `key_file`.
    fn start_replica(name: &str, cluster: &EtcdCluster, key_file: &Path) -> Self {
        let mut control = ControlService {
            data: TempDir::new(name),
            node_cert_ttl: Duration::from_secs(3600),
            addr: ANY_PORT,
            url: String::new(),
            runtime: None,
            store: StoreConfig::Etcd {
                endpoints: cluster.endpoints(),
                tls: None,
                prefix: "/sluice/".into(),
            },
            key_file: Some(key_file.to_owned()),
        };
        control.run_at(ANY_PORT);
        control
    }

    fn start(name: &str) -> Self {
        Self::start_with_ttl(name, Duration::from_secs(3600))
    }

    /// With node certificates valid for `node_cert_ttl`.
    fn start_with_ttl(name: &str, node_cert_ttl: Duration) -> Self {
        let mut control = ControlService {
            data: TempDir::new(name),
            node_cert_ttl,
            addr: ANY_PORT,
            url: String::new(),
            runtime: None,
            store: StoreConfig::Embedded,
            key_file: None,
        };
        control.run_at(ANY_PORT);
        control
    }

    /// Serves on `addr` from the data directory as it is (a restart, after
    /// the first time).
    fn run_at(&mut self, addr: SocketAddr) {
        assert!(self.runtime.is_none(), "already running");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Whatever the service spawns belongs to its runtime.
        let _context = runtime.enter();
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        self.addr = listener.local_addr().unwrap();
        let control = Control::open(Options {
            listen: self.addr,
            data_dir: self.data.path("state"),
            vip_cidr: "198.18.0.0/28".into(),
            advertise: vec!["127.0.0.1".into()],
            node_cert_ttl: self.node_cert_ttl,
            user_cert_ttl: Duration::from_secs(3600),
            admin_config: self.data.path("admin.conf"),
            encryption_key_file: self.key_file.clone(),
            store: self.store.clone(),
        })
        .unwrap();
        self.url = control.server_url();
        runtime.spawn(async move {
            control
                .serve(listener, std::future::pending())
                .await
                .unwrap();
        });
        self.runtime = Some(runtime);
    }

    /// Stops it abruptly: no goodbye to the clients.
    async fn stop(&mut self) {
        let runtime = self.runtime.take().unwrap();
        // Waiting for the runtime to wind down blocks, so not on this one's threads.
        tokio::task::spawn_blocking(move || runtime.shutdown_timeout(WAIT))
            .await
            .unwrap();
    }

    /// Stops it and starts it again on the same address.
    async fn restart(&mut self) {
        self.stop().await;
        self.run_at(self.addr);
    }

    /// The first admin's credentials, which the service wrote at its first start.
    fn admin(&self) -> ClientConfig {
        ClientConfig::load(&self.data.path("admin.conf")).unwrap()
    }

    async fn admin_channel(&self) -> Channel {
        let admin = self.admin();
        within(
            "an admin connection",
            pki::mtls_channel(&self.url, &admin.ca, &admin.certificate, &admin.key),
        )
        .await
        .unwrap()
    }

    /// A join token, as `sluicectl token create` gets it.
    async fn token(&self) -> v1::CreateJoinTokenResponse {
        let mut cluster = ClusterClient::new(self.admin_channel().await);
        let request = v1::CreateJoinTokenRequest { ttl_seconds: 0 };
        within("a join token", cluster.create_join_token(request))
            .await
            .unwrap()
            .into_inner()
    }

    /// Joins `node` with a fresh token, its identity saved in `dir`.
    async fn join(&self, dir: &TempDir, node: &str) -> Credentials {
        let token = self.token().await;
        join_with(self, dir, &token.token, &token.ca_hash, node)
            .await
            .unwrap()
    }

    /// Creates or replaces the service `shop/web` (port 80 to 8080), with
    /// static `backends`: a change to every node's view.
    async fn apply_web(&self, backends: &[&str]) {
        let service = v1::Service {
            meta: Some(v1::ObjectMeta {
                namespace: "shop".into(),
                name: "web".into(),
                ..Default::default()
            }),
            ports: vec![v1::ServicePort {
                port: 80,
                protocol: v1::Protocol::Tcp as i32,
                target_port: 8080,
            }],
            backends: backends
                .iter()
                .map(|address| v1::StaticBackend {
                    address: (*address).into(),
                    weight: 1,
                    draining: Default::default(),
                    version: Default::default(),
                })
                .collect(),
            ..Default::default()
        };
        let request = v1::ApplyRequest {
            objects: vec![v1::Object {
                kind: Some(v1::object::Kind::Service(service)),
            }],
            dry_run: false,
        };
        let mut resources = ResourcesClient::new(self.admin_channel().await);
        within("apply", resources.apply(request)).await.unwrap();
    }

    /// The node as the service knows it.
    async fn node(&self, name: &str) -> v1::Node {
        let mut resources = ResourcesClient::new(self.admin_channel().await);
        let request = v1::GetRequest {
            kind: v1::Kind::Node as i32,
            namespace: String::new(),
            name: name.into(),
        };
        let object = within("get the node", resources.get(request))
            .await
            .unwrap()
            .into_inner();
        match object.kind {
            Some(v1::object::Kind::Node(node)) => node,
            other => panic!("not a node: {other:?}"),
        }
    }

    /// `sluicectl node remove`.
    async fn remove_node(&self, name: &str) {
        let mut cluster = ClusterClient::new(self.admin_channel().await);
        let request = v1::RemoveNodeRequest { name: name.into() };
        within("remove the node", cluster.remove_node(request))
            .await
            .unwrap();
    }
}

impl Drop for ControlService {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The agent's join (in zone `zone-a`), with `token` and the CA `pin`.
async fn join_with(
    control: &ControlService,
    dir: &TempDir,
    token: &str,
    pin: &str,
    node: &str,
) -> Result<Credentials, ControlError> {
    let state = dir.state();
    within(
        "join",
        join(&state, &control.url, token, pin, node, "zone-a"),
    )
    .await
}

async fn next_event(rx: &mut mpsc::Receiver<ViewEvent>) -> ViewEvent {
    within("a view event", rx.recv()).await.unwrap()
}

fn expect_update(event: ViewEvent) -> ViewUpdate {
    match event {
        ViewEvent::Update(update) => update,
        other => panic!("expected an update, got {other:?}"),
    }
}

/// Waits out the retries of a control service that is away, up to the next
/// connection.
async fn reconnected(rx: &mut mpsc::Receiver<ViewEvent>) {
    loop {
        match next_event(rx).await {
            ViewEvent::Connected => return,
            ViewEvent::Disconnected(_) => {}
            other => panic!("expected a reconnect, got {other:?}"),
        }
    }
}

/// The backends of `shop/web` that `update` sets.
fn web_backends(update: &ViewUpdate) -> Vec<String> {
    let web: Vec<&Frontend> = update
        .upsert
        .iter()
        .filter(|f| f.service.to_string() == "shop/web")
        .collect();
    assert_eq!(web.len(), 1, "one frontend for shop/web in {update:?}");
    web[0]
        .backends
        .iter()
        .map(|b| b.address.to_string())
        .collect()
}

// ---- Against the real control service ----------------------------------------------

#[tokio::test]
async fn join_saves_the_identity_and_refuses_a_second_join() {
    let control = ControlService::start("join-control");
    let dir = TempDir::new("join");
    let state = dir.state();
    let token = control.token().await;
    let creds = join_with(&control, &dir, &token.token, &token.ca_hash, "node-1")
        .await
        .unwrap();

    assert_eq!(creds.control, control.url);
    assert_eq!(creds.node, "node-1");
    assert_eq!(
        pki::ca_pin(&creds.ca_pem).unwrap(),
        token.ca_hash,
        "the pinned CA is kept"
    );
    let info = pki::parse_cert(&creds.cert_pem).unwrap();
    assert_eq!(
        info.identity,
        Identity::Node {
            name: "node-1".into()
        }
    );
    assert_eq!(state.load().unwrap(), creds);
    assert_eq!(mode(&dir.0), 0o700);
    assert_eq!(mode(&dir.path("node.key")), 0o600);
    // The service recorded the node, in its zone, with that certificate.
    let node = control.node("node-1").await;
    assert_eq!(node.zone, "zone-a");
    assert_eq!(node.certificate_serial, info.serial);

    // The identity works for mTLS: report with it.
    let mut client = within("connect", ControlClient::connect(&creds))
        .await
        .unwrap();
    within(
        "report",
        client.report(v1::ReportStatusRequest {
            applied_version: 5,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let status = control.node("node-1").await.status.unwrap();
    assert_eq!(status.applied_version, 5);

    // Joining again is refused here, before the token reaches the service...
    let second = control.token().await;
    let err = join_with(&control, &dir, &second.token, &second.ca_hash, "node-1")
        .await
        .unwrap_err();
    assert!(matches!(err, ControlError::AlreadyJoined { .. }), "{err:?}");
    assert!(err.to_string().contains("sluicectl node remove"), "{err}");
    assert_eq!(state.load().unwrap(), creds, "the identity is untouched");
    // ...so the token is still unused: another node joins with it.
    let other = TempDir::new("join-other");
    join_with(&control, &other, &second.token, &second.ca_hash, "node-2")
        .await
        .unwrap();
}

/// An address of nothing on loopback: a port bound, then closed.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("https://127.0.0.1:{port}")
}

#[tokio::test]
async fn several_addresses_join_and_connect_through_the_one_that_answers() {
    let control = ControlService::start("failover-control");
    let dir = TempDir::new("failover");
    let token = control.token().await;
    // Replicas as `--control A --control B`: the first is down.
    let both = format!("{},{}", dead_url(), control.url);
    let creds = within(
        "join",
        join(
            &dir.state(),
            &both,
            &token.token,
            &token.ca_hash,
            "node-1",
            "",
        ),
    )
    .await
    .unwrap();
    assert_eq!(creds.control, both, "every address is kept for failover");
    let mut client = within("connect", ControlClient::connect(&creds))
        .await
        .unwrap();
    within(
        "report",
        client.report(v1::ReportStatusRequest {
            applied_version: 3,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        control.node("node-1").await.status.unwrap().applied_version,
        3
    );

    // None answers: one clear error, after trying each once.
    let nothing = Credentials {
        control: format!("{},{}", dead_url(), dead_url()),
        ..creds
    };
    let err = within("connect to nothing", ControlClient::connect(&nothing))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("connecting"), "{err}");
}

#[tokio::test]
async fn a_refused_join_shows_the_servers_reason() {
    let control = ControlService::start("refused-control");
    let token = control.token().await;
    let first = TempDir::new("refused-first");
    join_with(&control, &first, &token.token, &token.ca_hash, "node-0")
        .await
        .unwrap();

    let dir = TempDir::new("refused");
    for (attempt, reason) in [
        (
            token.token.as_str(),
            "already used (node \"node-0\" joined with it)",
        ),
        ("abcdef.0123456789abcdef", "unknown token"),
    ] {
        let err = join_with(&control, &dir, attempt, &token.ca_hash, "node-1")
            .await
            .unwrap_err();
        let ControlError::Status { status, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains(reason), "{status:?}");
        // The operator sees the service's whole explanation.
        assert!(err.to_string().contains(status.message()), "{err}");
        assert!(!dir.state().is_joined());
        assert!(!dir.path("node.key").exists(), "nothing saved");
    }
}

#[tokio::test]
async fn a_wrong_pin_stops_the_join_before_the_token_is_sent() {
    let control = ControlService::start("pin-control");
    let token = control.token().await;
    let dir = TempDir::new("pin");
    let another_cluster = ClusterCa::generate().unwrap();
    let err = join_with(
        &control,
        &dir,
        &token.token,
        &another_cluster.pin(),
        "node-1",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ControlError::Pki(PkiError::PinMismatch { .. })),
        "{err:?}"
    );
    assert!(!dir.state().is_joined());

    // The service never saw the token: with the right pin it still joins.
    join_with(&control, &dir, &token.token, &token.ca_hash, "node-1")
        .await
        .unwrap();
}

#[tokio::test]
async fn follow_delivers_resumes_from_the_applied_version_and_stops_when_refused() {
    let mut control = ControlService::start("follow-control");
    control.apply_web(&["198.19.0.1"]).await;
    let dir = TempDir::new("follow");
    control.join(&dir, "node-1").await;

    let since = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), since.clone(), tx));

    // A snapshot, then each change.
    assert!(matches!(next_event(&mut rx).await, ViewEvent::Connected));
    let first = expect_update(next_event(&mut rx).await);
    assert!(first.snapshot, "{first:?}");
    assert_eq!(web_backends(&first), ["198.19.0.1"]);
    since.store(first.version, Ordering::Release); // applied
    control.apply_web(&["198.19.0.1", "198.19.0.2"]).await;
    let second = expect_update(next_event(&mut rx).await);
    assert_eq!(
        (second.version, second.snapshot),
        (first.version + 1, false)
    );
    assert_eq!(web_backends(&second), ["198.19.0.1", "198.19.0.2"]);
    // The second is delivered but not applied when the control service
    // crashes; a third change is made while the node cannot reach it (the
    // service runs on another port meanwhile).
    let addr = control.addr;
    control.stop().await;
    match next_event(&mut rx).await {
        ViewEvent::Disconnected(why) => assert!(why.contains("reconnecting in"), "{why}"),
        other => panic!("{other:?}"),
    }
    control.run_at(ANY_PORT);
    control.apply_web(&["198.19.0.2"]).await;
    control.stop().await;
    control.run_at(addr);

    // Back, watching from the applied version: the service replays what
    // followed it, the second (which follow drops: it was delivered) and the
    // third, and sends no snapshot.
    reconnected(&mut rx).await;
    let third = expect_update(next_event(&mut rx).await);
    assert_eq!((third.version, third.snapshot), (second.version + 1, false));
    assert_eq!(web_backends(&third), ["198.19.0.2"]);
    since.store(third.version, Ordering::Release);

    // A restart that missed nothing resends nothing: the next update is the
    // next change.
    control.restart().await;
    reconnected(&mut rx).await;
    control.apply_web(&["198.19.0.3"]).await;
    let fourth = expect_update(next_event(&mut rx).await);
    assert_eq!(
        (fourth.version, fourth.snapshot),
        (third.version + 1, false)
    );
    assert_eq!(web_backends(&fourth), ["198.19.0.3"]);

    // Removed from the cluster: refused, and the loop ends...
    control.remove_node("node-1").await;
    match next_event(&mut rx).await {
        ViewEvent::Refused(why) => {
            assert!(
                why.contains("node \"node-1\" was removed from the cluster"),
                "{why}"
            );
        }
        other => panic!("{other:?}"),
    }
    within("follow to end", task).await.unwrap();
    assert!(rx.recv().await.is_none());

    // ...and following again is refused at once.
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), since, tx));
    match next_event(&mut rx).await {
        ViewEvent::Refused(why) => {
            assert!(why.contains("not a member of this cluster"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    within("follow to end", task).await.unwrap();
}

/// Two replicas on one etcd: the node watching the first resumes on the
/// second when the first dies, from the version it applied (no snapshot),
/// and a change applied through the second reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fails_over_to_another_replica_and_resumes_without_a_full_resend() {
    let cluster = EtcdCluster::start(3).unwrap();
    let keys = TempDir::new("failover-keys");
    std::fs::create_dir_all(&keys.0).unwrap();
    let key_file = keys.path("kek");
    fs::write(&key_file, sluice_control::sealing::new_key_line().unwrap()).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    let mut a = ControlService::start_replica("replica-a", &cluster, &key_file);
    let b = ControlService::start_replica("replica-b", &cluster, &key_file);
    a.apply_web(&["198.19.0.1"]).await;

    let dir = TempDir::new("failover-node");
    let token = a.token().await;
    let both = format!("{},{}", a.url, b.url);
    within(
        "join",
        join(
            &dir.state(),
            &both,
            &token.token,
            &token.ca_hash,
            "node-1",
            "",
        ),
    )
    .await
    .unwrap();
    let since = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), since.clone(), tx));
    assert!(matches!(next_event(&mut rx).await, ViewEvent::Connected));
    let first = expect_update(next_event(&mut rx).await);
    assert!(first.snapshot);
    since.store(first.version, Ordering::Release);

    // The replica it watches dies.
    let died = std::time::Instant::now();
    a.stop().await;
    match next_event(&mut rx).await {
        ViewEvent::Disconnected(_) => {}
        other => panic!("{other:?}"),
    }
    reconnected(&mut rx).await;
    let resumed = died.elapsed();
    println!("resumed on the other replica {resumed:?} after the first died");
    assert!(resumed < Duration::from_secs(10), "{resumed:?}");

    // A change through the survivor: the next version, not a snapshot.
    b.apply_web(&["198.19.0.1", "198.19.0.2"]).await;
    let next = expect_update(next_event(&mut rx).await);
    assert_eq!((next.version, next.snapshot), (first.version + 1, false));
    assert_eq!(web_backends(&next), ["198.19.0.1", "198.19.0.2"]);
    task.abort();
}

#[tokio::test]
async fn follow_waits_for_a_control_service_that_is_down() {
    let mut control = ControlService::start("down-control");
    control.apply_web(&["198.19.0.1"]).await;
    let dir = TempDir::new("down");
    control.join(&dir, "node-1").await;
    control.stop().await;

    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), Arc::new(AtomicU64::new(0)), tx));
    for _ in 0..2 {
        match next_event(&mut rx).await {
            ViewEvent::Disconnected(why) => {
                assert!(why.contains("cannot reach the control service"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
    control.run_at(control.addr);
    reconnected(&mut rx).await;
    let update = expect_update(next_event(&mut rx).await);
    assert!(update.snapshot, "{update:?}");
    assert_eq!(web_backends(&update), ["198.19.0.1"]);

    // The consumer goes away: follow ends.
    drop(rx);
    within("follow to end", task).await.unwrap();
}

/// A node of `another` cluster, pointed at `control` (whose CA it trusts,
/// so the only thing wrong is its certificate): follows from `dir`.
async fn a_stranger(
    control: &ControlService,
    another: &ControlService,
    dir: &TempDir,
) -> (mpsc::Receiver<ViewEvent>, tokio::task::JoinHandle<()>) {
    another.join(dir, "node-1").await;
    fs::write(dir.path("ca.crt"), control.admin().ca).unwrap();
    fs::write(dir.path("control"), format!("{}\n", control.url)).unwrap();
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), Arc::new(AtomicU64::new(0)), tx));
    (rx, task)
}

#[tokio::test]
async fn an_unknown_node_is_refused_at_the_watch() {
    let control = ControlService::start("unknown-control");
    let another = ControlService::start("unknown-another");
    let dir = TempDir::new("unknown");
    // A certificate from another CA never gets a watch: the TLS layer
    // refuses it (whether the agent learns why is the next test).
    let (mut rx, task) = a_stranger(&control, &another, &dir).await;
    match next_event(&mut rx).await {
        ViewEvent::Refused(_) | ViewEvent::Disconnected(_) => {}
        other => panic!("a foreign certificate got through: {other:?}"),
    }
    drop(rx);
    within("follow to end", task).await.unwrap();

    // A certificate of this cluster that is not a node's (the first
    // admin's) is refused by the service, and retrying cannot help.
    let admin = control.admin();
    let user = Credentials {
        control: control.url.clone(),
        node: "admin".into(),
        ca_pem: admin.ca,
        cert_pem: admin.certificate,
        key_pem: admin.key,
        zone: Default::default(),
    };
    let mut client = within("connect", ControlClient::connect(&user))
        .await
        .unwrap();
    let err = within("watch", client.watch(0)).await.unwrap_err();
    assert!(err.is_refusal(), "{err:?}");
    assert!(err.to_string().contains("this call is for nodes"), "{err}");
}

/// The TLS alert that refuses the certificate is what tells the agent that
/// retrying cannot help. TLS 1.3 sends it after the client has finished its
/// side of the handshake; the connector waits for the server's verdict
/// before the first request (`sluice_pki`), so that a request racing
/// the alert ("broken pipe") cannot hide it.
#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_with_an_explanation() {
    let control = ControlService::start("stranger-control");
    let another = ControlService::start("stranger-another");
    let dir = TempDir::new("stranger");
    let (mut rx, task) = a_stranger(&control, &another, &dir).await;
    match next_event(&mut rx).await {
        ViewEvent::Refused(why) => {
            assert!(why.contains("this cluster's CA"), "{why}");
            assert!(why.contains("TLS alert"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    within("follow to end", task).await.unwrap();
}

#[tokio::test]
async fn certificates_are_renewed_at_two_thirds_of_their_life() {
    // Node certificates live 2 s: due 1.33 s after they are issued.
    let mut control = ControlService::start_with_ttl("renew-control", Duration::from_secs(2));
    control.apply_web(&["198.19.0.1"]).await;
    let dir = TempDir::new("renew");
    let state = dir.state();
    let old = control.join(&dir, "node-1").await;
    let old_cert = pki::parse_cert(&old.cert_pem).unwrap();
    let due = renewal_time(old_cert.not_before, old_cert.not_after);

    // A watch opened with the old certificate.
    let (tx, mut rx) = mpsc::channel(16);
    let follower = tokio::spawn(follow(state.clone(), Arc::new(AtomicU64::new(0)), tx));
    assert!(matches!(next_event(&mut rx).await, ViewEvent::Connected));
    expect_update(next_event(&mut rx).await);

    // Left running to the end: with a life of 2 s, the node's certificate
    // must keep being renewed for the rest of the test.
    let renewer = tokio::spawn(keep_certificate_fresh(state.clone()));
    let renewed = within("renewal", async {
        loop {
            let creds = state.load().unwrap();
            if creds.cert_pem != old.cert_pem {
                break creds;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(SystemTime::now() >= due, "renewed when due, not before");
    assert_ne!(renewed.key_pem, old.key_pem, "a new key");
    assert_eq!(mode(&dir.path("node.key")), 0o600);
    // Renewed over mTLS with the old certificate, as node-1: the service
    // has replaced it.
    let node = control.node("node-1").await;
    assert_ne!(node.certificate_serial, old_cert.serial);
    // The new certificate was not due when the old one was.
    assert!(
        within("check", renew_if_due(&state, due))
            .await
            .unwrap()
            .is_none()
    );

    // The open watch keeps delivering.
    control.apply_web(&["198.19.0.2"]).await;
    let update = expect_update(next_event(&mut rx).await);
    assert_eq!(web_backends(&update), ["198.19.0.2"]);

    // Once the old certificate is refused (expired, or retired by the next
    // renewal), a new connection still gets through: it uses the new one.
    within("the old certificate to be refused", async {
        loop {
            let refused = match ControlClient::connect(&old).await {
                Ok(mut client) => client.watch(0).await.err(),
                Err(e) => Some(e),
            };
            if refused.is_some_and(|e| e.is_refusal()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    control.restart().await;
    reconnected(&mut rx).await;

    renewer.abort();
    drop(rx);
    within("follow to end", follower).await.unwrap();
}
