//! Manifests: the YAML files admins write, read in one of two modes.
//!
//! A manifest is a stream of YAML documents separated by `---`; each non-empty document
//! describes one object.
//!
//! * [`parse`] / [`load`] (`sluice-agent run --manifest FILE`, the standalone agent):
//!   only `kind: Service`, each with a `vip` and static `backends`, because there is no
//!   control service to allocate VIPs or resolve selectors. Returns a [`Manifest`].
//! * [`parse_objects`] / [`load_objects`] (`sluicectl apply -f FILE`, the control
//!   service): Service, Endpoint and Grant; a Service's `vip` is optional (the control
//!   service allocates one) and it may select Endpoints by label instead of listing
//!   backends. Returns [`Object`]s.
//!
//! ```yaml
//! kind: Service
//! namespace: shop                # optional, "default" when absent; DNS-1123 label
//! name: web                      # DNS-1035 label, unique per kind and namespace
//! labels: { tier: frontend }     # optional, on every kind; see `rules` for the syntax
//! vip: 198.18.0.10               # required by the agent; optional for the control service
//! ports:                         # 1..=64 entries, (port, protocol) unique in the service
//!   - { port: 80, protocol: TCP, targetPort: 8080 }
//!   - { port: 53, protocol: UDP }              # targetPort defaults to port
//! algorithm: round-robin         # optional, see `Algorithm`
//! # maglevTableSize: 16381       # algorithm maglev only: lookup table size, a prime ≤ 65521
//! backends:                      # optional; none means the data plane drops and counts
//!   - { address: 198.19.1.2, weight: 3 }       # weight 1..=10000, defaults to 1
//!   - { address: 198.19.1.3, version: v2, draining: true }  # both optional
//! # selector: { app: web }       # control service only; instead of backends, not with
//! # healthCheck, drainTimeoutSeconds, rollout, sessionAffinity, topologyAware: see `traffic`
//! ---
//! kind: Endpoint                 # control service only
//! namespace: shop
//! name: web-1
//! labels: { app: web }           # what service selectors match
//! address: 198.19.1.2            # same rules as a backend address
//! node: node-1                   # optional, DNS-1123 subdomain
//! zone: eu-west-1a               # optional
//! weight: 1                      # optional, 1..=10000, defaults to 1
//! ready: true                    # optional, defaults to true
//! draining: false                # optional: true takes it out of rotation, flows drain
//! ---
//! kind: Grant                    # control service only
//! namespace: shop                # where the grant itself lives
//! name: alice-edits-shop
//! subject: { user: alice }       # or { group: dev }, exactly one
//! role: editor                   # viewer | editor | admin | custom
//! scope: shop                    # a namespace, or "*" (quoted) for all of them and the
//!                                # cluster-scoped kinds
//! permissions:                   # required with role custom, forbidden otherwise
//!   - { verb: get, resource: services }   # verbs: get list watch create update delete *
//!                                         # resources: services endpoints grants nodes
//!                                         #            tokens users *
//! ```
//!
//! Both modes return either every object, valid, or the first error found, in document
//! order; nothing is half-applied. Every error names the file, the document (1-based,
//! counting empty documents, as an editor user would count them), the object
//! (`Service "shop/web"`) once its kind, name and namespace are known, the line and
//! column, the field path (`backends[1].weight`) and the offending value.
//!
//! How it works, in three steps:
//! 1. serde-saphyr reads every document into a small tree (`yaml::Node`) in which each
//!    node keeps its line and column (through [`serde_saphyr::Spanned`]). YAML itself
//!    (syntax, duplicate keys, anchors) is checked here. We walk a tree instead of
//!    deriving `Deserialize` for the manifest types because serde's derived errors carry
//!    neither the field path nor, for values we validate ourselves, a position.
//! 2. Each document is validated into an [`Object`] (`document::parse_document`); the
//!    value rules live in [`rules`], shared with API messages ([`crate::convert`]) so the
//!    control service rejects exactly what a manifest would.
//! 3. Rules that span documents are checked here: an object (kind, namespace, name) is
//!    defined once; two services never share an explicit (VIP, port, protocol), in any
//!    namespaces, since VIPs are global.
//!
//! serde-saphyr skips empty documents and does not say which document an error is in, so
//! a first pass with its parser, granit-parser, records the line where each document
//! starts; a line then maps to its document number.
//!
//! Conventions, chosen to keep a manifest unambiguous:
//! * A key given as `null` (`backends:` with nothing after it) counts as absent, so an
//!   optional field takes its default and a required one is reported missing.
//! * `kind` and `protocol` are case-sensitive: exactly `Service`, `TCP`, `UDP`, as in
//!   Kubernetes. A silent default could put a UDP service on TCP.
//! * Values keep their YAML types: `port: "80"` is a string, not a port, and a label
//!   value `version: 2` is an integer, not the string "2".

