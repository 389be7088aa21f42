//! The cluster CA and what only the control service does with it: signing node
//! and user certificates, its own server certificate, join tokens, the server
//! TLS configuration, and explicit client-chain checks.
//!
//! # Trust model (server side)
//!
//! * The **cluster CA** is a self-signed ECDSA P-256 certificate ("sluice
//!   cluster CA", 10 years, `pathLen 0`: it signs leaves only). Its key never
//!   leaves the control service. Everything below is trusted because it chains
//!   to it; nothing else is trusted (no system roots).
//! * The **server certificate** (CN "sluice-control", server-auth EKU, the DNS
//!   names and addresses clients dial, always `localhost` and 127.0.0.1) is
//!   presented with the CA after it, so a joining node that knows only the CA's
//!   pin can find and check the CA (`sluice_api::pki::pinned_join_channel`).
//! * **Clients** are verified by rustls/webpki in the handshake against the CA
//!   (chain, validity, client-auth EKU). The certificate is *optional* at the
//!   TLS layer because `NodeAgent.Join` is called by a node that has none yet:
//!   it proves itself with a join token instead, a one-time secret whose hash
//!   only is stored and which is compared in constant time. Every other call
//!   must come with a certificate; handlers read the caller's identity from
//!   `Request::peer_certs()` with [`sluice_api::pki::identity_from_chain`] (the
//!   chain was verified already) and authorize it. [`verify_chain`] runs the
//!   same webpki check explicitly, for code paths that hold a chain without a
//!   handshake behind it.
//! * **Identities** are the SAN URIs `sluice://node/<name>` and
//!   `sluice://user/<name>` (see `sluice_api::pki`). The CA puts them there
//!   from what the *caller* of [`ClusterCa::sign_node`] / [`ClusterCa::sign_user`]
//!   says — the node name the token was checked for, the user an admin
//!   created — never from the CSR: a CSR only contributes its public key (and
//!   must prove possession of it with a valid self-signature).
//!
//! rcgen cannot write a subject with several O attributes (its
//! `DistinguishedName` keeps one value per attribute type, rustls/rcgen#81),
//! and a user has one O per group. So leaf certificates are built by rcgen and
//! their subject is then replaced and the TBS re-signed by the CA
//! (`resign_with_subject`); the result is checked by parsing it back.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PublicKeyData, SanType,
    SerialNumber, SigningKey, SubjectPublicKeyInfo,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use sha2::{Digest, Sha256};
use sluice_api::pki::{
    CertInfo, Identity, NODES_ORGANIZATION, ca_pin_der, cert_der_to_pem, certs_from_pem,
    identity_from_chain, install_crypto_provider, key_from_pem, parse_cert_der, ring_provider,
    validate_group, validate_name,
};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

/// The PKI layer's one error type, shared with the clients' side.
pub use sluice_api::pki::PkiError;

/// The CA certificate's subject CN.
pub const CA_COMMON_NAME: &str = "sluice cluster CA";
/// The server certificate's subject CN.
pub const SERVER_COMMON_NAME: &str = "sluice-control";
/// How long the CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a server certificate is valid.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The default lifetime of a node certificate (agents renew before expiry).
pub const DEFAULT_NODE_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// The default lifetime of a user certificate.
pub const DEFAULT_USER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest lifetime a leaf certificate may be given: the CA's.
pub const MAX_LEAF_VALIDITY: Duration = CA_VALIDITY;
/// Certificates start this long before they are issued, so a peer whose clock
/// is slightly behind still accepts them.
const CLOCK_SKEW: Duration = sluice_api::pki::BACKDATE;
/// A client that does not finish the TLS handshake in time is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A join token's id: 6 characters of [a-z0-9].
pub const TOKEN_ID_LEN: usize = 6;
/// A join token's secret: 16 characters of [a-z0-9] (about 83 bits).
pub const TOKEN_SECRET_LEN: usize = 16;
const TOKEN_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

// DER of the attribute types we write into subjects (RFC 5280 appendix A).
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3
const OID_ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a]; // 2.5.4.10
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_VERSION: u8 = 0xa0; // [0] EXPLICIT Version

