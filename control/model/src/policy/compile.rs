//! Network policies compiled for the data plane ([`CompiledPolicy`]).
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
//! identity (flows denied to it); [`CompiledPolicy::slots`] says which.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sluice_common::types::IDENTITY_ANY;

use super::compiled::{CompiledPolicy, IdentityEntry, LabelSet, PolicyRef, RuleEntry, Slot};
use super::{Cidr, NetworkPolicy, Peer, PolicyPort};
use crate::endpoint::Endpoint;
use crate::kind::Labels;
use crate::service::Service;
use crate::view::ServiceRef;

pub const FIRST_ENDPOINT_IDENTITY: u32 = 256;
/// Protected service VIPs.
pub const FIRST_VIP_IDENTITY: u32 = 1 << 23;
pub const FIRST_CIDR_IDENTITY: u32 = 1 << 24;

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What a policy restricts for a label set.
struct Selection<'a> {
    policy: &'a NetworkPolicy,
}

impl Selection<'_> {
    /// The endpoints it selects (a policy on a service's VIP selects none).
    fn endpoints(&self, set: &LabelSet) -> bool {
        match &self.policy.selector {
            Some(selector) => {
                set.namespace == self.policy.namespace && selects(selector, &set.labels)
            }
            None => false,
        }
    }

    fn ingress(&self, set: &LabelSet) -> bool {
        self.policy.types.ingress && self.endpoints(set)
    }

    fn egress(&self, set: &LabelSet) -> bool {
        self.policy.types.egress && self.endpoints(set)
    }
}

