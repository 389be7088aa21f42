//! The cluster CA and what only the control service does with it (the `ca`
//! feature): signing node and user certificates, its own server certificate
//! and TLS configuration ([`server`]), join tokens ([`tokens`]), and explicit
//! client-chain checks.
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
//!   pin can find and check the CA ([`crate::pinned_join_channel`]).
//! * **Clients** are verified by rustls/webpki in the handshake against the CA
//!   (chain, validity, client-auth EKU). The certificate is *optional* at the
//!   TLS layer because `NodeAgent.Join` is called by a node that has none yet:
//!   it proves itself with a join token instead, a one-time secret whose hash
//!   only is stored and which is compared in constant time. Every other call
//!   must come with a certificate; handlers read the caller's identity from
//!   `Request::peer_certs()` with [`crate::identity_from_chain`] (the chain was
//!   verified already) and authorize it. [`verify_chain`] runs the same webpki
//!   check explicitly, for code paths that hold a chain without a handshake
//!   behind it.
//! * **Identities** are the SAN URIs `sluice://node/<name>` and
//!   `sluice://user/<name>` (see [`crate::Identity`]). The CA puts them there
//!   from what the *caller* of [`ClusterCa::sign_node`] / [`ClusterCa::sign_user`]
//!   says — the node name the token was checked for, the user an admin
//!   created — never from the CSR: a CSR only contributes its public key (and
//!   must prove possession of it with a valid self-signature).
//!
//! rcgen cannot write a subject with several O attributes (its
//! `DistinguishedName` keeps one value per attribute type, rustls/rcgen#81),
//! and a user has one O per group. So leaf certificates are built by rcgen and
//! their subject is then replaced and the TBS re-signed by the CA
//! ([`resign`]); the result is checked by parsing it back.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PublicKeyData, SanType,
    SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

use crate::{
    Identity, NODES_ORGANIZATION, PkiError, REPLICAS_GROUP, ca_pin_der, cert_der_to_pem,
    certs_from_pem, parse_cert_der, validate_group, validate_name,
};

mod resign;
mod server;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod tokens;

use resign::{encode_subject, resign_with_subject};

pub use server::{server_tls_config, verify_chain};
pub use tokens::{
    JoinToken, TOKEN_ID_LEN, TOKEN_SECRET_LEN, constant_time_eq, hash_token_secret, new_join_token,
    parse_token, verify_token_secret,
};

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
const CLOCK_SKEW: Duration = crate::BACKDATE;

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
    /// Lowercase hex, as [`crate::CertInfo::serial`] reports it.
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

    /// Signs the certificate a control replica presents to the others: a
    /// user `replica-<id>` in the reserved [`REPLICAS_GROUP`], which
    /// [`Self::sign_user`] never grants, so only a holder of this CA (a
    /// replica) can make one.
    pub fn sign_replica(
        &self,
        csr_pem: &str,
        id: &str,
        validity: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let user = format!("replica-{id}");
        validate_name("user", &user)?;
        let key = csr_public_key(csr_pem)?;
        let (not_before, not_after) = validity_window(validity)?;
        let identity = Identity::User {
            name: user,
            groups: vec![REPLICAS_GROUP.to_owned()],
        };
        self.issue(&key, &identity, not_before, not_after)
    }

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
