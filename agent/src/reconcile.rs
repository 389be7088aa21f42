//! A view → kernel map operations, as a pure function.
//!
//! [`desired`] reads what this node must program out of a view (the same
//! view whether the control service computed it or a standalone agent did,
//! from its manifest, with the same function): each frontend as the kernel
//! will see it, with this node's zone weights and probe assignments. [`plan`]
//! compares that with what the maps hold ([`State`]) and returns the
//! [`Step`]s that take the maps from one to the other, plus the state they
//! lead to. Nothing here touches the kernel: `apply` executes the steps, and
//! tests check plans directly.
//!
//! Ordering makes every intermediate state safe for packets in flight:
//! backends and slot tables are written before the frontend value that points
//! to them is swapped (one atomic map update per service port); VIPs are added
//! before their frontends and removed after; a backend that leaves the view
//! is first taken out of every slot table, then marked retired. Established TCP
//! flows keep their backend (the flow entry carries its address) and finish
//! normally; UDP flows of removed backends are purged at once, so that the next
//! datagram is balanced again instead of being sent to a backend that is gone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use sluice_common::{
    layout::{MAX_BACKENDS, MAX_FRONTENDS, MAX_SLOTS_PER_FRONTEND, SLOT_CAPACITY},
    maglev, slots,
    types::{
        BACKEND_DRAINING, BACKEND_RETIRED, Backend, FAMILY_V4, Frontend, FrontendKeyV4,
        FrontendMeta, IPPROTO_UDP, algorithm, fixed_name,
    },
};
use sluice_model::Algorithm;
use sluice_model::traffic::HealthCheck;
use sluice_model::view::{FrontendKey, Frontends, ServiceRef};

use crate::alloc::{Ids, SlotRange, SlotSpace};

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

    fn takes_new_flows(&self) -> bool {
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

/// What the maps hold (read back once at start, then kept in step).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub frontends: BTreeMap<FrontendKeyV4, FrontendState>,
    /// Every backend id in use, retired ones included.
    pub backends: BTreeMap<u32, Backend>,
    /// VIP address → number of service ports on it.
    pub vips: BTreeMap<u32, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub frontend: Frontend,
    pub meta: FrontendMeta,
    /// The slot table's content.
    pub slots: Vec<u32>,
}

impl State {
    /// Frontend ids that must not be handed out: in use by a frontend, or still
    /// named by a retired backend (whose flows account to it).
    fn frontend_ids_in_use(&self) -> BTreeSet<u32> {
        self.frontends
            .values()
            .map(|f| f.frontend.id)
            .chain(self.backends.values().map(|b| b.frontend_id))
            .collect()
    }
}

/// Id and slot allocators; cloned by [`plan`], adopted on success.
#[derive(Clone, Debug)]
pub struct Allocator {
    pub frontend_ids: Ids,
    pub backend_ids: Ids,
    pub slots: SlotSpace,
}

impl Allocator {
    /// Allocators consistent with a state read from the maps.
    pub fn for_state(state: &State) -> Self {
        Self::with_capacity(state, MAX_FRONTENDS, MAX_BACKENDS, SLOT_CAPACITY)
    }

    pub fn with_capacity(state: &State, frontends: u32, backends: u32, slots: u32) -> Self {
        let mut alloc = Self {
            frontend_ids: Ids::new(frontends),
            backend_ids: Ids::new(backends),
            slots: SlotSpace::new(slots),
        };
        for f in state.frontends.values() {
            alloc.slots.mark_used(range_of(&f.frontend));
        }
        alloc
            .frontend_ids
            .resume_after(state.frontend_ids_in_use().last().copied());
        alloc
            .backend_ids
            .resume_after(state.backends.keys().last().copied());
        alloc
    }
}

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write a backend entry; `fresh`: a newly allocated id, whose counters and
    /// connection count start at zero.
    PutBackend {
        id: u32,
        backend: Backend,
        fresh: bool,
    },
    /// Write a slot table into a range no frontend points to yet.
    PutSlots {
        base: u32,
        ids: Vec<u32>,
    },
    /// Write a frontend's name and target port; `fresh`: a new id, whose
    /// counters and round-robin cursor start at zero.
    PutFrontendMeta {
        id: u32,
        meta: FrontendMeta,
        fresh: bool,
    },
    PutVip {
        addr: u32,
        count: u32,
    },
    /// The switch: packets use the new frontend value from here on.
    PutFrontend {
        key: FrontendKeyV4,
        frontend: Frontend,
    },
    DeleteFrontend {
        key: FrontendKeyV4,
    },
    DeleteVip {
        addr: u32,
    },
    /// Mark a backend that is in no slot table any more.
    RetireBackend {
        id: u32,
        backend: Backend,
    },
    /// Delete the UDP flows (both directions) of these backends.
    PurgeUdpFlows {
        backends: BTreeSet<u32>,
    },
    /// Delete every flow (both directions) and client affinity of these
    /// frontends: a deleted service port ends its connections (established
    /// packets are forwarded from the flow entry alone, without looking the
    /// service up), and its ids may be handed out again.
    PurgeFrontendFlows {
        frontends: BTreeSet<u32>,
    },
    ClearFrontendMeta {
        id: u32,
    },
}