/// The compiled policy of the cluster. Pure: the order of the inputs does
/// not matter.
pub fn compile<'a>(
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    services: impl IntoIterator<Item = &'a Service>,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> CompiledPolicy {
    let mut policies: Vec<&NetworkPolicy> = policies.into_iter().collect();
    if policies.is_empty() {
        return CompiledPolicy::default();
    }
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let services: HashMap<(&str, &str), &Service> = services
        .into_iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    let mut endpoints: Vec<&Endpoint> = endpoints.into_iter().collect();
    endpoints.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Endpoint identities; an address shared by endpoints takes the first's.
    let mut sets: BTreeSet<LabelSet> = BTreeSet::new();
    let mut by_address: BTreeMap<Ipv4Addr, LabelSet> = BTreeMap::new();
    for e in &endpoints {
        let set = LabelSet {
            namespace: e.namespace.clone(),
            labels: e.labels.clone(),
        };
        sets.insert(set.clone());
        by_address.entry(e.address).or_insert(set);
    }
    let ids: HashMap<&LabelSet, u32> = sets.iter().zip(FIRST_ENDPOINT_IDENTITY..).collect();

    let mut slots = vec![Slot::Unused];
    let mut new_slot = |slot: Slot| {
        slots.push(slot);
        slots.len() as u32 - 1
    };
    let policy_slot: Vec<u32> = policies
        .iter()
        .map(|p| {
            new_slot(Slot::AllowedBy(PolicyRef {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            }))
        })
        .collect();
    let selections: Vec<Selection<'_>> = policies
        .iter()
        .map(|&policy| Selection { policy })
        .collect();
    let mut deny_slot: HashMap<u32, u32> = HashMap::new();
    let mut egress_slot: HashMap<u32, u32> = HashMap::new();
    for set in &sets {
        if selections.iter().any(|s| s.ingress(set)) {
            deny_slot.insert(ids[set], new_slot(Slot::DeniedTo(set.clone())));
        }
        if selections.iter().any(|s| s.egress(set)) {
            egress_slot.insert(ids[set], new_slot(Slot::EgressDeniedFrom(set.clone())));
        }
    }

    // VIP identities: one per protected service (that exists), shared by
    // every policy on it.
    let mut vips: BTreeMap<ServiceRef, (Ipv4Addr, u32)> = BTreeMap::new();
    for p in &policies {
        let Some(service) = &p.service else {
            continue;
        };
        let Some(found) = services.get(&(p.namespace.as_str(), service.as_str())) else {
            continue;
        };
        let target = ServiceRef {
            namespace: p.namespace.clone(),
            name: service.clone(),
        };
        let identity = FIRST_VIP_IDENTITY + vips.len() as u32;
        vips.entry(target).or_insert_with_key(|target| {
            deny_slot.insert(identity, new_slot(Slot::DeniedToService(target.clone())));
            (found.vip, identity)
        });
    }

    // CIDR identities: every prefix a peer names, excepts included.
    let mut cidrs: BTreeSet<Cidr> = BTreeSet::new();
    for p in &policies {
        let peers = p
            .ingress
            .iter()
            .flat_map(|r| &r.from)
            .chain(p.egress.iter().flat_map(|r| &r.to));
        for peer in peers {
            if let Peer::Cidr { cidr, except } = peer {
                cidrs.insert(*cidr);
                cidrs.extend(except.iter().copied());
            }
        }
    }
    let cidr_ids: BTreeMap<Cidr, u32> = cidrs.into_iter().zip(FIRST_CIDR_IDENTITY..).collect();

    let host = |addr: Ipv4Addr| Ipv4Net::from(addr);
    let mut identities: Vec<IdentityEntry> = by_address
        .iter()
        .map(|(&address, set)| {
            let identity = ids[set];
            IdentityEntry {
                prefix: host(address),
                identity,
                enforced: deny_slot.contains_key(&identity),
                stats_slot: deny_slot.get(&identity).copied().unwrap_or(0),
                egress_enforced: egress_slot.contains_key(&identity),
                egress_slot: egress_slot.get(&identity).copied().unwrap_or(0),
            }
        })
        .collect();
    identities.extend(vips.values().map(|&(vip, identity)| IdentityEntry {
        prefix: host(vip),
        identity,
        enforced: true,
        stats_slot: deny_slot[&identity],
        egress_enforced: false,
        egress_slot: 0,
    }));
    let endpoint_prefixes: BTreeSet<Ipv4Net> = identities.iter().map(|i| i.prefix).collect();
    identities.extend(
        cidr_ids
            .iter()
            .filter(|(cidr, _)| !endpoint_prefixes.contains(cidr))
            .map(|(&prefix, &identity)| IdentityEntry {
                prefix,
                identity,
                enforced: false,
                stats_slot: 0,
                egress_enforced: false,
                egress_slot: 0,
            }),
    );

    // The identities `peers` name: endpoints by selector (and namespace),
    // CIDRs minus their excepts; no peer at all: everyone.
    let identities_of = |peers: &[Peer]| -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        if peers.is_empty() {
            out.insert(IDENTITY_ANY);
        }
        for peer in peers {
            match peer {
                Peer::Endpoints {
                    selector,
                    namespace,
                } => out.extend(
                    sets.iter()
                        .filter(|set| namespace.as_ref().is_none_or(|ns| &set.namespace == ns))
                        .filter(|set| selects(selector, &set.labels))
                        .map(|set| ids[set]),
                ),
                Peer::Cidr { cidr, except } => out.extend(
                    cidr_ids
                        .iter()
                        .filter(|(c, _)| {
                            cidr.contains(*c) && !except.iter().any(|e| e.contains(*c))
                        })
                        .map(|(_, &id)| id),
                ),
            }
        }
        out
    };
    let ports_of = |ports: &[PolicyPort]| -> Vec<(u16, u8)> {
        if ports.is_empty() {
            vec![(0, 0)]
        } else {
            ports
                .iter()
                .map(|p| (p.port, p.protocol.ip_proto()))
                .collect()
        }
    };

    // (egress, dst, src, port, protocol) → the allowing policy's slot; the
    // first policy (in name order) that allows it counts it.
    let mut rules: BTreeMap<(bool, u32, u32, u16, u8), u32> = BTreeMap::new();
    for ((p, selection), &slot) in policies.iter().zip(&selections).zip(&policy_slot) {
        let protected_vip = p.service.as_ref().and_then(|service| {
            vips.get(&ServiceRef {
                namespace: p.namespace.clone(),
                name: service.clone(),
            })
        });
        let targets: Vec<u32> = match protected_vip {
            Some(&(_, identity)) => vec![identity],
            None => sets
                .iter()
                .filter(|set| selection.ingress(set))
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
            .filter(|set| selection.egress(set))
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
    CompiledPolicy {
        identities,
        rules: rules
            .into_iter()
            .map(
                |((egress, dst, src, port, protocol), stats_slot)| RuleEntry {
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

#[cfg(test)]
mod tests;
