//! Network policies compiled for the data plane.
//!
//! Identities, as Cilium assigns them: every distinct (namespace, label set)
//! of the endpoints gets a number (from [`FIRST_ENDPOINT_IDENTITY`], in
//! sorted order, so the compilation is a pure function of the objects), and
//! every CIDR a rule names gets one too (from [`FIRST_CIDR_IDENTITY`]). Each
//! endpoint address maps to its identity as a /32; each CIDR as its prefix,
//! so that the longest prefix decides: an `except` is a longer prefix whose
//! identity the rule leaves out, and an endpoint inside a CIDR is matched by
//! its own identity — CIDR peers are for addresses outside the cluster's
//! endpoints, which selectors name. An identity that some policy selects is
//! *enforced*: default-deny for ingress; rules are the union of what every
//! policy selecting it allows.
//!
//! A policy with `service:` protects that service's VIP instead: the VIP gets
//! an enforced identity of its own, checked before the backend's, with the
//! rules' ports read as the service's ports.
//!
//! Counter slots: one per policy (flows it allowed), then one per enforced
//! identity (flows denied to it); `PolicyView.slots` names them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sluice_api::v1;
use sluice_model::policy;

use crate::server::state::Named;

pub const FIRST_ENDPOINT_IDENTITY: u32 = 256;
/// Protected service VIPs.
pub const FIRST_VIP_IDENTITY: u32 = 1 << 23;
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;
/// In a rule: every source.
const ANY: u32 = 0;

type LabelSet = (String, BTreeMap<String, String>);

