//! Why a manifest was rejected, and where.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_saphyr::MessageFormatter as _;

use crate::kind::{ObjectKind, ObjectRef};
use crate::rules::{AddressProblem, NameProblem, Problem};
use crate::service::{MAX_WEIGHT, Protocol, algorithm_names};

/// Which program reads the manifest; it decides the kinds and fields accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `sluice-agent run --manifest`: Services only, each with a VIP and static backends,
    /// because there is no control service to allocate VIPs or resolve selectors.
    Agent,
    /// `sluicectl apply` and the control service: every [`ObjectKind`].
    Control,
}

impl Mode {
    /// The kinds this mode understands, in the order messages list them.
    pub const fn kinds(self) -> &'static [&'static str] {
        match self {
            Self::Agent => &["Service"],
            Self::Control => &["Service", "Endpoint", "Grant", "NetworkPolicy"],
        }
    }

    pub fn accepts(self, kind: ObjectKind) -> bool {
        self.kinds().contains(&kind.as_str())
    }

    const fn reader(self) -> &'static str {
        match self {
            Self::Agent => "this agent",
            Self::Control => "the control service",
        }
    }
}

/// What a standalone agent's manifest asked for that only the control service provides.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlOnly {
    #[error(
        "{kind} objects need the control service (apply them with `sluicectl apply -f`); \
         `sluice-agent run --manifest` understands only Service"
    )]
    Kind { kind: ObjectKind },
    #[error(
        "selectors need the control service, which resolves them to Endpoints (apply with \
         `sluicectl apply -f`); `sluice-agent run --manifest` takes static backends only"
    )]
    Selector,
    #[error(
        "topology-aware routing needs the control service, which knows the zones of nodes \
         and endpoints (apply with `sluicectl apply -f`)"
    )]
    TopologyAware,
}

/// Where in a manifest an error was found.
///
/// Displays as `web.yaml: document 2 (Service "shop/api"), line 9, column 13`, leaving
/// out what is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub file: String,
    /// 1-based, counting empty documents.
    pub document: usize,
    /// Known once the document's kind, name and namespace have been validated.
    pub object: Option<ObjectRef>,
    /// 1-based.
    pub line: Option<u64>,
    /// 1-based, in characters.
    pub column: Option<u64>,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            file,
            document,
            object,
            line,
            column,
        } = self;
        write!(f, "{file}: document {document}")?;
        if let Some(object) = object {
            write!(f, " ({object})")?;
        }
        if let Some(line) = line {
            write!(f, ", line {line}")?;
        }
        if let Some(column) = column {
            write!(f, ", column {column}")?;
        }
        Ok(())
    }
}

