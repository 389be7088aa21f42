//! Executes reconcile plans on the maps, and reads the maps back into a
//! [`State`]. The only module that writes the service tables.

use std::collections::BTreeSet;

use aya::maps::MapError;
use sluice_common::{
    layout::{MAX_BACKENDS, map},
    types::{FAMILY_NONE, FLOW_OPEN, FlowKeyV4, FlowV4, FrontendMeta, IPPROTO_UDP},
};

use crate::{
    maps::{Maps, MapsError},
    reconcile::{FrontendState, State, Step},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{op} in map {map}")]
    Map {
        op: &'static str,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> ApplyError {
    move |source| ApplyError::Map { op, map, source }
}

/// Reads what the maps hold: frontends with their names and slot tables, every
/// backend id in use, VIPs.
pub fn read_state(maps: &Maps) -> Result<State, ApplyError> {
    let mut state = State::default();
    for entry in maps.frontends.iter() {
        let (key, frontend) = entry.map_err(map_err("listing", map::FRONTENDS_V4))?;
        let meta = maps
            .frontend_meta
            .get(&frontend.id, 0)
            .map_err(map_err("reading", map::FRONTEND_META))?;
        let mut slots = Vec::with_capacity(frontend.slot_count as usize);
        for i in 0..frontend.slot_count {
            slots.push(
                maps.slots
                    .get(&(frontend.slot_base + i), 0)
                    .map_err(map_err("reading", map::SLOTS))?,
            );
        }
        state.frontends.insert(
            key,
            FrontendState {
                frontend,
                meta,
                slots,
            },
        );
    }
    for id in 0..MAX_BACKENDS {
        let backend = maps
            .backends
            .get(&id, 0)
            .map_err(map_err("reading", map::BACKENDS))?;
        if backend.family != FAMILY_NONE {
            state.backends.insert(id, backend);
        }
    }
    for entry in maps.vips.iter() {
        let (addr, count) = entry.map_err(map_err("listing", map::VIPS_V4))?;
        state.vips.insert(addr, count);
    }
    Ok(state)
}

/// What applying a plan did besides writing tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub steps: usize,
    /// UDP flows of removed backends.
    pub udp_flows_purged: usize,
    /// Flows of deleted service ports.
    pub flows_purged: usize,
}

/// Applies steps in order. Stops at the first failure: every step leaves the
/// data plane consistent, so what was applied is safe; the caller re-reads the
/// maps to learn where it stands.
pub fn apply(maps: &mut Maps, steps: &[Step]) -> Result<Applied, ApplyError> {
    let mut applied = Applied::default();
    for step in steps {
        match step {
            Step::PutBackend { id, backend, fresh } => {
                if *fresh {
                    reset_backend(maps, *id)?;
                    Maps::reset_traffic(&mut maps.backend_stats, *id, map::BACKEND_STATS)?;
                }
                maps.backends
                    .set(*id, backend, 0)
                    .map_err(map_err("writing", map::BACKENDS))?;
            }
            Step::PutSlots { base, ids } => {
                for (i, id) in ids.iter().enumerate() {
                    maps.slots
                        .set(base + i as u32, id, 0)
                        .map_err(map_err("writing", map::SLOTS))?;
                }
            }
            Step::PutFrontendMeta { id, meta, fresh } => {
                if *fresh {
                    maps.rr_cursors
                        .set(*id, 0, 0)
                        .map_err(map_err("writing", map::RR_CURSORS))?;
                    Maps::reset_traffic(&mut maps.frontend_stats, *id, map::FRONTEND_STATS)?;
                }
                maps.frontend_meta
                    .set(*id, meta, 0)
                    .map_err(map_err("writing", map::FRONTEND_META))?;
            }
            Step::PutVip { addr, count } => maps
                .vips
                .insert(addr, count, 0)
                .map_err(map_err("writing", map::VIPS_V4))?,
            Step::PutFrontend { key, frontend } => maps
                .frontends
                .insert(key, frontend, 0)
                .map_err(map_err("writing", map::FRONTENDS_V4))?,
            Step::DeleteFrontend { key } => maps
                .frontends
                .remove(key)
                .map_err(map_err("deleting", map::FRONTENDS_V4))?,
            Step::DeleteVip { addr } => maps
                .vips
                .remove(addr)
                .map_err(map_err("deleting", map::VIPS_V4))?,
            Step::RetireBackend { id, backend } => maps
                .backends
                .set(*id, backend, 0)
                .map_err(map_err("writing", map::BACKENDS))?,
            Step::PurgeUdpFlows { backends } => {
                applied.udp_flows_purged += purge_flows(maps, |key, flow| {
                    key.proto == IPPROTO_UDP && backends.contains(&flow.backend_id)
                })?;
            }
            Step::PurgeFrontendFlows { frontends } => {
                applied.flows_purged +=
                    purge_flows(maps, |_, flow| frontends.contains(&flow.frontend_id))?;
                purge_affinity(maps, frontends)?;
            }
            Step::ClearFrontendMeta { id } => maps
                .frontend_meta
                .set(*id, FrontendMeta::default(), 0)
                .map_err(map_err("writing", map::FRONTEND_META))?,
        }
        applied.steps += 1;
    }
    Ok(applied)
}

