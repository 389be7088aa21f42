#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use rcgen::{CertifiedIssuer, ExtendedKeyUsagePurpose, KeyPair, SanType};

use super::*;
use crate::keys::ca_pin_der;
use crate::testing::{leaf, test_ca};

#[test]
fn endpoints() {
    let t = Target::parse("https://control.example:7443").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("control.example", 7443));
    let t = Target::parse("https://[::1]:7443").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("::1", 7443));
    assert!(matches!(t.server_name, ServerName::IpAddress(_)));
    assert_eq!(
        t.endpoint().unwrap().uri().to_string(),
        "http://[::1]:7443/"
    );
    assert_eq!(Target::parse("https://10.0.0.1").unwrap().port, 443);
    for bad in [
        "http://10.0.0.1:7443",
        "10.0.0.1:7443",
        "https://",
        "not a uri",
    ] {
        assert!(
            matches!(Target::parse(bad), Err(PkiError::InvalidEndpoint { .. })),
            "{bad}"
        );
    }
}

struct Server {
    ca: CertifiedIssuer<'static, KeyPair>,
    leaf: CertificateDer<'static>,
}

fn server(name: &str) -> Server {
    let ca = test_ca("sluice cluster CA");
    let (leaf, _) = leaf(
        &ca,
        "sluice-control",
        &[],
        vec![SanType::DnsName(name.try_into().unwrap())],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    Server { ca, leaf }
}

fn verifier(pin: &str) -> PinnedCaVerifier {
    install_crypto_provider();
    PinnedCaVerifier {
        pin: normalize_pin(pin).unwrap(),
        provider: ring_provider(),
        outcome: Arc::default(),
    }
}

fn verify(
    v: &PinnedCaVerifier,
    chain: &[CertificateDer<'static>],
    name: &str,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    v.verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

/// The PkiError the verifier wrapped into a rustls error.
fn our_error(err: &rustls::Error) -> &PkiError {
    let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = err else {
        panic!("not ours: {err:?}");
    };
    inner.downcast_ref::<PkiError>().unwrap()
}

fn outcome(v: &PinnedCaVerifier) -> PinOutcome {
    v.outcome.lock().unwrap().clone()
}

#[test]
fn pinned_verifier_accepts_the_pinned_ca_and_records_it() {
    let s = server("control.example");
    let v = verifier(&ca_pin_der(s.ca.der()));
    verify(&v, &[s.leaf.clone(), s.ca.der().clone()], "control.example").unwrap();
    match outcome(&v) {
        PinOutcome::Verified { ca_der } => assert_eq!(ca_der, s.ca.der().to_vec()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pinned_verifier_rejects_another_ca() {
    let s = server("control.example");
    let other = test_ca("sluice cluster CA");
    let v = verifier(&ca_pin_der(other.der()));
    let err = verify(&v, &[s.leaf.clone(), s.ca.der().clone()], "control.example").unwrap_err();
    assert!(
        matches!(our_error(&err), PkiError::PinMismatch { .. }),
        "{err}"
    );
    assert!(matches!(outcome(&v), PinOutcome::Mismatch { .. }));
}

#[test]
fn pinned_verifier_rejects_a_leaf_not_signed_by_the_pinned_ca() {
    // The right CA appended to a leaf from another CA: the pin matches,
    // webpki does not.
    let s = server("control.example");
    let impostor = server("control.example");
    let v = verifier(&ca_pin_der(s.ca.der()));
    let err = verify(
        &v,
        &[impostor.leaf.clone(), s.ca.der().clone()],
        "control.example",
    )
    .unwrap_err();
    assert!(
        matches!(err, rustls::Error::InvalidCertificate(_)),
        "{err:?}"
    );
    assert!(matches!(outcome(&v), PinOutcome::Pending));
}

#[test]
fn pinned_verifier_checks_the_name_and_wants_the_ca() {
    let s = server("control.example");
    let v = verifier(&ca_pin_der(s.ca.der()));
    let err = verify(
        &v,
        &[s.leaf.clone(), s.ca.der().clone()],
        "elsewhere.example",
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
        ),
        "{err:?}"
    );
    let err = verify(&v, std::slice::from_ref(&s.leaf), "control.example").unwrap_err();
    assert!(matches!(our_error(&err), PkiError::NoCaPresented), "{err}");
    assert!(matches!(outcome(&v), PinOutcome::NoCa));
}

#[test]
fn pinned_verifier_wants_server_auth() {
    let ca = test_ca("ca");
    let (client, _) = leaf(
        &ca,
        "x",
        &[],
        vec![SanType::DnsName("control.example".try_into().unwrap())],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let v = verifier(&ca_pin_der(ca.der()));
    assert!(verify(&v, &[client, ca.der().clone()], "control.example").is_err());
}

#[tokio::test]
async fn channels_refuse_bad_input_before_dialing() {
    let err = pinned_join_channel("https://127.0.0.1:1", "sha256:zz")
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidPin { .. }), "{err:?}");
    let err = pinned_join_channel("http://127.0.0.1:1", &format!("sha256:{}", "0".repeat(64)))
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::InvalidEndpoint { .. }), "{err:?}");
    let err = mtls_channel("https://127.0.0.1:1", "x", "y", "z")
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::Pem { .. }), "{err:?}");
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    // Port 1 on loopback: refused at once (nobody listens there as non-root tests run).
    let pin = format!("sha256:{}", "0".repeat(64));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        pinned_join_channel("https://127.0.0.1:1", &pin),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err, PkiError::Connect { .. }), "{err:?}");
}