/// Why a manifest was rejected.
///
/// Each message is complete on its own (position, field path, reason, offending value),
/// so printing it with `{}` is enough; where there is an underlying cause it is also
/// available through [`std::error::Error::source`]. `at` is boxed to keep
/// `Result<_, ManifestError>` small.
///
/// Rules shared with API messages ([`crate::rules`]) produce a [`Problem`]; those that
/// had a variant of their own before the control-mode kinds keep it (the standalone
/// agent's callers match on them), the others are [`ManifestError::Invalid`]. Either
/// way the reason reads the same as the API's ([`crate::wire::ObjectError`]).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: cannot read manifest: {cause}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("{at}: invalid YAML: {}", yaml_reason(cause))]
    Yaml {
        at: Box<Position>,
        #[source]
        cause: Box<serde_saphyr::Error>,
    },
    #[error("{at}: a document must be a mapping describing one object, got {found}")]
    NotAMapping { at: Box<Position>, found: String },
    #[error("{at}: {field}: expected {expected}, got {found}")]
    WrongType {
        at: Box<Position>,
        field: String,
        expected: &'static str,
        found: String,
    },
    #[error("{at}: {field}: missing required field")]
    MissingField { at: Box<Position>, field: String },
    #[error("{at}: {field}: unknown field, expected one of: {}", expected.join(", "))]
    UnknownField {
        at: Box<Position>,
        field: String,
        expected: &'static [&'static str],
    },
    #[error(
        "{at}: kind: unsupported kind {kind:?}, {} understands: {}",
        mode.reader(),
        mode.kinds().join(", ")
    )]
    UnsupportedKind {
        at: Box<Position>,
        kind: String,
        mode: Mode,
    },
    /// A standalone agent's manifest uses something only the control service provides.
    #[error("{at}: {field}: {feature}")]
    NeedsControlService {
        at: Box<Position>,
        field: String,
        feature: ControlOnly,
    },
    #[error(
        "{at}: name: {name:?} is not a valid name: {problem} \
         (a DNS-1035 label: 1 to 63 of a-z, 0-9 and '-', starting with a letter, \
         ending with a letter or digit)"
    )]
    InvalidName {
        at: Box<Position>,
        name: String,
        problem: NameProblem,
    },
    #[error("{at}: {field}: {problem}, got {value:?}")]
    InvalidAddress {
        at: Box<Position>,
        field: String,
        value: String,
        problem: AddressProblem,
    },
    #[error("{at}: ports: at least one port is required, got an empty list")]
    NoPorts { at: Box<Position> },
    #[error("{at}: ports: at most {max} ports per service, got {count}")]
    TooManyPorts {
        at: Box<Position>,
        count: usize,
        max: usize,
    },
    #[error("{at}: {field}: must be between 1 and 65535, got {value}")]
    PortOutOfRange {
        at: Box<Position>,
        field: String,
        value: i128,
    },
    #[error("{at}: {field}: must be \"TCP\" or \"UDP\", got {value:?}")]
    UnknownProtocol {
        at: Box<Position>,
        field: String,
        value: String,
    },
    #[error("{at}: {field}: port {port}/{protocol} is already listed as {first}")]
    DuplicatePort {
        at: Box<Position>,
        field: String,
        port: u16,
        protocol: Protocol,
        first: String,
    },
    #[error(
        "{at}: algorithm: unknown algorithm {value:?}, expected one of: {}",
        algorithm_names()
    )]
    UnknownAlgorithm { at: Box<Position>, value: String },
    #[error("{at}: {field}: must be between 1 and {MAX_WEIGHT}, got {value}")]
    WeightOutOfRange {
        at: Box<Position>,
        field: String,
        value: i128,
    },
    #[error("{at}: {field}: backend {address} is already listed as {first}")]
    DuplicateBackend {
        at: Box<Position>,
        field: String,
        address: Ipv4Addr,
        first: String,
    },
    #[error("{at}: backends: at most {max} backends per service, got {count}")]
    TooManyBackends {
        at: Box<Position>,
        count: usize,
        max: usize,
    },
    #[error("{at}: {field}: {address} is the service's own VIP and cannot be a backend")]
    BackendIsVip {
        at: Box<Position>,
        field: String,
        address: Ipv4Addr,
    },
    /// Another rule of [`crate::rules`] (namespaces, labels, selectors, endpoints, grants).
    #[error("{at}: {field}: {problem}")]
    Invalid {
        at: Box<Position>,
        field: String,
        problem: Problem,
    },
    /// Two Services with the same namespace and name.
    #[error(
        "{at}: name: Service {:?} is already defined in document {first_document}",
        format!("{namespace}/{name}")
    )]
    DuplicateService {
        at: Box<Position>,
        namespace: String,
        name: String,
        first_document: usize,
    },
    /// Two Endpoints, or two Grants, with the same namespace and name.
    #[error("{at}: name: {object} is already defined in document {first_document}")]
    DuplicateObject {
        at: Box<Position>,
        object: ObjectRef,
        first_document: usize,
    },
    /// VIPs are global: two services, in any namespaces, cannot share a listener.
    #[error(
        "{at}: {field}: {vip}:{port}/{protocol} is already served by Service {other_service:?} \
         (document {other_document})"
    )]
    ListenerConflict {
        at: Box<Position>,
        field: String,
        vip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        /// `namespace/name`.
        other_service: String,
        other_document: usize,
    },
}

impl ManifestError {
    /// Where the error is, for callers that point at it (editors, status output);
    /// `None` when the file could not be read at all.
    pub fn position(&self) -> Option<&Position> {
        match self {
            Self::Read { .. } => None,
            Self::Yaml { at, .. }
            | Self::NotAMapping { at, .. }
            | Self::WrongType { at, .. }
            | Self::MissingField { at, .. }
            | Self::UnknownField { at, .. }
            | Self::UnsupportedKind { at, .. }
            | Self::NeedsControlService { at, .. }
            | Self::InvalidName { at, .. }
            | Self::InvalidAddress { at, .. }
            | Self::NoPorts { at }
            | Self::TooManyPorts { at, .. }
            | Self::PortOutOfRange { at, .. }
            | Self::UnknownProtocol { at, .. }
            | Self::DuplicatePort { at, .. }
            | Self::UnknownAlgorithm { at, .. }
            | Self::WeightOutOfRange { at, .. }
            | Self::DuplicateBackend { at, .. }
            | Self::TooManyBackends { at, .. }
            | Self::BackendIsVip { at, .. }
            | Self::Invalid { at, .. }
            | Self::DuplicateService { at, .. }
            | Self::DuplicateObject { at, .. }
            | Self::ListenerConflict { at, .. } => Some(at),
        }
    }

