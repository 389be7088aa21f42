//! A change's frontends, recomputed for what it touched only.
//!
//! At 10,000 services and 100,000 endpoints computing every frontend takes
//! tens of milliseconds; one endpoint changes a handful. A change records
//! what it [`Touched`]: the services it put or deleted, and the labels of the
//! endpoints it put or deleted (before and after, so that an endpoint leaving
//! a selector counts). The services affected are those, plus those whose
//! selector matches one of those label sets; only their frontends are
//! recomputed, from the endpoints their selectors can match, and only their
//! keys are compared for the update. Node changes move probers everywhere,
//! and a change that affects more than a quarter of the services gains
//! nothing from this: both recompute everything, as [`frontends`] does.
//! `tests.rs` holds the two to the same result on random changes.

use std::collections::{BTreeSet, HashMap};

use super::compute::frontends;
use super::{FrontendKey, Frontends};
use crate::endpoint::Endpoint;
use crate::kind::{Labels, Table};
use crate::service::Service;

/// What a change touched, as far as frontends depend on it.
#[derive(Clone, Debug, Default)]
pub struct Touched {
    /// Services put or deleted, by (namespace, name).
    pub services: BTreeSet<(String, String)>,
    /// (namespace, labels) of every endpoint put or deleted, before and
    /// after the change.
    pub endpoint_labels: Vec<(String, Labels)>,
    /// The nodes changed: every health-checked backend's probers may move.
    pub nodes: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_labels.is_empty() && !self.nodes
    }
}

/// The frontends after a change.
pub struct Refreshed {
    pub frontends: Frontends,
    /// The keys whose frontend may differ from before; `None`: any.
    pub candidates: Option<BTreeSet<FrontendKey>>,
}

/// The frontends of `services` and `endpoints` (the state after a change),
/// given `previous` (those of `previous_services` and the endpoints before
/// it) and what the change touched.
pub fn refresh(
    previous: &Frontends,
    previous_services: &Table<Service>,
    services: &Table<Service>,
    endpoints: &Table<Endpoint>,
    nodes: &[&str],
    touched: &Touched,
) -> Refreshed {
    let everything = || Refreshed {
        frontends: frontends(
            nodes,
            services.values().map(|s| &s.object),
            endpoints.values().map(|e| &e.object),
        ),
        candidates: None,
    };
    if touched.nodes {
        return everything();
    }
    let affected = affected_services(services, touched);
    if affected.len() > services.len() / 4 + 8 {
        return everything();
    }

    let mut out = previous.clone();
    let mut candidates = BTreeSet::new();
    // What the affected services had: their keys go, whatever they become.
    for id in &affected {
        if let Some(old) = previous_services.get(id) {
            for key in keys(&old.object) {
                out.remove(&key);
                candidates.insert(key);
            }
        }
    }
    let now: Vec<&Service> = affected
        .iter()
        .filter_map(|id| services.get(id).map(|s| &s.object))
        .collect();
    // Only the endpoints one of their selectors may match.
    let selectors: Vec<(&str, &Labels)> = now
        .iter()
        .filter(|s| !s.selector.is_empty())
        .map(|s| (s.namespace.as_str(), &s.selector))
        .collect();
    let candidate_endpoints = endpoints.values().map(|e| &e.object).filter(|e| {
        selectors
            .iter()
            .any(|(namespace, selector)| *namespace == e.namespace && selects(selector, &e.labels))
    });
    for (key, frontend) in frontends(nodes, now.iter().copied(), candidate_endpoints) {
        candidates.insert(key);
        out.insert(key, frontend);
    }
    Refreshed {
        frontends: out,
        candidates: Some(candidates),
    }
}

/// The services a change affects: those it put or deleted, and those whose
/// selector matches a touched endpoint's labels (before or after).
fn affected_services(services: &Table<Service>, touched: &Touched) -> BTreeSet<(String, String)> {
    let mut affected = touched.services.clone();
    if touched.endpoint_labels.is_empty() {
        return affected;
    }
    // Services by one label of their selector: a touched endpoint then
    // checks only the services that name one of its labels.
    let mut by_label: HashMap<(&str, &str, &str), Vec<&Service>> = HashMap::new();
    for s in services.values().map(|s| &s.object) {
        if let Some((k, v)) = s.selector.iter().next() {
            by_label
                .entry((s.namespace.as_str(), k.as_str(), v.as_str()))
                .or_default()
                .push(s);
        }
    }
    for (namespace, labels) in &touched.endpoint_labels {
        for (k, v) in labels {
            let Some(list) = by_label.get(&(namespace.as_str(), k.as_str(), v.as_str())) else {
                continue;
            };
            for s in list.iter().filter(|s| selects(&s.selector, labels)) {
                affected.insert((s.namespace.clone(), s.name.clone()));
            }
        }
    }
    affected
}

fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The frontend keys a service has: one per port.
fn keys(service: &Service) -> impl Iterator<Item = FrontendKey> + '_ {
    service.ports.iter().map(|p| FrontendKey {
        vip: service.vip,
        port: p.port,
        protocol: p.protocol,
    })
}

#[cfg(test)]
mod tests;