fn random_error(e: getrandom::Error) -> PkiError {
    // getrandom's error is no std::error::Error without its "std" feature;
    // carry the OS error as an io::Error.
    let source = e.raw_os_error().map_or_else(
        || io::Error::other(e.to_string()),
        io::Error::from_raw_os_error,
    );
    PkiError::Random { source }
}

fn rcgen_err(op: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { op, source }
}

// ---- The CA ------------------------------------------------------------------

/// The cluster CA: its key pair and self-signed certificate.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("pin", &self.pin())
            .field("key", &"[elided]")
            .finish()
    }
}

/// A certificate the CA issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    pub pem: String,
    /// Lowercase hex, as [`CertInfo::serial`] reports it.
    pub serial: String,
    pub not_after: SystemTime,
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_err("generate the CA key"))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        // pathLen 0: the CA signs leaves, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA certificate"))?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA as stored: its certificate and PKCS#8 key, both PEM. Checks that
    /// the certificate is a CA and that the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = certs_from_pem(cert_pem)?
            .into_iter()
            .next()
            .ok_or(PkiError::EmptyChain)?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("read the CA key"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).map_err(cert_parse)?;
        if !cert.is_ca() {
            return Err(PkiError::NotACa);
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::KeyMismatch { what: "CA" });
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(rcgen_err("read the CA certificate"))?;
        Ok(ClusterCa {
            cert_pem: cert_der_to_pem(&cert_der),
            cert_der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA key, PKCS#8 PEM. Store it readable by the control service only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.to_vec()
    }

    /// `"sha256:<hex>"` of the CA certificate, what joining nodes pin.
    pub fn pin(&self) -> String {
        ca_pin_der(&self.cert_der)
    }

    /// Signs a node certificate for `node` with the CSR's public key: CN =
    /// `node`, O = `sluice:nodes`, SAN URI `sluice://node/<node>`, client auth.
    /// The CSR's subject and extensions are ignored.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_name("node", node)?;
        let key = csr_public_key(csr_pem)?;
        let (not_before, not_after) = validity_window(validity)?;
        let identity = Identity::Node {
            name: node.to_owned(),
        };
        self.issue(&key, &identity, not_before, not_after)
    }

    /// Signs a user certificate: CN = `user`, one O per group (duplicates
    /// dropped, order kept), SAN URI `sluice://user/<user>`, client auth.
    pub fn sign_user(
        &self,
        csr_pem: &str,
        user: &str,
        groups: &[String],
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        validate_name("user", user)?;
        for group in groups {
            validate_group(group)?;
        }
        let mut seen = HashSet::new();
        let groups = groups
            .iter()
            .filter(|g| seen.insert(g.as_str()))
            .cloned()
            .collect();
        let key = csr_public_key(csr_pem)?;
        let (not_before, not_after) = validity_window(validity)?;
        let identity = Identity::User {
            name: user.to_owned(),
            groups,
        };
        self.issue(&key, &identity, not_before, not_after)
    }

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

    /// Issues a client certificate for `identity` over `key`, valid in
    /// [`not_before`, `not_after`] (not checked here: tests issue expired ones).
    fn issue(
        &self,
        key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, PkiError> {
        let uri = identity.uri();
        let mut params = leaf_params(not_before, not_after)?;
        // Placeholder: the subject is rewritten below.
        params
            .distinguished_name
            .push(DnType::CommonName, identity.name());
        params.subject_alt_names = vec![SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(rcgen_err("encode the identity URI"))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(rcgen_err("sign the client certificate"))?;

        let organizations: Vec<&str> = match identity {
            Identity::Node { .. } => vec![NODES_ORGANIZATION],
            Identity::User { groups, .. } => groups.iter().map(String::as_str).collect(),
        };
        let subject = encode_subject(identity.name(), &organizations);
        let der = resign_with_subject(cert.der(), &subject, self.issuer.key())?;

        // Read back what we wrote: the identity must come out as it went in.
        let info = parse_cert_der(&der)?;
        if info.identity != *identity {
            return Err(PkiError::Der {
                what: "checking the issued certificate's identity",
            });
        }
        Ok(IssuedCert {
            pem: cert_der_to_pem(&der),
            serial: info.serial,
            not_after: info.not_after,
        })
    }
}

/// Parameters every leaf shares: not a CA, digital signature only, a random
/// serial, an authority key identifier, and an empty subject to fill in.
fn leaf_params(
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn validity_window(validity: Duration) -> Result<(SystemTime, SystemTime), PkiError> {
    if validity.is_zero() || validity > MAX_LEAF_VALIDITY {
        return Err(PkiError::InvalidValidity {
            validity,
            max: MAX_LEAF_VALIDITY,
        });
    }
    let now = SystemTime::now();
    Ok((now - CLOCK_SKEW, now + validity))
}

/// 16 random bytes, positive and always 16 bytes long (RFC 5280 §4.1.2.2:
/// at most 20 octets, unique per CA; rcgen's default — a hash of the public
/// key — repeats when a node renews with the same key).
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(random_error)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The CSR's public key, after checking the CSR is well formed, signed by
/// that key, and the key is ECDSA P-256 or Ed25519.
fn csr_public_key(csr_pem: &str) -> Result<SubjectPublicKeyInfo, PkiError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|source| {
            PkiError::Pem {
                what: "a certificate signing request",
                source,
            }
        })?;
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|e| PkiError::CsrParse {
        source: nom_error(e),
    })?;
    if !rest.is_empty() {
        return Err(PkiError::TrailingBytes {
            what: "certificate signing request",
        });
    }
    // The signature proves the requester holds the private key.
    csr.verify_signature()
        .map_err(|source| PkiError::CsrSignature { source })?;
    let spki = &csr.certification_request_info.subject_pki;
    let unsupported = || PkiError::UnsupportedKey {
        algorithm: spki.algorithm.algorithm.to_id_string(),
    };
    // rcgen matches the whole AlgorithmIdentifier, curve included.
    let key = SubjectPublicKeyInfo::from_der(spki.raw).map_err(|_| unsupported())?;
    let alg = key.algorithm();
    if alg != &PKCS_ECDSA_P256_SHA256 && alg != &PKCS_ED25519 {
        return Err(unsupported());
    }
    Ok(key)
}