#[derive(Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// The state the maps hold once every step is applied.
    pub next: State,
    /// Allocators to adopt once applied.
    pub alloc: Allocator,
    /// Slot ranges no frontend points to any more: free them after a grace
    /// period (packets in flight may still read them).
    pub retired_ranges: Vec<SlotRange>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("service {service}: no free frontend id ({capacity} service ports supported per node)")]
    FrontendCapacity { service: String, capacity: u32 },
    #[error(
        "service {service}: no free backend id for {address} ({capacity} supported per node, \
         retired backends with open flows included)"
    )]
    BackendCapacity {
        service: String,
        address: Ipv4Addr,
        capacity: u32,
    },
    #[error("service {service}: slot table space exhausted ({needed} slots needed, {free} free)")]
    SlotCapacity {
        service: String,
        needed: u32,
        free: u32,
    },
}

/// The kernel's algorithm value.
pub fn kernel_algorithm(a: Algorithm) -> u32 {
    match a {
        Algorithm::RoundRobin => algorithm::ROUND_ROBIN,
        Algorithm::WeightedRoundRobin => algorithm::WEIGHTED_ROUND_ROBIN,
        Algorithm::LeastConnections => algorithm::LEAST_CONNECTIONS,
        Algorithm::WeightedLeastConnections => algorithm::WEIGHTED_LEAST_CONNECTIONS,
        Algorithm::Maglev => algorithm::MAGLEV,
    }
}

/// A frontend's slot table: backend ids as the kernel walks them.
/// Round-robin and the least-connections algorithms list each backend once
/// (least-connections scans the list); weighted round-robin repeats each in
/// proportion to its weight, smoothly interleaved; Maglev is its lookup table
/// of `maglev_size` slots (a prime), built from the backends' `identities`
/// (address and port) so that every node builds the same one.
pub fn slot_table(
    algorithm: Algorithm,
    ids: &[u32],
    weights: &[u32],
    identities: &[u64],
    maglev_size: u32,
) -> Vec<u32> {
    match algorithm {
        Algorithm::WeightedRoundRobin if !ids.is_empty() => {
            let effective = slots::effective_weights(weights, MAX_SLOTS_PER_FRONTEND);
            slots::weighted_table(&effective)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect()
        }
        Algorithm::Maglev if !ids.is_empty() => {
            let size = maglev_size;
            let effective = slots::effective_weights(weights, size);
            let backends: Vec<(u64, u32)> = identities.iter().copied().zip(effective).collect();
            maglev::table(&backends, size)
                .into_iter()
                .map(|i| ids[i as usize])
                .collect()
        }
        _ => ids.to_vec(),
    }
}

/// A backend's identity for Maglev: address and port, in host order.
fn identity(address: Ipv4Addr, port: u16) -> u64 {
    (u64::from(u32::from(address)) << 16) | u64::from(port)
}

fn range_of(f: &Frontend) -> SlotRange {
    SlotRange {
        base: f.slot_base,
        len: f.slot_count,
    }
}

/// Steps grouped by phase; emitted in this order (see the module comment).
#[derive(Default)]
struct Phases {
    put_backend: Vec<Step>,
    put_slots: Vec<Step>,
    put_meta: Vec<Step>,
    add_vip: Vec<Step>,
    put_frontend: Vec<Step>,
    delete_frontend: Vec<Step>,
    drop_vip: Vec<Step>,
    retire: Vec<Step>,
    purge: BTreeSet<u32>,
    purge_frontends: BTreeSet<u32>,
    clear_meta: Vec<Step>,
}

impl Phases {
    fn into_steps(self) -> Vec<Step> {
        let mut steps = Vec::new();
        steps.extend(self.put_backend);
        steps.extend(self.put_slots);
        steps.extend(self.put_meta);
        steps.extend(self.add_vip);
        steps.extend(self.put_frontend);
        steps.extend(self.delete_frontend);
        steps.extend(self.drop_vip);
        steps.extend(self.retire);
        if !self.purge.is_empty() {
            steps.push(Step::PurgeUdpFlows {
                backends: self.purge,
            });
        }
        if !self.purge_frontends.is_empty() {
            steps.push(Step::PurgeFrontendFlows {
                frontends: self.purge_frontends,
            });
        }
        steps.extend(self.clear_meta);
        steps
    }
}

