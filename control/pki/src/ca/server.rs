//! The control service's own side of TLS: its server certificate, the
//! server TLS configuration, and the explicit check of a client chain.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{DnType, ExtendedKeyUsagePurpose, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::{
    CLOCK_SKEW, ClusterCa, SERVER_COMMON_NAME, SERVER_VALIDITY, cert_parse, leaf_params, rcgen_err,
};
use crate::{
    CertInfo, PkiError, cert_der_to_pem, certs_from_pem, identity_from_chain,
    install_crypto_provider, key_from_pem, ring_provider,
};

/// A client that does not finish the TLS handshake in time is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ClusterCa {
    /// Issues the control service's certificate and a fresh key for it
    /// (PEMs: leaf certificate only, PKCS#8 key). The SANs are `dns` and
    /// `ips`, plus `localhost` and 127.0.0.1.
    pub fn issue_server(
        &self,
        dns: &[String],
        ips: &[IpAddr],
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generate the server key"))?;
        let mut dns_names: Vec<&str> = vec!["localhost"];
        dns_names.extend(dns.iter().map(String::as_str));
        let mut addresses: Vec<IpAddr> = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        addresses.extend(ips);
        let mut seen = HashSet::new();
        dns_names.retain(|d| seen.insert(d.to_ascii_lowercase()));
        let mut seen = HashSet::new();
        addresses.retain(|a| seen.insert(*a));

        let mut sans = Vec::new();
        for name in dns_names {
            let ia5 = name.try_into().map_err(|source| PkiError::InvalidDnsName {
                name: name.to_owned(),
                source,
            })?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(addresses.into_iter().map(SanType::IpAddress));

        let now = SystemTime::now();
        let mut params = leaf_params(now - CLOCK_SKEW, now + SERVER_VALIDITY)?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_COMMON_NAME);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("sign the server certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Verifies a client chain against this CA; see [`verify_chain`].
    pub fn verify_client(&self, chain: &[CertificateDer<'_>]) -> Result<CertInfo, PkiError> {
        verify_chain(chain, &self.cert_der)
    }
}

/// Verifies a client's chain (leaf first) against the CA as the TLS layer
/// does — signature, validity now, client-auth EKU — and returns what the
/// leaf says.
pub fn verify_chain(chain: &[CertificateDer<'_>], ca_der: &[u8]) -> Result<CertInfo, PkiError> {
    verify_chain_at(chain, ca_der, UnixTime::now())
}

fn verify_chain_at(
    chain: &[CertificateDer<'_>],
    ca_der: &[u8],
    now: UnixTime,
) -> Result<CertInfo, PkiError> {
    let (leaf, intermediates) = chain.split_first().ok_or(PkiError::EmptyChain)?;
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der))
        .map_err(|source| PkiError::TlsConfig { source })?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), ring_provider())
        .build()
        .map_err(|e| PkiError::TlsConfig {
            source: rustls::Error::General(e.to_string()),
        })?;
    verifier
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|source| PkiError::Untrusted { source })?;
    identity_from_chain(chain)
}

/// tonic's server TLS: presents `[server cert, CA cert]` (the CA is appended
/// unless `cert_pem` ends with it already), verifies client certificates
/// against the CA, and lets clients without one through — `NodeAgent.Join`
/// has none; every other handler authorizes from `Request::peer_certs()`.
/// Checks up front that the server certificate comes from this CA and that
/// the key is its key.
pub fn server_tls_config(
    ca: &ClusterCa,
    cert_pem: &str,
    key_pem: &str,
) -> Result<tonic::transport::ServerTlsConfig, PkiError> {
    install_crypto_provider();
    let mut chain = certs_from_pem(cert_pem)?;
    if chain.last() != Some(&ca.cert_der) {
        chain.push(ca.cert_der.clone());
    }
    let leaf = &chain[0];
    let (_, leaf_cert) = x509_parser::parse_x509_certificate(leaf).map_err(cert_parse)?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca.cert_der).map_err(cert_parse)?;
    leaf_cert
        .verify_signature(Some(ca_cert.public_key()))
        .map_err(|source| PkiError::ServerCertNotFromCa { source })?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key_from_pem(key_pem)?, &ring_provider())
        .map_err(|_| PkiError::KeyMismatch { what: "server" })?;

    let chain_pem: String = chain.iter().map(|c| cert_der_to_pem(c)).collect();
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(chain_pem, key_pem))
        .client_ca_root(tonic::transport::Certificate::from_pem(&ca.cert_pem))
        .client_auth_optional(true)
        .timeout(TLS_HANDSHAKE_TIMEOUT))
}

#[cfg(test)]
mod tests;
