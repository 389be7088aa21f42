//! The balancing algorithms: which backend a new flow of a frontend goes to.
//!
//! User space does the arithmetic that needs no packet: it lays out each
//! frontend's slot table (`SLOTS[slot_base..slot_base + slot_count]`, weights
//! reduced and interleaved, see sluice_common::slots) or its Maglev lookup
//! table (sluice_common::maglev). What is left here is the per-flow step,
//! kept to a few map lookups:
//!
//! * round-robin and weighted round-robin: the next slot, from one cursor per
//!   frontend shared by all CPUs and advanced by an atomic fetch-and-add, so
//!   the rotation is exact whichever CPU a flow lands on;
//! * least-connections (weighted or not): the slot with the fewest open
//!   connections per unit of weight, over a window of [`LC_SCAN_WINDOW`]
//!   slots starting at the cursor, so that ties rotate;
//! * Maglev: the slot the flow's 5-tuple hashes to; no shared state, so every
//!   node picks the same backend for a flow.
//!
//! Backends are chosen here without regard to policy or affinity: those are
//! the caller's (see `balance`).

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;
use sluice_common::{
    layout::LC_SCAN_WINDOW,
    maglev, reason,
    types::{FlowKeyV4, Frontend, algorithm},
};

use crate::{
    atomic,
    maps::{BACKEND_CONNS, BACKENDS, RR_CURSORS, SLOTS},
};

/// One shared cursor per frontend: round-robin walks the slot table with it,
/// least-connections starts its scan there so that ties rotate. Maglev needs
/// no cursor: its table is indexed by the flow's hash.
///
/// The cursor is advanced with `atomic::fetch_add` (SeqCst, see atomic.rs):
/// a weaker ordering returns the addend instead of the old value.
#[inline(always)]
pub fn select(frontend: &Frontend, key: &FlowKeyV4) -> Result<u32, u32> {
    if frontend.algorithm == algorithm::MAGLEV {
        let hash = maglev::flow_hash(key.src, key.dst, key.sport, key.dport, key.proto);
        return SLOTS
            .get(frontend.slot_base + hash % frontend.slot_count)
            .copied()
            .ok_or(reason::DROP_INTERNAL);
    }
    let cursor = RR_CURSORS
        .get_ptr_mut(frontend.id)
        .ok_or(reason::DROP_INTERNAL)?;
    let turn = atomic::fetch_add(cursor, 1) % frontend.slot_count as u64;
    match frontend.algorithm {
        algorithm::LEAST_CONNECTIONS => least_connections(frontend, turn as u32, false),
        algorithm::WEIGHTED_LEAST_CONNECTIONS => least_connections(frontend, turn as u32, true),
        _ => SLOTS
            .get(frontend.slot_base + turn as u32)
            .copied()
            .ok_or(reason::DROP_INTERNAL),
    }
}

/// The backend with the fewest open connections (per unit of weight), scanning
/// up to [`LC_SCAN_WINDOW`] slots from `start`. Exact for smaller backend sets,
/// best-of-a-rotating-window above.
///
/// The scan runs under `bpf_loop`, whose callback the verifier checks once. As
/// an open-coded loop, every iteration and every exit from it multiplied the
/// paths to verify past the kernel's budget.
#[inline(always)]
fn least_connections(frontend: &Frontend, start: u32, weighted: bool) -> Result<u32, u32> {
    let count = frontend.slot_count;
    let first = candidate(frontend.slot_base, start, weighted)?;
    let mut scan = Scan {
        slot_base: frontend.slot_base,
        count,
        start,
        weighted: weighted as u32,
        best: first.backend_id,
        failed: 0,
        best_conns: first.conns,
        best_weight: first.weight,
    };
    let steps = if count < LC_SCAN_WINDOW {
        count
    } else {
        LC_SCAN_WINDOW
    };
    if steps > 1 {
        // SAFETY: `scan_step` has the callback signature bpf_loop expects and
        // `scan` outlives the call.
        unsafe {
            bpf_loop(
                steps - 1,
                scan_step as *mut c_void,
                (&raw mut scan).cast(),
                0,
            )
        };
    }
    if scan.failed != 0 {
        return Err(reason::DROP_INTERNAL);
    }
    Ok(scan.best)
}

/// State of a least-connections scan, on the caller's stack.
#[repr(C)]
struct Scan {
    slot_base: u32,
    count: u32,
    start: u32,
    weighted: u32,
    best: u32,
    failed: u32,
    best_conns: u64,
    best_weight: u64,
}

/// One step of the scan: looks at slot `start + 1 + index` (wrapping).
/// Returns 0 to go on, 1 to stop.
extern "C" fn scan_step(index: u32, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer given to it: a live `Scan`.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    let mut pos = scan.start + 1 + index;
    if pos >= scan.count {
        pos -= scan.count;
    }
    match candidate(scan.slot_base, pos, scan.weighted != 0) {
        Ok(Candidate {
            backend_id,
            conns,
            weight,
        }) => {
            // conns / weight < best_conns / best_weight, without division.
            if conns * scan.best_weight < scan.best_conns * weight {
                scan.best = backend_id;
                scan.best_conns = conns;
                scan.best_weight = weight;
            }
            0
        }
        Err(_) => {
            scan.failed = 1;
            1
        }
    }
}

/// A backend in the running for least-connections.
#[derive(Clone, Copy)]
struct Candidate {
    backend_id: u32,
    /// Its open connections, as `BACKEND_CONNS` counts them.
    conns: u64,
    /// Its weight; 1 when the scan is unweighted.
    weight: u64,
}

/// The backend in slot `pos`, its open connections and its weight (1 unless
/// `weighted`).
#[inline(always)]
fn candidate(slot_base: u32, pos: u32, weighted: bool) -> Result<Candidate, u32> {
    let backend_id = *SLOTS.get(slot_base + pos).ok_or(reason::DROP_INTERNAL)?;
    let conns = match BACKEND_CONNS.get_ptr(backend_id) {
        // SAFETY: array values live as long as the map; an aligned u64 read is
        // never torn.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => return Err(reason::DROP_INTERNAL),
    };
    let weight = if weighted {
        match BACKENDS.get(backend_id) {
            Some(b) if b.weight > 0 => b.weight as u64,
            _ => 1,
        }
    } else {
        1
    };
    Ok(Candidate {
        backend_id,
        conns,
        weight,
    })
}
