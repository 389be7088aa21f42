//! What each node's data plane must do ("the view"), and how it changes.
//!
//! A view is the set of service ports a node programs, each with its resolved
//! backends: static ones, or the ready endpoints a selector matches in the
//! service's namespace. It is a pure function of the stored objects
//! ([`compute`]). When it changes, [`diff`] turns old and new into one
//! incremental update; [`History`] keeps recent updates so an agent that
//! reconnects with the version it last applied gets only what it missed.
//!
//! Every node gets the same view for now; the functions take the node so that
//! topology-aware views slot in without changing their callers.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_api::{
    manifest::{Rollout, VERSION_LABEL, traffic::rollout_weights},
    v1,
};

/// Identifies a service port: (VIP, port, protocol as the proto enum value).
pub type Key = (Ipv4Addr, u32, i32);

/// A node's view: its frontends by key.
pub type Frontends = BTreeMap<Key, v1::FrontendView>;

/// The frontends `node` must program. Services without a VIP are skipped (the
/// control service allocates one before storing, so none should exist).
pub fn compute<'a>(
    _node: &str,
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
        let backends = resolve(service, namespace, &index);
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
                    health_check: service.health_check.clone(),
                    drain_timeout_seconds: service.drain_timeout_seconds,
                    session_affinity_seconds: service.session_affinity_seconds,
                    zones: Vec::new(),
                    backends: backends.clone(),
                },
            );
        }
    }
    out
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
    // address → (weight, version, draining)
    let mut by_address: BTreeMap<Ipv4Addr, (u32, Option<&str>, bool)> = BTreeMap::new();
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
                by_address
                    .entry(addr)
                    .or_insert((e.weight.max(1), version, e.draining));
            }
        }
    } else {
        for b in &service.backends {
            if let Ok(addr) = b.address.parse::<Ipv4Addr>() {
                let version = (!b.version.is_empty()).then_some(b.version.as_str());
                by_address
                    .entry(addr)
                    .or_insert((b.weight.max(1), version, b.draining));
            }
        }
    }
    // Draining backends take no part in the shares: they get no new flows.
    let sharing: Vec<(u32, Option<&str>)> = by_address
        .values()
        .filter(|(_, _, draining)| !draining)
        .map(|&(weight, version, _)| (weight, version))
        .collect();
    let mut shares = rollout_weights(&sharing, rollout(service).as_ref()).into_iter();
    by_address
        .into_iter()
        .map(|(address, (weight, _, draining))| v1::ViewBackend {
            address: address.to_string(),
            weight: if draining {
                weight
            } else {
                shares.next().unwrap_or(weight)
            },
            draining,
        })
        .collect()
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

/// The update that turns `old` into `new` (None when they are equal).
pub fn diff(old: &Frontends, new: &Frontends, version: u64) -> Option<v1::ViewUpdate> {
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
    (!upsert.is_empty() || !remove.is_empty()).then_some(v1::ViewUpdate {
        version,
        snapshot: false,
        upsert,
        remove,
    })
}

/// The whole view as one update.
pub fn snapshot(frontends: &Frontends, version: u64) -> v1::ViewUpdate {
    v1::ViewUpdate {
        version,
        snapshot: true,
        upsert: frontends.values().cloned().collect(),
        remove: Vec::new(),
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
        let view = compute("n1", [&s], &[]);
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
        let view = compute("n1", [&s], &[&e1, &e2, &e3, &e4]);
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
            }]
        );
    }

    #[test]
    fn diff_carries_only_changes_and_applies_back() {
        let a = service("web", "198.18.0.10", &["198.19.1.2"], &[]);
        let b = service("api", "198.18.0.11", &["198.19.1.2"], &[]);
        let old = compute("n", [&a, &b], &[]);
        let a2 = service("web", "198.18.0.10", &["198.19.1.2", "198.19.2.2"], &[]);
        let new = compute("n", [&a2], &[]);
        let update = diff(&old, &new, 7).expect("changed");
        assert_eq!(update.upsert.len(), 2, "web's two ports changed");
        assert_eq!(update.remove.len(), 2, "api's two ports went");
        let mut replay = old.clone();
        apply(&mut replay, &update);
        assert_eq!(replay, new);
        assert!(diff(&new, &new, 8).is_none());
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
