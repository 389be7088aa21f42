//! Sluice's cryptographic identities, as every program sees them: keys and
//! certificate signing requests, certificates parsed into identities, and the
//! TLS channels to the control service.
//!
//! # Trust model
//!
//! The control service runs a private cluster CA (`sluice_control::pki`). Every
//! call to it is over TLS, and the server always proves itself with a chain
//! `[server certificate, CA certificate]`. What is verified, and where:
//!
//! * **Agents and `sluicectl` (clients) verify the server** against the CA
//!   certificate they hold ([`mtls_channel`]): webpki checks the chain, the
//!   validity period, the server-auth EKU and that the certificate names the
//!   host in the endpoint. They present their own certificate, issued by the CA.
//! * **The server verifies clients** in the TLS handshake against the same CA
//!   (webpki: chain, validity, client-auth EKU), then decides per call who the
//!   caller is with [`identity_from_chain`] on `Request::peer_certs()` and what
//!   it may do (RBAC). Client certificates are optional at the TLS layer only
//!   because one call needs none (below); every other handler rejects a call
//!   without one.
//! * **A joining node has no certificate yet** — getting one is the point of
//!   `NodeAgent.Join` — and it does not have the CA certificate either. It has a
//!   join token and the CA's pin (`"sha256:" + hex(SHA-256(CA DER))`), both
//!   handed over out of band by an admin. [`pinned_join_channel`] accepts the
//!   server only if the last certificate of its chain hashes to that pin and
//!   the server certificate verifies against that CA for the endpoint's host,
//!   so the token secret is only ever sent to the real control service. The
//!   token then proves the node to the server; the CA certificate learned
//!   during the handshake is what the agent stores for [`mtls_channel`] later.
//!
//! # Identities
//!
//! Who a certificate belongs to is decided by its SAN URI, `sluice://node/<name>`
//! or `sluice://user/<name>`, never by the common name alone: the URI names the
//! *kind* of principal as well as its name, so a user called like a node cannot
//! pass for it, and a certificate without one of the two forms is rejected
//! ([`PkiError::UnknownIdentity`]) rather than guessed at. The CN repeats the
//! name for humans reading `openssl x509 -text`. A user's groups are the
//! subject's O entries (one per group, as Kubernetes does); nodes carry
//! O = `sluice:nodes`, a prefix users cannot be given.
//!
//! Keys are ECDSA P-256. Every TLS configuration here uses rustls' *ring*
//! provider explicitly; [`install_crypto_provider`] also makes it the process
//! default for code that asks for the default (tonic's server TLS does).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Uri;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

/// The SAN URI prefix of a node certificate: `sluice://node/<name>`.
pub const NODE_URI_PREFIX: &str = "sluice://node/";
/// The SAN URI prefix of a user (admin) certificate: `sluice://user/<name>`.
pub const USER_URI_PREFIX: &str = "sluice://user/";
/// The subject O of every node certificate.
pub const NODES_ORGANIZATION: &str = "sluice:nodes";
/// Groups with this prefix are the system's own (see [`NODES_ORGANIZATION`]).
pub const RESERVED_GROUP_PREFIX: &str = "sluice:";
/// The prefix of a CA pin; the rest is the lowercase hex SHA-256 of the CA DER.
pub const PIN_PREFIX: &str = "sha256:";

/// Longest node or user name: a fully qualified host name fits.
pub const MAX_NAME_LEN: usize = 253;
/// Longest group name: RFC 5280's upper bound for an O attribute
/// (ub-organization-name).
pub const MAX_GROUP_LEN: usize = 64;

/// Certificates are valid from this long before they are issued, so that a
/// peer whose clock is a little behind accepts them at once. Renewal is timed
/// from the issue time ([`issued_at`]), not from `not_before`.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// When a certificate valid from `not_before` was issued (see [`BACKDATE`]).
pub fn issued_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    not_before
        .checked_add(BACKDATE)
        .filter(|issued| *issued <= not_after)
        .unwrap_or(not_before)
}