fn cert_parse(e: x509_parser::nom::Err<X509Error>) -> PkiError {
    PkiError::CertParse {
        source: nom_error(e),
    }
}

fn nom_error(e: x509_parser::nom::Err<X509Error>) -> X509Error {
    match e {
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
        x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    }
}

// ---- Subject rewriting (rustls/rcgen#81) -------------------------------------------

/// `Name` (RFC 5280 §4.1.2.4) with CN = `common_name` and one O per
/// organization, each its own RDN, values as UTF8String.
fn encode_subject(common_name: &str, organizations: &[&str]) -> Vec<u8> {
    let attribute = |oid: &[u8], value: &str| {
        let atv = [
            der_tlv(TAG_OID, oid),
            der_tlv(TAG_UTF8_STRING, value.as_bytes()),
        ]
        .concat();
        der_tlv(TAG_SET, &der_tlv(TAG_SEQUENCE, &atv))
    };
    let mut rdns = attribute(OID_COMMON_NAME, common_name);
    for o in organizations {
        rdns.extend(attribute(OID_ORGANIZATION, o));
    }
    der_tlv(TAG_SEQUENCE, &rdns)
}

/// Replaces the subject of `cert_der` with `subject` and signs the new TBS
/// with `ca_key` (the key that signed the original, so the signature algorithm
/// fields stay right).
fn resign_with_subject(
    cert_der: &[u8],
    subject: &[u8],
    ca_key: &KeyPair,
) -> Result<Vec<u8>, PkiError> {
    let malformed = || PkiError::Der {
        what: "rewriting the certificate subject",
    };
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let cert = der_contents(cert_der, TAG_SEQUENCE).ok_or_else(malformed)?;
    let tbs_len = der_len(cert).ok_or_else(malformed)?;
    let (tbs, rest) = cert.split_at(tbs_len);
    let signature_algorithm = &rest[..der_len(rest).ok_or_else(malformed)?];
    let tbs = der_contents(tbs, TAG_SEQUENCE).ok_or_else(malformed)?;

    // TBSCertificate ::= SEQUENCE { [0] version, serialNumber, signature,
    //                               issuer, validity, subject, ... }
    let mut fields = Vec::new();
    let mut at = 0;
    while at < tbs.len() {
        let len = der_len(&tbs[at..]).ok_or_else(malformed)?;
        fields.push((at, at + len));
        at += len;
    }
    let subject_index = if tbs.first() == Some(&TAG_VERSION) {
        5
    } else {
        4
    };
    let &(start, end) = fields.get(subject_index).ok_or_else(malformed)?;
    if tbs[start] != TAG_SEQUENCE {
        return Err(malformed());
    }
    let new_tbs = der_tlv(
        TAG_SEQUENCE,
        &[&tbs[..start], subject, &tbs[end..]].concat(),
    );
    let signature = ca_key
        .sign(&new_tbs)
        .map_err(rcgen_err("sign the certificate"))?;
    let signature_value = der_tlv(TAG_BIT_STRING, &[&[0u8][..], &signature].concat());
    Ok(der_tlv(
        TAG_SEQUENCE,
        &[new_tbs.as_slice(), signature_algorithm, &signature_value].concat(),
    ))
}

