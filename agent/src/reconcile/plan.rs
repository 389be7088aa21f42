//! The map operations from what the maps hold to what is desired, and the
//! kernel values (slot tables, algorithm numbers) they write.
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
};

use imbl::OrdMap;

use sluice_common::{
    layout::{MAX_BACKENDS, MAX_FRONTENDS, MAX_SLOTS_PER_FRONTEND, SLOT_CAPACITY},
    maglev, slots,
    types::{
        BACKEND_DRAINING, BACKEND_RETIRED, Backend, FAMILY_V4, Frontend, FrontendKeyV4,
        FrontendMeta, IPPROTO_UDP, algorithm, fixed_name,
    },
};
use sluice_model::Algorithm;

use super::{Desired, DesiredBackend};
use crate::alloc::{Ids, SlotRange, SlotSpace};

/// What the maps hold (read back once at start, then kept in step). The
/// tables are persistent maps: a plan starts from a copy of the state, which
/// costs nothing however large the state is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub frontends: OrdMap<FrontendKeyV4, FrontendState>,
    /// Every backend id in use, retired ones included.
    pub backends: OrdMap<u32, Backend>,
    /// VIP address → number of service ports on it.
    pub vips: OrdMap<u32, u32>,
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
            .resume_after(state.backends.get_max().map(|(id, _)| *id));
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
    plan_scoped(desired, current, alloc, Scope::All)
}

/// The frontends a plan looks at.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every one, desired or in the maps.
    All,
    /// Only these: the maps hold what an earlier plan made them for every
    /// other frontend, which `desired` still wants unchanged. A change to a
    /// few services of many then costs what it changes.
    Only(&'a BTreeSet<FrontendKeyV4>),
}

impl Scope<'_> {
    fn covers(&self, key: &FrontendKeyV4) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(keys) => keys.contains(key),
        }
    }
}

/// [`plan`] restricted to `scope`: the same steps and next state when the
/// frontends outside it are as the maps hold them.
pub fn plan_scoped(
    desired: &Desired,
    current: &State,
    alloc: &Allocator,
    scope: Scope<'_>,
) -> Result<Plan, PlanError> {
    let mut alloc = alloc.clone();
    let mut next = current.clone();
    let mut phases = Phases::default();
    let mut retired_ranges = Vec::new();
    // Backend ids per frontend id (of the frontends in scope), kept up to
    // date below: looking backends up by scanning them all would make a plan
    // quadratic in the cluster's size.
    let in_scope: Option<BTreeSet<u32>> = match scope {
        Scope::All => None,
        Scope::Only(keys) => Some(
            keys.iter()
                .filter_map(|k| current.frontends.get(k).map(|f| f.frontend.id))
                .collect(),
        ),
    };
    let mut by_frontend: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&bid, b) in &next.backends {
        if in_scope
            .as_ref()
            .is_none_or(|ids| ids.contains(&b.frontend_id))
        {
            by_frontend.entry(b.frontend_id).or_default().push(bid);
        }
    }

    for (key, gone) in &current.frontends {
        if desired.contains_key(key) || !scope.covers(key) {
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

    // Made when an id is first allocated: most changes allocate none.
    let mut frontend_ids_in_use: Option<BTreeSet<u32>> = None;
    let mut backend_ids_in_use: Option<BTreeSet<u32>> = None;
    for (key, want) in desired {
        if !scope.covers(key) {
            continue;
        }
        let existing = next.frontends.get(key).cloned();
        let (id, fresh) = match &existing {
            Some(f) => (f.frontend.id, false),
            None => {
                let frontend_ids_in_use =
                    frontend_ids_in_use.get_or_insert_with(|| next.frontend_ids_in_use());
                let id = alloc
                    .frontend_ids
                    .allocate(frontend_ids_in_use)
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
                    let backend_ids_in_use = backend_ids_in_use
                        .get_or_insert_with(|| next.backends.keys().copied().collect());
                    let bid = alloc
                        .backend_ids
                        .allocate(backend_ids_in_use)
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
    next.vips = vips.into_iter().collect();

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
