//! Certificates for the tests: a throwaway CA and leaves made with rcgen
//! directly, so the client side's tests do not need the `ca` feature.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

/// A throwaway CA made with rcgen directly (the real one is behind the
/// `ca` feature).
pub(crate) fn test_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

pub(crate) fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    orgs: &[&str],
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
) -> (CertificateDer<'static>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    // rcgen keeps one value per attribute type (rustls/rcgen#81): at most one O here.
    for o in orgs {
        params.distinguished_name.push(DnType::OrganizationName, *o);
    }
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![eku];
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.der().clone(), key)
}

pub(crate) fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

pub(crate) fn client_leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    sans: Vec<SanType>,
) -> CertificateDer<'static> {
    leaf(ca, "x", &[], sans, ExtendedKeyUsagePurpose::ClientAuth).0
}
