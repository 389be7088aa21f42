//! Who a certificate belongs to: [`Identity`] and [`CertInfo`], read from a
//! certificate's SAN URI and subject, and the rules for node, user and group
//! names.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use crate::PkiError;
use crate::keys::first_cert_der;

/// The SAN URI prefix of a node certificate: `sluice://node/<name>`.
pub const NODE_URI_PREFIX: &str = "sluice://node/";
/// The SAN URI prefix of a user (admin) certificate: `sluice://user/<name>`.
pub const USER_URI_PREFIX: &str = "sluice://user/";
/// The subject O of every node certificate.
pub const NODES_ORGANIZATION: &str = "sluice:nodes";
/// The group of the certificates control replicas present to each other
/// (see `ClusterCa::sign_replica`); no admin can be given it.
pub const REPLICAS_GROUP: &str = "sluice:replicas";
/// Groups with this prefix are the system's own (see [`NODES_ORGANIZATION`]).
pub const RESERVED_GROUP_PREFIX: &str = "sluice:";

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
/// it (the TLS layer or, on the CA side, `verify_chain` does).
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

#[cfg(test)]
mod tests;