    /// A broken rule at `field`, as the variant that rule has always had.
    pub(super) fn from_problem(at: Box<Position>, field: String, problem: Problem) -> Self {
        match problem {
            Problem::Missing => Self::MissingField { at, field },
            // The legacy variant reads "name: ..."; another field that holds a
            // name (a policy's `service`) keeps its own field.
            Problem::InvalidName { name, problem } if field == "name" => {
                Self::InvalidName { at, name, problem }
            }
            Problem::InvalidAddress { value, problem } => Self::InvalidAddress {
                at,
                field,
                value,
                problem,
            },
            Problem::NoPorts => Self::NoPorts { at },
            Problem::TooManyPorts { count, max } => Self::TooManyPorts { at, count, max },
            Problem::PortOutOfRange { value } => Self::PortOutOfRange { at, field, value },
            Problem::UnknownProtocol { value } => Self::UnknownProtocol { at, field, value },
            Problem::DuplicatePort {
                port,
                protocol,
                first,
            } => Self::DuplicatePort {
                at,
                field,
                port,
                protocol,
                first,
            },
            Problem::UnknownAlgorithm { value } => Self::UnknownAlgorithm { at, value },
            Problem::WeightOutOfRange { value } => Self::WeightOutOfRange { at, field, value },
            Problem::TooManyBackends { count, max } => Self::TooManyBackends { at, count, max },
            Problem::BackendIsVip { address } => Self::BackendIsVip { at, field, address },
            Problem::DuplicateBackend { address, first } => Self::DuplicateBackend {
                at,
                field,
                address,
                first,
            },
            problem => Self::Invalid { at, field, problem },
        }
    }
}

/// serde-saphyr's own wording without its location suffix: [`Position`] already has it.
fn yaml_reason(cause: &serde_saphyr::Error) -> String {
    let text = serde_saphyr::DefaultMessageFormatter.format_message(cause.without_snippet());
    // The formatter may echo input text; keep the message on one line.
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The variants kept for the standalone agent word each reason exactly as
    /// [`Problem`] does, so a manifest and an API call give the same reason.
    #[test]
    fn legacy_variants_read_like_the_shared_problem() {
        let at = Position {
            file: "f.yaml".to_owned(),
            document: 1,
            object: None,
            line: Some(2),
            column: Some(3),
        };
        let field = |f: &str| f.to_owned();
        let address: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
        let cases = [
            (
                "name",
                Problem::InvalidName {
                    name: "Web".to_owned(),
                    problem: NameProblem::InvalidChar { ch: 'W' },
                },
            ),
            (
                "vip",
                Problem::InvalidAddress {
                    value: "::1".to_owned(),
                    problem: AddressProblem::Ipv6,
                },
            ),
            ("ports", Problem::NoPorts),
            ("ports", Problem::TooManyPorts { count: 65, max: 64 }),
            ("ports[0].port", Problem::PortOutOfRange { value: 0 }),
            (
                "ports[0].protocol",
                Problem::UnknownProtocol {
                    value: "tcp".to_owned(),
                },
            ),
            (
                "ports[1]",
                Problem::DuplicatePort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    first: "ports[0]".to_owned(),
                },
            ),
            (
                "algorithm",
                Problem::UnknownAlgorithm {
                    value: "maglev".to_owned(),
                },
            ),
            (
                "backends[0].weight",
                Problem::WeightOutOfRange { value: -1 },
            ),
            (
                "backends",
                Problem::TooManyBackends {
                    count: 4097,
                    max: 4096,
                },
            ),
            ("backends[0].address", Problem::BackendIsVip { address }),
            (
                "backends[1].address",
                Problem::DuplicateBackend {
                    address,
                    first: "backends[0]".to_owned(),
                },
            ),
            ("labels.app", Problem::EmptySelector),
        ];
        for (f, problem) in cases {
            let expected = format!("{at}: {f}: {problem}");
            let error = ManifestError::from_problem(Box::new(at.clone()), field(f), problem);
            assert_eq!(error.to_string(), expected);
        }
        let missing =
            ManifestError::from_problem(Box::new(at.clone()), field("vip"), Problem::Missing);
        assert_eq!(
            missing.to_string(),
            format!("{at}: vip: missing required field")
        );
    }
}