/// The header length and content length of the DER element at the start of
/// `input` (single-byte tags, definite lengths up to 4 bytes).
fn der_header(input: &[u8]) -> Option<(usize, usize)> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (2 + n, len)
    };
    (input.len() >= header + len).then_some((header, len))
}

/// The total length (header and content) of the element at the start of `input`.
fn der_len(input: &[u8]) -> Option<usize> {
    der_header(input).map(|(h, l)| h + l)
}

/// The contents of `input` if it is exactly one element with tag `tag`.
fn der_contents(input: &[u8], tag: u8) -> Option<&[u8]> {
    let (header, len) = der_header(input)?;
    (input.first() == Some(&tag) && header + len == input.len()).then(|| &input[header..])
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(len) if len < 0x80 => out.push(len),
        _ => {
            let be = content.len().to_be_bytes();
            let skip = be.iter().take_while(|&&b| b == 0).count();
            let bytes = &be[skip..];
            #[expect(
                clippy::cast_possible_truncation,
                reason = "a usize has at most 8 bytes"
            )]
            out.push(0x80 | bytes.len() as u8);
            out.extend_from_slice(bytes);
        }
    }
    out.extend_from_slice(content);
    out
}

// ---- Client chains and server TLS ----------------------------------------------

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

// ---- Join tokens ---------------------------------------------------------------

/// A new join token. Show `token` to the admin once; store `id` and
/// `secret_hash` only.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `"<id>.<secret>"`.
    pub token: String,
    pub id: String,
    /// Lowercase hex SHA-256 of the secret.
    pub secret_hash: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"[elided]")
            .field("id", &self.id)
            .field("secret_hash", &self.secret_hash)
            .finish()
    }
}

/// Makes a join token from the system's random number generator.
pub fn new_join_token() -> Result<JoinToken, PkiError> {
    let id = random_token_chars(TOKEN_ID_LEN)?;
    let secret = random_token_chars(TOKEN_SECRET_LEN)?;
    Ok(JoinToken {
        token: format!("{id}.{secret}"),
        secret_hash: hash_token_secret(&secret),
        id,
    })
}

/// `n` characters of [a-z0-9], uniformly: bytes of 252 and above are drawn
/// again (252 = 7 × 36), so no character is likelier than another.
fn random_token_chars(n: usize) -> Result<String, PkiError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(random_error)?;
        for &b in buf.iter().filter(|&&b| b < 252) {
            if out.len() == n {
                break;
            }
            out.push(char::from(TOKEN_ALPHABET[usize::from(b % 36)]));
        }
    }
    Ok(out)
}