/// If `error` (or one of its causes) is the TLS peer rejecting the
/// certificate this side presented, the alert it sent: `CertificateExpired`,
/// `UnknownCA`, `BadCertificate`, `CertificateRevoked`, `DecryptError` (the
/// proof of key possession did not verify)... The control service answers a
/// client certificate it does not accept this way, during the handshake,
/// before any gRPC status can be sent.
pub fn certificate_rejection(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    const ABOUT_OUR_CERTIFICATE: &[&str] = &[
        "CertificateExpired",
        "CertificateRevoked",
        "CertificateUnknown",
        "BadCertificate",
        "UnsupportedCertificate",
        "UnknownCA",
        "AccessDenied",
        "CertificateRequired",
        "DecryptError",
    ];
    // The transport stack keeps only rustls's message ("received fatal alert:
    // UnknownCA") by the time it reaches us, not the rustls::Error.
    const ALERT: &str = "received fatal alert: ";
    let mut next = Some(error);
    while let Some(e) = next {
        // io::Error::source() skips the error it wraps: look inside.
        let inner = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        let texts = [Some(e.to_string()), inner.map(|i| i.to_string())];
        for text in texts.into_iter().flatten() {
            if let Some(at) = text.find(ALERT) {
                let alert: String = text[at + ALERT.len()..]
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect();
                if ABOUT_OUR_CERTIFICATE.contains(&alert.as_str()) {
                    return Some(alert);
                }
            }
        }
        next = e.source();
    }
    None
}

/// Bound on connecting to the control service: TCP and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle mTLS channels, so a watch on a dead peer ends.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const ALPN_H2: &[u8] = b"h2";

/// Errors of the PKI layer, client and server side (`sluice_control::pki`
/// uses this type too, so `?` works across both modules).
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {op}")]
    Rcgen {
        op: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("invalid PEM: expected {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot parse the certificate")]
    CertParse {
        #[source]
        source: X509Error,
    },
    #[error("cannot parse the certificate signing request")]
    CsrParse {
        #[source]
        source: X509Error,
    },
    #[error("trailing bytes after the {what}")]
    TrailingBytes { what: &'static str },
    #[error(
        "certificate has no sluice identity (a SAN URI {NODE_URI_PREFIX}<name> or {USER_URI_PREFIX}<name>); subject {subject:?}"
    )]
    UnknownIdentity { subject: String },
    #[error("certificate has {count} sluice identity URIs; exactly one is allowed")]
    AmbiguousIdentity { count: usize },
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("invalid CA pin {pin:?}: expected \"{PIN_PREFIX}\" and 64 hex digits")]
    InvalidPin { pin: String },
    #[error("cannot build the TLS configuration")]
    TlsConfig {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "the control service's CA does not match the pin: expected {expected}, presented {presented}"
    )]
    PinMismatch { expected: String, presented: String },
    #[error("the control service did not present its CA certificate after its own")]
    NoCaPresented,

    // Server side: the cluster CA (sluice_control::pki).
    #[error("the CA certificate is not a CA (basicConstraints cA is not set)")]
    NotACa,
    #[error("the private key does not belong to the {what} certificate")]
    KeyMismatch { what: &'static str },
    #[error("the server certificate was not issued by this CA")]
    ServerCertNotFromCa {
        #[source]
        source: X509Error,
    },
    #[error("the certificate signing request's signature does not verify")]
    CsrSignature {
        #[source]
        source: X509Error,
    },
    #[error(
        "unsupported key in the certificate signing request (algorithm {algorithm}): only ECDSA P-256 and Ed25519 keys are accepted"
    )]
    UnsupportedKey { algorithm: String },
    #[error("invalid validity {validity:?}: must be more than zero and at most {max:?}")]
    InvalidValidity { validity: Duration, max: Duration },
    #[error("invalid DNS name {name:?} for the server certificate")]
    InvalidDnsName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("malformed DER while {what}")]
    Der { what: &'static str },
    #[error("the system random number generator failed")]
    Random {
        #[source]
        source: io::Error,
    },
    #[error("malformed join token: {reason}")]
    MalformedToken { reason: &'static str },
    #[error("the certificate chain is not trusted")]
    Untrusted {
        #[source]
        source: rustls::Error,
    },
}

impl PkiError {
    /// Whether the error is about what a caller sent (a CSR, a name, a
    /// token, a certificate chain, a validity) rather than a failure of this
    /// side: a server answers the first kind with `InvalidArgument` or
    /// `Unauthenticated`, the second with `Internal`.
    pub fn is_caller_error(&self) -> bool {
        match self {
            PkiError::Pem { .. }
            | PkiError::CertParse { .. }
            | PkiError::CsrParse { .. }
            | PkiError::TrailingBytes { .. }
            | PkiError::UnknownIdentity { .. }
            | PkiError::AmbiguousIdentity { .. }
            | PkiError::InvalidName { .. }
            | PkiError::EmptyChain
            | PkiError::InvalidEndpoint { .. }
            | PkiError::InvalidPin { .. }
            | PkiError::CsrSignature { .. }
            | PkiError::UnsupportedKey { .. }
            | PkiError::InvalidValidity { .. }
            | PkiError::InvalidDnsName { .. }
            | PkiError::MalformedToken { .. }
            | PkiError::Untrusted { .. } => true,
            PkiError::Rcgen { .. }
            | PkiError::TlsConfig { .. }
            | PkiError::Connect { .. }
            | PkiError::PinMismatch { .. }
            | PkiError::NoCaPresented
            | PkiError::NotACa
            | PkiError::KeyMismatch { .. }
            | PkiError::ServerCertNotFromCa { .. }
            | PkiError::Der { .. }
            | PkiError::Random { .. } => false,
        }
    }
}

// ---- Identities ------------------------------------------------------------

/// Who a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An agent on a node: `sluice://node/<name>`.
    Node { name: String },
    /// An admin: `sluice://user/<name>`, with the subject's O entries as groups.
    User { name: String, groups: Vec<String> },
}

