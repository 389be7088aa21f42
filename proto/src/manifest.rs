//! The manifest: the YAML file `sluice-agent run --manifest FILE` turns into services.
//!
//! A manifest is a stream of YAML documents separated by `---`; each non-empty document
//! describes one service:
//!
//! ```yaml
//! kind: Service
//! name: web                      # DNS-1035 label, unique in the file
//! vip: 198.18.0.10
//! ports:                         # 1..=64 entries, (port, protocol) unique in the service
//!   - { port: 80, protocol: TCP, targetPort: 8080 }
//!   - { port: 53, protocol: UDP }              # targetPort defaults to port
//! algorithm: round-robin         # optional, see `Algorithm`
//! backends:                      # optional; none means the data plane drops and counts
//!   - { address: 198.19.1.2, weight: 3 }       # weight 1..=10000, defaults to 1
//! ```
//!
//! [`parse`] returns either a complete, valid [`Manifest`] or the first error found, in
//! document order; nothing is half-applied. Every error names the file, the document
//! (1-based, counting empty documents, as an editor user would count them), the service
//! when its name is known, the line and column, the field path (`backends[1].weight`) and
//! the offending value.
//!
//! How it works, in three steps:
//! 1. serde-saphyr reads every document into a small tree (`Node`) in which each node
//!    keeps its line and column (through [`serde_saphyr::Spanned`]). YAML itself (syntax,
//!    duplicate keys, anchors) is checked here. We walk a tree instead of deriving
//!    `Deserialize` for the manifest types because serde's derived errors carry neither
//!    the field path nor, for values we validate ourselves, a position.
//! 2. Each document is validated into a [`Service`] (`parse_service`).
//! 3. Rules that span documents (unique names, unique listeners) are checked in [`parse`].
//!
//! serde-saphyr skips empty documents and does not say which document an error is in, so
//! a first pass with its parser, granit-parser, records the line where each document
//! starts (`document_starts`); a line then maps to its document number.
//!
//! Conventions, chosen to keep a manifest unambiguous:
//! * A key given as `null` (`backends:` with nothing after it) counts as absent, so an
//!   optional field takes its default and a required one is reported missing.
//! * `protocol` is required and case-sensitive: exactly `TCP` or `UDP`, as in Kubernetes.
//!   A silent default could put a UDP service on TCP.
//! * Values keep their YAML types: `port: "80"` is a string, not a port.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{MessageFormatter as _, Spanned};
use sluice_common::types::{IPPROTO_TCP, IPPROTO_UDP};

/// Larger backend sets are rejected, never truncated.
pub const MAX_BACKENDS_PER_SERVICE: usize = 4096;
/// Weights are relative within a service: 1 against 9,999 is a 0.01% canary.
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_PORTS_PER_SERVICE: usize = 64;

/// The document kinds this agent understands.
const KINDS: &[&str] = &["Service"];
const SERVICE_FIELDS: &[&str] = &["kind", "name", "vip", "ports", "algorithm", "backends"];
const PORT_FIELDS: &[&str] = &["port", "protocol", "targetPort"];
const BACKEND_FIELDS: &[&str] = &["address", "weight"];
/// RFC 1035 section 2.3.4: labels are 63 octets or less.
const NAME_MAX_LEN: usize = 63;

// ---------------------------------------------------------------------------------------
// Domain types
// ---------------------------------------------------------------------------------------

/// Every service of a manifest file, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub algorithm: Algorithm,
    /// Empty is valid: the data plane then drops the service's traffic and counts it.
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
}

/// Transport protocol of a service port. Parsing accepts exactly `TCP` and `UDP`
/// (upper case, as Kubernetes spells them); `tcp` is rejected rather than guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the data-plane keys carry it.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ParseProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            _ => Err(ParseProtocolError {
                value: s.to_owned(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {value:?}, expected \"TCP\" or \"UDP\"")]
pub struct ParseProtocolError {
    pub value: String,
}

/// How a service picks a backend for a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    WeightedLeastConnections,
}

impl Algorithm {
    pub const ALL: [Self; 4] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnections,
        Self::WeightedLeastConnections,
    ];

    /// The manifest spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnections => "least-connections",
            Self::WeightedLeastConnections => "weighted-least-connections",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = ParseAlgorithmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| ParseAlgorithmError {
                value: s.to_owned(),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {value:?}, expected one of: {}", algorithm_names())]
pub struct ParseAlgorithmError {
    pub value: String,
}

fn algorithm_names() -> String {
    Algorithm::ALL.map(Algorithm::as_str).join(", ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct BackendSpec {
    pub address: Ipv4Addr,
    pub weight: u32,
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Where in a manifest an error was found.
///
/// Displays as `web.yaml: document 2 (Service "api"), line 9, column 13`, leaving out
/// what is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub file: String,
    /// 1-based, counting empty documents.
    pub document: usize,
    /// Known once the document's `name` has been validated.
    pub service: Option<String>,
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
            service,
            line,
            column,
        } = self;
        write!(f, "{file}: document {document}")?;
        if let Some(service) = service {
            write!(f, " (Service {service:?})")?;
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
    #[error("{at}: a document must be a mapping describing one Service, got {found}")]
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
    #[error("{at}: kind: unsupported kind {kind:?}, this agent understands: {}", KINDS.join(", "))]
    UnsupportedKind { at: Box<Position>, kind: String },
    #[error(
        "{at}: name: {name:?} is not a valid service name: {problem} \
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
    #[error("{at}: name: service {name:?} is already defined in document {first_document}")]
    DuplicateService {
        at: Box<Position>,
        name: String,
        first_document: usize,
    },
    #[error(
        "{at}: {field}: {vip}:{port}/{protocol} is already served by service {other_service:?} \
         (document {other_document})"
    )]
    ListenerConflict {
        at: Box<Position>,
        field: String,
        vip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
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
            | Self::DuplicateService { at, .. }
            | Self::ListenerConflict { at, .. } => Some(at),
        }
    }
}

/// Why a service name is not a DNS-1035 label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} characters long")]
    TooLong { len: usize },
    #[error("it contains {ch:?}")]
    InvalidChar { ch: char },
    #[error("it does not start with a letter")]
    BadStart,
    #[error("it does not end with a letter or digit")]
    BadEnd,
}

