//! `kind: NetworkPolicy` (control service only): which sources may open flows
//! to which endpoints.
//!
//! ```yaml
//! kind: NetworkPolicy
//! namespace: shop
//! name: web-ingress
//! selector: { app: web }          # endpoints of the namespace it protects; {} for all of them
//! # service: web                  # or instead: this service's VIP (rule ports: its ports),
//! #                               # e.g. for clients outside the cluster by CIDR
//! ingress:                        # absent or empty: they accept nothing (default deny)
//!   - from:                       # absent: every source
//!       - selector: { app: frontend }      # endpoints by label, any namespace...
//!         namespace: shop                  # ...or this one only
//!       - cidr: 198.18.100.0/24            # addresses that are not endpoints
//!         except: [198.18.100.128/25]
//!     ports: [{ port: 8080, protocol: TCP }]   # target ports; absent: every port
//! egress:                         # optional: where the selected endpoints may open flows
//!   - to: [{ selector: { app: db } }]      # the same peers; absent: everywhere
//!     ports: [{ port: 5432, protocol: TCP }]
//! # policyTypes: [Ingress, Egress]  # as in Kubernetes; default: Ingress, plus Egress
//! #                                 # when the policy has an egress field
//! ```

use std::{fmt, net::Ipv4Addr};

use serde::{Serialize, Serializer};

use super::rules::{self, Problem};
use super::yaml::{Cx, Fields, Node, integer, mapping, sequence, string};
use super::{Labels, ManifestError, ObjectRef, Protocol};

/// At most this many ingress rules per policy, peers per rule, except entries
/// per CIDR.
pub const MAX_RULES: usize = 64;
pub const MAX_PEERS: usize = 64;
pub const MAX_EXCEPT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// The endpoints of the namespace it protects (empty: all of them);
    /// `None` when it protects a service's VIP instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    /// Instead of `selector`: the service whose VIP the policy protects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What the policy restricts for what it selects.
    #[serde(rename = "policyTypes")]
    pub types: PolicyTypes,
    pub ingress: Vec<IngressRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

/// As Kubernetes' `policyTypes`: ingress is restricted unless only Egress is
/// listed; egress when Egress is listed, or, without `policyTypes`, when the
/// policy has an `egress` field (even empty: no egress allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