impl Identity {
    /// The principal's name.
    pub fn name(&self) -> &str {
        match self {
            Identity::Node { name } | Identity::User { name, .. } => name,
        }
    }

    /// `"node"` or `"user"`, as `WhoAmIResponse.kind` reports it.
    pub fn kind(&self) -> &'static str {
        match self {
            Identity::Node { .. } => "node",
            Identity::User { .. } => "user",
        }
    }

    /// The SAN URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node { name } => format!("{NODE_URI_PREFIX}{name}"),
            Identity::User { name, .. } => format!("{USER_URI_PREFIX}{name}"),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

/// What a certificate says, once parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// The serial number as lowercase hex, without leading zero bytes.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Checks a node or user name, as it appears in `sluice://<kind>/<name>` and
/// in the CN: 1 to 253 ASCII letters, digits, `-`, `.`, `_` or `@`, starting
/// with a letter or digit. Nothing that needs escaping in a URI path.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), PkiError> {
    let invalid = |reason| PkiError::InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    };
    check_chars(name, MAX_NAME_LEN, b"-._@").map_err(invalid)
}

/// Checks a user's group: 1 to 64 ASCII letters, digits, `-`, `.`, `_`, `@`
/// or `:`, starting with a letter or digit, and not in the reserved
/// `sluice:` namespace.
pub fn validate_group(group: &str) -> Result<(), PkiError> {
    let invalid = |reason| PkiError::InvalidName {
        kind: "group",
        name: group.to_owned(),
        reason,
    };
    check_chars(group, MAX_GROUP_LEN, b"-._@:").map_err(invalid)?;
    if group.starts_with(RESERVED_GROUP_PREFIX) {
        return Err(invalid("the \"sluice:\" prefix is reserved"));
    }
    Ok(())
}

fn check_chars(s: &str, max_len: usize, extra: &[u8]) -> Result<(), &'static str> {
    let Some(&first) = s.as_bytes().first() else {
        return Err("empty");
    };
    if s.len() > max_len {
        return Err("too long");
    }
    if !first.is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
    {
        return Err("contains a character that is not allowed");
    }
    Ok(())
}

/// Parses the first certificate of a PEM document.
pub fn parse_cert(pem: &str) -> Result<CertInfo, PkiError> {
    let der = first_cert_der(pem)?;
    parse_cert_der(&der)
}

/// Parses a DER certificate. This reads the certificate; it does not verify
/// it (the TLS layer or `sluice_control::pki::verify_chain` does).
pub fn parse_cert_der(der: &[u8]) -> Result<CertInfo, PkiError> {
    let cert = x509(der)?;
    let identity = identity_of(&cert)?;
    let validity = cert.validity();
    Ok(CertInfo {
        identity,
        serial: serial_hex(cert.raw_serial()),
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
    })
}

