//! The frontends of a view, from services and endpoints.
//!
//! A service's backends are its static ones, or the ready endpoints its
//! selector matches in its namespace; a rollout turns their weights into its
//! shares ([`rollout_weights`]); a topology-aware service adds each zone's
//! weights; a health-checked one names each backend's probers.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use super::{Frontend, FrontendKey, Frontends, ServiceRef, ViewBackend, ZoneWeights};
use crate::endpoint::{Endpoint, VERSION_LABEL};
use crate::kind::Labels;
use crate::service::{Algorithm, Service};
use crate::traffic::{probe_port, rollout_weights};

/// How many nodes probe each backend of a health-checked service.
pub const PROBERS_PER_BACKEND: usize = 3;

/// The frontends every node must program. `nodes` are the cluster's nodes,
/// among which each health-checked backend gets its probers (none for a
/// standalone agent: then it probes every backend itself).
pub fn frontends<'a>(
    nodes: &[&str],
    services: impl IntoIterator<Item = &'a Service>,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
) -> Frontends {
    let index = EndpointIndex::new(endpoints);
    let mut out = Frontends::new();
    for service in services {
        let name = ServiceRef {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        };
        let (mut backends, zones) = resolve_zoned(service, &index);
        if service.traffic.health_check.is_some() {
            let label = name.to_string();
            for backend in &mut backends {
                backend.probers = probers(nodes, &label, &backend.address.to_string());
            }
        }
        // One probe port for every port of the service: health is the
        // backend's. Validation made sure there is one.
        let health_check = service.traffic.health_check.as_ref().map(|check| {
            let mut check = check.clone();
            if let Some(port) = probe_port(&check, &service.ports) {
                check.probe = check.probe.with_port(port);
            }
            check
        });
        let algorithm = effective_algorithm(service);
        for port in &service.ports {
            let key = FrontendKey {
                vip: service.vip,
                port: port.port,
                protocol: port.protocol,
            };
            out.insert(
                key,
                Frontend {
                    key,
                    service: name.clone(),
                    target_port: port.target_port,
                    algorithm,
                    maglev_table_size: match algorithm {
                        Algorithm::Maglev => service.maglev_table_size(),
                        _ => 0,
                    },
                    health_check: health_check.clone(),
                    drain_timeout_seconds: service.traffic.drain_timeout_seconds,
                    session_affinity_seconds: service
                        .traffic
                        .session_affinity
                        .map(|a| a.timeout_seconds),
                    zones: zones.clone(),
                    backends: backends.clone(),
                },
            );
        }
    }
    out
}