/// Why an address cannot be a VIP or a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressProblem {
    #[error("not an IPv4 address")]
    NotIpv4,
    #[error("IPv6 is not supported yet, use an IPv4 address")]
    Ipv6,
    #[error("the unspecified address cannot be used")]
    Unspecified,
    #[error("the broadcast address cannot be used")]
    Broadcast,
    #[error("a multicast address cannot be used")]
    Multicast,
    #[error("a loopback address cannot be used")]
    Loopback,
}

/// serde-saphyr's own wording without its location suffix: [`Position`] already has it.
fn yaml_reason(cause: &serde_saphyr::Error) -> String {
    let text = serde_saphyr::DefaultMessageFormatter.format_message(cause.without_snippet());
    // The formatter may echo input text; keep the message on one line.
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

/// Reads `path` and parses it; messages name the file as given.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ManifestError::Read {
        path: path.to_owned(),
        cause,
    })?;
    parse(&path.display().to_string(), &text)
}

/// Parses and validates a whole manifest; `source` names the file in error messages.
pub fn parse(source: &str, text: &str) -> Result<Manifest, ManifestError> {
    let starts = document_starts(text);
    // Snippets would repeat the input inside the cause; our message carries the position.
    let options = serde_saphyr::options! { with_snippet: false };
    let roots =
        serde_saphyr::from_multiple_with_options::<Node>(text, options).map_err(|cause| {
            let location = cause.location().filter(|l| l.line() > 0);
            let document = match location {
                Some(l) => document_at(&starts, l.line()),
                None => starts.len().max(1),
            };
            ManifestError::Yaml {
                at: Box::new(Position {
                    file: source.to_owned(),
                    document,
                    service: None,
                    line: location.map(|l| l.line()),
                    column: location.map(|l| l.column()),
                }),
                cause: Box::new(cause),
            }
        })?;

    let mut services = Vec::with_capacity(roots.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listeners: HashMap<(Ipv4Addr, u16, Protocol), (String, usize)> = HashMap::new();
    for root in &roots {
        let document = document_at(&starts, root.line);
        let cx = Cx {
            file: source,
            document,
            service: None,
        };
        let parsed = parse_service(cx, root)?;
        let service = parsed.service;
        let cx = Cx {
            service: Some(&service.name),
            ..cx
        };

        match names.entry(service.name.clone()) {
            Entry::Occupied(first) => {
                return Err(ManifestError::DuplicateService {
                    at: cx.at(parsed.name_node),
                    name: service.name.clone(),
                    first_document: *first.get(),
                });
            }
            Entry::Vacant(slot) => {
                slot.insert(document);
            }
        }
        for (i, (port, node)) in service.ports.iter().zip(&parsed.port_nodes).enumerate() {
            // Ports are unique within the service (checked in parse_ports), so a clash
            // here is always with an earlier service.
            let key = (service.vip, port.port, port.protocol);
            if let Some((other_service, other_document)) = listeners.get(&key) {
                return Err(ManifestError::ListenerConflict {
                    at: cx.at(node),
                    field: format!("ports[{i}]"),
                    vip: service.vip,
                    port: port.port,
                    protocol: port.protocol,
                    other_service: other_service.clone(),
                    other_document: *other_document,
                });
            }
            listeners.insert(key, (service.name.clone(), document));
        }
        services.push(service);
    }
    Ok(Manifest { services })
}

// ---------------------------------------------------------------------------------------
// Document numbering
// ---------------------------------------------------------------------------------------

/// The line on which each document starts, ascending. Stops at the first syntax error:
/// serde-saphyr reports that error itself, and the documents before it are all we need
/// to number it.
fn document_starts(text: &str) -> Vec<u64> {
    use serde_saphyr::granit_parser::{Event, Parser};

    let mut starts = Vec::new();
    for event in Parser::new_from_str(text) {
        match event {
            Ok((Event::DocumentStart(..), span)) => {
                // usize is never wider than u64 on the targets we build for.
                starts.push(u64::try_from(span.start.line()).unwrap_or(u64::MAX));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    starts
}

/// 1-based number of the document containing `line`. Documents start on distinct lines
/// (`---` must begin a line), so the line alone decides.
fn document_at(starts: &[u64], line: u64) -> usize {
    starts.partition_point(|&start| start <= line).max(1)
}

// ---------------------------------------------------------------------------------------
// YAML tree
// ---------------------------------------------------------------------------------------

/// A YAML node and where it came from (1-based line and column; for an alias, where the
/// alias is used).
#[derive(Debug)]
struct Node {
    value: Value,
    line: u64,
    column: u64,
}

#[derive(Debug)]
enum Value {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// In source order; serde-saphyr has already rejected duplicate keys.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// The value as an error message shows it.
    fn describe(&self) -> String {
        match self {
            Self::Null => "null".to_owned(),
            Self::Bool(b) => format!("boolean {b}"),
            Self::Int(i) => format!("integer {i}"),
            Self::Float(x) => format!("number {x}"),
            Self::Str(s) => format!("string {s:?}"),
            Self::Seq(_) => "a sequence".to_owned(),
            Self::Map(_) => "a mapping".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let Spanned {
            value, referenced, ..
        } = Spanned::<Value>::deserialize(deserializer)?;
        Ok(Self {
            value,
            line: referenced.line(),
            column: referenced.column(),
        })
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        i128::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Value::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Node, Node>()? {
            entries.push(entry);
        }
        Ok(Value::Map(entries))
    }
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// What every error raised while validating one document needs to know.
#[derive(Clone, Copy)]
struct Cx<'a> {
    file: &'a str,
    document: usize,
    service: Option<&'a str>,
}

impl Cx<'_> {
    fn at(&self, node: &Node) -> Box<Position> {
        Box::new(Position {
            file: self.file.to_owned(),
            document: self.document,
            service: self.service.map(str::to_owned),
            line: Some(node.line),
            column: Some(node.column),
        })
    }
}

/// A YAML mapping seen as the fields of one object at `path` (`""` for a document).
struct Fields<'n> {
    path: String,
    node: &'n Node,
    entries: &'n [(Node, Node)],
}

impl<'n> Fields<'n> {
    fn new(cx: Cx<'_>, path: String, node: &'n Node) -> Result<Self, ManifestError> {
        match &node.value {
            Value::Map(entries) => Ok(Self {
                path,
                node,
                entries,
            }),
            other => Err(ManifestError::WrongType {
                at: cx.at(node),
                field: path,
                expected: "a mapping",
                found: other.describe(),
            }),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key`; null counts as absent (see the module docs).
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key))
            .map(|(_, v)| v)
            .filter(|v| !matches!(v.value, Value::Null))
    }

    fn require(&self, cx: Cx<'_>, key: &str) -> Result<&'n Node, ManifestError> {
        self.get(key).ok_or_else(|| ManifestError::MissingField {
            at: cx.at(self.node),
            field: self.path(key),
        })
    }

    fn deny_unknown(
        &self,
        cx: Cx<'_>,
        allowed: &'static [&'static str],
    ) -> Result<(), ManifestError> {
        for (key, _) in self.entries {
            let name = match &key.value {
                Value::Str(s) if allowed.contains(&s.as_str()) => continue,
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => other.describe(),
            };
            return Err(ManifestError::UnknownField {
                at: cx.at(key),
                field: self.path(&name),
                expected: allowed,
            });
        }
        Ok(())
    }
}

/// A validated service plus the nodes that cross-document checks point at.
struct ParsedService<'n> {
    service: Service,
    name_node: &'n Node,
    port_nodes: Vec<&'n Node>,
}

/// Validates one document. `kind` and `name` come first so that later errors can name
/// the service, and so that a document of another kind is reported as such rather than
/// as a pile of unknown fields.
fn parse_service<'n>(cx: Cx<'_>, root: &'n Node) -> Result<ParsedService<'n>, ManifestError> {
    if !matches!(root.value, Value::Map(_)) {
        return Err(ManifestError::NotAMapping {
            at: cx.at(root),
            found: root.value.describe(),
        });
    }
    let fields = Fields::new(cx, String::new(), root)?;

    let kind_node = fields.require(cx, "kind")?;
    let kind = string(cx, "kind", kind_node)?;
    if !KINDS.contains(&kind) {
        return Err(ManifestError::UnsupportedKind {
            at: cx.at(kind_node),
            kind: kind.to_owned(),
        });
    }

    let name_node = fields.require(cx, "name")?;
    let name = string(cx, "name", name_node)?;
    check_name(name).map_err(|problem| ManifestError::InvalidName {
        at: cx.at(name_node),
        name: name.to_owned(),
        problem,
    })?;
    let cx = Cx {
        service: Some(name),
        ..cx
    };

    fields.deny_unknown(cx, SERVICE_FIELDS)?;
    let vip = address(cx, "vip", fields.require(cx, "vip")?)?;
    let (ports, port_nodes) = parse_ports(cx, fields.require(cx, "ports")?)?;
    let algorithm = match fields.get("algorithm") {
        None => Algorithm::default(),
        Some(node) => {
            let value = string(cx, "algorithm", node)?;
            value.parse().map_err(|_| ManifestError::UnknownAlgorithm {
                at: cx.at(node),
                value: value.to_owned(),
            })?
        }
    };
    let backends = match fields.get("backends") {
        None => Vec::new(),
        Some(node) => parse_backends(cx, node, vip)?,
    };

    Ok(ParsedService {
        service: Service {
            name: name.to_owned(),
            vip,
            ports,
            algorithm,
            backends,
        },
        name_node,
        port_nodes,
    })
}

fn parse_ports<'n>(
    cx: Cx<'_>,
    node: &'n Node,
) -> Result<(Vec<ServicePort>, Vec<&'n Node>), ManifestError> {
    let entries = sequence(cx, "ports", node)?;
    if entries.is_empty() {
        return Err(ManifestError::NoPorts { at: cx.at(node) });
    }
    if entries.len() > MAX_PORTS_PER_SERVICE {
        return Err(ManifestError::TooManyPorts {
            at: cx.at(node),
            count: entries.len(),
            max: MAX_PORTS_PER_SERVICE,
        });
    }

    let mut ports = Vec::with_capacity(entries.len());
    let mut seen: HashMap<(u16, Protocol), usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let fields = Fields::new(cx, format!("ports[{i}]"), entry)?;
        fields.deny_unknown(cx, PORT_FIELDS)?;
        let port = port_number(cx, &fields.path("port"), fields.require(cx, "port")?)?;
        let protocol = protocol(
            cx,
            &fields.path("protocol"),
            fields.require(cx, "protocol")?,
        )?;
        let target_port = match fields.get("targetPort") {
            Some(node) => port_number(cx, &fields.path("targetPort"), node)?,
            None => port,
        };
        if let Some(first) = seen.insert((port, protocol), i) {
            return Err(ManifestError::DuplicatePort {
                at: cx.at(entry),
                field: fields.path,
                port,
                protocol,
                first: format!("ports[{first}]"),
            });
        }
        ports.push(ServicePort {
            port,
            protocol,
            target_port,
        });
    }
    Ok((ports, entries.iter().collect()))
}

fn parse_backends(
    cx: Cx<'_>,
    node: &Node,
    vip: Ipv4Addr,
) -> Result<Vec<BackendSpec>, ManifestError> {
    let entries = sequence(cx, "backends", node)?;
    if entries.len() > MAX_BACKENDS_PER_SERVICE {
        return Err(ManifestError::TooManyBackends {
            at: cx.at(node),
            count: entries.len(),
            max: MAX_BACKENDS_PER_SERVICE,
        });
    }

    let mut backends = Vec::with_capacity(entries.len());
    let mut seen: HashMap<Ipv4Addr, usize> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let fields = Fields::new(cx, format!("backends[{i}]"), entry)?;
        fields.deny_unknown(cx, BACKEND_FIELDS)?;
        let address_field = fields.path("address");
        let address_node = fields.require(cx, "address")?;
        let address = address(cx, &address_field, address_node)?;
        if address == vip {
            return Err(ManifestError::BackendIsVip {
                at: cx.at(address_node),
                field: address_field,
                address,
            });
        }
        let weight = match fields.get("weight") {
            Some(node) => weight(cx, &fields.path("weight"), node)?,
            None => 1,
        };
        if let Some(first) = seen.insert(address, i) {
            return Err(ManifestError::DuplicateBackend {
                at: cx.at(address_node),
                field: address_field,
                address,
                first: format!("backends[{first}]"),
            });
        }
        backends.push(BackendSpec { address, weight });
    }
    Ok(backends)
}

fn string<'n>(cx: Cx<'_>, field: &str, node: &'n Node) -> Result<&'n str, ManifestError> {
    match &node.value {
        Value::Str(s) => Ok(s),
        other => Err(wrong_type(cx, field, node, "a string", other)),
    }
}

fn integer(cx: Cx<'_>, field: &str, node: &Node) -> Result<i128, ManifestError> {
    match &node.value {
        Value::Int(i) => Ok(*i),
        other => Err(wrong_type(cx, field, node, "an integer", other)),
    }
}

fn sequence<'n>(cx: Cx<'_>, field: &str, node: &'n Node) -> Result<&'n [Node], ManifestError> {
    match &node.value {
        Value::Seq(items) => Ok(items),
        other => Err(wrong_type(cx, field, node, "a sequence", other)),
    }
}

fn wrong_type(
    cx: Cx<'_>,
    field: &str,
    node: &Node,
    expected: &'static str,
    found: &Value,
) -> ManifestError {
    ManifestError::WrongType {
        at: cx.at(node),
        field: field.to_owned(),
        expected,
        found: found.describe(),
    }
}

fn port_number(cx: Cx<'_>, field: &str, node: &Node) -> Result<u16, ManifestError> {
    let value = integer(cx, field, node)?;
    u16::try_from(value)
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| ManifestError::PortOutOfRange {
            at: cx.at(node),
            field: field.to_owned(),
            value,
        })
}

fn weight(cx: Cx<'_>, field: &str, node: &Node) -> Result<u32, ManifestError> {
    let value = integer(cx, field, node)?;
    u32::try_from(value)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or_else(|| ManifestError::WeightOutOfRange {
            at: cx.at(node),
            field: field.to_owned(),
            value,
        })
}

fn protocol(cx: Cx<'_>, field: &str, node: &Node) -> Result<Protocol, ManifestError> {
    let value = string(cx, field, node)?;
    value.parse().map_err(|_| ManifestError::UnknownProtocol {
        at: cx.at(node),
        field: field.to_owned(),
        value: value.to_owned(),
    })
}

/// An address that can carry service traffic: a VIP or a backend.
fn address(cx: Cx<'_>, field: &str, node: &Node) -> Result<Ipv4Addr, ManifestError> {
    let value = string(cx, field, node)?;
    let problem = match value.parse::<Ipv4Addr>() {
        Err(_) if value.parse::<Ipv6Addr>().is_ok() => AddressProblem::Ipv6,
        Err(_) => AddressProblem::NotIpv4,
        Ok(addr) if addr.is_unspecified() => AddressProblem::Unspecified,
        Ok(addr) if addr.is_broadcast() => AddressProblem::Broadcast,
        Ok(addr) if addr.is_multicast() => AddressProblem::Multicast,
        Ok(addr) if addr.is_loopback() => AddressProblem::Loopback,
        Ok(addr) => return Ok(addr),
    };
    Err(ManifestError::InvalidAddress {
        at: cx.at(node),
        field: field.to_owned(),
        value: value.to_owned(),
        problem,
    })
}

/// RFC 1035 label syntax, lower case only, as Kubernetes requires of Service names:
/// the name ends up in metric labels and status output, where one spelling per service
/// matters.
fn check_name(name: &str) -> Result<(), NameProblem> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameProblem::Empty);
    }
    if len > NAME_MAX_LEN {
        return Err(NameProblem::TooLong { len });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameProblem::InvalidChar { ch });
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameProblem::BadStart);
    }
    if name.ends_with('-') {
        return Err(NameProblem::BadEnd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid document; the line numbers tests rely on: kind 1, name 2, vip 3, ports 4,
    /// ports[0] 5.
    const MINIMAL: &str = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP }
";

    fn ok(text: &str) -> Manifest {
        match parse("web.yaml", text) {
            Ok(manifest) => manifest,
            Err(e) => panic!("expected a valid manifest, got: {e}"),
        }
    }

    fn err(text: &str) -> ManifestError {
        match parse("web.yaml", text) {
            Ok(manifest) => panic!("expected an error, got {manifest:?}"),
            Err(e) => e,
        }
    }

    /// The message names every part (file, document, field, value, line...).
    fn assert_mentions(e: &ManifestError, parts: &[&str]) {
        let message = e.to_string();
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} does not mention {part:?}"
            );
        }
    }

    /// MINIMAL with `backends:` appended; backends[i] is on line 7 + i.
    fn with_backends(entries: &[&str]) -> String {
        let mut text = format!("{MINIMAL}backends:\n");
        for entry in entries {
            text.push_str(&format!("  - {{ {entry} }}\n"));
        }
        text
    }

    fn addr(s: &str) -> Ipv4Addr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    // --- Accepted manifests ---------------------------------------------------------

    #[test]
    fn example_parses_to_expected_structs() {
        let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP, targetPort: 5353 }
algorithm: round-robin   # round-robin | weighted-round-robin | ...
backends:
  - { address: 198.19.1.2, weight: 1 }
  - { address: 198.19.2.2, weight: 3 }
";
        let expected = Manifest {
            services: vec![Service {
                name: "web".to_owned(),
                vip: addr("198.18.0.10"),
                ports: vec![
                    ServicePort {
                        port: 80,
                        protocol: Protocol::Tcp,
                        target_port: 8080,
                    },
                    ServicePort {
                        port: 53,
                        protocol: Protocol::Udp,
                        target_port: 5353,
                    },
                ],
                algorithm: Algorithm::RoundRobin,
                backends: vec![
                    BackendSpec {
                        address: addr("198.19.1.2"),
                        weight: 1,
                    },
                    BackendSpec {
                        address: addr("198.19.2.2"),
                        weight: 3,
                    },
                ],
            }],
        };
        assert_eq!(ok(text), expected);
    }

    #[test]
    fn block_style_is_accepted_too() {
        let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - port: 80
    protocol: TCP
backends:
  - address: 198.19.1.2
    weight: 2
";
        let service = &ok(text).services[0];
        assert_eq!(service.ports[0].port, 80);
        assert_eq!(service.backends[0].weight, 2);
    }

    #[test]
    fn omitted_optional_fields_take_defaults() {
        let text = with_backends(&["address: 198.19.1.2"]);
        let service = &ok(&text).services[0];
        assert_eq!(service.algorithm, Algorithm::RoundRobin);
        assert_eq!(
            service.ports[0].target_port, 80,
            "targetPort defaults to port"
        );
        assert_eq!(service.backends[0].weight, 1);
    }

    #[test]
    fn omitted_backends_mean_an_empty_list() {
        assert_eq!(ok(MINIMAL).services[0].backends, []);
    }

    #[test]
    fn null_optional_fields_count_as_omitted() {
        let text = format!("{MINIMAL}algorithm:\nbackends:\n");
        let service = &ok(&text).services[0];
        assert_eq!(service.algorithm, Algorithm::RoundRobin);
        assert_eq!(service.backends, []);
    }

    #[test]
    fn every_algorithm_name_is_accepted() {
        for algorithm in Algorithm::ALL {
            let text = format!("{MINIMAL}algorithm: {algorithm}\n");
            assert_eq!(ok(&text).services[0].algorithm, algorithm);
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let ports: String = (1..=MAX_PORTS_PER_SERVICE)
            .map(|p| format!("  - {{ port: {p}, protocol: UDP }}\n"))
            .collect();
        let text = format!("kind: Service\nname: web\nvip: 198.18.0.10\nports:\n{ports}");
        assert_eq!(ok(&text).services[0].ports.len(), MAX_PORTS_PER_SERVICE);

        let weight = format!("address: 198.19.1.2, weight: {MAX_WEIGHT}");
        assert_eq!(
            ok(&with_backends(&[&weight])).services[0].backends[0].weight,
            MAX_WEIGHT
        );

        let backends: Vec<String> = (0..MAX_BACKENDS_PER_SERVICE)
            .map(|i| format!("address: 198.19.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        let manifest = ok(&with_backends(&backends));
        assert_eq!(
            manifest.services[0].backends.len(),
            MAX_BACKENDS_PER_SERVICE
        );
    }

    #[test]
    fn name_rules_accept_edge_cases() {
        for name in ["a", "a1", "a-b", "web-2", &"a".repeat(63)] {
            let text = MINIMAL.replace("name: web", &format!("name: {name}"));
            assert_eq!(ok(&text).services[0].name, name);
        }
    }

    #[test]
    fn multiple_documents_keep_document_order() {
        let text = format!(
            "{MINIMAL}---\n{}",
            MINIMAL
                .replace("name: web", "name: api")
                .replace("port: 80", "port: 443")
        );
        let manifest = ok(&text);
        let names: Vec<&str> = manifest.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web", "api"]);
    }

    #[test]
    fn empty_documents_are_skipped() {
        let text = format!("---\n# nothing here\n---\n{MINIMAL}---\n");
        assert_eq!(ok(&text).services.len(), 1);
    }

    #[test]
    fn files_without_services_are_valid() {
        for text in ["", "\n", "# only a comment\n", "---\n", "---\n---\n...\n"] {
            assert_eq!(ok(text), Manifest::default(), "{text:?}");
        }
    }

    #[test]
    fn services_may_share_a_vip_on_other_ports_or_protocols() {
        let other_port = MINIMAL
            .replace("name: web", "name: api")
            .replace("port: 80", "port: 81");
        let other_proto = MINIMAL
            .replace("name: web", "name: dns")
            .replace("TCP", "UDP");
        let manifest = ok(&format!("{MINIMAL}---\n{other_port}---\n{other_proto}"));
        assert_eq!(manifest.services.len(), 3);
    }

    #[test]
    fn same_port_on_both_protocols_is_fine() {
        let text = format!("{MINIMAL}  - {{ port: 80, protocol: UDP }}\n");
        assert_eq!(ok(&text).services[0].ports.len(), 2);
    }

    #[test]
    fn anchors_and_merge_keys_resolve() {
        let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - &http { port: 80, protocol: TCP }
backends:
  - &b { address: 198.19.1.2, weight: 5 }
  - { <<: *b, address: 198.19.1.3 }
";
        let service = &ok(text).services[0];
        assert_eq!(service.backends[1].address, addr("198.19.1.3"));
        assert_eq!(service.backends[1].weight, 5);
    }

    // --- Domain types ---------------------------------------------------------------

    #[test]
    fn protocol_display_and_ip_proto() {
        assert_eq!(Protocol::Tcp.to_string(), "TCP");
        assert_eq!(Protocol::Udp.to_string(), "UDP");
        assert_eq!(Protocol::Tcp.ip_proto(), 6);
        assert_eq!(Protocol::Udp.ip_proto(), 17);
        assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
        assert!("udp".parse::<Protocol>().is_err(), "upper case only");
    }

    #[test]
    fn algorithm_display_and_from_str_round_trip() {
        for algorithm in Algorithm::ALL {
            assert_eq!(algorithm.to_string(), algorithm.as_str());
            assert_eq!(algorithm.as_str().parse::<Algorithm>(), Ok(algorithm));
        }
        assert_eq!(
            Algorithm::WeightedLeastConnections.as_str(),
            "weighted-least-connections"
        );
        let e = "random".parse::<Algorithm>().err();
        let message = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("\"random\"") && message.contains("least-connections"),
            "{message}"
        );
    }

    #[test]
    fn serializes_with_manifest_spellings() {
        let manifest = ok(&with_backends(&["address: 198.19.1.2"]));
        let json = serde_json::to_value(&manifest.services[0]).unwrap_or_default();
        assert_eq!(json["vip"], "198.18.0.10");
        assert_eq!(json["algorithm"], "round-robin");
        assert_eq!(json["ports"][0]["protocol"], "TCP");
        assert_eq!(json["ports"][0]["targetPort"], 80);
        assert_eq!(json["backends"][0]["weight"], 1);
    }

    // --- YAML errors ----------------------------------------------------------------

    #[test]
    fn syntax_error_names_document_line_and_column() {
        let text = format!("{MINIMAL}---\nkind: Service\nports: [ {{ port: 80\n");
        let e = err(&text);
        assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
        assert_mentions(
            &e,
            &["web.yaml: document 2", "line 8", "column", "invalid YAML"],
        );
        let position = e.position().cloned();
        assert_eq!(
            position.map(|p| (p.document, p.line.is_some())),
            Some((2, true))
        );
        assert!(std::error::Error::source(&e).is_some(), "cause is kept");
    }

    #[test]
    fn bad_indentation_is_a_yaml_error() {
        let e = err("kind: Service\nname: web\n vip: 198.18.0.10\n");
        assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
        assert_mentions(&e, &["document 1", "line 3"]);
    }

    #[test]
    fn duplicate_keys_are_a_yaml_error() {
        let e = err(&format!("{MINIMAL}name: api\n"));
        assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
        assert_mentions(&e, &["document 1", "line 6", "duplicate", "name"]);
    }

    #[test]
    fn document_numbers_count_empty_documents() {
        let text = format!("---\n# empty\n---\n{MINIMAL}weigth: 1\n");
        let e = err(&text);
        assert_mentions(&e, &["document 2", "line 9", "weigth"]);
    }

    #[test]
    fn a_document_must_be_a_mapping() {
        let e = err(&format!("{MINIMAL}---\n- kind: Service\n"));
        assert!(matches!(e, ManifestError::NotAMapping { .. }), "{e:?}");
        assert_mentions(&e, &["document 2", "line 7", "a sequence"]);

        let e = err("just a string\n");
        assert!(matches!(e, ManifestError::NotAMapping { .. }), "{e:?}");
        assert_mentions(&e, &["document 1", "line 1", "string \"just a string\""]);
    }

    // --- Fields -----------------------------------------------------------------------

    #[test]
    fn unknown_top_level_field() {
        let e = err(&format!("{MINIMAL}algoritm: round-robin\n"));
        assert!(
            matches!(&e, ManifestError::UnknownField { field, .. } if field == "algoritm"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "web.yaml: document 1 (Service \"web\"), line 6, column 1",
                "algoritm",
                "algorithm",
            ],
        );
    }

    #[test]
    fn unknown_backend_field_has_full_path() {
        let e = err(&with_backends(&[
            "address: 198.19.1.2",
            "address: 198.19.1.3, weigth: 2",
        ]));
        assert!(
            matches!(&e, ManifestError::UnknownField { field, .. } if field == "backends[1].weigth"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "document 1",
                "line 8",
                "backends[1].weigth",
                "address, weight",
            ],
        );
    }

    #[test]
    fn unknown_port_field_has_full_path() {
        let e = err(&MINIMAL.replace("protocol: TCP", "protocol: TCP, nodePort: 30080"));
        assert!(
            matches!(&e, ManifestError::UnknownField { field, .. } if field == "ports[0].nodePort"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 5", "ports[0].nodePort"]);
    }

    #[test]
    fn non_string_keys_are_unknown_fields() {
        let e = err(&format!("{MINIMAL}80: http\n"));
        assert!(
            matches!(&e, ManifestError::UnknownField { field, .. } if field == "80"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 6"]);
    }

    #[test]
    fn missing_required_fields() {
        for field in ["kind", "name", "vip", "ports"] {
            // Drop the field's line; for `ports` also its entry.
            let text: String = MINIMAL
                .lines()
                .filter(|l| !(l.starts_with(field) || (field == "ports" && l.starts_with("  -"))))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = err(&text);
            assert!(
                matches!(&e, ManifestError::MissingField { field: f, .. } if f == field),
                "{field}: {e:?}"
            );
            // A missing field points at the mapping that lacks it.
            assert_mentions(
                &e,
                &[
                    "web.yaml: document 1",
                    "line 1, column 1",
                    &format!("{field}: missing"),
                ],
            );
        }
        let e = err(&MINIMAL.replace("ports:\n  - { port: 80, protocol: TCP }\n", ""));
        assert_mentions(
            &e,
            &["document 1 (Service \"web\"), line 1", "ports: missing"],
        );
    }

    #[test]
    fn null_required_field_is_missing() {
        let e = err(&MINIMAL.replace("vip: 198.18.0.10", "vip:"));
        assert!(
            matches!(&e, ManifestError::MissingField { field, .. } if field == "vip"),
            "{e:?}"
        );
    }

    #[test]
    fn missing_fields_inside_entries() {
        let e = err(&MINIMAL.replace("port: 80, ", ""));
        assert!(
            matches!(&e, ManifestError::MissingField { field, .. } if field == "ports[0].port"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 5", "ports[0].port"]);

        let e = err(&MINIMAL.replace(", protocol: TCP", ""));
        assert!(
            matches!(&e, ManifestError::MissingField { field, .. } if field == "ports[0].protocol"),
            "{e:?}"
        );

        let e = err(&with_backends(&["weight: 2"]));
        assert!(
            matches!(&e, ManifestError::MissingField { field, .. } if field == "backends[0].address"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 7", "backends[0].address"]);
    }

    #[test]
    fn wrong_types_name_expected_and_found() {
        let e = err(&MINIMAL.replace("port: 80", "port: \"80\""));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "ports[0].port"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 5", "expected an integer", "string \"80\""]);

        let e = err(&MINIMAL.replace("name: web", "name: 42"));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "name"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 2", "integer 42"]);

        let e = err(&format!("{MINIMAL}backends: {{ address: 198.19.1.2 }}\n"));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "backends"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 6", "expected a sequence", "a mapping"]);

        let e = err(&with_backends(&["address: 198.19.1.2, weight: 1.5"]));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "backends[0].weight"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 7", "1.5"]);
    }

    #[test]
    fn port_entries_must_be_mappings() {
        let e = err(&MINIMAL.replace("  - { port: 80, protocol: TCP }", "  - 80"));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "ports[0]"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 5", "expected a mapping", "integer 80"]);
    }

    // --- kind and name ----------------------------------------------------------------

    #[test]
    fn other_kinds_are_rejected_listing_the_known_ones() {
        let e = err(&format!(
            "{MINIMAL}---\n{}",
            MINIMAL.replace("kind: Service", "kind: Deployment")
        ));
        assert!(
            matches!(&e, ManifestError::UnsupportedKind { kind, .. } if kind == "Deployment"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "document 2",
                "line 7",
                "kind",
                "\"Deployment\"",
                "understands: Service",
            ],
        );
    }

    #[test]
    fn kind_is_case_sensitive() {
        let e = err(&MINIMAL.replace("kind: Service", "kind: service"));
        assert!(matches!(e, ManifestError::UnsupportedKind { .. }), "{e:?}");
    }

    #[test]
    fn invalid_names_say_why() {
        let long = "a".repeat(64);
        let cases = [
            ("Web", NameProblem::InvalidChar { ch: 'W' }),
            ("web_api", NameProblem::InvalidChar { ch: '_' }),
            ("web.api", NameProblem::InvalidChar { ch: '.' }),
            ("1web", NameProblem::BadStart),
            ("-web", NameProblem::BadStart),
            ("web-", NameProblem::BadEnd),
            ("\"\"", NameProblem::Empty),
            (long.as_str(), NameProblem::TooLong { len: 64 }),
        ];
        for (name, expected) in cases {
            let e = err(&MINIMAL.replace("name: web", &format!("name: {name}")));
            assert!(
                matches!(&e, ManifestError::InvalidName { problem, .. } if *problem == expected),
                "{name}: {e:?}"
            );
            let shown = format!("{:?}", name.trim_matches('"'));
            assert_mentions(&e, &["document 1, line 2", "name:", &shown, "DNS-1035"]);
        }
    }

    // --- Addresses --------------------------------------------------------------------

    #[test]
    fn vip_must_be_a_usable_ipv4_address() {
        let cases = [
            ("not-an-ip", AddressProblem::NotIpv4),
            ("198.18.0.10/32", AddressProblem::NotIpv4),
            ("198.18.0.256", AddressProblem::NotIpv4),
            ("\"2001:db8::1\"", AddressProblem::Ipv6),
            ("0.0.0.0", AddressProblem::Unspecified),
            ("255.255.255.255", AddressProblem::Broadcast),
            ("224.0.0.1", AddressProblem::Multicast),
            ("127.0.0.1", AddressProblem::Loopback),
        ];
        for (vip, expected) in cases {
            let e = err(&MINIMAL.replace("198.18.0.10", vip));
            assert!(
                matches!(&e, ManifestError::InvalidAddress { field, problem, .. }
                    if field == "vip" && *problem == expected),
                "{vip}: {e:?}"
            );
            let shown = format!("{:?}", vip.trim_matches('"'));
            assert_mentions(&e, &["(Service \"web\"), line 3, column 6", "vip:", &shown]);
        }
    }

    #[test]
    fn ipv6_gets_its_own_message() {
        let e = err(&MINIMAL.replace("198.18.0.10", "\"fd00::10\""));
        assert_mentions(&e, &["IPv6 is not supported yet", "\"fd00::10\""]);
    }

    #[test]
    fn vip_must_be_a_string() {
        let e = err(&MINIMAL.replace("198.18.0.10", "3323068426"));
        assert!(
            matches!(&e, ManifestError::WrongType { field, .. } if field == "vip"),
            "{e:?}"
        );
    }

    #[test]
    fn backend_address_must_be_a_usable_ipv4_address() {
        let cases = [
            ("backend-1", AddressProblem::NotIpv4),
            ("\"2001:db8::2\"", AddressProblem::Ipv6),
            ("0.0.0.0", AddressProblem::Unspecified),
            ("255.255.255.255", AddressProblem::Broadcast),
            ("239.1.2.3", AddressProblem::Multicast),
            ("127.0.0.53", AddressProblem::Loopback),
        ];
        for (address, expected) in cases {
            let e = err(&with_backends(&[
                "address: 198.19.1.2",
                &format!("address: {address}"),
            ]));
            assert!(
                matches!(&e, ManifestError::InvalidAddress { field, problem, .. }
                    if field == "backends[1].address" && *problem == expected),
                "{address}: {e:?}"
            );
            let shown = format!("{:?}", address.trim_matches('"'));
            assert_mentions(&e, &["line 8", "backends[1].address", &shown]);
        }
    }

    #[test]
    fn backend_cannot_be_the_vip() {
        let e = err(&with_backends(&["address: 198.18.0.10"]));
        assert!(
            matches!(&e, ManifestError::BackendIsVip { field, address, .. }
                if field == "backends[0].address" && *address == addr("198.18.0.10")),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &["line 7", "backends[0].address", "198.18.0.10", "own VIP"],
        );
    }

    // --- Ports ------------------------------------------------------------------------

    #[test]
    fn ports_cannot_be_empty() {
        let e = err("kind: Service\nname: web\nvip: 198.18.0.10\nports: []\n");
        assert!(matches!(e, ManifestError::NoPorts { .. }), "{e:?}");
        assert_mentions(
            &e,
            &["document 1 (Service \"web\"), line 4", "ports:", "empty"],
        );
    }

    #[test]
    fn too_many_ports() {
        let ports: String = (1..=MAX_PORTS_PER_SERVICE + 1)
            .map(|p| format!("  - {{ port: {p}, protocol: TCP }}\n"))
            .collect();
        let e = err(&format!(
            "kind: Service\nname: web\nvip: 198.18.0.10\nports:\n{ports}"
        ));
        assert!(
            matches!(
                e,
                ManifestError::TooManyPorts {
                    count: 65,
                    max: 64,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &["document 1", "line 5", "ports:", "at most 64", "got 65"],
        );
    }

    #[test]
    fn port_numbers_must_be_in_range() {
        for (replace, with, field, value) in [
            ("port: 80", "port: 0", "ports[0].port", "got 0"),
            ("port: 80", "port: 65536", "ports[0].port", "got 65536"),
            ("port: 80", "port: -1", "ports[0].port", "got -1"),
            ("TCP", "TCP, targetPort: 0", "ports[0].targetPort", "got 0"),
            (
                "TCP",
                "TCP, targetPort: 70000",
                "ports[0].targetPort",
                "got 70000",
            ),
        ] {
            let e = err(&MINIMAL.replace(replace, with));
            assert!(
                matches!(&e, ManifestError::PortOutOfRange { field: f, .. } if f == field),
                "{with}: {e:?}"
            );
            assert_mentions(
                &e,
                &["document 1", "line 5", field, "between 1 and 65535", value],
            );
        }
    }

    #[test]
    fn unknown_protocols_are_rejected() {
        for protocol in ["SCTP", "tcp", "Udp"] {
            let e = err(&MINIMAL.replace("TCP", protocol));
            assert!(
                matches!(&e, ManifestError::UnknownProtocol { field, value, .. }
                    if field == "ports[0].protocol" && value == protocol),
                "{protocol}: {e:?}"
            );
            assert_mentions(
                &e,
                &[
                    "line 5",
                    "ports[0].protocol",
                    &format!("{protocol:?}"),
                    "\"TCP\"",
                ],
            );
        }
    }

    #[test]
    fn duplicate_port_and_protocol_in_a_service() {
        let e = err(&format!(
            "{MINIMAL}  - {{ port: 80, protocol: TCP, targetPort: 8080 }}\n"
        ));
        assert!(
            matches!(&e, ManifestError::DuplicatePort { field, port: 80, protocol: Protocol::Tcp, first, .. }
                if field == "ports[1]" && first == "ports[0]"),
            "{e:?}"
        );
        assert_mentions(&e, &["line 6", "ports[1]", "80/TCP", "ports[0]"]);
    }

    // --- Algorithm and backends -------------------------------------------------------

    #[test]
    fn unknown_algorithm_lists_the_valid_ones() {
        let e = err(&format!("{MINIMAL}algorithm: maglev\n"));
        assert!(
            matches!(&e, ManifestError::UnknownAlgorithm { value, .. } if value == "maglev"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "line 6",
                "algorithm:",
                "\"maglev\"",
                "round-robin, weighted-round-robin, least-connections, weighted-least-connections",
            ],
        );
    }

    #[test]
    fn weights_must_be_in_range() {
        for (weight, value) in [("0", 0), ("10001", 10_001), ("-3", -3)] {
            let e = err(&with_backends(&[
                "address: 198.19.1.2",
                &format!("address: 198.19.1.3, weight: {weight}"),
            ]));
            assert!(
                matches!(&e, ManifestError::WeightOutOfRange { field, value: v, .. }
                    if field == "backends[1].weight" && *v == value),
                "{weight}: {e:?}"
            );
            assert_mentions(
                &e,
                &[
                    "web.yaml: document 1 (Service \"web\"), line 8",
                    "backends[1].weight: must be between 1 and 10000",
                    &format!("got {weight}"),
                ],
            );
        }
    }

    #[test]
    fn duplicate_backend_address() {
        let e = err(&with_backends(&[
            "address: 198.19.1.2",
            "address: 198.19.1.3",
            "address: 198.19.1.2, weight: 2",
        ]));
        assert!(
            matches!(&e, ManifestError::DuplicateBackend { field, first, .. }
                if field == "backends[2].address" && first == "backends[0]"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &["line 9", "backends[2].address", "198.19.1.2", "backends[0]"],
        );
    }

    #[test]
    fn too_many_backends() {
        let backends: Vec<String> = (0..=MAX_BACKENDS_PER_SERVICE)
            .map(|i| format!("address: 198.19.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
        let e = err(&with_backends(&backends));
        assert!(
            matches!(
                e,
                ManifestError::TooManyBackends {
                    count: 4097,
                    max: 4096,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "document 1",
                "line 7",
                "backends:",
                "at most 4096",
                "got 4097",
            ],
        );
    }

    // --- Across documents -------------------------------------------------------------

    #[test]
    fn duplicate_service_names() {
        let second = MINIMAL.replace("port: 80", "port: 81");
        let e = err(&format!("{MINIMAL}---\n{second}"));
        assert!(
            matches!(&e, ManifestError::DuplicateService { name, first_document: 1, .. } if name == "web"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "document 2 (Service \"web\"), line 8",
                "name:",
                "\"web\"",
                "document 1",
            ],
        );
    }

    #[test]
    fn same_vip_port_and_protocol_in_two_services() {
        let second = format!(
            "{}  - {{ port: 80, protocol: TCP }}\n",
            MINIMAL
                .replace("name: web", "name: api")
                .replace("port: 80", "port: 81")
        );
        let e = err(&format!("{MINIMAL}---\n{second}"));
        assert!(
            matches!(&e, ManifestError::ListenerConflict { field, port: 80, other_service, other_document: 1, .. }
                if field == "ports[1]" && other_service == "web"),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "document 2 (Service \"api\"), line 12",
                "ports[1]",
                "198.18.0.10:80/TCP",
                "\"web\"",
            ],
        );
    }

    #[test]
    fn the_first_error_wins_and_nothing_partial_is_returned() {
        let bad_weight =
            with_backends(&["address: 198.19.1.2, weight: 0"]).replace("name: web", "name: a");
        let bad_kind = MINIMAL.replace("kind: Service", "kind: Pod");
        let e = err(&format!("{MINIMAL}---\n{bad_weight}---\n{bad_kind}"));
        assert!(matches!(e, ManifestError::WeightOutOfRange { .. }), "{e:?}");
        assert_mentions(&e, &["document 2 (Service \"a\")"]);
    }

    // --- load -------------------------------------------------------------------------

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let dir = std::env::temp_dir().join(format!("sluice-manifest-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("{}: {e}", dir.display());
        }
        let good = dir.join("good.yaml");
        let bad = dir.join("bad.yaml");
        for (path, text) in [
            (&good, MINIMAL.to_owned()),
            (&bad, format!("{MINIMAL}weigth: 1\n")),
        ] {
            if let Err(e) = std::fs::write(path, text) {
                panic!("{}: {e}", path.display());
            }
        }

        let loaded = load(&good);
        let bad_result = load(&bad);
        let missing = load(&dir.join("missing.yaml"));
        let _ = std::fs::remove_dir_all(&dir);

        assert!(
            matches!(&loaded, Ok(m) if m.services.len() == 1),
            "{loaded:?}"
        );
        match bad_result {
            Err(e) => assert_mentions(&e, &[&format!("{}: document 1", bad.display()), "weigth"]),
            Ok(m) => panic!("expected an error, got {m:?}"),
        }
        match missing {
            Err(e @ ManifestError::Read { .. }) => {
                assert_mentions(&e, &["missing.yaml", "cannot read manifest"]);
                assert!(e.position().is_none());
            }
            other => panic!("expected a read error, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod example_tests {
    /// The example the README and the demo use must stay valid.
    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../agent/manifests/web.yaml");
        let manifest = super::parse("agent/manifests/web.yaml", text).expect("example manifest");
        assert_eq!(manifest.services.len(), 1);
        assert_eq!(manifest.services[0].backends.len(), 3);
    }
}
