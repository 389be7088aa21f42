//! The node state on disk, and the client against a fake `NodeAgent` server
//! (tonic, TLS with a throwaway CA made here: `sluice-control` itself is far
//! too heavy a dependency for the agent's tests).

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::{
    fs,
    future::Future,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use sluice_api::{
    pki::{self, Identity, PkiError},
    v1::{
        self,
        node_agent_server::{NodeAgent, NodeAgentServer},
    },
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tonic::{
    Code, Request, Response, Status,
    codegen::tokio_stream::wrappers::ReceiverStream,
    transport::{Certificate, Server, ServerTlsConfig, server::TcpIncoming},
};

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

/// Sets a certificate's validity (rcgen takes `time` dates; the epoch plus a
/// std duration avoids a direct dependency on `time`).
fn set_validity(params: &mut CertificateParams, from: SystemTime, to: SystemTime) {
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + from.duration_since(UNIX_EPOCH).unwrap();
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + to.duration_since(UNIX_EPOCH).unwrap();
}

// ---- A throwaway cluster CA ------------------------------------------------------

struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new() -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "test cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn pin(&self) -> String {
        pki::ca_pin(&self.pem()).unwrap()
    }

    /// What the control service's CA issues a node: SAN URI
    /// `sluice://node/<name>`, client auth, for the CSR's key.
    fn sign_node(&self, csr_pem: &str, name: &str, validity: (SystemTime, SystemTime)) -> String {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, pki::NODES_ORGANIZATION);
        params.subject_alt_names = vec![SanType::URI(
            format!("{}{name}", pki::NODE_URI_PREFIX)
                .try_into()
                .unwrap(),
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, validity.0, validity.1);
        params
            .signed_by(&csr.public_key, &self.issuer)
            .unwrap()
            .pem()
    }

    /// The server's chain `[leaf, CA]` (the pinned join channel wants the CA
    /// last) and key, for 127.0.0.1.
    fn server_identity(&self) -> tonic::transport::Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "sluice-control");
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        tonic::transport::Identity::from_pem(
            format!("{}{}", leaf.pem(), self.pem()),
            key.serialize_pem(),
        )
    }

    /// Credentials for `node` as a join would have saved them.
    fn credentials(&self, control: &str, node: &str) -> Credentials {
        let kc = pki::new_key_and_csr(node).unwrap();
        Credentials {
            control: control.to_owned(),
            node: node.to_owned(),
            ca_pem: self.pem(),
            cert_pem: self.sign_node(&kc.csr_pem, node, valid_for_a_day()),
            key_pem: kc.key_pem,
        }
    }
}

fn valid_for_a_day() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (
        now - Duration::from_secs(60),
        now + Duration::from_secs(24 * 3600),
    )
}

// ---- A fake NodeAgent server -------------------------------------------------------

/// What the fake saw.
#[derive(Default)]
struct Seen {
    /// (node, zone, token) per Join call.
    joins: Vec<(String, String, String)>,
    /// (node, old serial) per RenewCertificate call.
    renewals: Vec<(String, String)>,
    /// (node, applied version) per ReportStatus call.
    reports: Vec<(String, u64)>,
}

/// A WatchView call, handed to the test to script: send updates on `tx`,
/// drop it to end the stream, or send an error.
struct Watch {
    node: String,
    /// Serial of the client certificate the watch came with.
    serial: String,
    since: u64,
    tx: mpsc::Sender<Result<v1::ViewUpdate, Status>>,
}

struct Fake {
    ca: Arc<TestCa>,
    /// Answer Join with this refusal.
    refuse_join: Option<(Code, String)>,
    /// Validity of the next certificates issued.
    validity: Arc<Mutex<(SystemTime, SystemTime)>>,
    seen: Arc<Mutex<Seen>>,
    watches: mpsc::UnboundedSender<Watch>,
}

impl Fake {
    /// The calling node, from its client certificate (the TLS layer checked it
    /// against the CA), as the real service decides it.
    fn caller<T>(request: &Request<T>) -> Result<(String, String), Status> {
        let chain = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        match pki::identity_from_chain(&chain) {
            Ok(pki::CertInfo {
                identity: Identity::Node { name },
                serial,
                ..
            }) => Ok((name, serial)),
            _ => Err(Status::unauthenticated("not a node certificate")),
        }
    }