/// The nodes that probe `address` for `service`: the [`PROBERS_PER_BACKEND`]
/// highest by rendezvous hash. Every node computes the same set, backends
/// spread evenly over nodes, and a node joining or leaving moves only the
/// backends it gains or loses.
pub fn probers(nodes: &[&str], service: &str, address: &str) -> Vec<String> {
    let score = |node: &str| {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for part in [node, service, address] {
            for byte in part.bytes().chain([0]) {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        // FNV alone clusters on similar names; one avalanche round spreads them.
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^ (hash >> 33)
    };
    let mut ranked: Vec<(u64, &str)> = nodes.iter().map(|n| (score(n), *n)).collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    let mut chosen: Vec<String> = ranked
        .into_iter()
        .take(PROBERS_PER_BACKEND)
        .map(|(_, n)| n.to_owned())
        .collect();
    chosen.sort();
    chosen
}

/// Endpoints by (namespace, label key, label value), so that resolving every
/// selector costs what the selectors match rather than services × endpoints.
pub struct EndpointIndex<'a> {
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Endpoint>>,
}

impl<'a> EndpointIndex<'a> {
    pub fn new(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Self {
        let mut by_label: HashMap<_, Vec<&'a Endpoint>> = HashMap::new();
        for endpoint in endpoints {
            for (key, value) in &endpoint.labels {
                by_label
                    .entry((endpoint.namespace.as_str(), key.as_str(), value.as_str()))
                    .or_default()
                    .push(endpoint);
            }
        }
        Self { by_label }
    }

    /// Endpoints of `namespace` carrying every label of `selector` (which
    /// must not be empty), ready or not, in no particular order.
    fn matching(&self, namespace: &str, selector: &Labels) -> Vec<&'a Endpoint> {
        // Start from the rarest label; the others filter.
        let postings: Option<Vec<&Vec<&'a Endpoint>>> = selector
            .iter()
            .map(|(k, v)| self.by_label.get(&(namespace, k.as_str(), v.as_str())))
            .collect();
        let Some(rarest) = postings.and_then(|p| p.into_iter().min_by_key(|list| list.len()))
        else {
            return Vec::new();
        };
        rarest
            .iter()
            .copied()
            .filter(|e| selector.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            .collect()
    }
}

/// A backend as resolution finds it, before shares are computed.
struct Candidate<'a> {
    weight: u32,
    version: Option<&'a str>,
    draining: bool,
    zone: Option<&'a str>,
}

/// A service's backends: static, or ready endpoints matching its selector in
/// its namespace. Sorted by address, one entry per address (the first
/// endpoint by name wins). A rollout turns the weights into its shares (zero
/// for the side that gets no new flows); draining backends stay listed,
/// marked, so that their established flows keep going.
pub fn resolve(service: &Service, index: &EndpointIndex<'_>) -> Vec<ViewBackend> {
    resolve_zoned(service, index).0
}

/// [`resolve`], and for a topology-aware service the weights a node of each
/// zone uses: the backends of that zone that take new flows, with their
/// weights (after any rollout); zones where none does are left out, so their
/// nodes use every backend.
fn resolve_zoned(
    service: &Service,
    index: &EndpointIndex<'_>,
) -> (Vec<ViewBackend>, Vec<ZoneWeights>) {
    let mut by_address: BTreeMap<Ipv4Addr, Candidate<'_>> = BTreeMap::new();
    if service.selector.is_empty() {
        for b in &service.backends {
            by_address.entry(b.address).or_insert(Candidate {
                weight: b.weight,
                version: b.version.as_deref(),
                draining: b.draining,
                zone: None,
            });
        }
    } else {
        let mut matching: Vec<&Endpoint> = index
            .matching(&service.namespace, &service.selector)
            .into_iter()
            .filter(|e| e.ready)
            .collect();
        matching.sort_by(|a, b| a.name.cmp(&b.name));
        for e in matching {
            by_address.entry(e.address).or_insert(Candidate {
                weight: e.weight,
                version: e.labels.get(VERSION_LABEL).map(String::as_str),
                draining: e.draining,
                zone: e.zone.as_deref(),
            });
        }
    }
    // Draining backends take no part in the shares: they get no new flows.
    let sharing: Vec<(u32, Option<&str>)> = by_address
        .values()
        .filter(|c| !c.draining)
        .map(|c| (c.weight, c.version))
        .collect();
    let mut shares = rollout_weights(&sharing, service.traffic.rollout.as_ref()).into_iter();
    let backends: Vec<ViewBackend> = by_address
        .iter()
        .map(|(&address, c)| ViewBackend {
            address,
            weight: if c.draining {
                c.weight
            } else {
                shares.next().unwrap_or(c.weight)
            },
            draining: c.draining,
            probers: Vec::new(),
        })
        .collect();
    if !service.traffic.topology_aware {
        return (backends, Vec::new());
    }
    let zones_of: Vec<Option<&str>> = by_address.values().map(|c| c.zone).collect();
    let mut zones: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for zone in zones_of.iter().flatten() {
        zones.entry(zone).or_insert_with(|| {
            backends
                .iter()
                .zip(&zones_of)
                .map(|(b, z)| {
                    if *z == Some(*zone) && !b.draining {
                        b.weight
                    } else {
                        0
                    }
                })
                .collect()
        });
    }
    let zones = zones
        .into_iter()
        .filter(|(_, weights)| weights.iter().any(|&w| w > 0))
        .map(|(zone, weights)| ZoneWeights {
            zone: zone.to_owned(),
            weights,
        })
        .collect();
    (backends, zones)
}

/// Under a rollout, shares are weights even for an algorithm that ignores
/// them: round-robin becomes weighted round-robin, least-connections its
/// weighted form.
fn effective_algorithm(service: &Service) -> Algorithm {
    match service.algorithm {
        Algorithm::RoundRobin if service.traffic.rollout.is_some() => Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections if service.traffic.rollout.is_some() => {
            Algorithm::WeightedLeastConnections
        }
        other => other,
    }
}