/// The identity of a client, from the chain the TLS layer verified; the leaf
/// is `chain[0]`. The server calls this on `Request::peer_certs()`: tonic's
/// TLS acceptor has verified the chain against the cluster CA by then, so
/// this only reads the leaf.
pub fn identity_from_chain(chain: &[CertificateDer<'_>]) -> Result<CertInfo, PkiError> {
    let leaf = chain.first().ok_or(PkiError::EmptyChain)?;
    parse_cert_der(leaf)
}

fn x509(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
        let source = match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        };
        PkiError::CertParse { source }
    })?;
    if !rest.is_empty() {
        return Err(PkiError::TrailingBytes {
            what: "certificate",
        });
    }
    Ok(cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, PkiError> {
    let unknown = || PkiError::UnknownIdentity {
        subject: cert.subject().to_string(),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|source| PkiError::CertParse { source })?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("sluice:") => Some(*uri),
            _ => None,
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(unknown()),
        [uri] => *uri,
        _ => return Err(PkiError::AmbiguousIdentity { count: uris.len() }),
    };
    if let Some(name) = uri.strip_prefix(NODE_URI_PREFIX) {
        validate_name("node", name).map_err(|_| unknown())?;
        return Ok(Identity::Node {
            name: name.to_owned(),
        });
    }
    if let Some(name) = uri.strip_prefix(USER_URI_PREFIX) {
        validate_name("user", name).map_err(|_| unknown())?;
        let groups = cert
            .subject()
            .iter_organization()
            .map(|o| o.as_str().map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| PkiError::CertParse { source })?;
        return Ok(Identity::User {
            name: name.to_owned(),
            groups,
        });
    }
    Err(unknown())
}

/// Lowercase hex of a DER INTEGER's content, without its sign-padding zeros.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

fn system_time(unix_seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

// ---- Keys, CSRs, PEM, pins -----------------------------------------------------

/// A fresh private key and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM ("PRIVATE KEY"); never leaves the machine that made it.
    pub key_pem: String,
    /// PEM ("CERTIFICATE REQUEST").
    pub csr_pem: String,
}

impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"[elided]")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Generates an ECDSA P-256 key and a CSR with subject CN = `common_name`. The
/// CA decides the certificate's identity itself; the CN is informational.
pub fn new_key_and_csr(common_name: &str) -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Rcgen {
        op: "generate a key pair",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| PkiError::Rcgen {
            op: "build a certificate signing request",
            source,
        })?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem,
    })
}

/// The pin of a CA certificate given as PEM (its first certificate).
pub fn ca_pin(ca_pem: &str) -> Result<String, PkiError> {
    Ok(ca_pin_der(&first_cert_der(ca_pem)?))
}

/// The pin of a DER CA certificate: `"sha256:" + hex(SHA-256(der))`.
pub fn ca_pin_der(der: &[u8]) -> String {
    format!("{PIN_PREFIX}{}", hex::encode(Sha256::digest(der)))
}

/// Checks a pin's form and returns it normalized (lowercase hex).
pub fn normalize_pin(pin: &str) -> Result<String, PkiError> {
    let invalid = || PkiError::InvalidPin {
        pin: pin.to_owned(),
    };
    let digest = pin.strip_prefix(PIN_PREFIX).ok_or_else(invalid)?;
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    Ok(format!("{PIN_PREFIX}{}", digest.to_ascii_lowercase()))
}

/// Every certificate of a PEM document, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Pem {
            what: "certificates",
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificates",
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// The private key of a PEM document (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem {
        what: "a private key",
        source,
    })
}

fn first_cert_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem {
        what: "a certificate",
        source,
    })
}

