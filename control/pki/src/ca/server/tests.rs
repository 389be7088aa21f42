#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::ServerName;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use x509_parser::extensions::GeneralName;

use super::super::csr_public_key;
use super::super::testing::{HOUR, STEP, assert_close, csr, der_of, unix_time, with_x509};
use super::*;
use crate::{Identity, mtls_channel, pinned_join_channel};

// ---- Chains ----

#[test]
fn verify_chain_wants_this_ca_a_valid_period_and_client_auth() {
    let ca = ClusterCa::generate().unwrap();
    let other = ClusterCa::generate().unwrap();
    let kc = csr("n");
    let good = der_of(&ca.sign_node(&kc.csr_pem, "n", HOUR).unwrap().pem);
    verify_chain(std::slice::from_ref(&good), &ca.cert_der()).unwrap();
    // The CA sent along in the chain changes nothing.
    verify_chain(&[good.clone(), ca.cert_der.clone()], &ca.cert_der()).unwrap();
    ca.verify_client(std::slice::from_ref(&good)).unwrap();

    let foreign = der_of(&other.sign_node(&kc.csr_pem, "n", HOUR).unwrap().pem);
    let err = verify_chain(std::slice::from_ref(&foreign), &ca.cert_der()).unwrap_err();
    // Every cluster CA has the same subject, so webpki finds "the"
    // issuer by name and then the signature fails.
    assert!(
        matches!(
            err,
            PkiError::Untrusted {
                source: rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            }
        ),
        "{err:?}"
    );
    // Nor does appending our CA to a foreign leaf.
    assert!(verify_chain(&[foreign, ca.cert_der.clone()], &ca.cert_der()).is_err());

    let now = SystemTime::now();
    let key = csr_public_key(&kc.csr_pem).unwrap();
    let identity = Identity::Node { name: "n".into() };
    let expired = ca
        .issue(&key, &identity, now - 2 * HOUR, now - HOUR)
        .unwrap();
    assert!(expired.not_after < now);
    let err = verify_chain(&[der_of(&expired.pem)], &ca.cert_der()).unwrap_err();
    assert!(
        matches!(
            err,
            PkiError::Untrusted {
                source: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredContext { .. }
                )
            }
        ),
        "{err:?}"
    );
    // Not yet valid either.
    let future = ca
        .issue(&key, &identity, now + HOUR, now + 2 * HOUR)
        .unwrap();
    assert!(verify_chain(&[der_of(&future.pem)], &ca.cert_der()).is_err());
    // At a time inside its window, the expired one was fine.
    let then = UnixTime::since_unix_epoch(
        (now - HOUR - Duration::from_secs(60))
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap(),
    );
    verify_chain_at(&[der_of(&expired.pem)], &ca.cert_der(), then).unwrap();

    // A server certificate is no client certificate.
    let (server, _) = ca.issue_server(&[], &[]).unwrap();
    assert!(matches!(
        verify_chain(&[der_of(&server)], &ca.cert_der()),
        Err(PkiError::Untrusted { .. })
    ));
    assert!(matches!(
        verify_chain(&[], &ca.cert_der()),
        Err(PkiError::EmptyChain)
    ));
}

// ---- Server certificate ----

#[test]
fn server_certificate_names_what_clients_dial() {
    let ca = ClusterCa::generate().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let (cert_pem, key_pem) = ca
        .issue_server(
            &["control.example".into(), "LOCALHOST".into()],
            &[ip, IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )
        .unwrap();
    let der = der_of(&cert_pem);
    with_x509(&der, |c| {
        assert_eq!(
            c.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            SERVER_COMMON_NAME
        );
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans = &c
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &vec![
                GeneralName::DNSName("localhost"),
                GeneralName::DNSName("control.example"),
                GeneralName::IPAddress(&[127, 0, 0, 1]),
                GeneralName::IPAddress(&[10, 1, 2, 3]),
            ]
        );
        assert_close(
            unix_time(c.validity().not_after.timestamp()),
            SystemTime::now() + SERVER_VALIDITY,
        );
    });
    KeyPair::from_pem(&key_pem).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der.clone()).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring_provider())
        .build()
        .unwrap();
    for name in ["control.example", "localhost", "127.0.0.1", "10.1.2.3"] {
        let name = ServerName::try_from(name).unwrap();
        verifier
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap();
    }
    let elsewhere = ServerName::try_from("elsewhere.example").unwrap();
    assert!(
        verifier
            .verify_server_cert(&der, &[], &elsewhere, &[], UnixTime::now())
            .is_err()
    );
    assert!(matches!(
        ca.issue_server(&["bad name\u{e9}".into()], &[]),
        Err(PkiError::InvalidDnsName { .. })
    ));
}

#[test]
fn server_tls_config_checks_its_inputs() {
    let ca = ClusterCa::generate().unwrap();
    let other = ClusterCa::generate().unwrap();
    let (cert, key) = ca.issue_server(&[], &[]).unwrap();
    server_tls_config(&ca, &cert, &key).unwrap();
    // The chain may already end with the CA.
    server_tls_config(&ca, &format!("{cert}{}", ca.cert_pem()), &key).unwrap();
    let (foreign_cert, foreign_key) = other.issue_server(&[], &[]).unwrap();
    assert!(matches!(
        server_tls_config(&ca, &foreign_cert, &foreign_key),
        Err(PkiError::ServerCertNotFromCa { .. })
    ));
    let (_, wrong_key) = ca.issue_server(&[], &[]).unwrap();
    assert!(matches!(
        server_tls_config(&ca, &cert, &wrong_key),
        Err(PkiError::KeyMismatch { what: "server" })
    ));
    assert!(matches!(
        server_tls_config(&ca, "junk", &key),
        Err(PkiError::Pem { .. })
    ));
}

