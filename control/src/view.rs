//! What each node's data plane must do ("the view"), and how it changes.
//!
//! A view is the set of service ports a node programs, each with its resolved
//! backends: static ones, or the ready endpoints a selector matches in the
//! service's namespace. It is a pure function of the stored objects
//! ([`compute`]). When it changes, [`diff`] turns old and new into one
//! incremental update; [`History`] keeps recent updates so an agent that
//! reconnects with the version it last applied gets only what it missed.
//!
//! Every node gets the same view: what differs by node is in it, keyed by
//! node or zone (the probers of each health-checked backend, the weights of
//! each zone for topology-aware services), so one computation and one
//! history serve all nodes.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_api::v1;
use sluice_model::VERSION_LABEL;
use sluice_model::traffic::{Rollout, rollout_weights};

/// Identifies a service port: (VIP, port, protocol as the proto enum value).
pub type Key = (Ipv4Addr, u32, i32);

/// A node's view: its frontends by key.
pub type Frontends = BTreeMap<Key, v1::FrontendView>;

/// How many nodes probe each backend of a health-checked service.
pub const PROBERS_PER_BACKEND: usize = 3;

/// The frontends every node must program. Services without a VIP are skipped
/// (the control service allocates one before storing, so none should exist).
/// `nodes` are the cluster's nodes, among which each health-checked backend
/// gets its probers.
pub fn compute<'a>(
    nodes: &[&str],
    services: impl IntoIterator<Item = &'a v1::Service>,
    endpoints: &[&v1::Endpoint],
) -> Frontends {
    let mut out = Frontends::new();
    let index = EndpointIndex::new(endpoints);
    for service in services {
        let Ok(vip) = service.vip.parse::<Ipv4Addr>() else {
            continue;
        };
        let (namespace, name) = meta_names(service.meta.as_ref());
        let (mut backends, zones) = resolve_zoned(service, namespace, &index);
        if service.health_check.is_some() {
            let service = format!("{namespace}/{name}");
            for backend in &mut backends {
                backend.probers = probers(nodes, &service, &backend.address);
            }
        }
        for port in &service.ports {
            let target_port = if port.target_port == 0 {
                port.port
            } else {
                port.target_port
            };
            out.insert(
                (vip, port.port, port.protocol),
                v1::FrontendView {
                    service: format!("{namespace}/{name}"),
                    vip: vip.to_string(),
                    port: port.port,
                    protocol: port.protocol,
                    target_port,
                    algorithm: effective_algorithm(service),
                    maglev_table_size: service.maglev_table_size,
                    health_check: service
                        .health_check
                        .as_ref()
                        .map(|check| with_probe_port(check, &service.ports)),
                    drain_timeout_seconds: service.drain_timeout_seconds,
                    session_affinity_seconds: service.session_affinity_seconds,
                    zones: zones.clone(),
                    backends: backends.clone(),
                },
            );
        }
    }
    out
}

/// The check with the port it probes spelled out: one port for every port
/// of the service, since health is a backend's, not a port's (see
/// `sluice_model::manifest::traffic::probe_port`).
fn with_probe_port(check: &v1::HealthCheck, ports: &[v1::ServicePort]) -> v1::HealthCheck {
    use v1::health_check::Probe;
    let first_tcp = ports
        .iter()
        .find(|p| p.protocol == v1::Protocol::Tcp as i32)
        .map(|p| {
            if p.target_port == 0 {
                p.port
            } else {
                p.target_port
            }
        })
        .unwrap_or(0);
    let mut check = check.clone();
    match &mut check.probe {
        Some(Probe::Http(v1::HttpProbe { port, .. }) | Probe::Tcp(v1::TcpProbe { port }))
            if *port == 0 =>
        {
            *port = first_tcp;
        }
        _ => {}
    }
    check
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

fn meta_names(meta: Option<&v1::ObjectMeta>) -> (&str, &str) {
    meta.map_or(("default", ""), |m| {
        let ns = if m.namespace.is_empty() {
            "default"
        } else {
            &m.namespace
        };
        (ns, m.name.as_str())
    })
}

/// Endpoints by (namespace, label key, label value), so that resolving every
/// selector costs what the selectors match rather than services × endpoints.
pub struct EndpointIndex<'a> {
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a v1::Endpoint>>,
}

