#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use x509_parser::prelude::FromDer;

use super::*;
use crate::testing::test_ca;

#[test]
fn key_and_csr_are_p256_and_self_signed() {
    let kc = new_key_and_csr("node-1").unwrap();
    let key = KeyPair::from_pem(&kc.key_pem).unwrap();
    assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(kc.csr_pem.as_bytes())
        .unwrap();
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
    assert!(rest.is_empty());
    csr.verify_signature().unwrap();
    let subject = &csr.certification_request_info.subject;
    assert_eq!(
        subject.iter_common_name().next().unwrap().as_str().unwrap(),
        "node-1"
    );
    assert_eq!(
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .as_ref(),
        key.public_key_raw()
    );
    assert!(
        !format!("{kc:?}").contains("PRIVATE KEY"),
        "Debug hides the key"
    );
}

#[test]
fn pins() {
    let ca = test_ca("ca");
    let pin = ca_pin(&ca.pem()).unwrap();
    assert_eq!(pin, ca_pin_der(ca.der()));
    let digest = pin.strip_prefix("sha256:").unwrap();
    assert_eq!(digest.len(), 64);
    assert!(
        digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(
        hex::decode(digest).unwrap(),
        Sha256::digest(ca.der()).to_vec()
    );
    assert_eq!(
        normalize_pin(&pin.to_uppercase().replace("SHA256:", "sha256:")).unwrap(),
        pin
    );
    for bad in [
        "",
        "sha256:",
        "sha1:00",
        &pin[..70],
        &format!("{pin}0"),
        &pin.replace('a', "g"),
    ] {
        if bad != pin {
            assert!(
                matches!(normalize_pin(bad), Err(PkiError::InvalidPin { .. })),
                "{bad}"
            );
        }
    }
    assert_ne!(
        ca_pin_der(test_ca("ca").der()),
        pin,
        "another CA, another pin"
    );
}

#[test]
fn base64_and_pem_match_the_references() {
    // RFC 4648 §10 test vectors, as the body of the PEM we write.
    for (input, out) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        let pem = cert_der_to_pem(input.as_bytes());
        let body = pem
            .strip_prefix("-----BEGIN CERTIFICATE-----\n")
            .and_then(|rest| rest.strip_suffix("-----END CERTIFICATE-----\n"))
            .unwrap();
        assert_eq!(body.trim_end_matches('\n'), out, "{input:?}");
    }
    let ca = test_ca("ca");
    assert_eq!(
        cert_der_to_pem(ca.der()),
        ca.pem(),
        "same text as rcgen writes"
    );
    assert_eq!(
        certs_from_pem(&cert_der_to_pem(ca.der())).unwrap(),
        vec![ca.der().clone()]
    );
}