impl Serialize for PolicyTypes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut names = Vec::new();
        if self.ingress {
            names.push("Ingress");
        }
        if self.egress {
            names.push("Egress");
        }
        names.serialize(serializer)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressRule {
    /// Empty: every destination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    /// Empty: every port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IngressRule {
    /// Empty: every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    /// Empty: every port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Peer {
    Endpoints {
        selector: Labels,
        /// `None`: any namespace.
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    Cidr {
        cidr: Cidr,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        except: Vec<Cidr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PolicyPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// An IPv4 prefix with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(len: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// `other` lies inside this prefix (or is it).
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

pub fn validate_cidr(text: &str) -> Result<Cidr, Problem> {
    let bad = || Problem::InvalidCidr {
        value: text.to_owned(),
    };
    let (addr, len) = text.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32 && !len.starts_with('+'))
        .ok_or_else(bad)?;
    let canonical = Ipv4Addr::from(u32::from(addr) & Cidr::mask(len));
    if canonical != addr {
        return Err(Problem::CidrHostBits {
            value: text.to_owned(),
            canonical: format!("{canonical}/{len}"),
        });
    }
    Ok(Cidr { addr, len })
}

/// An `except` entry must lie strictly inside its CIDR.
pub fn validate_except(cidr: Cidr, except: Cidr) -> Result<(), Problem> {
    if except.len > cidr.len && cidr.covers(&except) {
        Ok(())
    } else {
        Err(Problem::ExceptOutside {
            except: except.to_string(),
            cidr: cidr.to_string(),
        })
    }
}

pub(super) const FIELDS: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "labels",
    "selector",
    "service",
    "policyTypes",
    "ingress",
    "egress",
];
const INGRESS_FIELDS: &[&str] = &["from", "ports"];
const EGRESS_FIELDS: &[&str] = &["to", "ports"];
const PEER_FIELDS: &[&str] = &["selector", "namespace", "cidr", "except"];
const PORT_FIELDS: &[&str] = &["port", "protocol"];

pub(super) fn parse(
    cx: Cx<'_>,
    fields: &Fields<'_>,
    id: &ObjectRef,
    labels: Labels,
    label_entries: impl Fn(Cx<'_>, &str, &[(Node, Node)]) -> Result<Labels, ManifestError>,
) -> Result<NetworkPolicy, ManifestError> {
    fields.deny_unknown(cx, FIELDS)?;
    let (selector, service) = match (fields.key("selector"), fields.get("service")) {
        (Some(_), None) => {
            let selector = match fields.get("selector") {
                // `selector:` with nothing, or `{}`: the whole namespace.
                None => Labels::new(),
                Some(node) => label_entries(cx, "selector", mapping(cx, "selector", node)?)?,
            };
            (Some(selector), None)
        }
        (None, Some(node)) => {
            let name = string(cx, "service", node)?;
            rules::validate_name(name).map_err(cx.fail(node, "service"))?;
            (None, Some(name.to_owned()))
        }
        (Some(_), Some(node)) => {
            return Err(cx.invalid(node, "service", Problem::PolicyTarget));
        }
        (None, None) => {
            return Err(cx.invalid(fields.node, "selector", Problem::PolicyTarget));
        }
    };
    let ingress = parse_rules(cx, fields, "ingress", "from", &label_entries)?
        .into_iter()
        .map(|(from, ports)| IngressRule { from, ports })
        .collect();
    let egress: Vec<EgressRule> = parse_rules(cx, fields, "egress", "to", &label_entries)?
        .into_iter()
        .map(|(to, ports)| EgressRule { to, ports })
        .collect();
    let types = match fields.get("policyTypes") {
        None => PolicyTypes {
            ingress: true,
            egress: fields.get("egress").is_some(),
        },
        Some(node) => {
            let entries = sequence(cx, "policyTypes", node)?;
            let mut types = PolicyTypes::default();
            for (i, entry) in entries.iter().enumerate() {
                let field = format!("policyTypes[{i}]");
                let value = string(cx, &field, entry)?;
                let slot = match value {
                    "Ingress" => &mut types.ingress,
                    "Egress" => &mut types.egress,
                    other => {
                        let problem = Problem::PolicyType {
                            value: other.to_owned(),
                        };
                        return Err(cx.invalid(entry, &field, problem));
                    }
                };
                *slot = true;
            }
            if !types.ingress && !types.egress {
                return Err(cx.invalid(node, "policyTypes", Problem::NoPolicyType));
            }
            types
        }
    };
    if let Some(node) = fields.get("egress") {
        if service.is_some() {
            return Err(cx.invalid(node, "egress", Problem::EgressOnService));
        }
        if !types.egress {
            return Err(cx.invalid(node, "egress", Problem::EgressNotInTypes));
        }
    }
    Ok(NetworkPolicy {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        labels,
        selector,
        service,
        types,
        ingress,
        egress,
    })
}

/// One rule's peers and ports, before it is known as ingress or egress.
type Rule = (Vec<Peer>, Vec<PolicyPort>);

/// The rules at `key` (`ingress` or `egress`), each with its peers (at
/// `peers_key`: `from` or `to`) and ports.
fn parse_rules(
    cx: Cx<'_>,
    fields: &Fields<'_>,
    key: &str,
    peers_key: &str,
    label_entries: &impl Fn(Cx<'_>, &str, &[(Node, Node)]) -> Result<Labels, ManifestError>,
) -> Result<Vec<Rule>, ManifestError> {
    let rule_nodes = match fields.get(key) {
        Some(node) => sequence(cx, key, node)?,
        None => &[],
    };
    if rule_nodes.len() > MAX_RULES {
        let node = fields.get(key).unwrap_or(fields.node);
        let too_many = Problem::TooMany {
            what: "rules",
            count: rule_nodes.len(),
            max: MAX_RULES,
        };
        return Err(cx.invalid(node, key, too_many));
    }
    let allowed: &'static [&'static str] = if peers_key == "from" {
        INGRESS_FIELDS
    } else {
        EGRESS_FIELDS
    };
    let mut out = Vec::with_capacity(rule_nodes.len());
    for (i, node) in rule_nodes.iter().enumerate() {
        let rule = Fields::new(cx, format!("{key}[{i}]"), node)?;
        rule.deny_unknown(cx, allowed)?;
        let peer_nodes = match rule.get(peers_key) {
            Some(node) => sequence(cx, &rule.path(peers_key), node)?,
            None => &[],
        };
        if peer_nodes.len() > MAX_PEERS {
            let too_many = Problem::TooMany {
                what: "peers",
                count: peer_nodes.len(),
                max: MAX_PEERS,
            };
            return Err(cx.invalid(node, &rule.path(peers_key), too_many));
        }
        let mut peers = Vec::with_capacity(peer_nodes.len());
        for (j, node) in peer_nodes.iter().enumerate() {
            let peer = Fields::new(cx, format!("{key}[{i}].{peers_key}[{j}]"), node)?;
            peer.deny_unknown(cx, PEER_FIELDS)?;
            peers.push(parse_peer(cx, &peer, label_entries)?);
        }
        let port_nodes = match rule.get("ports") {
            Some(node) => sequence(cx, &rule.path("ports"), node)?,
            None => &[],
        };
        let mut ports = Vec::with_capacity(port_nodes.len());
        for (j, node) in port_nodes.iter().enumerate() {
            let entry = Fields::new(cx, format!("{key}[{i}].ports[{j}]"), node)?;
            entry.deny_unknown(cx, PORT_FIELDS)?;
            let port_field = entry.path("port");
            let port_node = entry.require(cx, "port")?;
            let port = rules::validate_port(integer(cx, &port_field, port_node)?)
                .map_err(cx.fail(port_node, &port_field))?;
            let protocol_field = entry.path("protocol");
            let protocol_node = entry.require(cx, "protocol")?;
            let protocol = rules::validate_protocol(string(cx, &protocol_field, protocol_node)?)
                .map_err(cx.fail(protocol_node, &protocol_field))?;
            ports.push(PolicyPort { port, protocol });
        }
        out.push((peers, ports));
    }
    Ok(out)
}

fn parse_peer(
    cx: Cx<'_>,
    peer: &Fields<'_>,
    label_entries: &impl Fn(Cx<'_>, &str, &[(Node, Node)]) -> Result<Labels, ManifestError>,
) -> Result<Peer, ManifestError> {
    match (peer.key("selector"), peer.get("cidr")) {
        (Some(_), None) => {
            if let Some(key) = peer.key("except") {
                return Err(cx.invalid(key, &peer.path("except"), Problem::ExceptWithoutCidr));
            }
            let field = peer.path("selector");
            let selector = match peer.get("selector") {
                None => Labels::new(),
                Some(node) => label_entries(cx, &field, mapping(cx, &field, node)?)?,
            };
            let namespace = match peer.get("namespace") {
                None => None,
                Some(node) => {
                    let field = peer.path("namespace");
                    let value = string(cx, &field, node)?;
                    rules::validate_namespace(value).map_err(cx.fail(node, &field))?;
                    Some(value.to_owned())
                }
            };
            Ok(Peer::Endpoints {
                selector,
                namespace,
            })
        }
        (None, Some(node)) => {
            if let Some(key) = peer.key("namespace") {
                return Err(cx.invalid(key, &peer.path("namespace"), Problem::NamespaceWithCidr));
            }
            let field = peer.path("cidr");
            let cidr = validate_cidr(string(cx, &field, node)?).map_err(cx.fail(node, &field))?;
            let except_nodes = match peer.get("except") {
                Some(node) => sequence(cx, &peer.path("except"), node)?,
                None => &[],
            };
            if except_nodes.len() > MAX_EXCEPT {
                let too_many = Problem::TooMany {
                    what: "except entries",
                    count: except_nodes.len(),
                    max: MAX_EXCEPT,
                };
                return Err(cx.invalid(node, &peer.path("except"), too_many));
            }
            let mut except = Vec::with_capacity(except_nodes.len());
            for (k, node) in except_nodes.iter().enumerate() {
                let field = peer.path(&format!("except[{k}]"));
                let e = validate_cidr(string(cx, &field, node)?).map_err(cx.fail(node, &field))?;
                validate_except(cidr, e).map_err(cx.fail(node, &field))?;
                except.push(e);
            }
            Ok(Peer::Cidr { cidr, except })
        }
        _ => Err(cx.invalid(peer.node, &peer.path, Problem::PeerKind)),
    }
}