impl<'a> EndpointIndex<'a> {
    pub fn new(endpoints: &[&'a v1::Endpoint]) -> Self {
        let mut by_label: HashMap<_, Vec<&'a v1::Endpoint>> = HashMap::new();
        for &endpoint in endpoints {
            let Some(meta) = endpoint.meta.as_ref() else {
                continue;
            };
            let namespace = meta_names(Some(meta)).0;
            for (key, value) in &meta.labels {
                by_label
                    .entry((namespace, key.as_str(), value.as_str()))
                    .or_default()
                    .push(endpoint);
            }
        }
        Self { by_label }
    }

    /// Endpoints of `namespace` carrying every label of `selector` (which
    /// must not be empty), ready or not, in no particular order.
    fn matching(
        &self,
        namespace: &str,
        selector: &std::collections::HashMap<String, String>,
    ) -> Vec<&'a v1::Endpoint> {
        // Start from the rarest label; the others filter.
        let postings: Option<Vec<&Vec<&'a v1::Endpoint>>> = selector
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
            .filter(|e| {
                let labels = e.meta.as_ref().map(|m| &m.labels);
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect()
    }
}

/// A service's backends: static, or ready endpoints matching its selector in
/// its namespace. Sorted by address, one entry per address (the first
/// endpoint by name wins), weight 0 read as 1. A rollout turns the weights
/// into its shares (zero for the side that gets no new flows); draining
/// backends stay listed, marked, so that their established flows keep going.
pub fn resolve(
    service: &v1::Service,
    namespace: &str,
    index: &EndpointIndex<'_>,
) -> Vec<v1::ViewBackend> {
    resolve_zoned(service, namespace, index).0
}

/// A backend as resolution finds it, before shares are computed.
struct Candidate<'a> {
    weight: u32,
    version: Option<&'a str>,
    draining: bool,
    zone: Option<&'a str>,
}

/// [`resolve`], and for a topology-aware service the weights a node of each
/// zone uses: the backends of that zone that take new flows, with their
/// weights (after any rollout); zones where none does are left out, so their
/// nodes use every backend.
pub fn resolve_zoned(
    service: &v1::Service,
    namespace: &str,
    index: &EndpointIndex<'_>,
) -> (Vec<v1::ViewBackend>, Vec<v1::ZoneWeights>) {
    let mut by_address: BTreeMap<Ipv4Addr, Candidate<'_>> = BTreeMap::new();
    if !service.selector.is_empty() {
        let mut matching: Vec<&v1::Endpoint> = index
            .matching(namespace, &service.selector)
            .into_iter()
            .filter(|e| e.ready)
            .collect();
        matching.sort_by(|a, b| {
            meta_names(a.meta.as_ref())
                .1
                .cmp(meta_names(b.meta.as_ref()).1)
        });
        for e in matching {
            if let Ok(addr) = e.address.parse::<Ipv4Addr>() {
                let version = e
                    .meta
                    .as_ref()
                    .and_then(|m| m.labels.get(VERSION_LABEL))
                    .map(String::as_str);
                by_address.entry(addr).or_insert(Candidate {
                    weight: e.weight.max(1),
                    version,
                    draining: e.draining,
                    zone: (!e.zone.is_empty()).then_some(e.zone.as_str()),
                });
            }
        }
    } else {
        for b in &service.backends {
            if let Ok(addr) = b.address.parse::<Ipv4Addr>() {
                let version = (!b.version.is_empty()).then_some(b.version.as_str());
                by_address.entry(addr).or_insert(Candidate {
                    weight: b.weight.max(1),
                    version,
                    draining: b.draining,
                    zone: None,
                });
            }
        }
    }
    // Draining backends take no part in the shares: they get no new flows.
    let sharing: Vec<(u32, Option<&str>)> = by_address
        .values()
        .filter(|c| !c.draining)
        .map(|c| (c.weight, c.version))
        .collect();
    let mut shares = rollout_weights(&sharing, rollout(service).as_ref()).into_iter();
    let backends: Vec<v1::ViewBackend> = by_address
        .iter()
        .map(|(address, c)| v1::ViewBackend {
            address: address.to_string(),
            weight: if c.draining {
                c.weight
            } else {
                shares.next().unwrap_or(c.weight)
            },
            draining: c.draining,
            probers: Vec::new(),
        })
        .collect();
    if !service.topology_aware {
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
        .map(|(zone, weights)| v1::ZoneWeights {
            zone: zone.to_owned(),
            weights,
        })
        .collect();
    (backends, zones)
}

/// The service's rollout, as the manifest type (the API's was validated on the
/// way in).
fn rollout(service: &v1::Service) -> Option<Rollout> {
    service.rollout.as_ref().map(|r| Rollout {
        to: r.to.clone(),
        percent: r.percent,
    })
}

/// Under a rollout, shares are weights even for an algorithm that ignores
/// them: round-robin becomes weighted round-robin, least-connections its
/// weighted form.
fn effective_algorithm(service: &v1::Service) -> i32 {
    use v1::Algorithm as A;
    if service.rollout.is_none() {
        return service.algorithm;
    }
    match A::try_from(service.algorithm) {
        Ok(A::Unspecified | A::RoundRobin) => A::WeightedRoundRobin as i32,
        Ok(A::LeastConnections) => A::WeightedLeastConnections as i32,
        _ => service.algorithm,
    }
}

/// The update that turns `old` into `new` (None when they are equal), the
/// compiled network policy included when it changed.
pub fn diff(
    old: &Frontends,
    new: &Frontends,
    old_policy: &v1::PolicyView,
    new_policy: &v1::PolicyView,
    version: u64,
) -> Option<v1::ViewUpdate> {
    let upsert: Vec<v1::FrontendView> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(_, v)| v.clone())
        .collect();
    let remove: Vec<v1::FrontendKey> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .map(|&(vip, port, protocol)| v1::FrontendKey {
            vip: vip.to_string(),
            port,
            protocol,
        })
        .collect();
    let policy = (old_policy != new_policy).then(|| new_policy.clone());
    (!upsert.is_empty() || !remove.is_empty() || policy.is_some()).then_some(v1::ViewUpdate {
        version,
        snapshot: false,
        upsert,
        remove,
        policy,
    })
}

/// The whole view as one update.
pub fn snapshot(frontends: &Frontends, policy: &v1::PolicyView, version: u64) -> v1::ViewUpdate {
    v1::ViewUpdate {
        version,
        snapshot: true,
        upsert: frontends.values().cloned().collect(),
        remove: Vec::new(),
        policy: Some(policy.clone()),
    }
}

/// Applies an update to a view (what an agent does with the stream).
pub fn apply(frontends: &mut Frontends, update: &v1::ViewUpdate) {
    if update.snapshot {
        frontends.clear();
    }
    for key in &update.remove {
        if let Ok(vip) = key.vip.parse() {
            frontends.remove(&(vip, key.port, key.protocol));
        }
    }
    for f in &update.upsert {
        if let Ok(vip) = f.vip.parse() {
            frontends.insert((vip, f.port, f.protocol), f.clone());
        }
    }
}

/// The last updates, oldest first, so that reconnecting agents catch up by
/// replaying what they missed. Each update is known with the version it
/// starts from.
#[derive(Clone, Debug)]
pub struct History {
    /// Shared: the state (and this history) is copied for every change.
    updates: VecDeque<(u64, Arc<v1::ViewUpdate>)>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        Self {
            updates: VecDeque::new(),
            capacity,
        }
    }

