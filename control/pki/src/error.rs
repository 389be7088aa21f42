//! The PKI layer's one error type, client and CA side alike, so `?` works
//! across both and callers map it to a status in one place.

use std::io;
use std::time::Duration;

use x509_parser::error::X509Error;

use crate::identity::{NODE_URI_PREFIX, USER_URI_PREFIX};
use crate::keys::PIN_PREFIX;

/// Errors of the PKI layer, client and server side.
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

    // Server side: the cluster CA (the `ca` feature).
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