    fn issue(&self, csr_pem: &str, node: &str) -> String {
        let validity = *self.validity.lock().unwrap();
        self.ca.sign_node(csr_pem, node, validity)
    }
}

#[tonic::async_trait]
impl NodeAgent for Fake {
    async fn join(
        &self,
        request: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let v1::JoinRequest {
            token,
            node_name,
            zone,
            csr_pem,
        } = request.into_inner();
        self.seen
            .lock()
            .unwrap()
            .joins
            .push((node_name.clone(), zone, token));
        if let Some((code, message)) = &self.refuse_join {
            return Err(Status::new(*code, message.clone()));
        }
        Ok(Response::new(v1::JoinResponse {
            certificate_pem: self.issue(&csr_pem, &node_name),
            ca_pem: self.ca.pem(),
        }))
    }

    async fn renew_certificate(
        &self,
        request: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let (node, serial) = Self::caller(&request)?;
        let certificate_pem = self.issue(&request.get_ref().csr_pem, &node);
        self.seen.lock().unwrap().renewals.push((node, serial));
        Ok(Response::new(v1::RenewCertificateResponse {
            certificate_pem,
        }))
    }

    type WatchViewStream = ReceiverStream<Result<v1::ViewUpdate, Status>>;

    async fn watch_view(
        &self,
        request: Request<v1::WatchViewRequest>,
    ) -> Result<Response<Self::WatchViewStream>, Status> {
        let (node, serial) = Self::caller(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let watch = Watch {
            node,
            serial,
            since: request.get_ref().since_version,
            tx,
        };
        self.watches
            .send(watch)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_status(
        &self,
        request: Request<v1::ReportStatusRequest>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let (node, _) = Self::caller(&request)?;
        let applied = request.get_ref().applied_version;
        self.seen.lock().unwrap().reports.push((node, applied));
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}

struct FakeServer {
    url: String,
    ca: Arc<TestCa>,
    validity: Arc<Mutex<(SystemTime, SystemTime)>>,
    seen: Arc<Mutex<Seen>>,
    watches: mpsc::UnboundedReceiver<Watch>,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    async fn start(refuse_join: Option<(Code, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(Arc::new(TestCa::new()), listener, refuse_join)
    }

    /// Serves on `listener` with TLS (client certificates optional, as for
    /// the real service: Join has none).
    fn serve(ca: Arc<TestCa>, listener: TcpListener, refuse_join: Option<(Code, String)>) -> Self {
        pki::install_crypto_provider();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (watch_tx, watches) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let validity = Arc::new(Mutex::new(valid_for_a_day()));
        let fake = Fake {
            ca: ca.clone(),
            refuse_join,
            validity: validity.clone(),
            seen: seen.clone(),
            watches: watch_tx,
        };
        let tls = ServerTlsConfig::new()
            .identity(ca.server_identity())
            .client_ca_root(Certificate::from_pem(ca.pem()))
            .client_auth_optional(true);
        let router = Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(NodeAgentServer::new(fake));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        FakeServer {
            url: format!("https://{addr}"),
            ca,
            validity,
            seen,
            watches,
            task,
        }
    }

    async fn next_watch(&mut self) -> Watch {
        within("a WatchView call", self.watches.recv())
            .await
            .unwrap()
    }

    fn joins(&self) -> usize {
        self.seen.lock().unwrap().joins.len()
    }
}

async fn joined(server: &FakeServer, dir: &TempDir, node: &str) -> Credentials {
    within(
        "join",
        join(
            &dir.state(),
            &server.url,
            "abc.secret",
            &server.ca.pin(),
            node,
            "zone-a",
        ),
    )
    .await
    .unwrap()
}

fn snapshot(version: u64, services: &[&str]) -> v1::ViewUpdate {
    v1::ViewUpdate {
        version,
        snapshot: true,
        upsert: services.iter().map(|s| frontend(s, 80)).collect(),
        remove: vec![],
    }
}

fn delta(version: u64, service: &str) -> v1::ViewUpdate {
    v1::ViewUpdate {
        version,
        snapshot: false,
        upsert: vec![frontend(service, 80)],
        remove: vec![],
    }
}

fn frontend(service: &str, port: u32) -> v1::FrontendView {
    v1::FrontendView {
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
            },
            v1::ViewBackend {
                address: "10.0.0.2".into(),
                weight: 3,
            },
        ],
    }
}

async fn next_event(rx: &mut mpsc::Receiver<ViewEvent>) -> ViewEvent {
    within("a view event", rx.recv()).await.unwrap()
}

fn expect_update(event: ViewEvent) -> v1::ViewUpdate {
    match event {
        ViewEvent::Update(update) => update,
        other => panic!("expected an update, got {other:?}"),
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

    let ca = TestCa::new();
    let creds = ca.credentials("https://control.example:7443", "node-1");
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
    let ca = TestCa::new();
    let mut creds = ca.credentials("https://control.example", "node-1");
    creds.cert_pem = ca.credentials("https://control.example", "node-2").cert_pem;
    state.save_credentials(&creds).unwrap();
    let err = state.load().unwrap_err();
    assert!(matches!(err, ControlError::Corrupt { .. }), "{err:?}");
    assert!(err.is_refusal());
    assert!(err.to_string().contains("node-2"), "{err}");
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
    state.save_view(7, &frontends).unwrap();
    assert_eq!(state.load_view().unwrap(), Some((7, frontends.clone())));
    assert_eq!(mode(&dir.path("view.json")), 0o600);
    let text = fs::read_to_string(dir.path("view.json")).unwrap();
    assert!(text.contains("PROTOCOL_UDP"), "readable enums: {text}");

    // A crash while writing the next view leaves a partial temp file: the
    // saved view is unaffected and the next save replaces the leftover.
    fs::write(dir.path(".view.json.tmp"), b"{\"version\": 8, \"fronte").unwrap();
    assert_eq!(state.load_view().unwrap(), Some((7, frontends.clone())));
    // Values this build does not know survive as numbers.
    let mut newer = vec![frontend("web/api", 443)];
    newer[0].protocol = 99;
    state.save_view(8, &newer).unwrap();
    assert_eq!(state.load_view().unwrap(), Some((8, newer)));
    assert!(!dir.path(".view.json.tmp").exists());

    fs::write(dir.path("view.json"), b"{\"version\": 8, \"fronte").unwrap();
    let err = state.load_view().unwrap_err();
    assert!(matches!(err, ControlError::Corrupt { .. }), "{err:?}");
}

#[test]
fn an_interrupted_renewal_leaves_a_matching_pair() {
    let dir = TempDir::new("swap");
    let state = dir.state();
    let ca = TestCa::new();
    let old = ca.credentials("https://control.example", "node-1");
    state.save_credentials(&old).unwrap();
    let new = ca.credentials("https://control.example", "node-1");

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
    let newest = ca.credentials("https://control.example", "node-1");
    state
        .save_identity(&newest.key_pem, &newest.cert_pem)
        .unwrap();
    assert_eq!(state.load().unwrap(), newest);
    assert!(!dir.path("node.key.next").exists());
    assert!(!dir.path("node.crt.next").exists());
    assert_eq!(mode(&dir.path("node.key")), 0o600);
}

// ---- Against the fake control service ------------------------------------------------

#[tokio::test]
async fn join_saves_the_identity_and_refuses_a_second_join() {
    let server = FakeServer::start(None).await;
    let dir = TempDir::new("join");
    let state = dir.state();
    let creds = joined(&server, &dir, "node-1").await;

    assert_eq!(creds.control, server.url);
    assert_eq!(creds.node, "node-1");
    assert_eq!(creds.ca_pem, server.ca.pem(), "the pinned CA is kept");
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
    {
        let seen = server.seen.lock().unwrap();
        assert_eq!(
            seen.joins,
            vec![("node-1".into(), "zone-a".into(), "abc.secret".into())]
        );
    }

    // The identity works for mTLS: report with it.
    let mut client = within("connect", ControlClient::connect(&creds))
        .await
        .unwrap();
    within("report", client.report(5, vec![])).await.unwrap();
    assert_eq!(
        server.seen.lock().unwrap().reports,
        vec![("node-1".to_owned(), 5)]
    );

    // Joining again is refused here, before the token reaches the server.
    let err = within(
        "second join",
        join(
            &state,
            &server.url,
            "def.secret",
            &server.ca.pin(),
            "node-1",
            "zone-a",
        ),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ControlError::AlreadyJoined { .. }), "{err:?}");
    assert!(err.to_string().contains("sluicectl node remove"), "{err}");
    assert_eq!(server.joins(), 1);
    assert_eq!(state.load().unwrap(), creds, "the identity is untouched");
}

#[tokio::test]
async fn a_refused_join_shows_the_servers_reason() {
    let reason =
        "join token refused: already used (node \"node-0\" joined with it); create a new one";
    let server = FakeServer::start(Some((Code::Unauthenticated, reason.into()))).await;
    let dir = TempDir::new("refused");
    let err = within(
        "join",
        join(
            &dir.state(),
            &server.url,
            "abc.secret",
            &server.ca.pin(),
            "node-1",
            "",
        ),
    )
    .await
    .unwrap_err();
    match &err {
        ControlError::Status { status, .. } => {
            assert_eq!(status.code(), Code::Unauthenticated);
            assert_eq!(status.message(), reason);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(reason), "{err}");
    assert_eq!(server.joins(), 1);
    assert!(!dir.state().is_joined());
    assert!(!dir.path("node.key").exists(), "nothing saved");
}

#[tokio::test]
async fn a_wrong_pin_stops_the_join_before_the_token_is_sent() {
    let server = FakeServer::start(None).await;
    let dir = TempDir::new("pin");
    let other = TestCa::new();
    let err = within(
        "join",
        join(
            &dir.state(),
            &server.url,
            "abc.secret",
            &other.pin(),
            "node-1",
            "",
        ),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ControlError::Pki(PkiError::PinMismatch { .. })),
        "{err:?}"
    );
    assert_eq!(server.joins(), 0, "the server never saw a Join");
    assert!(!dir.state().is_joined());
}

#[tokio::test]
async fn follow_delivers_resumes_from_the_applied_version_and_stops_when_refused() {
    let mut server = FakeServer::start(None).await;
    let dir = TempDir::new("follow");
    let creds = joined(&server, &dir, "node-1").await;
    let first_serial = pki::parse_cert(&creds.cert_pem).unwrap().serial;

    let since = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), since.clone(), tx));

    // A snapshot, then a delta.
    let watch = server.next_watch().await;
    assert_eq!((watch.node.as_str(), watch.since), ("node-1", 0));
    assert_eq!(watch.serial, first_serial);
    assert!(matches!(next_event(&mut rx).await, ViewEvent::Connected));
    watch.tx.send(Ok(snapshot(1, &["web/api"]))).await.unwrap();
    let update = expect_update(next_event(&mut rx).await);
    assert_eq!((update.version, update.snapshot), (1, true));
    since.store(1, Ordering::Release); // applied
    watch.tx.send(Ok(delta(2, "web/dns"))).await.unwrap();
    let update = expect_update(next_event(&mut rx).await);
    assert_eq!((update.version, update.snapshot), (2, false));
    // Version 2 is delivered but not applied yet when the stream drops.

    // An open watch survives a certificate renewal.
    let mut client = within("connect", ControlClient::connect(&creds))
        .await
        .unwrap();
    let renewed = within("renew", client.renew(&dir.state())).await.unwrap();
    let renewed_serial = pki::parse_cert(&renewed.cert_pem).unwrap().serial;
    assert_ne!(renewed_serial, first_serial);
    watch.tx.send(Ok(delta(3, "web/a"))).await.unwrap();
    assert_eq!(expect_update(next_event(&mut rx).await).version, 3);

    // The server ends the stream: reconnect, from the applied version, with
    // the renewed certificate.
    drop(watch);
    match next_event(&mut rx).await {
        ViewEvent::Disconnected(why) => {
            assert!(why.contains("ended the watch"), "{why}");
            assert!(why.contains("reconnecting in"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let watch = server.next_watch().await;
    assert_eq!(watch.since, 1, "resumes from the applied version");
    assert_eq!(watch.serial, renewed_serial, "the new certificate is used");
    assert!(matches!(next_event(&mut rx).await, ViewEvent::Connected));
    // The server resends what follows version 1; what was delivered already
    // is not delivered twice.
    for update in [delta(2, "web/dns"), delta(3, "web/a"), delta(4, "web/b")] {
        watch.tx.send(Ok(update)).await.unwrap();
    }
    assert_eq!(expect_update(next_event(&mut rx).await).version, 4);

    // Removed from the cluster: refused, and the loop ends.
    let removed = "node \"node-1\" was removed from the cluster; its certificate is revoked";
    watch
        .tx
        .send(Err(Status::permission_denied(removed)))
        .await
        .unwrap();
    match next_event(&mut rx).await {
        ViewEvent::Refused(why) => assert!(why.contains(removed), "{why}"),
        other => panic!("{other:?}"),
    }
    within("follow to end", task).await.unwrap();
    assert!(rx.recv().await.is_none());
}

#[tokio::test]
async fn follow_waits_for_a_control_service_that_is_down() {
    // Take a free port, then leave it closed until the server starts.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let ca = Arc::new(TestCa::new());
    let dir = TempDir::new("down");
    dir.state()
        .save_credentials(&ca.credentials(&format!("https://{addr}"), "node-1"))
        .unwrap();

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
    let mut server = FakeServer::serve(ca, TcpListener::bind(addr).await.unwrap(), None);
    loop {
        match next_event(&mut rx).await {
            ViewEvent::Connected => break,
            ViewEvent::Disconnected(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let watch = server.next_watch().await;
    watch.tx.send(Ok(snapshot(9, &["web/api"]))).await.unwrap();
    assert_eq!(expect_update(next_event(&mut rx).await).version, 9);

    // The consumer goes away: follow ends.
    drop(rx);
    within("follow to end", task).await.unwrap();
}

#[tokio::test]
async fn an_unknown_node_is_refused_at_the_watch() {
    let server = FakeServer::start(None).await;
    let dir = TempDir::new("unknown");
    // Credentials from another CA: the TLS layer refuses them with an alert,
    // which retrying cannot fix...
    let stranger = TestCa::new();
    let mut creds = stranger.credentials(&server.url, "node-1");
    creds.ca_pem = server.ca.pem();
    dir.state().save_credentials(&creds).unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(follow(dir.state(), Arc::new(AtomicU64::new(0)), tx));
    match next_event(&mut rx).await {
        ViewEvent::Refused(why) => {
            assert!(why.contains("this cluster's CA"), "{why}");
            assert!(why.contains("TLS alert"), "{why}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    within("follow to end", task).await.unwrap();

    // ...while a certificate the server does not accept as a node is refused.
    let mut user = server.ca.credentials(&server.url, "node-1");
    let kc = pki::new_key_and_csr("node-1").unwrap();
    user.cert_pem = {
        let csr = CertificateSigningRequestParams::from_pem(&kc.csr_pem).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI("sluice://user/node-1".try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params
            .signed_by(&csr.public_key, &server.ca.issuer)
            .unwrap()
            .pem()
    };
    user.key_pem = kc.key_pem;
    let mut client = within("connect", ControlClient::connect(&user))
        .await
        .unwrap();
    let err = within("watch", client.watch(0)).await.unwrap_err();
    assert!(err.is_refusal(), "{err:?}");
    assert!(err.to_string().contains("not a node certificate"), "{err}");
}

#[tokio::test]
async fn certificates_are_renewed_at_two_thirds_of_their_life() {
    let server = FakeServer::start(None).await;
    let dir = TempDir::new("renew");
    let state = dir.state();
    // A certificate two hours into a life of two and a half hours: due.
    let now = SystemTime::now();
    *server.validity.lock().unwrap() = (
        now - Duration::from_secs(2 * 3600),
        now + Duration::from_secs(1800),
    );
    let old = joined(&server, &dir, "node-1").await;
    *server.validity.lock().unwrap() = valid_for_a_day();

    let task = tokio::spawn(keep_certificate_fresh(state.clone()));
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
    task.abort();
    assert_ne!(renewed.key_pem, old.key_pem, "a new key");
    assert_eq!(mode(&dir.path("node.key")), 0o600);
    let old_serial = pki::parse_cert(&old.cert_pem).unwrap().serial;
    assert_eq!(
        server.seen.lock().unwrap().renewals,
        vec![("node-1".to_owned(), old_serial)],
        "renewed over mTLS with the old certificate"
    );
    // The new one is far from due.
    assert!(
        within("check", renew_if_due(&state, SystemTime::now()))
            .await
            .unwrap()
            .is_none()
    );
    // And it works.
    let mut client = within("connect", ControlClient::connect(&renewed))
        .await
        .unwrap();
    within("report", client.report(1, vec![])).await.unwrap();
}
