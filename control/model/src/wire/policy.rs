//! Network policies.

use sluice_api::v1;

use super::{
    Check, ObjectError, from_labels, from_meta, meta, optional, port, protocol_from_proto, to_map,
};
use crate::kind::{ObjectKind, ObjectRef};
use crate::policy::{self, EgressRule, IngressRule, NetworkPolicy, Peer, PolicyPort, PolicyTypes};
use crate::rules::{self, Problem};

fn peers_to_proto(peers: &[Peer]) -> Vec<v1::PolicyPeer> {
    peers
        .iter()
        .map(|peer| match peer {
            Peer::Endpoints {
                selector,
                namespace,
            } => v1::PolicyPeer {
                selector: to_map(selector),
                namespace: namespace.clone().unwrap_or_default(),
                ..Default::default()
            },
            Peer::Cidr { cidr, except } => v1::PolicyPeer {
                cidr: cidr.to_string(),
                except: except.iter().map(ToString::to_string).collect(),
                ..Default::default()
            },
        })
        .collect()
}

fn ports_to_proto(ports: &[PolicyPort]) -> Vec<v1::PolicyPort> {
    ports
        .iter()
        .map(|p| v1::PolicyPort {
            port: p.port.into(),
            protocol: v1::Protocol::from(p.protocol) as i32,
        })
        .collect()
}

impl From<&NetworkPolicy> for v1::NetworkPolicy {
    fn from(policy: &NetworkPolicy) -> Self {
        let NetworkPolicy {
            namespace,
            name,
            labels,
            selector,
            service,
            types,
            ingress,
            egress,
        } = policy;
        let mut policy_types = Vec::new();
        if types.ingress {
            policy_types.push(v1::PolicyType::Ingress as i32);
        }
        if types.egress {
            policy_types.push(v1::PolicyType::Egress as i32);
        }
        Self {
            meta: meta(namespace, name, labels),
            selector: selector.as_ref().map(to_map).unwrap_or_default(),
            service: service.clone().unwrap_or_default(),
            ingress: ingress
                .iter()
                .map(|rule| v1::IngressRule {
                    from: peers_to_proto(&rule.from),
                    ports: ports_to_proto(&rule.ports),
                })
                .collect(),
            egress: egress
                .iter()
                .map(|rule| v1::EgressRule {
                    to: peers_to_proto(&rule.to),
                    ports: ports_to_proto(&rule.ports),
                })
                .collect(),
            policy_types,
        }
    }
}

/// Peers and ports of one rule at `at` (`ingress[0]`), validated as a manifest's.
fn rule_from_proto(
    check: &Check,
    at: &str,
    peers_key: &str,
    peers: Vec<v1::PolicyPeer>,
    ports: Vec<v1::PolicyPort>,
) -> Result<(Vec<Peer>, Vec<PolicyPort>), ObjectError> {
    if peers.len() > policy::MAX_PEERS {
        return Err(check.at(format!("{at}.{peers_key}"))(Problem::TooMany {
            what: "peers",
            count: peers.len(),
            max: policy::MAX_PEERS,
        }));
    }
    let mut out = Vec::with_capacity(peers.len());
    for (j, peer) in peers.into_iter().enumerate() {
        let field = |name: &str| format!("{at}.{peers_key}[{j}].{name}");
        let v1::PolicyPeer {
            selector,
            namespace,
            cidr,
            except,
        } = peer;
        if cidr.is_empty() {
            if !except.is_empty() {
                return Err(check.at(field("except"))(Problem::ExceptWithoutCidr));
            }
            let selector = from_labels(check, &field("selector"), selector)?;
            let namespace = optional(
                check,
                &field("namespace"),
                namespace,
                rules::validate_namespace,
            )?;
            out.push(Peer::Endpoints {
                selector,
                namespace,
            });
            continue;
        }
        if !selector.is_empty() {
            return Err(check.at(format!("{at}.{peers_key}[{j}]"))(
                Problem::PeerKind,
            ));
        }
        if !namespace.is_empty() {
            return Err(check.at(field("namespace"))(Problem::NamespaceWithCidr));
        }
        let cidr = policy::validate_cidr(&cidr).map_err(check.at(field("cidr")))?;
        if except.len() > policy::MAX_EXCEPT {
            return Err(check.at(field("except"))(Problem::TooMany {
                what: "except entries",
                count: except.len(),
                max: policy::MAX_EXCEPT,
            }));
        }
        let mut excepted = Vec::with_capacity(except.len());
        for (k, e) in except.iter().enumerate() {
            let at = field(&format!("except[{k}]"));
            let e = policy::validate_cidr(e).map_err(check.at(&at))?;
            policy::validate_except(cidr, e).map_err(check.at(&at))?;
            excepted.push(e);
        }
        out.push(Peer::Cidr {
            cidr,
            except: excepted,
        });
    }
    let mut domain_ports = Vec::with_capacity(ports.len());
    for (j, p) in ports.into_iter().enumerate() {
        let port = port(check, &format!("{at}.ports[{j}].port"), p.port)?;
        let protocol = protocol_from_proto(p.protocol)
            .map_err(check.at(format!("{at}.ports[{j}].protocol")))?;
        domain_ports.push(PolicyPort { port, protocol });
    }
    Ok((out, domain_ports))
}