/// The steps from `current` to `desired`. Fails, changing nothing, when a
/// capacity would be exceeded.
pub fn plan(desired: &Desired, current: &State, alloc: &Allocator) -> Result<Plan, PlanError> {
    let mut alloc = alloc.clone();
    let mut next = current.clone();
    let mut phases = Phases::default();
    let mut retired_ranges = Vec::new();
    // Backend ids per frontend id, kept up to date below: looking backends up
    // by scanning them all would make a plan quadratic in the cluster's size.
    let mut by_frontend: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&bid, b) in &next.backends {
        by_frontend.entry(b.frontend_id).or_default().push(bid);
    }

    for (key, gone) in &current.frontends {
        if desired.contains_key(key) {
            continue;
        }
        phases
            .delete_frontend
            .push(Step::DeleteFrontend { key: *key });
        phases.purge_frontends.insert(gone.frontend.id);
        retire_backends(
            &mut next,
            &mut phases,
            &by_frontend,
            key,
            gone.frontend.id,
            &BTreeSet::new(),
        );
        phases.clear_meta.push(Step::ClearFrontendMeta {
            id: gone.frontend.id,
        });
        if gone.frontend.slot_count > 0 {
            retired_ranges.push(range_of(&gone.frontend));
        }
        next.frontends.remove(key);
    }

    let mut frontend_ids_in_use = next.frontend_ids_in_use();
    let mut backend_ids_in_use: BTreeSet<u32> = next.backends.keys().copied().collect();
    for (key, want) in desired {
        let existing = next.frontends.get(key).cloned();
        let (id, fresh) = match &existing {
            Some(f) => (f.frontend.id, false),
            None => {
                let id = alloc
                    .frontend_ids
                    .allocate(&frontend_ids_in_use)
                    .ok_or_else(|| PlanError::FrontendCapacity {
                        service: want.name.clone(),
                        capacity: MAX_FRONTENDS,
                    })?;
                frontend_ids_in_use.insert(id);
                (id, true)
            }
        };

        let target_port = want.target_port.to_be();
        // This frontend's backends by (address, target port), the lowest id
        // first as a scan in id order would find it: a lookup per wanted
        // backend instead of a scan keeps the plan linear in its size.
        let mut known_ids: HashMap<(u32, u16), u32> = HashMap::new();
        for &bid in by_frontend.get(&id).into_iter().flatten() {
            let b = &next.backends[&bid];
            known_ids.entry((b.addr[0], b.port)).or_insert(bid);
        }
        let mut ids = Vec::with_capacity(want.backends.len());
        let mut weights = Vec::with_capacity(want.backends.len());
        let mut identities = Vec::with_capacity(want.backends.len());
        let mut kept = Vec::with_capacity(want.backends.len());
        for wanted_backend in &want.backends {
            let DesiredBackend {
                address, weight, ..
            } = *wanted_backend;
            let flags = if wanted_backend.draining {
                BACKEND_DRAINING
            } else {
                0
            };
            let addr = u32::from_ne_bytes(address.octets());
            let known = known_ids
                .get(&(addr, target_port))
                .map(|&bid| (bid, next.backends[&bid]));
            let bid = match known {
                Some((bid, backend)) => {
                    let wanted = Backend {
                        weight,
                        flags,
                        ..backend
                    };
                    if wanted != backend {
                        phases.put_backend.push(Step::PutBackend {
                            id: bid,
                            backend: wanted,
                            fresh: false,
                        });
                        next.backends.insert(bid, wanted);
                    }
                    bid
                }
                None => {
                    let bid = alloc
                        .backend_ids
                        .allocate(&backend_ids_in_use)
                        .ok_or_else(|| PlanError::BackendCapacity {
                            service: want.name.clone(),
                            address,
                            capacity: MAX_BACKENDS,
                        })?;
                    let backend = Backend {
                        addr: [addr, 0, 0, 0],
                        port: target_port,
                        family: FAMILY_V4,
                        flags,
                        weight,
                        frontend_id: id,
                        _pad: 0,
                    };
                    phases.put_backend.push(Step::PutBackend {
                        id: bid,
                        backend,
                        fresh: true,
                    });
                    next.backends.insert(bid, backend);
                    backend_ids_in_use.insert(bid);
                    by_frontend.entry(id).or_default().push(bid);
                    known_ids.entry((addr, target_port)).or_insert(bid);
                    bid
                }
            };
            kept.push(bid);
            if wanted_backend.takes_new_flows() {
                ids.push(bid);
                weights.push(weight);
                identities.push(identity(address, want.target_port));
            }
        }
        let keep: BTreeSet<u32> = kept.into_iter().collect();
        retire_backends(&mut next, &mut phases, &by_frontend, key, id, &keep);

        let table = slot_table(
            want.algorithm,
            &ids,
            &weights,
            &identities,
            want.maglev_table_size,
        );
        let kernel_algorithm = kernel_algorithm(want.algorithm);
        // Saturating (u32 seconds outlast any deployment); a sub-second
        // timeout rounds up rather than switching affinity off.
        let affinity_timeout_s = want.session_affinity.map_or(0, |d| {
            u32::try_from(d.as_millis().div_ceil(1000)).unwrap_or(u32::MAX)
        });
        let frontend = match &existing {
            Some(f) if f.slots == table && f.frontend.algorithm == kernel_algorithm => {
                // The table stands; a new affinity timeout needs only a new
                // value pointing at the same slot range.
                let frontend = Frontend {
                    affinity_timeout_s,
                    ..f.frontend
                };
                if frontend != f.frontend {
                    phases.put_frontend.push(Step::PutFrontend {
                        key: *key,
                        frontend,
                    });
                }
                frontend
            }
            _ => {
                let needed = table.len() as u32;
                let range =
                    alloc
                        .slots
                        .allocate(needed)
                        .ok_or_else(|| PlanError::SlotCapacity {
                            service: want.name.clone(),
                            needed,
                            free: alloc.slots.free(),
                        })?;
                if !table.is_empty() {
                    phases.put_slots.push(Step::PutSlots {
                        base: range.base,
                        ids: table.clone(),
                    });
                }
                if let Some(old) = &existing
                    && old.frontend.slot_count > 0
                {
                    retired_ranges.push(range_of(&old.frontend));
                }
                let frontend = Frontend {
                    id,
                    algorithm: kernel_algorithm,
                    slot_base: range.base,
                    slot_count: needed,
                    affinity_timeout_s,
                    _pad: 0,
                };
                phases.put_frontend.push(Step::PutFrontend {
                    key: *key,
                    frontend,
                });
                frontend
            }
        };

        let meta = FrontendMeta {
            name: fixed_name(&want.name),
            target_port: want.target_port,
            in_use: 1,
            _pad0: 0,
            _pad1: 0,
        };
        if existing.as_ref().map(|f| f.meta) != Some(meta) {
            phases
                .put_meta
                .push(Step::PutFrontendMeta { id, meta, fresh });
        }
        next.frontends.insert(
            *key,
            FrontendState {
                frontend,
                meta,
                slots: table,
            },
        );
    }

    let mut vips = BTreeMap::new();
    for key in desired.keys() {
        *vips.entry(key.vip).or_insert(0u32) += 1;
    }
    for (&addr, &count) in &vips {
        match current.vips.get(&addr) {
            Some(&now) if now == count => {}
            Some(&now) if now > count => phases.drop_vip.push(Step::PutVip { addr, count }),
            _ => phases.add_vip.push(Step::PutVip { addr, count }),
        }
    }
    for &addr in current.vips.keys() {
        if !vips.contains_key(&addr) {
            phases.drop_vip.push(Step::DeleteVip { addr });
        }
    }
    next.vips = vips;

    Ok(Plan {
        steps: phases.into_steps(),
        next,
        alloc,
        retired_ranges,
    })
}