/// PEM ("CERTIFICATE") for a DER certificate, formatted as rcgen formats it
/// (64-column base64, LF line ends).
pub fn cert_der_to_pem(der: &[u8]) -> String {
    let b64 = base64(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Standard base64 with padding (RFC 4648 §4); PEM's body encoding.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---- TLS channels ----------------------------------------------------------------

/// The ring crypto provider, which every TLS configuration here uses.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default rustls provider, for code that builds
/// configurations from the default (tonic's server TLS). Idempotent: an
/// already installed default (ours or another) is left in place.
pub fn install_crypto_provider() {
    // Err means a default is installed already; that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An mTLS channel to the control service: the server is verified against
/// `ca_pem` and must be valid for the endpoint's host; `cert_pem` (which may
/// hold a chain) and `key_pem` are presented. TLS 1.3 only: both ends are ours.
pub async fn mtls_channel(
    endpoint: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, PkiError> {
    let target = Target::parse(endpoint)?;
    let provider = ring_provider();
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(ca_pem)? {
        roots
            .add(ca)
            .map_err(|source| PkiError::TlsConfig { source })?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| PkiError::TlsConfig {
            source: rustls::Error::General(e.to_string()),
        })?;
    let config = client_config_builder(provider)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)
        .map_err(|source| PkiError::TlsConfig { source })?;
    let endpoint_cfg = target
        .endpoint()?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    endpoint_cfg
        .connect_with_connector(tls_connector(&target, config))
        .await
        .map_err(|source| PkiError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

/// A TLS channel for `NodeAgent.Join`: no client certificate, and the server is
/// accepted only if the last certificate of its chain is a CA whose pin equals
/// `ca_pin` and its own certificate verifies against that CA for the
/// endpoint's host. Returns the channel and the CA certificate (PEM) the
/// server presented, for the agent to keep.
///
/// Meant for the single Join call: afterwards the agent drops it and talks
/// over [`mtls_channel`] with the certificate it got. A pin mismatch is
/// reported as [`PkiError::PinMismatch`] (with both pins), a server that sends
/// no CA after its certificate as [`PkiError::NoCaPresented`].
pub async fn pinned_join_channel(
    endpoint: &str,
    ca_pin: &str,
) -> Result<(Channel, String), PkiError> {
    let target = Target::parse(endpoint)?;
    let provider = ring_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: normalize_pin(ca_pin)?,
        provider: provider.clone(),
        outcome: Arc::default(),
    });
    let outcome = verifier.outcome.clone();
    let config = client_config_builder(provider)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let connected = target
        .endpoint()?
        .connect_with_connector(tls_connector(&target, config))
        .await;
    let outcome = outcome
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match (connected, outcome) {
        (Ok(channel), PinOutcome::Verified { ca_der }) => Ok((channel, cert_der_to_pem(&ca_der))),
        (
            _,
            PinOutcome::Mismatch {
                expected,
                presented,
            },
        ) => Err(PkiError::PinMismatch {
            expected,
            presented,
        }),
        (_, PinOutcome::NoCa) => Err(PkiError::NoCaPresented),
        (Err(source), _) => Err(PkiError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        }),
        // Connected without the verifier accepting a chain: cannot happen
        // with rustls; refuse rather than hand out an unverified channel.
        (Ok(_), PinOutcome::Pending) => Err(PkiError::NoCaPresented),
    }
}

fn client_config_builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, PkiError> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::TlsConfig { source })
}