fn selects(
    selector: &std::collections::HashMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn namespace_of(meta: Option<&v1::ObjectMeta>) -> String {
    match meta {
        Some(m) if !m.namespace.is_empty() => m.namespace.clone(),
        _ => "default".to_owned(),
    }
}

/// The compiled policy of the cluster (the same for every node).
pub fn compile(
    policies: &BTreeMap<Named, v1::NetworkPolicy>,
    services: &BTreeMap<Named, v1::Service>,
    endpoints: &BTreeMap<Named, v1::Endpoint>,
) -> v1::PolicyView {
    if policies.is_empty() {
        return v1::PolicyView::default();
    }
    // Endpoint identities.
    let mut sets: BTreeSet<LabelSet> = BTreeSet::new();
    let mut by_address: BTreeMap<String, LabelSet> = BTreeMap::new();
    for ((ns, _), e) in endpoints {
        let labels: BTreeMap<String, String> = e
            .meta
            .as_ref()
            .map(|m| m.labels.clone().into_iter().collect())
            .unwrap_or_default();
        let set = (ns.clone(), labels);
        sets.insert(set.clone());
        by_address.entry(e.address.clone()).or_insert(set);
    }
    let ids: HashMap<&LabelSet, u32> = sets.iter().zip(FIRST_ENDPOINT_IDENTITY..).collect();

    let mut slots = vec![String::new()];
    let policy_slot: HashMap<&Named, u32> = policies
        .keys()
        .map(|key| {
            slots.push(format!("allowed by {}/{}", key.0, key.1));
            (key, slots.len() as u32 - 1)
        })
        .collect();
    // A policy with a service protects that service's VIP, no endpoint.
    let selects_endpoints = |p: &v1::NetworkPolicy, set: &LabelSet| {
        p.service.is_empty()
            && set.0 == namespace_of(p.meta.as_ref())
            && selects(&p.selector, &set.1)
    };
    let selected_by = |p: &v1::NetworkPolicy, set: &LabelSet| {
        restricts(p, v1::PolicyType::Ingress) && selects_endpoints(p, set)
    };
    let egress_selected_by = |p: &v1::NetworkPolicy, set: &LabelSet| {
        restricts(p, v1::PolicyType::Egress) && selects_endpoints(p, set)
    };
    let mut deny_slot: HashMap<u32, u32> = HashMap::new();
    let mut egress_slot: HashMap<u32, u32> = HashMap::new();
    for set in &sets {
        if policies.values().any(|p| selected_by(p, set)) {
            slots.push(format!("denied to {}", describe(set)));
            deny_slot.insert(ids[set], slots.len() as u32 - 1);
        }
        if policies.values().any(|p| egress_selected_by(p, set)) {
            slots.push(format!("egress denied from {}", describe(set)));
            egress_slot.insert(ids[set], slots.len() as u32 - 1);
        }
    }

    // VIP identities: one per protected service (that exists, with a VIP),
    // shared by every policy on it.
    let mut vips: BTreeMap<Named, (String, u32)> = BTreeMap::new();
    for (key, p) in policies {
        if p.service.is_empty() {
            continue;
        }
        let target = (key.0.clone(), p.service.clone());
        let Some(service) = services.get(&target).filter(|s| !s.vip.is_empty()) else {
            continue;
        };
        let identity = FIRST_VIP_IDENTITY + vips.len() as u32;
        vips.entry(target).or_insert_with_key(|(ns, name)| {
            slots.push(format!("denied to service {ns}/{name}"));
            deny_slot.insert(identity, slots.len() as u32 - 1);
            (service.vip.clone(), identity)
        });
    }

    // CIDR identities: every prefix a peer names, excepts included.
    let mut cidrs: BTreeSet<policy::Cidr> = BTreeSet::new();
    for p in policies.values() {
        let peers = p
            .ingress
            .iter()
            .flat_map(|r| &r.from)
            .chain(p.egress.iter().flat_map(|r| &r.to))
            .filter(|peer| !peer.cidr.is_empty());
        for peer in peers {
            cidrs.extend(policy::validate_cidr(&peer.cidr).ok());
            cidrs.extend(
                peer.except
                    .iter()
                    .filter_map(|e| policy::validate_cidr(e).ok()),
            );
        }
    }
    let cidr_ids: BTreeMap<policy::Cidr, u32> =
        cidrs.into_iter().zip(FIRST_CIDR_IDENTITY..).collect();

    let mut identities: Vec<v1::PolicyIdentity> = by_address
        .iter()
        .map(|(address, set)| {
            let identity = ids[set];
            v1::PolicyIdentity {
                prefix: format!("{address}/32"),
                identity,
                enforced: deny_slot.contains_key(&identity),
                stats_slot: deny_slot.get(&identity).copied().unwrap_or(0),
                egress_enforced: egress_slot.contains_key(&identity),
                egress_slot: egress_slot.get(&identity).copied().unwrap_or(0),
            }
        })
        .collect();
    identities.extend(vips.values().map(|(vip, identity)| v1::PolicyIdentity {
        prefix: format!("{vip}/32"),
        identity: *identity,
        enforced: true,
        stats_slot: deny_slot[identity],
        egress_enforced: false,
        egress_slot: 0,
    }));
    let endpoint_prefixes: BTreeSet<String> = identities.iter().map(|i| i.prefix.clone()).collect();
    identities.extend(
        cidr_ids
            .iter()
            .filter(|(cidr, _)| !endpoint_prefixes.contains(&cidr.to_string()))
            .map(|(cidr, &identity)| v1::PolicyIdentity {
                prefix: cidr.to_string(),
                identity,
                enforced: false,
                stats_slot: 0,
                egress_enforced: false,
                egress_slot: 0,
            }),
    );

    // The identities `peers` name: endpoints by selector (and namespace),
    // CIDRs minus their excepts; no peer at all: everyone.
    let identities_of = |peers: &[v1::PolicyPeer]| -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        if peers.is_empty() {
            out.insert(ANY);
        }
        for peer in peers {
            if peer.cidr.is_empty() {
                out.extend(
                    sets.iter()
                        .filter(|set| peer.namespace.is_empty() || set.0 == peer.namespace)
                        .filter(|set| selects(&peer.selector, &set.1))
                        .map(|set| ids[set]),
                );
            } else if let Ok(cidr) = policy::validate_cidr(&peer.cidr) {
                let except: Vec<policy::Cidr> = peer
                    .except
                    .iter()
                    .filter_map(|e| policy::validate_cidr(e).ok())
                    .collect();
                out.extend(
                    cidr_ids
                        .iter()
                        .filter(|(c, _)| {
                            cidr.contains(*c) && !except.iter().any(|e| e.contains(*c))
                        })
                        .map(|(_, &id)| id),
                );
            }
        }
        out
    };
    let ports_of = |ports: &[v1::PolicyPort]| -> Vec<(u32, u32)> {
        if ports.is_empty() {
            vec![(0, 0)]
        } else {
            ports
                .iter()
                .map(|p| (p.port, protocol_number(p.protocol)))
                .collect()
        }
    };

    // (egress, dst, src, port, protocol) → the allowing policy's slot.
    let mut rules: BTreeMap<(bool, u32, u32, u32, u32), u32> = BTreeMap::new();
    for (key, p) in policies {
        let slot = policy_slot[key];
        let protected_vip = vips.get(&(key.0.clone(), p.service.clone()));
        let targets: Vec<u32> = match protected_vip {
            Some((_, identity)) => vec![*identity],
            None => sets
                .iter()
                .filter(|set| selected_by(p, set))
                .map(|set| ids[set])
                .collect(),
        };
        for rule in &p.ingress {
            let sources = identities_of(&rule.from);
            for &dst in &targets {
                for &src in &sources {
                    for (port, protocol) in ports_of(&rule.ports) {
                        rules
                            .entry((false, dst, src, port, protocol))
                            .or_insert(slot);
                    }
                }
            }
        }
        let restricted: Vec<u32> = sets
            .iter()
            .filter(|set| egress_selected_by(p, set))
            .map(|set| ids[set])
            .collect();
        for rule in &p.egress {
            let destinations = identities_of(&rule.to);
            for &src in &restricted {
                for &dst in &destinations {
                    for (port, protocol) in ports_of(&rule.ports) {
                        rules
                            .entry((true, dst, src, port, protocol))
                            .or_insert(slot);
                    }
                }
            }
        }
    }
    v1::PolicyView {
        identities,
        rules: rules
            .into_iter()
            .map(
                |((egress, dst, src, port, protocol), stats_slot)| v1::PolicyRuleView {
                    egress,
                    dst,
                    src,
                    port,
                    protocol,
                    stats_slot,
                },
            )
            .collect(),
        slots,
    }
}

