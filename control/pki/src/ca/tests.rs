#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

use super::testing::{HOUR, assert_close, cn_and_orgs, csr, der_of, unix_time, with_x509};
use super::*;
use crate::{cert_der_to_pem, parse_cert};

// ---- CA ----

#[test]
fn ca_is_a_constrained_p256_ca_for_ten_years() {
    let ca = ClusterCa::generate().unwrap();
    with_x509(&ca.cert_der(), |c| {
        assert_eq!(
            c.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            CA_COMMON_NAME
        );
        assert_eq!(c.subject(), c.issuer(), "self-signed");
        c.verify_signature(None).unwrap();
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(!ku.digital_signature());
        let not_after = c.validity().not_after.timestamp();
        let expected = SystemTime::now() + CA_VALIDITY;
        assert_close(unix_time(not_after), expected);
    });
    assert_eq!(
        KeyPair::from_pem(&ca.key_pem()).unwrap().algorithm(),
        &PKCS_ECDSA_P256_SHA256
    );
    assert!(
        !format!("{ca:?}").contains("PRIVATE"),
        "Debug hides the key"
    );
}

#[test]
fn ca_round_trips_through_pem() {
    let ca = ClusterCa::generate().unwrap();
    let loaded = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.key_pem(), ca.key_pem());
    assert_eq!(loaded.pin(), ca.pin());
    // The loaded CA issues certificates the original's chain accepts.
    let issued = loaded.sign_node(&csr("n").csr_pem, "n", HOUR).unwrap();
    verify_chain(&[der_of(&issued.pem)], &ca.cert_der()).unwrap();
}

#[test]
fn ca_from_pem_refuses_a_leaf_or_a_foreign_key() {
    let ca = ClusterCa::generate().unwrap();
    let other = ClusterCa::generate().unwrap();
    assert!(matches!(
        ClusterCa::from_pem(&ca.cert_pem(), &other.key_pem()),
        Err(PkiError::KeyMismatch { what: "CA" })
    ));
    let leaf = csr("x");
    let issued = ca.sign_node(&leaf.csr_pem, "x", HOUR).unwrap();
    assert!(matches!(
        ClusterCa::from_pem(&issued.pem, &leaf.key_pem),
        Err(PkiError::NotACa)
    ));
    assert!(matches!(
        ClusterCa::from_pem("junk", &ca.key_pem()),
        Err(PkiError::Pem { .. })
    ));
    assert!(matches!(
        ClusterCa::from_pem(&ca.cert_pem(), "junk"),
        Err(PkiError::Rcgen { .. })
    ));
}

#[test]
fn pin_is_sha256_of_the_der() {
    let ca = ClusterCa::generate().unwrap();
    let pin = ca.pin();
    assert_eq!(
        pin,
        format!("sha256:{}", hex::encode(Sha256::digest(ca.cert_der())))
    );
    assert_eq!(pin.len(), "sha256:".len() + 64);
    assert_eq!(pin, crate::ca_pin(&ca.cert_pem()).unwrap());
    assert_ne!(pin, ClusterCa::generate().unwrap().pin());
}

// ---- Leaves ----

#[test]
fn node_certificate_carries_the_callers_name_not_the_csrs() {
    let ca = ClusterCa::generate().unwrap();
    let kc = csr("evil-other-node");
    let issued = ca.sign_node(&kc.csr_pem, "worker-1", HOUR).unwrap();
    let info = parse_cert(&issued.pem).unwrap();
    assert_eq!(
        info.identity,
        Identity::Node {
            name: "worker-1".into()
        }
    );
    assert_eq!(info.serial, issued.serial);
    assert_eq!(info.not_after, issued.not_after);
    assert_close(issued.not_after, SystemTime::now() + HOUR);
    assert!(info.not_before <= SystemTime::now());
    let der = der_of(&issued.pem);
    assert_eq!(
        cn_and_orgs(&der),
        ("worker-1".into(), vec![NODES_ORGANIZATION.into()])
    );
    with_x509(&der, |c| {
        let eku = c.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!c.is_ca());
        let sans: Vec<_> = c
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .clone();
        assert_eq!(sans, vec![GeneralName::URI("sluice://node/worker-1")]);
        // The key is the CSR's.
        let key = KeyPair::from_pem(&kc.key_pem).unwrap();
        assert_eq!(
            c.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    });
    let verified = verify_chain(&[der], &ca.cert_der()).unwrap();
    assert_eq!(verified, info);
}

#[test]
fn user_certificate_has_one_o_per_group() {
    let ca = ClusterCa::generate().unwrap();
    for groups in [
        vec![],
        vec!["admins".to_owned()],
        vec![
            "admins".to_owned(),
            "net:ops".to_owned(),
            "admins".to_owned(),
            "viewers".to_owned(),
        ],
    ] {
        let issued = ca
            .sign_user(&csr("whatever").csr_pem, "alice@example.com", &groups, HOUR)
            .unwrap();
        let mut expected = groups.clone();
        expected.dedup_by(|a, b| a == b);
        let mut seen = HashSet::new();
        expected.retain(|g| seen.insert(g.clone()));
        let info = verify_chain(&[der_of(&issued.pem)], &ca.cert_der()).unwrap();
        assert_eq!(
            info.identity,
            Identity::User {
                name: "alice@example.com".into(),
                groups: expected.clone()
            }
        );
        assert_eq!(
            cn_and_orgs(&der_of(&issued.pem)),
            ("alice@example.com".into(), expected)
        );
    }
}