/// Where to connect, parsed from `https://host[:port]`.
struct Target {
    /// The endpoint as given (normalized by `Uri`).
    uri: Uri,
    /// Host without IPv6 brackets, for dialing.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, PkiError> {
        let invalid = |reason| PkiError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let uri: Uri = endpoint.parse().map_err(|_| invalid("not a URI"))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
        Ok(Target {
            port: uri.port_u16().unwrap_or(443),
            uri,
            host,
            server_name,
        })
    }

    /// The tonic endpoint. Our connector does TLS itself, so the URI tonic
    /// dials is `http://` (with `https://`, tonic insists on its own TLS
    /// layer); requests still carry the real `https` origin.
    fn endpoint(&self) -> Result<Endpoint, PkiError> {
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let endpoint = Endpoint::from_shared(format!("http://{authority}")).map_err(|_| {
            PkiError::InvalidEndpoint {
                endpoint: self.uri.to_string(),
                reason: "not a valid tonic endpoint",
            }
        })?;
        Ok(endpoint
            .origin(self.uri.clone())
            .connect_timeout(CONNECT_TIMEOUT))
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

/// How long [`await_verdict`] waits for the server's first word.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session store that only notes that the server sent a TLS 1.3 session
/// ticket: the server sends tickets once it has accepted the client's
/// Finished, i.e. after it has judged the client certificate. Sluice does not
/// resume sessions (every connection is long-lived), so nothing is kept.
#[derive(Debug, Default)]
struct TicketSignal {
    seen: std::sync::atomic::AtomicBool,
}

impl rustls::client::ClientSessionStore for TicketSignal {
    fn set_kx_hint(&self, _: ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls13ClientSessionValue,
    ) {
        self.seen.store(true, std::sync::atomic::Ordering::Release);
    }
    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// TLS 1.3 lets the client finish its handshake before the server has judged
/// the client's certificate; a rejection (expired, unknown CA, revoked) comes
/// as an alert just after. If the client sent its request first, the server
/// may close before the alert is read and the client sees only "broken
/// pipe", which looks like a network failure and would be retried forever.
/// So wait, before handing the connection to HTTP/2, for the server's first
/// records: a session ticket or data means accepted, an alert is returned as
/// the error it is. Records read here stay buffered in the TLS session.
async fn await_verdict(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    signal: &TicketSignal,
) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + VERDICT_TIMEOUT;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (tcp, session) = tls.get_mut();
        let accepted = signal.seen.load(std::sync::atomic::Ordering::Acquire)
            || session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                .plaintext_bytes_to_read()
                > 0;
        if accepted {
            return Ok(());
        }
        // No word in time: go ahead; the first call will tell.
        match tokio::time::timeout_at(deadline, tcp.readable()).await {
            Err(_elapsed) => return Ok(()),
            Ok(ready) => ready?,
        }
        let n = match tcp.try_read(&mut buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server closed the connection after the TLS handshake",
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut fresh = &buf[..n];
        while !fresh.is_empty() {
            session.read_tls(&mut fresh)?;
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

/// A connector for `Endpoint::connect_with_connector`: TCP to the target, then
/// a TLS handshake with `config` (ALPN h2, required), then the server's
/// verdict on the client certificate ([`await_verdict`]), if one was sent.
fn tls_connector(
    target: &Target,
    mut config: ClientConfig,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = ConnectFuture,
> + Send
+ 'static {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let presents_certificate = config.client_auth_cert_resolver.has_certs();
    let config = Arc::new(config);
    let host = target.host.clone();
    let port = target.port;
    let server_name = target.server_name.clone();
    tower::service_fn(move |_uri: Uri| -> ConnectFuture {
        // A session store of its own per connection, to see its tickets.
        let signal = Arc::new(TicketSignal::default());
        let mut config = (*config).clone();
        config.resumption = rustls::client::Resumption::store(signal.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let host = host.clone();
        let server_name = server_name.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let mut tls = connector.connect(server_name, tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server did not negotiate HTTP/2 (ALPN h2)",
                ));
            }
            if presents_certificate {
                await_verdict(&mut tls, &signal).await?;
            }
            Ok(TokioIo::new(tls))
        })
    })
}

/// What the pinned verifier saw, for [`pinned_join_channel`] to report.
#[derive(Clone, Debug, Default)]
enum PinOutcome {
    #[default]
    Pending,
    NoCa,
    Mismatch {
        expected: String,
        presented: String,
    },
    Verified {
        ca_der: Vec<u8>,
    },
}

/// Accepts a server whose chain ends in the pinned CA and whose certificate
/// verifies against that CA (webpki: signature, validity, server-auth EKU,
/// name). Records what it saw in `outcome`.
#[derive(Debug)]
struct PinnedCaVerifier {
    /// Normalized `"sha256:<hex>"`.
    pin: String,
    provider: Arc<CryptoProvider>,
    outcome: Arc<Mutex<PinOutcome>>,
}

impl PinnedCaVerifier {
    fn record(&self, outcome: PinOutcome) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = outcome;
    }
}

fn rejected(error: PkiError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server sends [leaf, (intermediates...,) CA]: the CA is last.
        let Some((ca, intermediates)) = intermediates.split_last() else {
            self.record(PinOutcome::NoCa);
            return Err(rejected(PkiError::NoCaPresented));
        };
        let presented = ca_pin_der(ca);
        if presented != self.pin {
            self.record(PinOutcome::Mismatch {
                expected: self.pin.clone(),
                presented: presented.clone(),
            });
            return Err(rejected(PkiError::PinMismatch {
                expected: self.pin.clone(),
                presented,
            }));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.record(PinOutcome::Verified {
            ca_der: ca.to_vec(),
        });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests panic on failure")]

    use rcgen::{
        BasicConstraints, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    };
    use x509_parser::prelude::FromDer;

    use super::*;

    /// A throwaway CA made with rcgen directly (the real one lives in
    /// sluice-control, which this crate cannot depend on).
    fn test_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    fn leaf(
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

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn client_leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        sans: Vec<SanType>,
    ) -> CertificateDer<'static> {
        leaf(ca, "x", &[], sans, ExtendedKeyUsagePurpose::ClientAuth).0
    }

    #[test]
    fn key_and_csr_are_p256_and_self_signed() {
        let kc = new_key_and_csr("node-1").unwrap();
        let key = KeyPair::from_pem(&kc.key_pem).unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(kc.csr_pem.as_bytes())
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
        // RFC 4648 §10 test vectors.
        for (input, out) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), out);
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
        let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = err
        else {
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
}
