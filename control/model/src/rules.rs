//! The validation rules, one implementation of each, shared by the two ways objects
//! come in: YAML manifests (the parent module, which adds where in the file) and API
//! messages ([`crate::convert`], which adds which object). The control service thus
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

use std::collections::HashMap;
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
    /// [`super::ManifestError::MissingField`] with the position of the mapping.
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

// ---------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------

/// Object names (Service, Endpoint, Grant): RFC 1035 label syntax, lower case only, as
/// Kubernetes requires of Service names. Names end up in metric labels and status
/// output, where one spelling per object matters.
pub fn validate_name(name: &str) -> Result<(), Problem> {
    dns_1035_label(name).map_err(|problem| Problem::InvalidName {
        name: name.to_owned(),
        problem,
    })
}

/// Namespaces: DNS-1123 labels (may start with a digit), as in Kubernetes.
pub fn validate_namespace(namespace: &str) -> Result<(), Problem> {
    dns_1123_label(namespace).map_err(|problem| Problem::InvalidNamespace {
        namespace: namespace.to_owned(),
        problem,
    })
}

/// The node an endpoint runs on: a DNS-1123 subdomain, so host names fit.
pub fn validate_node(node: &str) -> Result<(), Problem> {
    dns_1123_subdomain(node).map_err(|problem| Problem::InvalidNode {
        value: node.to_owned(),
        problem,
    })
}

/// A zone (`eu-west-1a`): label value syntax, and not empty (an unknown zone is left out).
pub fn validate_zone(zone: &str) -> Result<(), Problem> {
    let problem = if zone.is_empty() {
        LabelProblem::Empty
    } else {
        match label_token(zone) {
            Ok(()) => return Ok(()),
            Err(problem) => problem,
        }
    };
    Err(Problem::InvalidZone {
        value: zone.to_owned(),
        problem,
    })
}

/// A grant's user or group. Wider than a DNS name so that e-mail addresses and
/// `system:`-style group names fit; no spaces, slashes or control characters, so a
/// subject prints unambiguously in audit lines.
pub fn validate_subject(subject: &str) -> Result<(), Problem> {
    let invalid = |problem| Problem::InvalidSubject {
        value: subject.to_owned(),
        problem,
    };
    let len = subject.chars().count();
    if len == 0 {
        return Err(invalid(NameProblem::Empty));
    }
    if len > SUBJECT_MAX_LEN {
        return Err(invalid(NameProblem::TooLong { len }));
    }
    if let Some(ch) = subject
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | ':' | '-')))
    {
        return Err(invalid(NameProblem::InvalidChar { ch }));
    }
    if !subject.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(NameProblem::BadStartAlnum));
    }
    if !subject.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(NameProblem::BadEnd));
    }
    Ok(())
}

fn dns_1035_label(name: &str) -> Result<(), NameProblem> {
    label_chars(name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameProblem::BadStart);
    }
    if name.ends_with('-') {
        return Err(NameProblem::BadEnd);
    }
    Ok(())
}

fn dns_1123_label(name: &str) -> Result<(), NameProblem> {
    label_chars(name)?;
    if name.starts_with('-') {
        return Err(NameProblem::BadStartAlnum);
    }
    if name.ends_with('-') {
        return Err(NameProblem::BadEnd);
    }
    Ok(())
}

/// 1 to 63 of a-z, 0-9 and '-': what DNS-1035 and DNS-1123 labels share.
fn label_chars(name: &str) -> Result<(), NameProblem> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameProblem::Empty);
    }
    if len > LABEL_MAX_LEN {
        return Err(NameProblem::TooLong { len });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameProblem::InvalidChar { ch });
    }
    Ok(())
}