/// Deletes the flows `doomed` selects, both directions, returning the open
/// connections they held. Returns how many flows went.
pub fn purge_flows(
    maps: &mut Maps,
    doomed: impl Fn(&FlowKeyV4, &FlowV4) -> bool,
) -> Result<usize, ApplyError> {
    let mut victims = Vec::new();
    for entry in maps.flows.iter() {
        let (key, flow) = entry.map_err(map_err("listing", map::FLOWS_V4))?;
        if doomed(&key, &flow) {
            victims.push((key, flow));
        }
    }
    for (key, flow) in &victims {
        forget_flow(maps, key, flow)?;
    }
    Ok(victims.len())
}

/// Forgets the clients' affinities to these (deleted) frontends.
///
/// Purged rather than made harmless by the kernel: the kernel already refuses
/// an entry whose backend left rotation or belongs to another frontend, but a
/// frontend id is recycled once its retired backends are freed, and their ids
/// with it, so a stale entry could name a backend of the id's next service and
/// tie clients to it that never chose it. Purging here, in the plan that
/// deletes the frontend, runs long before either id can be handed out again.
/// (A packet in flight that read the old frontend may still add an entry
/// after this; it names a backend retired in the same plan, which the kernel
/// refuses, and it expires with the timeout.)
fn purge_affinity(maps: &mut Maps, frontends: &BTreeSet<u32>) -> Result<(), ApplyError> {
    let mut doomed = Vec::new();
    for key in maps.affinity.keys() {
        let key = key.map_err(map_err("listing", map::AFFINITY_V4))?;
        if frontends.contains(&key.frontend_id) {
            doomed.push(key);
        }
    }
    for key in &doomed {
        match maps.affinity.remove(key) {
            // Evicted by the LRU meanwhile.
            Err(MapError::KeyNotFound) | Ok(()) => {}
            Err(e) => return Err(map_err("deleting", map::AFFINITY_V4)(e)),
        }
    }
    Ok(())
}

/// Deletes one flow in both directions and returns its connection count.
pub fn forget_flow(maps: &mut Maps, key: &FlowKeyV4, flow: &FlowV4) -> Result<(), ApplyError> {
    match maps.flows.remove(key) {
        // Already gone (expired by the LRU, or closed and reaped meanwhile).
        Err(MapError::KeyNotFound) => return Ok(()),
        other => other.map_err(map_err("deleting", map::FLOWS_V4))?,
    }
    let reply = FlowKeyV4::new(
        flow.backend_addr,
        key.src,
        flow.backend_port,
        key.sport,
        key.proto,
    );
    match maps.replies.remove(&reply) {
        Err(MapError::KeyNotFound) | Ok(()) => {}
        Err(e) => return Err(map_err("deleting", map::REPLIES_V4)(e)),
    }
    if flow.state == FLOW_OPEN {
        maps.conns.release(flow.backend_id);
    }
    Ok(())
}

/// Frees retired backends that no flow refers to any more: their ids can be
/// recycled. Returns the ids freed.
pub fn free_idle_backends(
    maps: &mut Maps,
    state: &mut State,
    referenced: &BTreeSet<u32>,
) -> Result<Vec<u32>, ApplyError> {
    let idle: Vec<u32> = state
        .backends
        .iter()
        .filter(|(id, b)| {
            b.flags & sluice_common::types::BACKEND_RETIRED != 0 && !referenced.contains(id)
        })
        .map(|(id, _)| *id)
        .collect();
    for id in &idle {
        maps.backends
            .set(*id, sluice_common::types::Backend::default(), 0)
            .map_err(map_err("freeing", map::BACKENDS))?;
        reset_backend(maps, *id)?;
        state.backends.remove(id);
    }
    Ok(idle)
}

/// A backend id starts (or ends) with no open connection and no cached next
/// hop: a recycled id must not send its first packets to its predecessor's
/// neighbour.
fn reset_backend(maps: &mut Maps, id: u32) -> Result<(), ApplyError> {
    maps.conns.reset(id);
    maps.next_hops
        .set(id, sluice_common::types::NextHop::default(), 0)
        .map_err(map_err("resetting", map::NEXT_HOPS))
}