mod document;
mod error;
mod objects;
pub mod policy;
pub mod rules;
pub mod traffic;
mod yaml;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sluice_common::types::{IPPROTO_TCP, IPPROTO_UDP};

pub use error::{ControlOnly, ManifestError, Mode, Position};
pub use objects::{
    DEFAULT_NAMESPACE, Endpoint, Grant, Labels, Object, ObjectKind, ObjectRef, Permission,
    Resource, Role, Scope, ServiceObject, Subject, VERSION_LABEL, Verb,
};
pub use policy::{Cidr, EgressRule, IngressRule, NetworkPolicy, Peer, PolicyPort, PolicyTypes};
pub use rules::{AddressProblem, LabelProblem, NameProblem, Problem};
pub use traffic::{HealthCheck, Probe, Rollout, SessionAffinity, Traffic};

use document::{Parsed, parse_document};
use yaml::{Cx, read_documents};

/// Larger backend sets are rejected, never truncated.
pub const MAX_BACKENDS_PER_SERVICE: usize = 4096;
/// Weights are relative within a service: 1 against 9,999 is a 0.01% canary.
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_PORTS_PER_SERVICE: usize = 64;

// ---------------------------------------------------------------------------------------
// Domain types
// ---------------------------------------------------------------------------------------

/// Every service of a standalone agent's manifest, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub services: Vec<Service>,
}

/// A service as a standalone agent runs it: VIP given, backends static. See
/// [`ServiceObject`] for the control service's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// [`DEFAULT_NAMESPACE`] when the manifest gives none; names are unique per namespace.
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub algorithm: Algorithm,
    /// Empty is valid: the data plane then drops the service's traffic and counts it.
    pub backends: Vec<BackendSpec>,
    /// With `algorithm: maglev`: the lookup table's size, a prime.
    #[serde(rename = "maglevTableSize", skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    #[serde(flatten)]
    pub traffic: Traffic,
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
    /// Consistent hashing (Maglev): a flow's backend follows from its hash,
    /// the same on every node; weights set the shares.
    Maglev,
}

impl Algorithm {
    pub const ALL: [Self; 5] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnections,
        Self::WeightedLeastConnections,
        Self::Maglev,
    ];

    /// The manifest spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnections => "least-connections",
            Self::WeightedLeastConnections => "weighted-least-connections",
            Self::Maglev => "maglev",
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct BackendSpec {
    pub address: Ipv4Addr,
    pub weight: u32,
    /// What a rollout moves traffic between.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// No new flows; established ones run until they close or the service's
    /// drain timeout ends them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

/// Reads `path` and parses it as a standalone agent's manifest; messages name the file
/// as given.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    parse(&path.display().to_string(), &read(path)?)
}

/// Parses and validates a standalone agent's manifest (Services with a VIP and static
/// backends); `source` names the file in error messages.
pub fn parse(source: &str, text: &str) -> Result<Manifest, ManifestError> {
    let documents = read_documents(source, text)?;
    let services = validate_documents(source, &documents, Mode::Agent)?
        .into_iter()
        .map(|(document, parsed)| standalone(source, document, parsed))
        .collect::<Result<_, _>>()?;
    Ok(Manifest { services })
}

/// Reads `path` and parses it as a control-mode manifest; messages name the file as
/// given.
pub fn load_objects(path: &Path) -> Result<Vec<Object>, ManifestError> {
    parse_objects(&path.display().to_string(), &read(path)?)
}

/// Parses and validates a control-mode manifest (`sluicectl apply -f`): every object, in
/// document order. `source` names the file in error messages.
pub fn parse_objects(source: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let documents = read_documents(source, text)?;
    Ok(validate_documents(source, &documents, Mode::Control)?
        .into_iter()
        .map(|(_, parsed)| parsed.object)
        .collect())
}