    /// Records `update`, which applies on top of version `from`.
    pub fn push(&mut self, from: u64, update: v1::ViewUpdate) {
        if self.updates.len() == self.capacity {
            self.updates.pop_front();
        }
        self.updates.push_back((from, Arc::new(update)));
    }

    /// The updates that bring a node at `since` to `current`: empty when it is
    /// current, None when the history does not reach back that far (the caller
    /// sends a snapshot).
    pub fn since(&self, since: u64, current: u64) -> Option<Vec<v1::ViewUpdate>> {
        if since == current {
            return Some(Vec::new());
        }
        // A node with nothing gets the view in one snapshot, not every change
        // since the beginning.
        if since == 0 {
            return None;
        }
        let start = self.updates.iter().position(|(from, _)| *from == since)?;
        Some(
            self.updates
                .iter()
                .skip(start)
                .map(|(_, u)| (**u).clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> Option<v1::ObjectMeta> {
        Some(v1::ObjectMeta {
            namespace: ns.into(),
            name: name.into(),
            resource_version: 1,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn service(name: &str, vip: &str, backends: &[&str], selector: &[(&str, &str)]) -> v1::Service {
        v1::Service {
            maglev_table_size: 0,
            meta: meta("shop", name, &[]),
            vip: vip.into(),
            ports: vec![
                v1::ServicePort {
                    port: 80,
                    protocol: v1::Protocol::Tcp as i32,
                    target_port: 8080,
                },
                v1::ServicePort {
                    port: 53,
                    protocol: v1::Protocol::Udp as i32,
                    target_port: 0,
                },
            ],
            algorithm: v1::Algorithm::RoundRobin as i32,
            backends: backends
                .iter()
                .map(|a| v1::StaticBackend {
                    address: a.to_string(),
                    weight: 0,
                    draining: Default::default(),
                    version: Default::default(),
                })
                .collect(),
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            drain_timeout_seconds: Default::default(),
            health_check: Default::default(),
            rollout: Default::default(),
            session_affinity_seconds: Default::default(),
            topology_aware: Default::default(),
        }
    }

    fn endpoint(
        ns: &str,
        name: &str,
        address: &str,
        labels: &[(&str, &str)],
        ready: bool,
    ) -> v1::Endpoint {
        v1::Endpoint {
            meta: meta(ns, name, labels),
            address: address.into(),
            node: String::new(),
            zone: String::new(),
            weight: 2,
            ready,
            draining: Default::default(),
        }
    }

    #[test]
    fn static_backends_become_frontends_per_port() {
        let s = service("web", "198.18.0.10", &["198.19.2.2", "198.19.1.2"], &[]);
        let view = compute(&["n1"], [&s], &[]);
        assert_eq!(view.len(), 2);
        let tcp = &view[&(
            "198.18.0.10".parse().expect("ip"),
            80,
            v1::Protocol::Tcp as i32,
        )];
        assert_eq!(tcp.service, "shop/web");
        assert_eq!(tcp.target_port, 8080);
        let addrs: Vec<&str> = tcp.backends.iter().map(|b| b.address.as_str()).collect();
        assert_eq!(addrs, ["198.19.1.2", "198.19.2.2"], "sorted");
        assert!(tcp.backends.iter().all(|b| b.weight == 1));
        let udp = &view[&(
            "198.18.0.10".parse().expect("ip"),
            53,
            v1::Protocol::Udp as i32,
        )];
        assert_eq!(udp.target_port, 53, "0 means the same port");
    }

    #[test]
    fn selectors_take_ready_matching_endpoints_of_the_namespace() {
        let s = service("web", "198.18.0.10", &[], &[("app", "web")]);
        let e1 = endpoint(
            "shop",
            "a",
            "198.19.1.2",
            &[("app", "web"), ("v", "1")],
            true,
        );
        let e2 = endpoint("shop", "b", "198.19.2.2", &[("app", "web")], false);
        let e3 = endpoint("blog", "c", "198.19.3.2", &[("app", "web")], true);
        let e4 = endpoint("shop", "d", "198.19.4.2", &[("app", "db")], true);
        let view = compute(&["n1"], [&s], &[&e1, &e2, &e3, &e4]);
        let tcp = &view[&(
            "198.18.0.10".parse().expect("ip"),
            80,
            v1::Protocol::Tcp as i32,
        )];
        assert_eq!(
            tcp.backends,
            [v1::ViewBackend {
                address: "198.19.1.2".into(),
                weight: 2,
                draining: Default::default(),
                probers: Default::default(),
            }]
        );
    }

    #[test]
    fn rollouts_draining_and_zones_shape_the_weights() {
        let mut s = service("web", "198.18.0.10", &[], &[("app", "web")]);
        s.rollout = Some(v1::Rollout {
            to: "v2".into(),
            percent: 10,
        });
        s.topology_aware = true;
        let mut endpoints = Vec::new();
        for (i, version, zone, draining) in [
            (1, "v1", "a", false),
            (2, "v1", "b", false),
            (3, "v2", "a", false),
            (4, "v2", "b", true),
        ] {
            let mut e = endpoint(
                "shop",
                &format!("e{i}"),
                &format!("198.19.1.{i}"),
                &[("app", "web"), ("version", version)],
                true,
            );
            e.zone = zone.into();
            e.draining = draining;
            endpoints.push(e);
        }
        let refs: Vec<&v1::Endpoint> = endpoints.iter().collect();
        let (backends, zones) = resolve_zoned(&s, "shop", &EndpointIndex::new(&refs));
        let shares: Vec<(u32, bool)> = backends.iter().map(|b| (b.weight, b.draining)).collect();
        // v1 (weights 2 + 2) gets 90%, v2 (the one serving, weight 2) 10%.
        assert_eq!(shares, [(9, false), (9, false), (2, false), (2, true)]);
        let zones: Vec<(&str, &[u32])> = zones
            .iter()
            .map(|z| (z.zone.as_str(), z.weights.as_slice()))
            .collect();
        assert_eq!(zones, [("a", &[9, 0, 2, 0][..]), ("b", &[0, 9, 0, 0][..])]);
        // A round-robin service under a rollout is balanced by weight.
        let view = compute(&["n1"], [&s], &refs);
        assert!(
            view.values()
                .all(|f| f.algorithm == v1::Algorithm::WeightedRoundRobin as i32)
        );
        s.topology_aware = false;
        assert!(
            resolve_zoned(&s, "shop", &EndpointIndex::new(&refs))
                .1
                .is_empty()
        );
    }

    #[test]
    fn diff_carries_only_changes_and_applies_back() {
        let a = service("web", "198.18.0.10", &["198.19.1.2"], &[]);
        let b = service("api", "198.18.0.11", &["198.19.1.2"], &[]);
        let old = compute(&["n"], [&a, &b], &[]);
        let a2 = service("web", "198.18.0.10", &["198.19.1.2", "198.19.2.2"], &[]);
        let new = compute(&["n"], [&a2], &[]);
        let none = v1::PolicyView::default();
        let update = diff(&old, &new, &none, &none, 7).expect("changed");
        assert_eq!(update.upsert.len(), 2, "web's two ports changed");
        assert_eq!(update.remove.len(), 2, "api's two ports went");
        let mut replay = old.clone();
        apply(&mut replay, &update);
        assert_eq!(replay, new);
        assert!(diff(&new, &new, &none, &none, 8).is_none());
        let some = v1::PolicyView {
            slots: vec![String::new()],
            ..Default::default()
        };
        let policy_only = diff(&new, &new, &none, &some, 8).expect("the policy changed");
        assert!(policy_only.upsert.is_empty() && policy_only.policy == Some(some));
    }

    #[test]
    fn history_replays_what_was_missed_or_asks_for_a_snapshot() {
        let mut h = History::new(2);
        let u = |v| v1::ViewUpdate {
            version: v,
            ..Default::default()
        };
        h.push(1, u(2));
        h.push(2, u(3));
        assert_eq!(h.since(3, 3), Some(vec![]));
        assert_eq!(h.since(2, 3).map(|v| v.len()), Some(1));
        assert_eq!(h.since(1, 3).map(|v| v.len()), Some(2));
        h.push(3, u(4));
        assert_eq!(h.since(1, 4), None, "1 fell out of the history");
        assert_eq!(h.since(9, 4), None, "unknown version");
    }
}