/// Retires the active backends of frontend `id` not in `keep`.
fn retire_backends(
    next: &mut State,
    phases: &mut Phases,
    by_frontend: &HashMap<u32, Vec<u32>>,
    key: &FrontendKeyV4,
    id: u32,
    keep: &BTreeSet<u32>,
) {
    let leaving: Vec<(u32, Backend)> = by_frontend
        .get(&id)
        .into_iter()
        .flatten()
        .filter_map(|bid| next.backends.get(bid).map(|b| (*bid, *b)))
        .filter(|(bid, b)| {
            b.frontend_id == id && b.flags & BACKEND_RETIRED == 0 && !keep.contains(bid)
        })
        .collect();
    for (bid, backend) in leaving {
        let retired = Backend {
            flags: backend.flags | BACKEND_RETIRED,
            ..backend
        };
        phases.retire.push(Step::RetireBackend {
            id: bid,
            backend: retired,
        });
        next.backends.insert(bid, retired);
        if key.proto == IPPROTO_UDP {
            phases.purge.insert(bid);
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE;
    use sluice_common::types::{IPPROTO_TCP, name_str};

    use super::*;

    fn addr(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn key(vip: &str, port: u16, proto: u8) -> FrontendKeyV4 {
        FrontendKeyV4 {
            vip: u32::from_ne_bytes(addr(vip).octets()),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }

    fn frontend(service: &str, algorithm: Algorithm, backends: &[(&str, u32)]) -> DesiredFrontend {
        DesiredFrontend {
            service: ServiceRef {
                namespace: "default".into(),
                name: service.into(),
            },
            name: service.to_string(),
            target_port: 8080,
            algorithm,
            backends: backends
                .iter()
                .map(|&(a, w)| DesiredBackend::new(addr(a), w))
                .collect(),
            maglev_table_size: MAGLEV_DEFAULT_TABLE_SIZE,
            health_check: None,
            drain_timeout: None,
            session_affinity: Default::default(),
            fallback_weights: Default::default(),
        }
    }

    /// What a standalone agent programs for `manifest`.
    fn from_manifest(manifest: &str) -> Desired {
        let manifest =
            sluice_model::manifest::parse("test.yaml", manifest).expect("valid manifest");
        let view = sluice_model::view::View::of_manifest(&manifest);
        desired(&view.frontends, &Node::standalone())
    }

    /// Plans, checks the plan's `next` is what re-planning from it agrees
    /// with (idempotence), and returns the plan.
    fn plan_ok(desired: &Desired, current: &State) -> Plan {
        let alloc = Allocator::for_state(current);
        let plan = plan(desired, current, &alloc).expect("plan");
        let again = super::plan(desired, &plan.next, &plan.alloc).expect("replan");
        assert!(again.is_empty(), "not idempotent: {:?}", again.steps);
        plan
    }

    fn step_names(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .map(|s| match s {
                Step::PutBackend { .. } => "put_backend",
                Step::PutSlots { .. } => "put_slots",
                Step::PutFrontendMeta { .. } => "put_meta",
                Step::PutVip { .. } => "put_vip",
                Step::PutFrontend { .. } => "put_frontend",
                Step::DeleteFrontend { .. } => "delete_frontend",
                Step::DeleteVip { .. } => "delete_vip",
                Step::RetireBackend { .. } => "retire",
                Step::PurgeUdpFlows { .. } => "purge_udp",
                Step::PurgeFrontendFlows { .. } => "purge_frontend",
                Step::ClearFrontendMeta { .. } => "clear_meta",
            })
            .collect()
    }

    #[test]
    fn maglev_tables_have_the_size_asked_for_and_change_only_with_the_backends() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        let backends = [("198.19.1.2", 1), ("198.19.2.2", 1), ("198.19.3.2", 1)];
        let default = Desired::from([(k, frontend("web", Algorithm::Maglev, &backends))]);
        let plan = plan_ok(&default, &State::default());
        let table = &plan.next.frontends[&k];
        assert_eq!(table.frontend.slot_count, MAGLEV_DEFAULT_TABLE_SIZE);
        assert_eq!(table.frontend.algorithm, algorithm::MAGLEV);
        let mut small = frontend("web", Algorithm::Maglev, &backends);
        small.maglev_table_size = 251;
        let resized = plan_ok(&Desired::from([(k, small)]), &plan.next);
        assert_eq!(resized.next.frontends[&k].frontend.slot_count, 251);
        // Every backend owns about a third of the slots.
        let ids: BTreeSet<u32> = resized.next.frontends[&k].slots.iter().copied().collect();
        assert_eq!(ids.len(), 3);
        for id in ids {
            let owned = resized.next.frontends[&k]
                .slots
                .iter()
                .filter(|&&s| s == id)
                .count();
            assert!((82..=86).contains(&owned), "{owned}");
        }
    }

    #[test]
    fn new_service_writes_backends_then_table_then_switches() {
        let desired = Desired::from([(
            key("198.18.0.10", 80, IPPROTO_TCP),
            frontend(
                "web",
                Algorithm::RoundRobin,
                &[("198.19.1.2", 1), ("198.19.2.2", 3)],
            ),
        )]);
        let plan = plan_ok(&desired, &State::default());
        assert_eq!(
            step_names(&plan.steps),
            [
                "put_backend",
                "put_backend",
                "put_slots",
                "put_meta",
                "put_vip",
                "put_frontend"
            ]
        );
        let f = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)];
        assert_eq!(f.slots.len(), 2, "round-robin ignores weights");
        assert_eq!(name_str(&f.meta.name), "web");
        assert_eq!(plan.next.backends.len(), 2);
        assert!(
            plan.next
                .backends
                .values()
                .all(|b| b.port == 8080u16.to_be())
        );
    }

    #[test]
    fn weighted_round_robin_expands_weights() {
        let desired = Desired::from([(
            key("198.18.0.10", 80, IPPROTO_TCP),
            frontend(
                "web",
                Algorithm::WeightedRoundRobin,
                &[("198.19.1.2", 1), ("198.19.2.2", 1), ("198.19.3.2", 2)],
            ),
        )]);
        let plan = plan_ok(&desired, &State::default());
        let f = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)];
        let ids: Vec<u32> = plan.next.backends.keys().copied().collect();
        assert_eq!(f.slots, [ids[2], ids[0], ids[1], ids[2]]);
    }

    #[test]
    fn weight_change_swaps_to_a_new_range_and_keeps_ids() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        let first = plan_ok(
            &Desired::from([(
                k,
                frontend(
                    "web",
                    Algorithm::WeightedRoundRobin,
                    &[("198.19.1.2", 1), ("198.19.2.2", 1)],
                ),
            )]),
            &State::default(),
        );
        let desired = Desired::from([(
            k,
            frontend(
                "web",
                Algorithm::WeightedRoundRobin,
                &[("198.19.1.2", 1), ("198.19.2.2", 3)],
            ),
        )]);
        let second = plan(&desired, &first.next, &first.alloc).expect("plan");
        assert_eq!(
            step_names(&second.steps),
            ["put_backend", "put_slots", "put_frontend"]
        );
        let before = &first.next.frontends[&k].frontend;
        let after = &second.next.frontends[&k].frontend;
        assert_ne!(before.slot_base, after.slot_base, "old range is in use");
        assert_eq!(second.retired_ranges.len(), 1);
        assert_eq!(
            first.next.backends.keys().collect::<Vec<_>>(),
            second.next.backends.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn removed_backend_is_retired_and_only_udp_flows_are_purged() {
        let tcp = key("198.18.0.10", 80, IPPROTO_TCP);
        let udp = key("198.18.0.10", 53, IPPROTO_UDP);
        let both = |backends: &[(&str, u32)]| {
            Desired::from([
                (tcp, frontend("web", Algorithm::RoundRobin, backends)),
                (udp, frontend("web", Algorithm::RoundRobin, backends)),
            ])
        };
        let first = plan_ok(
            &both(&[("198.19.1.2", 1), ("198.19.2.2", 1)]),
            &State::default(),
        );
        let second = plan(&both(&[("198.19.1.2", 1)]), &first.next, &first.alloc).expect("plan");
        let retired: Vec<u32> = second
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::RetireBackend { id, backend } => {
                    assert!(backend.flags & BACKEND_RETIRED != 0);
                    Some(*id)
                }
                _ => None,
            })
            .collect();
        assert_eq!(retired.len(), 2, "one per service port");
        let purged: Vec<&BTreeSet<u32>> = second
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::PurgeUdpFlows { backends } => Some(backends),
                _ => None,
            })
            .collect();
        assert_eq!(purged.len(), 1);
        let udp_id = second.next.frontends[&udp].frontend.id;
        let udp_retired: Vec<u32> = retired
            .iter()
            .copied()
            .filter(|id| second.next.backends[id].frontend_id == udp_id)
            .collect();
        assert_eq!(purged[0].iter().copied().collect::<Vec<_>>(), udp_retired);
        // Retired backends stay known (their TCP flows continue) but are in no table.
        for id in &retired {
            assert!(second.next.backends.contains_key(id));
            assert!(
                second
                    .next
                    .frontends
                    .values()
                    .all(|f| !f.slots.contains(id))
            );
        }
        // Coming back revives the same id.
        let third = plan(
            &both(&[("198.19.1.2", 1), ("198.19.2.2", 1)]),
            &second.next,
            &second.alloc,
        )
        .expect("plan");
        let revived: BTreeSet<u32> = third
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::PutBackend {
                    id, fresh: false, ..
                } => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(revived, retired.into_iter().collect());
    }

    #[test]
    fn removed_service_goes_after_its_vip_users() {
        let a = key("198.18.0.10", 80, IPPROTO_TCP);
        let b = key("198.18.0.10", 443, IPPROTO_TCP);
        let first = plan_ok(
            &Desired::from([
                (
                    a,
                    frontend("web", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
                ),
                (
                    b,
                    frontend("tls", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
                ),
            ]),
            &State::default(),
        );
        assert_eq!(first.next.vips.values().copied().collect::<Vec<_>>(), [2]);
        let desired = Desired::from([(
            a,
            frontend("web", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
        )]);
        let second = plan(&desired, &first.next, &first.alloc).expect("plan");
        assert_eq!(
            step_names(&second.steps),
            [
                "delete_frontend",
                "put_vip",
                "retire",
                "purge_frontend",
                "clear_meta"
            ]
        );
        let third = plan(&Desired::new(), &second.next, &second.alloc).expect("plan");
        assert_eq!(
            step_names(&third.steps),
            [
                "delete_frontend",
                "delete_vip",
                "retire",
                "purge_frontend",
                "clear_meta"
            ]
        );
        assert!(third.next.frontends.is_empty() && third.next.vips.is_empty());
    }

    #[test]
    fn service_without_backends_has_an_empty_table() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        let plan = plan_ok(
            &Desired::from([(k, frontend("web", Algorithm::LeastConnections, &[]))]),
            &State::default(),
        );
        assert_eq!(plan.next.frontends[&k].frontend.slot_count, 0);
        assert!(!step_names(&plan.steps).contains(&"put_slots"));
    }

    #[test]
    fn capacity_errors_change_nothing() {
        let k1 = key("198.18.0.10", 80, IPPROTO_TCP);
        let k2 = key("198.18.0.11", 80, IPPROTO_TCP);
        let desired = Desired::from([
            (
                k1,
                frontend("a", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
            ),
            (
                k2,
                frontend("b", Algorithm::RoundRobin, &[("198.19.1.3", 1)]),
            ),
        ]);
        let state = State::default();
        let tight = Allocator::with_capacity(&state, 1, 8, 8);
        assert!(matches!(
            plan(&desired, &state, &tight),
            Err(PlanError::FrontendCapacity { .. })
        ));
        let tight = Allocator::with_capacity(&state, 8, 1, 8);
        assert!(matches!(
            plan(&desired, &state, &tight),
            Err(PlanError::BackendCapacity { .. })
        ));
        let tight = Allocator::with_capacity(&state, 8, 8, 1);
        let err = plan(&desired, &state, &tight).expect_err("no room");
        assert!(
            err.to_string().contains("slot table space exhausted"),
            "{err}"
        );
    }

    #[test]
    fn desired_from_a_view_matches_the_manifest_form() {
        use sluice_api::v1;
        let view = v1::FrontendView {
            maglev_table_size: 0,
            service: "shop/web".into(),
            vip: "198.18.0.10".into(),
            port: 80,
            protocol: v1::Protocol::Tcp as i32,
            target_port: 8080,
            algorithm: v1::Algorithm::WeightedRoundRobin as i32,
            backends: vec![v1::ViewBackend {
                address: "198.19.1.2".into(),
                weight: 3,
                draining: Default::default(),
                probers: Default::default(),
            }],
            drain_timeout_seconds: Default::default(),
            health_check: Default::default(),
            session_affinity_seconds: Default::default(),
            zones: Default::default(),
        };
        let frontend = sluice_model::view::Frontend::try_from(view.clone()).expect("readable");
        let frontends = Frontends::from([(frontend.key, frontend)]);
        let node = Node {
            name: "n1".into(),
            zone: None,
            naming: Naming::Cluster,
        };
        let d = desired(&frontends, &node);
        let f = &d[&key("198.18.0.10", 80, IPPROTO_TCP)];
        assert_eq!(f.name, "shop/web");
        assert_eq!(f.target_port, 8080);
        assert_eq!(f.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(f.backends, [DesiredBackend::new(addr("198.19.1.2"), 3)]);
        // A standalone agent names the service as its manifest does.
        assert_eq!(
            desired(&frontends, &Node::standalone())[&key("198.18.0.10", 80, IPPROTO_TCP)].name,
            "web"
        );
        let bad = v1::FrontendView {
            vip: "not-an-ip".into(),
            ..view
        };
        assert!(sluice_model::view::Frontend::try_from(bad).is_err());
    }

    #[test]
    fn draining_and_zero_share_backends_keep_their_id_but_leave_the_table() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        let all = frontend(
            "web",
            Algorithm::WeightedRoundRobin,
            &[("198.19.1.2", 1), ("198.19.1.3", 1), ("198.19.1.4", 2)],
        );
        let first = plan_ok(&Desired::from([(k, all.clone())]), &State::default());
        let ids: Vec<u32> = first.next.backends.keys().copied().collect();
        assert_eq!(first.next.frontends[&k].slots.len(), 4);

        let mut drained = all.clone();
        drained.backends[0].draining = true;
        drained.backends[2].weight = 0;
        let second = plan_ok(&Desired::from([(k, drained)]), &first.next);
        // Same ids, nothing retired or purged: established flows keep going.
        assert_eq!(
            second.next.backends.keys().copied().collect::<Vec<_>>(),
            ids
        );
        assert!(
            !step_names(&second.steps)
                .iter()
                .any(|s| matches!(*s, "retire" | "purge_udp"))
        );
        assert_eq!(second.next.frontends[&k].slots, [ids[1]]);
        assert_eq!(second.next.backends[&ids[0]].flags, BACKEND_DRAINING);
        assert_eq!(second.next.backends[&ids[2]].flags, 0);

        // Back in rotation: the same ids again.
        let third = plan_ok(&Desired::from([(k, all)]), &second.next);
        assert_eq!(third.next.frontends[&k].slots.len(), 4);
        assert_eq!(third.next.backends[&ids[0]].flags, 0);
    }

    #[test]
    fn a_manifest_rollout_becomes_exact_weights_and_a_weighted_algorithm() {
        let d = from_manifest(
            "kind: Service\nname: web\nvip: 198.18.0.10\nports: [{ port: 80, protocol: TCP }]\n\
             rollout: { to: v2, percent: 1 }\ndrainTimeoutSeconds: 30\nbackends:\n\
             - { address: 198.19.1.2, version: v1 }\n- { address: 198.19.1.3, version: v1 }\n\
             - { address: 198.19.1.4, version: v1 }\n- { address: 198.19.1.5, version: v2 }\n\
             - { address: 198.19.1.6, version: v2, draining: true }\n",
        );
        let web = &d[&key("198.18.0.10", 80, IPPROTO_TCP)];
        assert_eq!(web.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(web.drain_timeout, Some(Duration::from_secs(30)));
        let weights: Vec<(u32, bool)> = web
            .backends
            .iter()
            .map(|b| (b.weight, b.draining))
            .collect();
        assert_eq!(
            weights,
            [(33, false), (33, false), (33, false), (1, false), (1, true)]
        );
        let plan = plan_ok(&d, &State::default());
        let table = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)].slots;
        assert_eq!(table.len(), 100);
    }

    #[test]
    fn desired_from_manifest_splits_ports() {
        let d = from_manifest(
            "kind: Service\nname: web\nvip: 198.18.0.10\nports:\n  - { port: 80, protocol: TCP, targetPort: 8080 }\n  - { port: 53, protocol: UDP, targetPort: 5353 }\nbackends:\n  - { address: 198.19.1.2, weight: 2 }\n",
        );
        assert_eq!(d.len(), 2);
        let udp = &d[&key("198.18.0.10", 53, IPPROTO_UDP)];
        assert_eq!(udp.target_port, 5353);
        assert_eq!(udp.backends, [DesiredBackend::new(addr("198.19.1.2"), 2)]);
    }

    #[test]
    fn an_affinity_change_rewrites_the_frontend_value_alone() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        let plain = frontend(
            "web",
            Algorithm::RoundRobin,
            &[("198.19.1.2", 1), ("198.19.2.2", 1)],
        );
        let affine = DesiredFrontend {
            session_affinity: Some(Duration::from_secs(300)),
            ..plain.clone()
        };
        let first = plan_ok(&Desired::from([(k, plain.clone())]), &State::default());
        let before = first.next.frontends[&k].frontend;
        assert_eq!(before.affinity_timeout_s, 0);

        let on = plan(
            &Desired::from([(k, affine.clone())]),
            &first.next,
            &first.alloc,
        )
        .expect("plan");
        let after = Frontend {
            affinity_timeout_s: 300,
            ..before
        };
        // Same id, same slot range: nothing else to write, nothing to free.
        assert_eq!(
            on.steps,
            [Step::PutFrontend {
                key: k,
                frontend: after
            }]
        );
        assert!(on.retired_ranges.is_empty());
        assert!(
            plan(&Desired::from([(k, affine)]), &on.next, &on.alloc)
                .expect("replan")
                .is_empty()
        );

        let off = plan(&Desired::from([(k, plain)]), &on.next, &on.alloc).expect("plan");
        assert_eq!(
            off.steps,
            [Step::PutFrontend {
                key: k,
                frontend: before
            }]
        );
    }

    #[test]
    fn affinity_timeouts_round_up_to_seconds_and_saturate() {
        let k = key("198.18.0.10", 80, IPPROTO_TCP);
        for (asked, kernel) in [
            (Duration::from_millis(1), 1),
            (Duration::from_millis(1500), 2),
            (Duration::from_secs(10_800), 10_800),
            (Duration::from_secs(u64::MAX), u32::MAX),
        ] {
            let want = DesiredFrontend {
                session_affinity: Some(asked),
                ..frontend("web", Algorithm::Maglev, &[("198.19.1.2", 1)])
            };
            let plan = plan_ok(&Desired::from([(k, want)]), &State::default());
            assert_eq!(
                plan.next.frontends[&k].frontend.affinity_timeout_s, kernel,
                "{asked:?}"
            );
        }
    }
}
