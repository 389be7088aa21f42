//! What the CA side's tests share.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use crate::{KeyAndCsr, certs_from_pem, new_key_and_csr};

pub(crate) const HOUR: Duration = Duration::from_secs(3600);
/// Every network step of a test is bounded by this.
pub(crate) const STEP: Duration = Duration::from_secs(20);

pub(crate) fn csr(cn: &str) -> KeyAndCsr {
    new_key_and_csr(cn).unwrap()
}

pub(crate) fn der_of(pem: &str) -> CertificateDer<'static> {
    certs_from_pem(pem).unwrap().remove(0)
}

pub(crate) fn with_x509<T>(der: &[u8], f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    f(&cert)
}

pub(crate) fn cn_and_orgs(der: &[u8]) -> (String, Vec<String>) {
    with_x509(der, |c| {
        let cn = c
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        let orgs = c
            .subject()
            .iter_organization()
            .map(|o| o.as_str().unwrap().to_owned())
            .collect();
        (cn, orgs)
    })
}

pub(crate) fn assert_close(a: SystemTime, b: SystemTime) {
    let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(d <= Duration::from_secs(5), "{a:?} vs {b:?}");
}

pub(crate) fn unix_time(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
}
