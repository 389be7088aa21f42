//! What each node's data plane must do ("the view"), and how it changes.
//!
//! A view is the set of service ports a node programs ([`Frontend`]s), each
//! with its resolved backends, and the compiled network policy. It is a pure
//! function of the objects ([`compute::frontends`],
//! [`crate::policy::compile::compile`]), computed the same way by the control
//! service for its nodes and by a standalone agent from its manifest. When it
//! changes, [`View::diff`] turns old and new into one incremental
//! [`ViewUpdate`], which [`View::apply`] replays.
//!
//! Every node gets the same view: what differs by node is in it, keyed by
//! node or zone (the probers of each health-checked backend, the weights of
//! each zone for topology-aware services), so one computation serves all.

pub mod compute;
mod incremental;

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use crate::policy::compiled::CompiledPolicy;
use crate::service::{Algorithm, Protocol};
use crate::traffic::HealthCheck;

pub use compute::{PROBERS_PER_BACKEND, frontends, probers};
pub use incremental::{Refreshed, Touched, refresh};

/// A service, by namespace and name; displays as `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service port: what a packet's destination is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.protocol)
    }
}

/// One service port as a node must program it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub service: ServiceRef,
    pub target_port: u16,
    /// The algorithm in effect: under a rollout, shares are weights even for
    /// an algorithm that ignores them (round-robin becomes weighted
    /// round-robin, least-connections its weighted form).
    pub algorithm: Algorithm,
    /// The Maglev lookup table's size (a prime), the default applied; 0 with
    /// any other algorithm.
    pub maglev_table_size: u32,
    /// With the port it probes spelled out: one for every port of the
    /// service, since health is a backend's, not a port's.
    pub health_check: Option<HealthCheck>,
    /// When the flows of draining backends end; `None`: when they close.
    pub drain_timeout_seconds: Option<u32>,
    /// Client-IP affinity's idle timeout; `None`: no affinity.
    pub session_affinity_seconds: Option<u32>,
    /// Topology-aware services: the weights a node of each zone uses,
    /// aligned with `backends`. A node whose zone is not listed uses the
    /// backends' own weights, and so does one whose zone's backends all fail.
    pub zones: Vec<ZoneWeights>,
    /// Sorted by address, one entry per address.
    pub backends: Vec<ViewBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewBackend {
    pub address: Ipv4Addr,
    /// Share of new flows; zero: none (a rollout's other side), established
    /// flows stay without a deadline.
    pub weight: u32,
    /// No new flows; established ones end at the frontend's drain timeout.
    pub draining: bool,
    /// With a health check: the nodes that probe it (see
    /// [`compute::probers`]). Empty: every node that programs it probes it.
    pub probers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneWeights {
    pub zone: String,
    pub weights: Vec<u32>,
}

/// A node's frontends by key.
/// Persistent, as the objects' tables are: copies share what they do not change.
pub type Frontends = imbl::OrdMap<FrontendKey, Frontend>;

/// The view at one version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// 0 before the first update (and for a standalone agent's).
    pub version: u64,
    pub frontends: Frontends,
    pub policy: CompiledPolicy,
}

/// What turns one version of a view into the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewUpdate {
    /// The version after this update.
    pub version: u64,
    /// `upsert` is the whole view: drop anything not in it.
    pub snapshot: bool,
    pub upsert: Vec<Frontend>,
    pub remove: Vec<FrontendKey>,
    /// Present: the compiled network policy, replacing the previous one.
    pub policy: Option<CompiledPolicy>,
}

impl View {
    /// A standalone agent's view: the frontends of its manifest's services,
    /// computed as the control service computes them for a cluster with no
    /// nodes (every backend is probed by whoever programs it) and no
    /// endpoints (a standalone manifest has static backends only), and no
    /// network policy (which needs the control service).
    pub fn of_manifest(manifest: &crate::manifest::Manifest) -> Self {
        Self {
            version: 0,
            frontends: frontends(&[], &manifest.services, []),
            policy: CompiledPolicy::default(),
        }
    }

    /// Applies `update`: a snapshot replaces everything; a change removes,
    /// then upserts (a frontend both removed and upserted ends up upserted).
    pub fn apply(&mut self, update: ViewUpdate) {
        let ViewUpdate {
            version,
            snapshot,
            upsert,
            remove,
            policy,
        } = update;
        if snapshot {
            self.frontends.clear();
            self.policy = CompiledPolicy::default();
        }
        if let Some(policy) = policy {
            self.policy = policy;
        }
        for key in &remove {
            self.frontends.remove(key);
        }
        for frontend in upsert {
            self.frontends.insert(frontend.key, frontend);
        }
        self.version = version;
    }

    /// The update that turns `self` into `new`, numbered `version`; `None`
    /// when they are equal.
    pub fn diff(&self, new: &Self, version: u64) -> Option<ViewUpdate> {
        self.diff_among(new, version, None)
    }

    /// [`Self::diff`], comparing only the frontends under `candidates` (the
    /// others are known to be equal; `None`: compare all).
    pub fn diff_among(
        &self,
        new: &Self,
        version: u64,
        candidates: Option<&BTreeSet<FrontendKey>>,
    ) -> Option<ViewUpdate> {
        let (upsert, remove): (Vec<Frontend>, Vec<FrontendKey>) = match candidates {
            None => (
                new.frontends
                    .iter()
                    .filter(|(k, v)| self.frontends.get(*k) != Some(*v))
                    .map(|(_, v)| v.clone())
                    .collect(),
                self.frontends
                    .keys()
                    .filter(|k| !new.frontends.contains_key(*k))
                    .copied()
                    .collect(),
            ),
            Some(keys) => {
                let mut upsert = Vec::new();
                let mut remove = Vec::new();
                for key in keys {
                    match (self.frontends.get(key), new.frontends.get(key)) {
                        (old, Some(now)) if old != Some(now) => upsert.push(now.clone()),
                        (Some(_), None) => remove.push(*key),
                        _ => {}
                    }
                }
                (upsert, remove)
            }
        };
        let policy = (self.policy != new.policy).then(|| new.policy.clone());
        (!upsert.is_empty() || !remove.is_empty() || policy.is_some()).then_some(ViewUpdate {
            version,
            snapshot: false,
            upsert,
            remove,
            policy,
        })
    }

    /// The whole view as one update.
    pub fn snapshot(&self) -> ViewUpdate {
        ViewUpdate {
            version: self.version,
            snapshot: true,
            upsert: self.frontends.values().cloned().collect(),
            remove: Vec::new(),
            policy: Some(self.policy.clone()),
        }
    }
}

#[cfg(test)]
mod tests;
