//! The validation rules, one implementation of each, shared by the two ways objects
//! come in: YAML manifests ([`crate::manifest`], which adds where in the file) and API
//! messages ([`crate::wire`], which adds which object). The control service thus
//! rejects exactly what `sluicectl apply` would reject locally.
//!
//! A rule takes a value and returns either the validated value or a [`Problem`] that
//! carries the offending value; the caller adds the field path and the position. Rules
//! about a whole list (duplicates) are small incremental sets, so both callers report
//! the first offending entry, in order.
//!
//! Syntax, chosen to match Kubernetes so that names and labels carry over unchanged:
//! * object names: DNS-1035 labels (`web`, `api-2`), as Kubernetes requires of Services;
//! * namespaces: DNS-1123 labels (`shop`, `2024-tests`);
//! * node names: DNS-1123 subdomains (`node-1.eu-west`);
//! * label keys: `[prefix/]name`, the prefix a DNS-1123 subdomain of at most 253
//!   characters, the name 1 to 63 of `a-z A-Z 0-9 . _ -` starting and ending with a
//!   letter or digit (`app`, `app.kubernetes.io/name`);
//! * label values and zones: up to 63 of the same characters, starting and ending with a
//!   letter or digit; a label value may be empty, a zone may not;
//! * user and group names: 1 to 253 of `a-z A-Z 0-9 . _ @ : -`, starting and ending with a
//!   letter or digit (`alice`, `alice@example.com`, `system:admins`).
//!
//! See <https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set>
//! and <https://kubernetes.io/docs/concepts/overview/working-with-objects/names/>.

use std::net::{Ipv4Addr, Ipv6Addr};

use sluice_common::{layout::MAGLEV_MAX_TABLE_SIZE, maglev};

use crate::grant::{Permission, Resource, Role, Scope, Verb};
use crate::service::{
    Algorithm, MAX_BACKENDS_PER_SERVICE, MAX_PORTS_PER_SERVICE, MAX_WEIGHT, Protocol,
    algorithm_names,
};

/// More labels than this on one object (or selector) are rejected: labels are for
/// selecting, not for storing data.
pub const MAX_LABELS: usize = 64;
/// RFC 1035 section 2.3.4: labels are 63 octets or less.
const LABEL_MAX_LEN: usize = 63;
/// RFC 1035 section 2.3.4: names are 255 octets or less; Kubernetes uses 253 for the
/// text form (no length octets, no trailing dot).
const SUBDOMAIN_MAX_LEN: usize = 253;
const SUBJECT_MAX_LEN: usize = 253;

const LABEL_KEY_SYNTAX: &str = "a key is an optional DNS-1123 subdomain prefix and '/', \
     then 1 to 63 of a-z, A-Z, 0-9, '.', '_' and '-', starting and ending with a letter or digit";
const LABEL_VALUE_SYNTAX: &str = "a value is empty or up to 63 of a-z, A-Z, 0-9, '.', '_' \
     and '-', starting and ending with a letter or digit";