fn read(path: &Path) -> Result<String, ManifestError> {
    std::fs::read_to_string(path).map_err(|cause| ManifestError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Validates each document, then the rules that span documents, one document at a time
/// so that the first error in document order is the one reported.
fn validate_documents<'n>(
    source: &str,
    documents: &'n [(usize, yaml::Node)],
    mode: Mode,
) -> Result<Vec<(usize, Parsed<'n>)>, ManifestError> {
    let mut objects = Vec::with_capacity(documents.len());
    let mut defined: HashMap<ObjectRef, usize> = HashMap::new();
    let mut listeners: HashMap<(Ipv4Addr, u16, Protocol), (String, usize)> = HashMap::new();
    for &(document, ref root) in documents {
        let cx = Cx {
            file: source,
            document,
            object: None,
        };
        let parsed = parse_document(cx, root, mode)?;
        let id = parsed.object.object_ref();
        let cx = Cx {
            object: Some(&id),
            ..cx
        };

        match defined.entry(id.clone()) {
            Entry::Occupied(first) => {
                let at = cx.at(parsed.name_node);
                let first_document = *first.get();
                return Err(match id.kind {
                    ObjectKind::Service => ManifestError::DuplicateService {
                        at,
                        namespace: id.namespace,
                        name: id.name,
                        first_document,
                    },
                    ObjectKind::Endpoint | ObjectKind::Grant | ObjectKind::NetworkPolicy => {
                        ManifestError::DuplicateObject {
                            at,
                            object: id,
                            first_document,
                        }
                    }
                });
            }
            Entry::Vacant(slot) => {
                slot.insert(document);
            }
        }
        // A service without a VIP gets a fresh one from the control service, so it
        // cannot clash here.
        if let Object::Service(ServiceObject {
            vip: Some(vip),
            ports,
            ..
        }) = &parsed.object
        {
            for (i, (port, node)) in ports.iter().zip(&parsed.port_nodes).enumerate() {
                // Ports are unique within the service (checked in parse_ports), so a
                // clash here is always with an earlier service.
                let key = (*vip, port.port, port.protocol);
                if let Some((other_service, other_document)) = listeners.get(&key) {
                    return Err(ManifestError::ListenerConflict {
                        at: cx.at(node),
                        field: format!("ports[{i}]"),
                        vip: *vip,
                        port: port.port,
                        protocol: port.protocol,
                        other_service: other_service.clone(),
                        other_document: *other_document,
                    });
                }
                listeners.insert(key, (format!("{}/{}", id.namespace, id.name), document));
            }
        }
        objects.push((document, parsed));
    }
    Ok(objects)
}

/// A standalone agent's service. `parse_document` has enforced agent mode already; the
/// errors here restate those rules rather than assume them.
fn standalone(source: &str, document: usize, parsed: Parsed<'_>) -> Result<Service, ManifestError> {
    let id = parsed.object.object_ref();
    let cx = Cx {
        file: source,
        document,
        object: Some(&id),
    };
    let service = match parsed.object {
        Object::Service(service) => service,
        Object::Endpoint(_) | Object::Grant(_) | Object::NetworkPolicy(_) => {
            return Err(ManifestError::NeedsControlService {
                at: cx.at(parsed.kind_node),
                field: "kind".to_owned(),
                feature: ControlOnly::Kind { kind: id.kind },
            });
        }
    };
    let ServiceObject {
        namespace,
        name,
        labels,
        vip,
        ports,
        algorithm,
        backends,
        selector,
        maglev_table_size,
        traffic,
    } = service;
    if !selector.is_empty() {
        return Err(ManifestError::NeedsControlService {
            at: cx.at(parsed.root),
            field: "selector".to_owned(),
            feature: ControlOnly::Selector,
        });
    }
    let Some(vip) = vip else {
        return Err(ManifestError::MissingField {
            at: cx.at(parsed.root),
            field: "vip".to_owned(),
        });
    };
    Ok(Service {
        namespace,
        name,
        labels,
        vip,
        ports,
        algorithm,
        backends,
        maglev_table_size,
        traffic,
    })
}

#[cfg(test)]
mod agent_tests;
#[cfg(test)]
mod control_tests;
