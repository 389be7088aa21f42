//! A change's frontends, recomputed for what it touched only.
//!
//! At 10,000 services and 100,000 endpoints computing every frontend takes
//! tens of milliseconds; one endpoint changes a handful. A change records
//! what it [`Touched`]: the services it put or deleted, and the labels of the
//! endpoints it put or deleted (before and after, so that an endpoint leaving
//! a selector counts). The services affected are those, plus those whose
//! selector matches one of those label sets (found through the objects'
//! label indexes, [`crate::index`]); only their frontends are recomputed,
//! from the endpoints their selectors match, and only their keys are
//! compared for the update. Node changes move probers everywhere,
//! and a change that affects more than a quarter of the services gains
//! nothing from this: both recompute everything, as [`frontends`] does.
//! `tests.rs` holds the two to the same result on random changes.

use std::collections::{BTreeMap, BTreeSet};

use super::compute::frontends;
use super::{FrontendKey, Frontends};
use crate::endpoint::Endpoint;
use crate::kind::{Labels, ObjectKind, Objects, Table};
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

/// The frontends of `objects` (the state after a change), given `previous`
/// (those before it, when the services were `previous_services`) and what
/// the change touched.
pub fn refresh(
    previous: &Frontends,
    previous_services: &Table<Service>,
    objects: &Objects,
    nodes: &[&str],
    touched: &Touched,
) -> Refreshed {
    let everything = || Refreshed {
        frontends: frontends(nodes, objects.all::<Service>(), objects.all::<Endpoint>()),
        candidates: None,
    };
    if touched.nodes {
        return everything();
    }
    let affected = affected_services(objects, touched);
    if affected.len() > objects.count(ObjectKind::Service) / 4 + 8 {
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
        .filter_map(|(namespace, name)| objects.get::<Service>(namespace, name))
        .map(|s| &s.object)
        .collect();
    // Only the endpoints their selectors match, each once.
    let mut selected: BTreeMap<(&str, &str), &Endpoint> = BTreeMap::new();
    for s in now.iter().filter(|s| !s.selector.is_empty()) {
        for e in objects.endpoints_selected(&s.namespace, &s.selector) {
            selected.insert((e.namespace.as_str(), e.name.as_str()), e);
        }
    }
    for (key, frontend) in frontends(nodes, now.iter().copied(), selected.into_values()) {
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
fn affected_services(objects: &Objects, touched: &Touched) -> BTreeSet<(String, String)> {
    let mut affected = touched.services.clone();
    for (namespace, labels) in &touched.endpoint_labels {
        for s in objects.services_selecting(namespace, labels) {
            affected.insert((s.namespace.clone(), s.name.clone()));
        }
    }
    affected
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