impl TryFrom<v1::NetworkPolicy> for NetworkPolicy {
    type Error = ObjectError;

    fn try_from(policy: v1::NetworkPolicy) -> Result<Self, ObjectError> {
        let v1::NetworkPolicy {
            meta,
            selector,
            ingress,
            service,
            egress,
            policy_types,
        } = policy;
        let (check, labels) = from_meta(ObjectKind::NetworkPolicy, meta)?;
        // proto3 cannot tell an empty selector from none: without a service,
        // empty is the whole namespace, as `selector: {}` in a manifest.
        let (selector, service) = if service.is_empty() {
            (Some(from_labels(&check, "selector", selector)?), None)
        } else {
            if !selector.is_empty() {
                return Err(check.at("service")(Problem::PolicyTarget));
            }
            rules::validate_name(&service).map_err(check.at("service"))?;
            (None, Some(service))
        };
        for (key, count) in [("ingress", ingress.len()), ("egress", egress.len())] {
            if count > policy::MAX_RULES {
                return Err(check.at(key)(Problem::TooMany {
                    what: "rules",
                    count,
                    max: policy::MAX_RULES,
                }));
            }
        }
        let mut types = PolicyTypes::default();
        for (i, value) in policy_types.iter().enumerate() {
            match v1::PolicyType::try_from(*value) {
                Ok(v1::PolicyType::Ingress) => types.ingress = true,
                Ok(v1::PolicyType::Egress) => types.egress = true,
                _ => {
                    return Err(check.at(format!("policyTypes[{i}]"))(Problem::PolicyType {
                        value: value.to_string(),
                    }));
                }
            }
        }
        if policy_types.is_empty() {
            types = PolicyTypes::implied(!egress.is_empty());
        }
        if !egress.is_empty() && service.is_some() {
            return Err(check.at("egress")(Problem::EgressOnService));
        }
        if !egress.is_empty() && !types.egress {
            return Err(check.at("egress")(Problem::EgressNotInTypes));
        }
        let mut domain_ingress = Vec::with_capacity(ingress.len());
        for (i, v1::IngressRule { from, ports }) in ingress.into_iter().enumerate() {
            let (from, ports) =
                rule_from_proto(&check, &format!("ingress[{i}]"), "from", from, ports)?;
            domain_ingress.push(IngressRule { from, ports });
        }
        let mut domain_egress = Vec::with_capacity(egress.len());
        for (i, v1::EgressRule { to, ports }) in egress.into_iter().enumerate() {
            let (to, ports) = rule_from_proto(&check, &format!("egress[{i}]"), "to", to, ports)?;
            domain_egress.push(EgressRule { to, ports });
        }
        let ObjectRef {
            namespace, name, ..
        } = check.object;
        Ok(Self {
            namespace,
            name,
            labels,
            selector,
            service,
            types,
            ingress: domain_ingress,
            egress: domain_egress,
        })
    }
}
