//! `kind: NetworkPolicy` in a manifest (see [`crate::policy`]).

use super::ManifestError;
use super::yaml::{Cx, Fields, Node, integer, mapping, sequence, string};
use crate::kind::{Labels, ObjectRef};
use crate::policy::*;
use crate::rules::{self, Problem};

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
        None => PolicyTypes::implied(fields.get("egress").is_some()),
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
