#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use rcgen::{ExtendedKeyUsagePurpose, SanType};

use super::*;
use crate::keys::cert_der_to_pem;
use crate::testing::{client_leaf, leaf, test_ca, uri};

#[test]
fn node_and_user_identities_come_from_the_uri() {
    let ca = test_ca("ca");
    let (node, _) = leaf(
        &ca,
        "misleading-cn",
        &[NODES_ORGANIZATION],
        vec![
            uri("sluice://node/worker-1"),
            SanType::DnsName("x.example".try_into().unwrap()),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let info = parse_cert_der(&node).unwrap();
    assert_eq!(
        info.identity,
        Identity::Node {
            name: "worker-1".into()
        }
    );
    assert_eq!(info.identity.kind(), "node");
    assert_eq!(info.identity.uri(), "sluice://node/worker-1");

    let (user, _) = leaf(
        &ca,
        "alice",
        &["admins"],
        vec![uri("sluice://user/alice@example.com")],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let info = identity_from_chain(&[user.clone(), ca.der().clone()]).unwrap();
    assert_eq!(
        info.identity,
        Identity::User {
            name: "alice@example.com".into(),
            groups: vec!["admins".into()]
        }
    );
    // PEM entry point, same answer.
    assert_eq!(parse_cert(&cert_der_to_pem(&user)).unwrap(), info);
    assert!(info.not_before < info.not_after);
    assert!(!info.serial.is_empty());
    assert_eq!(info.serial, info.serial.to_lowercase());
}

#[test]
fn certificates_without_exactly_one_sluice_uri_are_rejected() {
    let ca = test_ca("ca");
    // CN alone is not an identity.
    let no_uri = client_leaf(&ca, vec![SanType::DnsName("node-1".try_into().unwrap())]);
    assert!(matches!(
        parse_cert_der(&no_uri),
        Err(PkiError::UnknownIdentity { .. })
    ));
    let no_san = client_leaf(&ca, vec![]);
    assert!(matches!(
        parse_cert_der(&no_san),
        Err(PkiError::UnknownIdentity { .. })
    ));
    for bad in [
        "spiffe://cluster/ns/x",
        "sluice://group/admins",
        "sluice://node/",
        "sluice://node/a/b",
        "sluice://user/%2e%2e",
        "sluice://node/-x",
    ] {
        let cert = client_leaf(&ca, vec![uri(bad)]);
        assert!(
            matches!(parse_cert_der(&cert), Err(PkiError::UnknownIdentity { .. })),
            "{bad}"
        );
    }
    let two = client_leaf(&ca, vec![uri("sluice://node/a"), uri("sluice://user/a")]);
    assert!(matches!(
        parse_cert_der(&two),
        Err(PkiError::AmbiguousIdentity { count: 2 })
    ));
    // Other URIs next to ours are fine.
    let mixed = client_leaf(
        &ca,
        vec![uri("https://example.com"), uri("sluice://node/a")],
    );
    assert_eq!(
        parse_cert_der(&mixed).unwrap().identity,
        Identity::Node { name: "a".into() }
    );
}

#[test]
fn garbage_is_not_a_certificate() {
    assert!(matches!(
        parse_cert_der(b"not der"),
        Err(PkiError::CertParse { .. })
    ));
    assert!(matches!(
        parse_cert("no pem here"),
        Err(PkiError::Pem { .. })
    ));
    assert!(matches!(
        identity_from_chain(&[]),
        Err(PkiError::EmptyChain)
    ));
    let ca = test_ca("ca");
    let mut der = ca.der().to_vec();
    der.push(0);
    assert!(matches!(x509(&der), Err(PkiError::TrailingBytes { .. })));
}

#[test]
fn serials_are_lowercase_hex_without_sign_padding() {
    assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8f01");
    assert_eq!(serial_hex(&[0x7f, 0xAB]), "7fab");
    assert_eq!(serial_hex(&[0x00]), "00");
}

#[test]
fn names_and_groups() {
    for good in [
        "a",
        "node-1",
        "worker.zone-b.example",
        "alice@example.com",
        "x_y",
        &"a".repeat(253),
    ] {
        validate_name("node", good).unwrap();
    }
    for bad in [
        "",
        "-a",
        ".a",
        "a/b",
        "a b",
        "é",
        "a:b",
        "a%2f",
        &"a".repeat(254),
    ] {
        assert!(
            matches!(
                validate_name("node", bad),
                Err(PkiError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    for good in ["admins", "team:net", "ops-1"] {
        validate_group(good).unwrap();
    }
    for bad in ["", "sluice:nodes", "sluice:admins", "a b", &"g".repeat(65)] {
        assert!(
            matches!(validate_group(bad), Err(PkiError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}