#[test]
fn many_groups_need_long_form_lengths_and_still_verify() {
    let ca = ClusterCa::generate().unwrap();
    let groups: Vec<String> = (0..40)
        .map(|i| format!("group-number-{i:03}-with-a-long-name"))
        .collect();
    let issued = ca.sign_user(&csr("u").csr_pem, "u", &groups, HOUR).unwrap();
    let der = der_of(&issued.pem);
    assert!(der.len() > 1500);
    let Identity::User { groups: got, .. } = verify_chain(&[der], &ca.cert_der()).unwrap().identity
    else {
        panic!("not a user");
    };
    assert_eq!(got, groups);
}

#[test]
fn serials_are_unique_even_for_the_same_key() {
    let ca = ClusterCa::generate().unwrap();
    let kc = csr("n");
    let mut serials = HashSet::new();
    for _ in 0..20 {
        let issued = ca.sign_node(&kc.csr_pem, "n", HOUR).unwrap();
        assert_eq!(issued.serial.len(), 32, "16 bytes, no sign padding");
        assert!(serials.insert(issued.serial));
    }
    let (server, _) = ca.issue_server(&[], &[]).unwrap();
    assert!(
        !serials.contains(&with_x509(&der_of(&server), |c| hex::encode(
            c.raw_serial()
        )))
    );
}

#[test]
fn validity_is_as_requested_and_bounded() {
    let ca = ClusterCa::generate().unwrap();
    let kc = csr("n");
    let issued = ca
        .sign_node(&kc.csr_pem, "n", DEFAULT_NODE_VALIDITY)
        .unwrap();
    assert_close(issued.not_after, SystemTime::now() + DEFAULT_NODE_VALIDITY);
    let issued = ca
        .sign_user(&kc.csr_pem, "u", &[], DEFAULT_USER_VALIDITY)
        .unwrap();
    assert_close(issued.not_after, SystemTime::now() + DEFAULT_USER_VALIDITY);
    for bad in [Duration::ZERO, MAX_LEAF_VALIDITY + Duration::from_secs(1)] {
        assert!(matches!(
            ca.sign_node(&kc.csr_pem, "n", bad),
            Err(PkiError::InvalidValidity { .. })
        ));
    }
}

#[test]
fn names_and_groups_are_checked() {
    let ca = ClusterCa::generate().unwrap();
    let kc = csr("n");
    for bad in ["", "a/b", "x y", "-x"] {
        assert!(
            matches!(
                ca.sign_node(&kc.csr_pem, bad, HOUR),
                Err(PkiError::InvalidName { .. })
            ),
            "{bad:?}"
        );
        assert!(
            matches!(
                ca.sign_user(&kc.csr_pem, bad, &[], HOUR),
                Err(PkiError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    // A user cannot be put among the nodes.
    let err = ca
        .sign_user(&kc.csr_pem, "u", &[NODES_ORGANIZATION.to_owned()], HOUR)
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}

// ---- CSRs ----

fn csr_pem_from_der(der: &[u8]) -> String {
    cert_der_to_pem(der).replace("CERTIFICATE", "CERTIFICATE REQUEST")
}

fn csr_der(pem: &str) -> Vec<u8> {
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn garbage_csrs_are_rejected_clearly() {
    let ca = ClusterCa::generate().unwrap();
    let sign = |pem: &str| ca.sign_node(pem, "n", HOUR).unwrap_err();
    assert!(matches!(sign(""), PkiError::Pem { .. }));
    assert!(matches!(sign("hello"), PkiError::Pem { .. }));
    // A certificate is not a CSR.
    assert!(matches!(sign(&ca.cert_pem()), PkiError::Pem { .. }));
    assert!(matches!(
        sign(&csr_pem_from_der(b"\x30\x03\x02\x01\x00")),
        PkiError::CsrParse { .. }
    ));
    let mut trailing = csr_der(&csr("n").csr_pem);
    trailing.push(0);
    assert!(matches!(
        sign(&csr_pem_from_der(&trailing)),
        PkiError::TrailingBytes { .. }
    ));
    assert!(
        sign("hello")
            .to_string()
            .contains("certificate signing request")
    );
}

#[test]
fn a_tampered_csr_does_not_verify() {
    let ca = ClusterCa::generate().unwrap();
    let mut der = csr_der(&csr("aaaaaaaa").csr_pem);
    let at = der.windows(8).position(|w| w == b"aaaaaaaa").unwrap();
    der[at] = b'b';
    let err = ca
        .sign_node(&csr_pem_from_der(&der), "n", HOUR)
        .unwrap_err();
    assert!(matches!(err, PkiError::CsrSignature { .. }), "{err:?}");
}

fn csr_with(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

#[test]
fn only_p256_and_ed25519_keys_are_accepted() {
    let ca = ClusterCa::generate().unwrap();
    let issued = ca.sign_node(&csr_with(&PKCS_ED25519), "n", HOUR).unwrap();
    verify_chain(&[der_of(&issued.pem)], &ca.cert_der()).unwrap();
    let err = ca
        .sign_node(&csr_with(&rcgen::PKCS_ECDSA_P384_SHA384), "n", HOUR)
        .unwrap_err();
    assert!(matches!(err, PkiError::UnsupportedKey { .. }), "{err:?}");
    assert!(err.to_string().contains("P-256"));
}
