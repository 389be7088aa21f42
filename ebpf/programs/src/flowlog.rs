//! The flow log: sampled records of flows opened, closed and dropped, on the
//! `FLOW_EVENTS` ring for the agent. Best effort by design: a full ring loses
//! the record (counted in `FLOW_EVENTS_LOST`), never the packet.

use core::ptr::{addr_of_mut, write_volatile};

use sluice_common::{
    flowlog,
    types::{FlowEvent, FlowKeyV4},
};

use crate::maps::{FLOW_EVENTS, FLOW_EVENTS_LOST, FLOW_LOG};

/// Whether the flow (client → VIP 5-tuple, network order) is in the sample.
#[inline(always)]
pub fn sampled(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> bool {
    match FLOW_LOG.get(0) {
        Some(config) => flowlog::sampled(src, dst, sport, dport, proto, config.sample_every),
        None => false,
    }
}

/// The flow a record is about.
#[derive(Clone, Copy)]
pub struct Flow<'a> {
    /// Client → VIP.
    pub key: &'a FlowKeyV4,
    /// 0: none chosen.
    pub backend: u32,
    pub backend_port: u16,
    pub frontend_id: u32,
    pub now: u64,
}

/// What the record says of it.
#[derive(Clone, Copy)]
pub struct What {
    pub kind: u8,
    pub verdict: u8,
    pub reason: u8,
    pub stats_slot: u32,
}

/// Writes one record straight into the ring, field by field.
///
/// Not built on the stack and copied: LLVM merges adjacent stores of a
/// struct literal into 64-bit stores at whatever offset they start, and the
/// verifier refuses misaligned stack writes. Volatile stores are not merged.
#[inline(always)]
pub fn emit(flow: Flow<'_>, what: What) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        if let Some(lost) = FLOW_EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array; no one else writes it now.
            unsafe { *lost += 1 };
        }
        return;
    };
    let e = entry.as_mut_ptr();
    let key = flow.key;
    // SAFETY: `e` points at a reserved, writable record of our size, ours
    // until submitted.
    unsafe {
        write_volatile(addr_of_mut!((*e).time_ns), flow.now);
        write_volatile(addr_of_mut!((*e).client), key.src);
        write_volatile(addr_of_mut!((*e).vip), key.dst);
        write_volatile(addr_of_mut!((*e).backend), flow.backend);
        write_volatile(addr_of_mut!((*e).frontend_id), flow.frontend_id);
        write_volatile(addr_of_mut!((*e).stats_slot), what.stats_slot);
        write_volatile(addr_of_mut!((*e).kind), what.kind);
        write_volatile(addr_of_mut!((*e).verdict), what.verdict);
        write_volatile(addr_of_mut!((*e)._pad), 0);
        write_volatile(addr_of_mut!((*e).client_port), key.sport);
        write_volatile(addr_of_mut!((*e).vip_port), key.dport);
        write_volatile(addr_of_mut!((*e).backend_port), flow.backend_port);
        write_volatile(addr_of_mut!((*e).proto), key.proto);
        write_volatile(addr_of_mut!((*e).reason), what.reason);
    }
    entry.submit(0);
}