/// Why a value breaks a rule; each message includes the offending value, and is the
/// same whether the value came from a manifest or from an API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Only for API messages, where an empty string means "not set"; manifests report
    /// [`crate::manifest::ManifestError::MissingField`] with the position of the mapping.
    #[error("missing required field")]
    Missing,
    #[error(
        "{name:?} is not a valid name: {problem} \
         (a DNS-1035 label: 1 to 63 of a-z, 0-9 and '-', starting with a letter, \
         ending with a letter or digit)"
    )]
    InvalidName { name: String, problem: NameProblem },
    #[error(
        "{namespace:?} is not a valid namespace: {problem} \
         (a DNS-1123 label: 1 to 63 of a-z, 0-9 and '-', starting and ending with a \
         letter or digit)"
    )]
    InvalidNamespace {
        namespace: String,
        problem: NameProblem,
    },
    #[error("{problem}, got {value:?}")]
    InvalidAddress {
        value: String,
        problem: AddressProblem,
    },
    #[error("must be a prime number no larger than {max} (e.g. 16381 or 65521), got {value}")]
    MaglevTableSize { value: i128, max: u32 },
    #[error("only applies to algorithm maglev, not {algorithm}")]
    MaglevTableSizeWithout { algorithm: Algorithm },
    #[error("must be between {min} and {max}, got {value}")]
    OutOfRange { value: i128, min: i128, max: i128 },
    #[error("a version must not be empty")]
    EmptyVersion,
    #[error(
        "must be an absolute path of printable ASCII without spaces (e.g. /healthz), \
         got {value:?}"
    )]
    HttpPath { value: String },
    #[error("must give exactly one probe: http or tcp")]
    ProbeKind,
    #[error("{value:?} is not an IPv4 CIDR (a.b.c.d/len, len 0..=32)")]
    InvalidCidr { value: String },
    #[error("{value} has host bits set; did you mean {canonical}?")]
    CidrHostBits { value: String, canonical: String },
    #[error("{except} is not strictly inside {cidr}")]
    ExceptOutside { except: String, cidr: String },
    #[error("except only applies to a cidr peer")]
    ExceptWithoutCidr,
    #[error("namespace only applies to a selector peer; a cidr peer matches addresses")]
    NamespaceWithCidr,
    #[error("must give exactly one of selector (endpoints by label) or cidr")]
    PeerKind,
    #[error(
        "a policy protects either endpoints (selector, {{}} for the whole namespace) or a \
         service's VIP (service); give exactly one"
    )]
    PolicyTarget,
    #[error("unknown policy type {value:?}, expected Ingress or Egress")]
    PolicyType { value: String },
    #[error("must list Ingress, Egress or both")]
    NoPolicyType,
    #[error("egress rules restrict endpoints (a selector), not a service's VIP")]
    EgressOnService,
    #[error("egress rules need Egress in policyTypes")]
    EgressNotInTypes,
    #[error("at most {max} {what}, got {count}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "needs a port: the service has no TCP port whose target port it could probe \
         (give http.port or tcp.port)"
    )]
    ProbePort,
    #[error("at least one port is required, got an empty list")]
    NoPorts,
    #[error("at most {max} ports per service, got {count}")]
    TooManyPorts { count: usize, max: usize },
    #[error("must be between 1 and 65535, got {value}")]
    PortOutOfRange { value: i128 },
    #[error("must be \"TCP\" or \"UDP\", got {value:?}")]
    UnknownProtocol { value: String },
    #[error("port {port}/{protocol} is already listed as {first}")]
    DuplicatePort {
        port: u16,
        protocol: Protocol,
        first: String,
    },
    #[error("unknown algorithm {value:?}, expected one of: {}", algorithm_names())]
    UnknownAlgorithm { value: String },
    #[error("must be between 1 and {MAX_WEIGHT}, got {value}")]
    WeightOutOfRange { value: i128 },
    #[error("at most {max} backends per service, got {count}")]
    TooManyBackends { count: usize, max: usize },
    #[error("{address} is the service's own VIP and cannot be a backend")]
    BackendIsVip { address: Ipv4Addr },
    #[error("backend {address} is already listed as {first}")]
    DuplicateBackend { address: Ipv4Addr, first: String },
    #[error("label key {key:?} is invalid: {problem} ({LABEL_KEY_SYNTAX})")]
    InvalidLabelKey { key: String, problem: LabelProblem },
    #[error("label value {value:?} is invalid: {problem} ({LABEL_VALUE_SYNTAX})")]
    InvalidLabelValue {
        value: String,
        problem: LabelProblem,
    },
    #[error("at most {max} labels, got {count}")]
    TooManyLabels { count: usize, max: usize },
    /// An empty selector would select every endpoint of the namespace, which is never
    /// what a one-character typo (`selector: {}`) meant.
    #[error("an empty selector would select every endpoint; give at least one label")]
    EmptySelector,
    #[error(
        "backends and selector are mutually exclusive: list static backends, \
         or select endpoints by label, not both"
    )]
    BackendsAndSelector,
    #[error(
        "{value:?} is not a valid node name: {problem} (a DNS-1123 subdomain: at most 253 \
         of a-z, 0-9, '-' and '.', each dot-separated part starting and ending with a \
         letter or digit)"
    )]
    InvalidNode { value: String, problem: NameProblem },
    #[error(
        "{value:?} is not a valid zone: {problem} (1 to 63 of a-z, A-Z, 0-9, '.', '_' \
         and '-', starting and ending with a letter or digit)"
    )]
    InvalidZone {
        value: String,
        problem: LabelProblem,
    },
    #[error("must name exactly one of user, group; got neither")]
    NoSubject,
    #[error("must name exactly one of user, group; got both (user {user:?}, group {group:?})")]
    TwoSubjects { user: String, group: String },
    #[error(
        "{value:?} is not a valid user or group name: {problem} (1 to 253 of a-z, A-Z, \
         0-9, '.', '_', '@', ':' and '-', starting and ending with a letter or digit)"
    )]
    InvalidSubject { value: String, problem: NameProblem },
    #[error("unknown role {value:?}, expected one of: {}", names(Role::ALL.map(Role::as_str)))]
    UnknownRole { value: String },
    #[error(
        "{value:?} is neither \"*\" (every namespace and the cluster-scoped kinds) nor a \
         valid namespace: {problem} (a DNS-1123 label: 1 to 63 of a-z, 0-9 and '-', \
         starting and ending with a letter or digit)"
    )]
    InvalidScope { value: String, problem: NameProblem },
    #[error("role custom needs at least one permission")]
    NoPermissions,
    #[error("only role custom takes permissions; role {role} has fixed ones")]
    PermissionsNotCustom { role: Role },
    #[error("unknown verb {value:?}, expected one of: {}", names(Verb::ALL.map(Verb::as_str)))]
    UnknownVerb { value: String },
    #[error(
        "unknown resource {value:?}, expected one of: {}",
        names(Resource::ALL.map(Resource::as_str))
    )]
    UnknownResource { value: String },
    #[error("{verb} on {resource} is already listed as {first}")]
    DuplicatePermission {
        verb: Verb,
        resource: Resource,
        first: String,
    },
}

fn names<const N: usize>(names: [&str; N]) -> String {
    names.join(", ")
}

/// Why a name is not a DNS label (or subdomain, or user name).
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
    #[error("it does not start with a letter or digit")]
    BadStartAlnum,
    #[error("it does not end with a letter or digit")]
    BadEnd,
    #[error("it has an empty part between dots")]
    EmptyPart,
}

/// Why an address cannot be a VIP, a backend or an endpoint.
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

/// Why a label key, label value or zone breaks the label syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} characters long, at most {max} are allowed")]
    TooLong { len: usize, max: usize },
    #[error("it contains {ch:?}")]
    InvalidChar { ch: char },
    #[error("it does not start and end with a letter or digit")]
    BadEnds,
    #[error("its prefix {prefix:?} is not a DNS-1123 subdomain: {problem}")]
    BadPrefix {
        prefix: String,
        problem: NameProblem,
    },
}

mod grants;
mod labels;
mod names;
mod unique;
mod values;

pub use grants::*;
pub use labels::*;
pub use names::*;
pub(crate) use unique::*;
pub use values::*;

#[cfg(test)]
mod tests;