fn dns_1123_subdomain(name: &str) -> Result<(), NameProblem> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameProblem::Empty);
    }
    if len > SUBDOMAIN_MAX_LEN {
        return Err(NameProblem::TooLong { len });
    }
    for part in name.split('.') {
        match dns_1123_label(part) {
            Ok(()) => {}
            Err(NameProblem::Empty) => return Err(NameProblem::EmptyPart),
            Err(problem) => return Err(problem),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Labels
// ---------------------------------------------------------------------------------------

pub fn validate_label_count(count: usize) -> Result<(), Problem> {
    if count > MAX_LABELS {
        return Err(Problem::TooManyLabels {
            count,
            max: MAX_LABELS,
        });
    }
    Ok(())
}

/// A selector, when given, names 1..=[`MAX_LABELS`] labels (see [`Problem::EmptySelector`]).
pub fn validate_selector_count(count: usize) -> Result<(), Problem> {
    if count == 0 {
        return Err(Problem::EmptySelector);
    }
    validate_label_count(count)
}

pub fn validate_label_key(key: &str) -> Result<(), Problem> {
    let invalid = |problem| Problem::InvalidLabelKey {
        key: key.to_owned(),
        problem,
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            dns_1123_subdomain(prefix).map_err(|problem| {
                invalid(LabelProblem::BadPrefix {
                    prefix: prefix.to_owned(),
                    problem,
                })
            })?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(invalid(LabelProblem::Empty));
    }
    label_token(name).map_err(invalid)
}

pub fn validate_label_value(value: &str) -> Result<(), Problem> {
    if value.is_empty() {
        return Ok(());
    }
    label_token(value).map_err(|problem| Problem::InvalidLabelValue {
        value: value.to_owned(),
        problem,
    })
}

/// A non-empty label name or value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both
/// ends.
fn label_token(token: &str) -> Result<(), LabelProblem> {
    let len = token.chars().count();
    if len > LABEL_MAX_LEN {
        return Err(LabelProblem::TooLong {
            len,
            max: LABEL_MAX_LEN,
        });
    }
    if let Some(ch) = token
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(LabelProblem::InvalidChar { ch });
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if !(token.starts_with(alnum) && token.ends_with(alnum)) {
        return Err(LabelProblem::BadEnds);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Addresses, ports, weights
// ---------------------------------------------------------------------------------------

/// An address that can carry service traffic: a VIP, a backend or an endpoint.
pub fn validate_address(value: &str) -> Result<Ipv4Addr, Problem> {
    let problem = match value.parse::<Ipv4Addr>() {
        Err(_) if value.parse::<Ipv6Addr>().is_ok() => AddressProblem::Ipv6,
        Err(_) => AddressProblem::NotIpv4,
        Ok(addr) if addr.is_unspecified() => AddressProblem::Unspecified,
        Ok(addr) if addr.is_broadcast() => AddressProblem::Broadcast,
        Ok(addr) if addr.is_multicast() => AddressProblem::Multicast,
        Ok(addr) if addr.is_loopback() => AddressProblem::Loopback,
        Ok(addr) => return Ok(addr),
    };
    Err(Problem::InvalidAddress {
        value: value.to_owned(),
        problem,
    })
}

/// A port or target port. Takes `i128` so that every integer a manifest or a message
/// can hold is reported as written rather than truncated.
pub fn validate_port(value: i128) -> Result<u16, Problem> {
    u16::try_from(value)
        .ok()
        .filter(|&port| port != 0)
        .ok_or(Problem::PortOutOfRange { value })
}

pub fn validate_port_count(count: usize) -> Result<(), Problem> {
    if count == 0 {
        return Err(Problem::NoPorts);
    }
    if count > MAX_PORTS_PER_SERVICE {
        return Err(Problem::TooManyPorts {
            count,
            max: MAX_PORTS_PER_SERVICE,
        });
    }
    Ok(())
}

/// Case-sensitive, see [`Protocol`].
pub fn validate_protocol(value: &str) -> Result<Protocol, Problem> {
    value.parse().map_err(|_| Problem::UnknownProtocol {
        value: value.to_owned(),
    })
}

pub fn validate_algorithm(value: &str) -> Result<Algorithm, Problem> {
    value.parse().map_err(|_| Problem::UnknownAlgorithm {
        value: value.to_owned(),
    })
}

pub fn validate_weight(value: i128) -> Result<u32, Problem> {
    u32::try_from(value)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or(Problem::WeightOutOfRange { value })
}

/// A Maglev table size: a prime between 2 and
/// [`MAGLEV_MAX_TABLE_SIZE`], and only for the `maglev` algorithm.
pub fn validate_maglev_table_size(value: i128, algorithm: Algorithm) -> Result<u32, Problem> {
    if algorithm != Algorithm::Maglev {
        return Err(Problem::MaglevTableSizeWithout { algorithm });
    }
    u32::try_from(value)
        .ok()
        .filter(|&n| n <= MAGLEV_MAX_TABLE_SIZE && maglev::is_prime(n))
        .ok_or(Problem::MaglevTableSize {
            value,
            max: MAGLEV_MAX_TABLE_SIZE,
        })
}

pub fn validate_backend_count(count: usize) -> Result<(), Problem> {
    if count > MAX_BACKENDS_PER_SERVICE {
        return Err(Problem::TooManyBackends {
            count,
            max: MAX_BACKENDS_PER_SERVICE,
        });
    }
    Ok(())
}

/// A backend must not be its own service's VIP: the data plane would rewrite the packet
/// to the address it was already sent to and loop it.
pub fn validate_backend_address(address: Ipv4Addr, vip: Option<Ipv4Addr>) -> Result<(), Problem> {
    if vip == Some(address) {
        return Err(Problem::BackendIsVip { address });
    }
    Ok(())
}

/// A service takes its backends from one place: static `backends`, or the endpoints its
/// `selector` matches. Merging both would make it unclear which list an edit changes.
pub fn validate_backends_or_selector(
    has_backends: bool,
    has_selector: bool,
) -> Result<(), Problem> {
    if has_backends && has_selector {
        return Err(Problem::BackendsAndSelector);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Grants
// ---------------------------------------------------------------------------------------

pub fn validate_role(value: &str) -> Result<Role, Problem> {
    Role::from_name(value).ok_or_else(|| Problem::UnknownRole {
        value: value.to_owned(),
    })
}

/// `"*"` or a namespace.
pub fn validate_scope(value: &str) -> Result<Scope, Problem> {
    if value == Scope::ALL {
        return Ok(Scope::All);
    }
    dns_1123_label(value)
        .map(|()| Scope::Namespace(value.to_owned()))
        .map_err(|problem| Problem::InvalidScope {
            value: value.to_owned(),
            problem,
        })
}

pub fn validate_verb(value: &str) -> Result<Verb, Problem> {
    Verb::from_name(value).ok_or_else(|| Problem::UnknownVerb {
        value: value.to_owned(),
    })
}

pub fn validate_resource(value: &str) -> Result<Resource, Problem> {
    Resource::from_name(value).ok_or_else(|| Problem::UnknownResource {
        value: value.to_owned(),
    })
}

/// `permissions` is required with role custom and forbidden with the others: a fixed
/// role with extra permissions would read as if those were all it grants.
pub fn validate_permission_count(role: Role, count: usize) -> Result<(), Problem> {
    match (role, count) {
        (Role::Custom, 0) => Err(Problem::NoPermissions),
        (Role::Custom, _) | (_, 0) => Ok(()),
        (role, _) => Err(Problem::PermissionsNotCustom { role }),
    }
}

// ---------------------------------------------------------------------------------------
// Duplicates within a list
// ---------------------------------------------------------------------------------------

/// `(port, protocol)` is unique within a service: it is the listener's key.
#[derive(Default)]
pub(crate) struct UniquePorts(HashMap<(u16, Protocol), usize>);

impl UniquePorts {
    pub(crate) fn insert(
        &mut self,
        index: usize,
        port: u16,
        protocol: Protocol,
    ) -> Result<(), Problem> {
        match self.0.insert((port, protocol), index) {
            Some(first) => Err(Problem::DuplicatePort {
                port,
                protocol,
                first: format!("ports[{first}]"),
            }),
            None => Ok(()),
        }
    }
}

/// A backend address appears once per service; its weight says how much traffic it gets.
#[derive(Default)]
pub(crate) struct UniqueBackends(HashMap<Ipv4Addr, usize>);

impl UniqueBackends {
    pub(crate) fn insert(&mut self, index: usize, address: Ipv4Addr) -> Result<(), Problem> {
        match self.0.insert(address, index) {
            Some(first) => Err(Problem::DuplicateBackend {
                address,
                first: format!("backends[{first}]"),
            }),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
pub(crate) struct UniquePermissions(HashMap<Permission, usize>);

impl UniquePermissions {
    pub(crate) fn insert(&mut self, index: usize, permission: Permission) -> Result<(), Problem> {
        match self.0.insert(permission, index) {
            Some(first) => Err(Problem::DuplicatePermission {
                verb: permission.verb,
                resource: permission.resource,
                first: format!("permissions[{first}]"),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name_problem(result: Result<(), Problem>) -> Option<NameProblem> {
        match result {
            Ok(()) => None,
            Err(
                Problem::InvalidName { problem, .. }
                | Problem::InvalidNamespace { problem, .. }
                | Problem::InvalidNode { problem, .. }
                | Problem::InvalidSubject { problem, .. },
            ) => Some(problem),
            Err(other) => panic!("unexpected problem {other:?}"),
        }
    }

    fn label_problem(result: Result<(), Problem>) -> Option<LabelProblem> {
        match result {
            Ok(()) => None,
            Err(
                Problem::InvalidLabelKey { problem, .. }
                | Problem::InvalidLabelValue { problem, .. }
                | Problem::InvalidZone { problem, .. },
            ) => Some(problem),
            Err(other) => panic!("unexpected problem {other:?}"),
        }
    }

    #[test]
    fn names_are_dns_1035_labels() {
        let long = "a".repeat(64);
        for (name, expected) in [
            ("web", None),
            ("a", None),
            ("web-2", None),
            (&"a".repeat(63), None),
            ("", Some(NameProblem::Empty)),
            (&long, Some(NameProblem::TooLong { len: 64 })),
            ("Web", Some(NameProblem::InvalidChar { ch: 'W' })),
            ("web.api", Some(NameProblem::InvalidChar { ch: '.' })),
            ("1web", Some(NameProblem::BadStart)),
            ("-web", Some(NameProblem::BadStart)),
            ("web-", Some(NameProblem::BadEnd)),
        ] {
            assert_eq!(name_problem(validate_name(name)), expected, "{name:?}");
        }
    }

    #[test]
    fn namespaces_are_dns_1123_labels() {
        for (namespace, expected) in [
            ("default", None),
            ("2024-tests", None),
            ("", Some(NameProblem::Empty)),
            ("Shop", Some(NameProblem::InvalidChar { ch: 'S' })),
            ("shop_eu", Some(NameProblem::InvalidChar { ch: '_' })),
            ("-shop", Some(NameProblem::BadStartAlnum)),
            ("shop-", Some(NameProblem::BadEnd)),
            (&"a".repeat(64), Some(NameProblem::TooLong { len: 64 })),
        ] {
            assert_eq!(
                name_problem(validate_namespace(namespace)),
                expected,
                "{namespace:?}"
            );
        }
    }

    #[test]
    fn node_names_are_dns_1123_subdomains() {
        for (node, expected) in [
            ("node-1", None),
            ("node-1.eu-west.example", None),
            ("", Some(NameProblem::Empty)),
            ("node..1", Some(NameProblem::EmptyPart)),
            (".node", Some(NameProblem::EmptyPart)),
            ("node.-a", Some(NameProblem::BadStartAlnum)),
            ("Node", Some(NameProblem::InvalidChar { ch: 'N' })),
            (&"a.".repeat(127), Some(NameProblem::TooLong { len: 254 })),
        ] {
            assert_eq!(name_problem(validate_node(node)), expected, "{node:?}");
        }
    }

    #[test]
    fn subjects_allow_email_and_system_names() {
        for (subject, expected) in [
            ("alice", None),
            ("alice@example.com", None),
            ("system:admins", None),
            ("Bob_2", None),
            ("", Some(NameProblem::Empty)),
            ("alice smith", Some(NameProblem::InvalidChar { ch: ' ' })),
            ("a/b", Some(NameProblem::InvalidChar { ch: '/' })),
            ("@alice", Some(NameProblem::BadStartAlnum)),
            ("alice.", Some(NameProblem::BadEnd)),
            (&"a".repeat(254), Some(NameProblem::TooLong { len: 254 })),
        ] {
            assert_eq!(
                name_problem(validate_subject(subject)),
                expected,
                "{subject:?}"
            );
        }
    }

    #[test]
    fn label_keys_follow_kubernetes_syntax() {
        for (key, expected) in [
            ("app", None),
            ("App.Tier_2", None),
            ("app.kubernetes.io/name", None),
            (&"a".repeat(63), None),
            ("", Some(LabelProblem::Empty)),
            ("example.com/", Some(LabelProblem::Empty)),
            (
                &"a".repeat(64),
                Some(LabelProblem::TooLong { len: 64, max: 63 }),
            ),
            ("app name", Some(LabelProblem::InvalidChar { ch: ' ' })),
            ("a/b/c", Some(LabelProblem::InvalidChar { ch: '/' })),
            ("-app", Some(LabelProblem::BadEnds)),
            ("app.", Some(LabelProblem::BadEnds)),
            (
                "Example.com/app",
                Some(LabelProblem::BadPrefix {
                    prefix: "Example.com".to_owned(),
                    problem: NameProblem::InvalidChar { ch: 'E' },
                }),
            ),
            (
                "/app",
                Some(LabelProblem::BadPrefix {
                    prefix: String::new(),
                    problem: NameProblem::Empty,
                }),
            ),
        ] {
            assert_eq!(label_problem(validate_label_key(key)), expected, "{key:?}");
        }
    }

    #[test]
    fn label_values_may_be_empty_but_not_malformed() {
        for (value, expected) in [
            ("", None),
            ("web", None),
            ("v1.2_rc-3", None),
            (
                &"v".repeat(64),
                Some(LabelProblem::TooLong { len: 64, max: 63 }),
            ),
            ("a/b", Some(LabelProblem::InvalidChar { ch: '/' })),
            ("_web", Some(LabelProblem::BadEnds)),
        ] {
            assert_eq!(
                label_problem(validate_label_value(value)),
                expected,
                "{value:?}"
            );
        }
    }

    #[test]
    fn zones_use_label_value_syntax_but_not_empty() {
        assert_eq!(label_problem(validate_zone("eu-west-1a")), None);
        assert_eq!(label_problem(validate_zone("")), Some(LabelProblem::Empty));
        assert_eq!(
            label_problem(validate_zone("eu west")),
            Some(LabelProblem::InvalidChar { ch: ' ' })
        );
    }

    #[test]
    fn counts_and_ranges() {
        assert_eq!(validate_label_count(MAX_LABELS), Ok(()));
        assert_eq!(
            validate_label_count(MAX_LABELS + 1),
            Err(Problem::TooManyLabels { count: 65, max: 64 })
        );
        assert_eq!(validate_selector_count(0), Err(Problem::EmptySelector));
        assert_eq!(validate_port_count(0), Err(Problem::NoPorts));
        assert_eq!(validate_port(65_535), Ok(65_535));
        assert_eq!(validate_port(0), Err(Problem::PortOutOfRange { value: 0 }));
        assert_eq!(validate_weight(MAX_WEIGHT.into()), Ok(MAX_WEIGHT));
        assert_eq!(
            validate_weight(0),
            Err(Problem::WeightOutOfRange { value: 0 })
        );
    }

    #[test]
    fn scopes_are_star_or_a_namespace() {
        assert_eq!(validate_scope("*"), Ok(Scope::All));
        assert_eq!(
            validate_scope("shop"),
            Ok(Scope::Namespace("shop".to_owned()))
        );
        let e = validate_scope("**").err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("\"**\"") && m.contains("\"*\"")),
            "{e:?}"
        );
    }

    #[test]
    fn permissions_only_with_role_custom() {
        assert_eq!(
            validate_permission_count(Role::Custom, 0),
            Err(Problem::NoPermissions)
        );
        assert_eq!(validate_permission_count(Role::Custom, 2), Ok(()));
        assert_eq!(validate_permission_count(Role::Viewer, 0), Ok(()));
        assert_eq!(
            validate_permission_count(Role::Admin, 1),
            Err(Problem::PermissionsNotCustom { role: Role::Admin })
        );
    }

    #[test]
    fn messages_list_what_is_accepted() {
        for (problem, parts) in [
            (
                validate_role("owner").err(),
                &["\"owner\"", "viewer, editor, admin, custom"][..],
            ),
            (
                validate_verb("patch").err(),
                &["\"patch\"", "get, list, watch, create, update, delete, *"][..],
            ),
            (
                validate_resource("pods").err(),
                &[
                    "\"pods\"",
                    "services, endpoints, grants, networkpolicies, nodes, tokens, users, *",
                ][..],
            ),
        ] {
            let message = problem.map(|p| p.to_string()).unwrap_or_default();
            for part in parts {
                assert!(message.contains(part), "{message:?} lacks {part:?}");
            }
        }
    }
}