/// Splits `"<id>.<secret>"` and checks both parts' form. Errors never
/// contain the token.
pub fn parse_token(token: &str) -> Result<(String, String), PkiError> {
    let malformed = |reason| PkiError::MalformedToken { reason };
    let (id, secret) = token
        .split_once('.')
        .ok_or_else(|| malformed("expected <id>.<secret>"))?;
    let well_formed =
        |s: &str, len| s.len() == len && s.bytes().all(|b| TOKEN_ALPHABET.contains(&b));
    if !well_formed(id, TOKEN_ID_LEN) {
        return Err(malformed("the id must be 6 characters of [a-z0-9]"));
    }
    if !well_formed(secret, TOKEN_SECRET_LEN) {
        return Err(malformed("the secret must be 16 characters of [a-z0-9]"));
    }
    Ok((id.to_owned(), secret.to_owned()))
}

/// Lowercase hex SHA-256 of a token secret, as stored. The secret is random
/// with ~83 bits of entropy, so a fast hash is enough.
pub fn hash_token_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `token` is well formed, has id `id`, and its secret hashes to
/// `stored_hash`; the hashes are compared in constant time.
pub fn verify_token_secret(token: &str, id: &str, stored_hash: &str) -> bool {
    let Ok((token_id, secret)) = parse_token(token) else {
        return false;
    };
    let id_ok = constant_time_eq(token_id.as_bytes(), id.as_bytes());
    let hash_ok = constant_time_eq(
        hash_token_secret(&secret).as_bytes(),
        stored_hash.as_bytes(),
    );
    id_ok & hash_ok
}