/// Whether `p` restricts `kind` for what it selects: as Kubernetes, with no
/// types listed, ingress always and egress when it has egress rules.
fn restricts(p: &v1::NetworkPolicy, kind: v1::PolicyType) -> bool {
    if p.policy_types.is_empty() {
        return match kind {
            v1::PolicyType::Egress => !p.egress.is_empty(),
            _ => true,
        };
    }
    p.policy_types.contains(&(kind as i32))
}

fn protocol_number(protocol: i32) -> u32 {
    match v1::Protocol::try_from(protocol) {
        Ok(v1::Protocol::Udp) => 17,
        _ => 6,
    }
}

fn describe(set: &LabelSet) -> String {
    let labels: Vec<String> = set.1.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{}:{{{}}}", set.0, labels.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(
        ns: &str,
        name: &str,
        address: &str,
        labels: &[(&str, &str)],
    ) -> (Named, v1::Endpoint) {
        (
            (ns.into(), name.into()),
            v1::Endpoint {
                meta: Some(v1::ObjectMeta {
                    namespace: ns.into(),
                    name: name.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                address: address.into(),
                ready: true,
                ..Default::default()
            },
        )
    }

    fn policy(
        ns: &str,
        name: &str,
        selector: &[(&str, &str)],
        ingress: Vec<v1::IngressRule>,
    ) -> (Named, v1::NetworkPolicy) {
        (
            (ns.into(), name.into()),
            v1::NetworkPolicy {
                meta: Some(v1::ObjectMeta {
                    namespace: ns.into(),
                    name: name.into(),
                    ..Default::default()
                }),
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ingress,
                service: String::new(),
                egress: Default::default(),
                policy_types: Default::default(),
            },
        )
    }

    #[test]
    fn selectors_cidrs_and_excepts_become_identities_and_rules() {
        let endpoints: BTreeMap<_, _> = [
            endpoint("shop", "web-1", "198.19.0.11", &[("app", "web")]),
            endpoint("shop", "web-2", "198.19.0.12", &[("app", "web")]),
            endpoint("shop", "front", "198.19.0.20", &[("app", "frontend")]),
            endpoint("other", "front", "198.19.0.30", &[("app", "frontend")]),
        ]
        .into();
        let rule = v1::IngressRule {
            from: vec![
                v1::PolicyPeer {
                    selector: [("app".into(), "frontend".into())].into(),
                    namespace: "shop".into(),
                    ..Default::default()
                },
                v1::PolicyPeer {
                    cidr: "198.18.1.0/24".into(),
                    except: vec!["198.18.1.128/25".into()],
                    ..Default::default()
                },
            ],
            ports: vec![v1::PolicyPort {
                port: 8080,
                protocol: v1::Protocol::Tcp as i32,
            }],
        };
        let policies: BTreeMap<_, _> =
            [policy("shop", "web-ingress", &[("app", "web")], vec![rule])].into();
        let view = compile(&policies, &BTreeMap::new(), &endpoints);
        let identity = |prefix: &str| {
            view.identities
                .iter()
                .find(|i| i.prefix == prefix)
                .unwrap_or_else(|| panic!("no {prefix} in {view:?}"))
                .clone()
        };
        let web = identity("198.19.0.11/32");
        assert!(web.enforced);
        assert_eq!(
            identity("198.19.0.12/32").identity,
            web.identity,
            "one label set, one identity"
        );
        let front = identity("198.19.0.20/32");
        assert!(!front.enforced);
        let elsewhere = identity("198.19.0.30/32");
        assert_ne!(
            elsewhere.identity, front.identity,
            "another namespace, another identity"
        );
        let cidr = identity("198.18.1.0/24");
        let except = identity("198.18.1.128/25");
        let allowed: BTreeSet<u32> = view.rules.iter().map(|r| r.src).collect();
        assert_eq!(allowed, BTreeSet::from([front.identity, cidr.identity]));
        assert!(!allowed.contains(&except.identity) && !allowed.contains(&elsewhere.identity));
        assert!(
            view.rules
                .iter()
                .all(|r| r.dst == web.identity && r.port == 8080 && r.protocol == 6)
        );
        assert_eq!(
            view.slots[view.rules[0].stats_slot as usize],
            "allowed by shop/web-ingress"
        );
        assert!(view.slots[web.stats_slot as usize].starts_with("denied to shop:"));
        // No policy: nothing to enforce, nothing sent.
        assert_eq!(
            compile(&BTreeMap::new(), &BTreeMap::new(), &endpoints),
            v1::PolicyView::default()
        );
    }

    #[test]
    fn a_service_policy_protects_its_vip_and_no_endpoint() {
        let endpoints: BTreeMap<_, _> =
            [endpoint("shop", "web-1", "198.19.0.11", &[("app", "web")])].into();
        let services: BTreeMap<Named, v1::Service> = [(
            ("shop".to_owned(), "web".to_owned()),
            v1::Service {
                vip: "198.18.100.7".into(),
                ..Default::default()
            },
        )]
        .into();
        let (key, mut p) = policy(
            "shop",
            "web-vip",
            &[],
            vec![v1::IngressRule {
                from: vec![v1::PolicyPeer {
                    cidr: "198.18.1.0/24".into(),
                    ..Default::default()
                }],
                ports: vec![v1::PolicyPort {
                    port: 80,
                    protocol: v1::Protocol::Tcp as i32,
                }],
            }],
        );
        p.service = "web".into();
        let view = compile(&[(key, p)].into(), &services, &endpoints);
        let enforced: Vec<&str> = view
            .identities
            .iter()
            .filter(|i| i.enforced)
            .map(|i| i.prefix.as_str())
            .collect();
        assert_eq!(enforced, ["198.18.100.7/32"], "{view:?}");
        assert!(
            view.rules
                .iter()
                .all(|r| r.dst >= FIRST_VIP_IDENTITY && r.port == 80)
        );
        assert_eq!(view.rules.len(), 1);
    }

    #[test]
    fn egress_policies_restrict_their_sources_only() {
        let endpoints: BTreeMap<_, _> = [
            endpoint("shop", "client", "198.18.1.2", &[("app", "client")]),
            endpoint("shop", "web", "198.19.0.11", &[("app", "web")]),
            endpoint("shop", "db", "198.19.0.13", &[("app", "db")]),
        ]
        .into();
        let (key, mut p) = policy("shop", "client-out", &[("app", "client")], Vec::new());
        p.policy_types = vec![v1::PolicyType::Egress as i32];
        p.egress = vec![v1::EgressRule {
            to: vec![v1::PolicyPeer {
                selector: [("app".into(), "web".into())].into(),
                ..Default::default()
            }],
            ports: vec![v1::PolicyPort {
                port: 8080,
                protocol: v1::Protocol::Tcp as i32,
            }],
        }];
        let view = compile(&[(key, p)].into(), &BTreeMap::new(), &endpoints);
        let identity = |prefix: &str| {
            view.identities
                .iter()
                .find(|i| i.prefix == prefix)
                .cloned()
                .unwrap_or_else(|| panic!("no {prefix}"))
        };
        let client = identity("198.18.1.2/32");
        assert!(client.egress_enforced && !client.enforced, "{client:?}");
        let web = identity("198.19.0.11/32");
        assert!(!web.enforced && !web.egress_enforced);
        assert_eq!(view.rules.len(), 1);
        let rule = &view.rules[0];
        assert!(rule.egress && rule.src == client.identity && rule.dst == web.identity);
        assert_eq!((rule.port, rule.protocol), (8080, 6));
        assert!(view.slots[client.egress_slot as usize].starts_with("egress denied from shop:"));
    }

    #[test]
    fn an_empty_selector_with_no_rules_denies_the_whole_namespace() {
        let endpoints: BTreeMap<_, _> = [
            endpoint("shop", "a", "198.19.0.11", &[("app", "a")]),
            endpoint("shop", "b", "198.19.0.12", &[("app", "b")]),
            endpoint("open", "c", "198.19.0.13", &[("app", "c")]),
        ]
        .into();
        let policies: BTreeMap<_, _> = [policy("shop", "deny-all", &[], Vec::new())].into();
        let view = compile(&policies, &BTreeMap::new(), &endpoints);
        let enforced: Vec<&str> = view
            .identities
            .iter()
            .filter(|i| i.enforced)
            .map(|i| i.prefix.as_str())
            .collect();
        assert_eq!(enforced, ["198.19.0.11/32", "198.19.0.12/32"]);
        assert!(view.rules.is_empty());
    }
}
