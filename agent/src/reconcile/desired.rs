//! What this node must program, read out of a view: each frontend as the
//! kernel will see it, with this node's zone weights, probe assignments and
//! names. Both modes go through [`desired()`], so a standalone agent and a
//! joined node program the same view the same way.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use sluice_common::types::FrontendKeyV4;
use sluice_model::Algorithm;
use sluice_model::traffic::HealthCheck;
use sluice_model::view::{FrontendKey, Frontends, ServiceRef};

/// One service port as the kernel will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ServiceRef,
    /// What the maps call the service (see [`Naming`]).
    pub name: String,
    /// Host order.
    pub target_port: u16,
    pub algorithm: Algorithm,
    /// In the view's order.
    pub backends: Vec<DesiredBackend>,
    /// Maglev only: the lookup table's size.
    pub maglev_table_size: u32,
    /// Probed by this agent; unhealthy backends drain (see `health`).
    pub health_check: Option<HealthCheck>,
    /// When draining backends' flows are ended; `None`: never, they run until
    /// they close.
    pub drain_timeout: Option<Duration>,
    /// Client-IP affinity: how long a client idle stays tied to its backend.
    pub session_affinity: Option<Duration>,
    /// Topology-aware, with this node's zone weights in `backends`: the
    /// backends' own weights, used when none of the zone's backends can take
    /// new flows (see `health::overlay`).
    pub fallback_weights: Option<Vec<u32>>,
}

/// A backend of a [`DesiredFrontend`]. Only backends with a weight that are not
/// draining are in the slot table; the others keep their id (and so their
/// established flows) but get no new flows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: Ipv4Addr,
    /// Share of new flows; 0: none (the far side of a rollout), with no deadline
    /// for its established flows.
    pub weight: u32,
    /// Out of rotation (marked so, or unhealthy): its flows end at the drain timeout.
    pub draining: bool,
    /// This node probes it, if the frontend has a health check (a joined node
    /// probes the backends the view assigns to it; a standalone agent all).
    pub probe_here: bool,
}

impl DesiredBackend {
    pub fn new(address: Ipv4Addr, weight: u32) -> Self {
        Self {
            address,
            weight,
            draining: false,
            probe_here: true,
        }
    }

    pub(super) fn takes_new_flows(&self) -> bool {
        self.weight > 0 && !self.draining
    }
}

pub type Desired = BTreeMap<FrontendKeyV4, DesiredFrontend>;

/// How the maps name a frontend's service, which is what `status`, the
/// metrics and the flow log show: a standalone agent's services by their
/// name, as its manifest writes them; a joined node's as `namespace/name`,
/// as everything in a cluster names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    Standalone,
    Cluster,
}

impl Naming {
    pub fn name(self, service: &ServiceRef) -> String {
        match self {
            Self::Standalone => service.name.clone(),
            Self::Cluster => service.to_string(),
        }
    }
}

/// Who this node is, for what of a view depends on it.
#[derive(Clone, Debug)]
pub struct Node {
    /// Which backends it probes (those whose probers name it, or that have
    /// none); empty for a standalone agent.
    pub name: String,
    /// Which zone weights of a topology-aware frontend apply; `None`: none.
    pub zone: Option<String>,
    pub naming: Naming,
}

impl Node {
    /// A standalone agent.
    pub fn standalone() -> Self {
        Self {
            name: String::new(),
            zone: None,
            naming: Naming::Standalone,
        }
    }
}

/// The kernel's key of a frontend.
pub fn kernel_key(key: &FrontendKey) -> FrontendKeyV4 {
    FrontendKeyV4 {
        vip: u32::from_ne_bytes(key.vip.octets()),
        port: key.port.to_be(),
        proto: key.protocol.ip_proto(),
        _pad: 0,
    }
}

/// What `node` must program of a view's frontends.
pub fn desired(frontends: &Frontends, node: &Node) -> Desired {
    frontends
        .values()
        .map(|f| {
            let mut backends: Vec<DesiredBackend> = f
                .backends
                .iter()
                .map(|b| DesiredBackend {
                    address: b.address,
                    weight: b.weight,
                    draining: b.draining,
                    probe_here: b.probers.is_empty() || b.probers.contains(&node.name),
                })
                .collect();
            let zone_weights = node
                .zone
                .as_ref()
                .and_then(|zone| f.zones.iter().find(|z| z.zone == *zone))
                .filter(|z| z.weights.len() == backends.len());
            let fallback_weights = zone_weights.map(|z| {
                let own = backends.iter().map(|b| b.weight).collect();
                for (backend, &weight) in backends.iter_mut().zip(&z.weights) {
                    backend.weight = weight;
                }
                own
            });
            let seconds = |s: Option<u32>| s.map(|s| Duration::from_secs(s.into()));
            let frontend = DesiredFrontend {
                service: f.service.clone(),
                name: node.naming.name(&f.service),
                target_port: f.target_port,
                algorithm: f.algorithm,
                backends,
                maglev_table_size: f.maglev_table_size,
                health_check: f.health_check.clone(),
                drain_timeout: seconds(f.drain_timeout_seconds),
                session_affinity: seconds(f.session_affinity_seconds),
                fallback_weights,
            };
            (kernel_key(&f.key), frontend)
        })
        .collect()
}