/// Byte-slice equality whose time depends on the lengths only, not on where
/// the slices differ. Lengths are public here (hex digests, token ids).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // black_box keeps the optimizer from turning the fold into an early exit.
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic on failure")]

    use std::sync::Mutex;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::ServerName;
    use sluice_api::pki::{
        KeyAndCsr, mtls_channel, new_key_and_csr, parse_cert, pinned_join_channel,
    };
    use tokio::task::JoinHandle;
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::HealthServer;
    use tonic_health::server::{HealthReporter, HealthService};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::extensions::GeneralName;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    /// Every network step of a test is bounded by this.
    const STEP: Duration = Duration::from_secs(20);

    fn csr(cn: &str) -> KeyAndCsr {
        new_key_and_csr(cn).unwrap()
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        certs_from_pem(pem).unwrap().remove(0)
    }

    fn with_x509<T>(der: &[u8], f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        f(&cert)
    }

    fn cn_and_orgs(der: &[u8]) -> (String, Vec<String>) {
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

    fn assert_close(a: SystemTime, b: SystemTime) {
        let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
        assert!(d <= Duration::from_secs(5), "{a:?} vs {b:?}");
    }

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
            assert_close(sluice_api_time(not_after), expected);
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

    fn sluice_api_time(unix: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap())
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
        assert_eq!(pin, sluice_api::pki::ca_pin(&ca.cert_pem()).unwrap());
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
        let Identity::User { groups: got, .. } =
            verify_chain(&[der], &ca.cert_der()).unwrap().identity
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
                    source: rustls::Error::InvalidCertificate(
                        rustls::CertificateError::BadSignature
                    )
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
                sluice_api_time(c.validity().not_after.timestamp()),
                SystemTime::now() + SERVER_VALIDITY,
            );
        });
        KeyPair::from_pem(&key_pem).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der.clone()).unwrap();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), ring_provider())
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

    // ---- DER helpers ----

    #[test]
    fn der_lengths_round_trip() {
        for len in [0, 1, 127, 128, 255, 256, 65_535, 70_000] {
            let content = vec![0x5a; len];
            let tlv = der_tlv(TAG_SEQUENCE, &content);
            assert_eq!(der_header(&tlv), Some((tlv.len() - len, len)), "{len}");
            assert_eq!(der_contents(&tlv, TAG_SEQUENCE), Some(content.as_slice()));
            assert_eq!(der_contents(&tlv, TAG_SET), None);
        }
        // Truncated or indefinite input is refused, not misread.
        assert_eq!(der_header(&[0x30, 0x05, 1, 2]), None);
        assert_eq!(der_header(&[0x30, 0x80]), None);
        assert_eq!(der_header(&[0x30]), None);
        assert_eq!(der_header(&[0x1f, 0x01, 0x00]), None);
        assert!(matches!(
            resign_with_subject(
                b"\x30\x00",
                &encode_subject("x", &[]),
                &KeyPair::generate().unwrap()
            ),
            Err(PkiError::Der { .. })
        ));
    }

    // ---- Tokens ----

    #[test]
    fn tokens_have_the_documented_form_and_verify() {
        let mut ids = HashSet::new();
        for _ in 0..200 {
            let t = new_join_token().unwrap();
            let (id, secret) = t.token.split_once('.').unwrap();
            assert_eq!(id, t.id);
            assert_eq!(id.len(), 6);
            assert_eq!(secret.len(), 16);
            assert!(
                t.token
                    .bytes()
                    .all(|b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit())
            );
            assert_eq!(
                t.secret_hash,
                hex::encode(Sha256::digest(secret.as_bytes()))
            );
            assert!(!t.secret_hash.contains(secret));
            assert!(verify_token_secret(&t.token, &t.id, &t.secret_hash));
            assert_eq!(
                parse_token(&t.token).unwrap(),
                (id.to_owned(), secret.to_owned())
            );
            assert!(!format!("{t:?}").contains(secret), "Debug hides the secret");
            ids.insert(t.id);
        }
        assert!(ids.len() > 190, "ids are random");
    }

    #[test]
    fn token_characters_are_uniform_enough() {
        // 36 symbols, 36,000 draws: each should appear ~1000 times. The
        // bounds are > 6 sigma wide, so this does not flake.
        let s = random_token_chars(36_000).unwrap();
        for c in TOKEN_ALPHABET {
            let n = s.bytes().filter(|b| b == c).count();
            assert!(
                (800..1200).contains(&n),
                "{} appears {n} times",
                char::from(*c)
            );
        }
    }

    #[test]
    fn wrong_or_malformed_tokens_do_not_verify() {
        let t = new_join_token().unwrap();
        let other = new_join_token().unwrap();
        let (id, secret) = parse_token(&t.token).unwrap();
        // Wrong secret, wrong id, wrong stored hash.
        assert!(!verify_token_secret(
            &format!("{id}.{}", parse_token(&other.token).unwrap().1),
            &id,
            &t.secret_hash
        ));
        assert!(!verify_token_secret(&t.token, &other.id, &t.secret_hash));
        assert!(!verify_token_secret(&t.token, &t.id, &other.secret_hash));
        assert!(!verify_token_secret(&t.token, &t.id, ""));
        assert!(!verify_token_secret(
            &t.token,
            &t.id,
            &t.secret_hash.to_uppercase()
        ));
        for bad in [
            String::new(),
            ".".into(),
            id.clone(),
            format!("{id}{secret}"),
            format!("{id}.{secret}x"),
            format!("{id}x.{secret}"),
            format!(
                "{}.{secret}",
                id.to_uppercase().replace(|c: char| c.is_ascii_digit(), "A")
            ),
            format!("{id}.{}", &secret[..15]),
            format!("{id}.{}-", &secret[..15]),
            format!("{id}.{secret}.{secret}"),
            format!(" {id}.{secret}"),
        ] {
            assert!(!verify_token_secret(&bad, &t.id, &t.secret_hash), "{bad:?}");
            if bad != t.token {
                let err = parse_token(&bad).unwrap_err();
                assert!(matches!(err, PkiError::MalformedToken { .. }), "{bad:?}");
                assert!(
                    bad.len() < 6 || !err.to_string().contains(&bad),
                    "errors do not echo tokens"
                );
            }
        }
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        let a = [0u8; 64];
        for i in 0..64 {
            for bit in 0..8 {
                let mut b = a;
                b[i] ^= 1 << bit;
                assert!(!constant_time_eq(&a, &b));
            }
        }
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

    async fn mtls(
        endpoint: &str,
        ca: &ClusterCa,
        cert: &str,
        key: &str,
    ) -> Result<Channel, PkiError> {
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
        let (channel, ca_pem) =
            tokio::time::timeout(STEP, pinned_join_channel(&endpoint, &ca.pin()))
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
}