// ---- TLS end to end ----

type Seen = Arc<Mutex<Vec<Option<Identity>>>>;

/// A health service behind `server_tls_config` on 127.0.0.1:0, recording
/// the identity of each caller (None: no client certificate).
async fn serve(ca: &ClusterCa) -> (String, Seen, JoinHandle<()>) {
    let (cert, key) = ca.issue_server(&[], &[]).unwrap();
    let tls = server_tls_config(ca, &cert, &key).unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let health = HealthServer::with_interceptor(
        HealthService::from_health_reporter(HealthReporter::new()),
        move |req: tonic::Request<()>| {
            let identity = req
                .peer_certs()
                .map(|chain| identity_from_chain(&chain).unwrap().identity);
            record.lock().unwrap().push(identity);
            Ok(req)
        },
    );
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(health)
        .serve_with_incoming(incoming);
    let handle = tokio::spawn(async move { server.await.unwrap() });
    (format!("https://127.0.0.1:{}", addr.port()), seen, handle)
}

async fn check(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = HealthClient::new(channel);
    tokio::time::timeout(
        STEP,
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .map(|_| ())
}

async fn mtls(endpoint: &str, ca: &ClusterCa, cert: &str, key: &str) -> Result<Channel, PkiError> {
    tokio::time::timeout(STEP, mtls_channel(endpoint, &ca.cert_pem(), cert, key))
        .await
        .unwrap()
}

#[tokio::test]
async fn mtls_client_is_seen_with_its_identity() {
    let ca = ClusterCa::generate().unwrap();
    let (endpoint, seen, server) = serve(&ca).await;
    let kc = csr("alice");
    let user = ca
        .sign_user(&kc.csr_pem, "alice", &["admins".into()], HOUR)
        .unwrap();
    check(mtls(&endpoint, &ca, &user.pem, &kc.key_pem).await.unwrap())
        .await
        .unwrap();
    let kc = csr("n1");
    let node = ca.sign_node(&kc.csr_pem, "n1", HOUR).unwrap();
    // By name too: the server certificate always covers localhost.
    let by_name = endpoint.replace("127.0.0.1", "localhost");
    check(mtls(&by_name, &ca, &node.pem, &kc.key_pem).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            Some(Identity::User {
                name: "alice".into(),
                groups: vec!["admins".into()]
            }),
            Some(Identity::Node { name: "n1".into() }),
        ]
    );
    server.abort();
}

#[tokio::test]
async fn pinned_join_channel_needs_no_certificate_and_learns_the_ca() {
    let ca = ClusterCa::generate().unwrap();
    let (endpoint, seen, server) = serve(&ca).await;
    let (channel, ca_pem) = tokio::time::timeout(STEP, pinned_join_channel(&endpoint, &ca.pin()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ca_pem, ca.cert_pem());
    check(channel).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![None]);

    let other = ClusterCa::generate().unwrap();
    let err = tokio::time::timeout(STEP, pinned_join_channel(&endpoint, &other.pin()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, PkiError::PinMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("does not match the pin"), "{err}");
    assert!(
        err.to_string().contains(&ca.pin()),
        "says what was presented: {err}"
    );
    server.abort();
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate().unwrap();
    let other = ClusterCa::generate().unwrap();
    let (endpoint, seen, server) = serve(&ca).await;
    let kc = csr("mallory");
    let foreign = other
        .sign_user(&kc.csr_pem, "mallory", &["admins".into()], HOUR)
        .unwrap();
    // TLS 1.3: the client may finish its side of the handshake before the
    // server rejects the certificate, so the refusal can surface on
    // connect or on the first call.
    let refused = match mtls(&endpoint, &ca, &foreign.pem, &kc.key_pem).await {
        Err(_) => true,
        Ok(channel) => check(channel).await.is_err(),
    };
    assert!(refused);
    assert!(seen.lock().unwrap().is_empty(), "no call got through");

    // An expired certificate from the right CA is refused the same way.
    let now = SystemTime::now();
    let key = csr_public_key(&kc.csr_pem).unwrap();
    let expired = ca
        .issue(
            &key,
            &Identity::Node { name: "n".into() },
            now - 2 * HOUR,
            now - HOUR,
        )
        .unwrap();
    let refused = match mtls(&endpoint, &ca, &expired.pem, &kc.key_pem).await {
        Err(_) => true,
        Ok(channel) => check(channel).await.is_err(),
    };
    assert!(refused);
    assert!(seen.lock().unwrap().is_empty());
    server.abort();
}

#[tokio::test]
async fn plaintext_clients_are_refused() {
    let ca = ClusterCa::generate().unwrap();
    let (endpoint, seen, server) = serve(&ca).await;
    let plain = Endpoint::from_shared(endpoint.replace("https://", "http://"))
        .unwrap()
        .connect_timeout(STEP)
        .timeout(STEP);
    let refused = match tokio::time::timeout(STEP, plain.connect()).await.unwrap() {
        Err(_) => true,
        Ok(channel) => check(channel).await.is_err(),
    };
    assert!(refused);
    assert!(seen.lock().unwrap().is_empty());
    server.abort();
}

#[tokio::test]
async fn mtls_client_refuses_a_server_from_another_ca() {
    let ca = ClusterCa::generate().unwrap();
    let other = ClusterCa::generate().unwrap();
    let (endpoint, _, server) = serve(&ca).await;
    let kc = csr("alice");
    let user = other.sign_user(&kc.csr_pem, "alice", &[], HOUR).unwrap();
    let err = tokio::time::timeout(
        STEP,
        mtls_channel(&endpoint, &other.cert_pem(), &user.pem, &kc.key_pem),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, PkiError::Connect { .. }), "{err:?}");
    server.abort();
}
