//! Connection tracking: the flow table (`FLOWS_V4`, client → VIP, which
//! backend a 5-tuple goes to), the reply table (`REPLIES_V4`, backend →
//! client, what to reverse-NAT a reply to) and the open-connection counts
//! (`BACKEND_CONNS`) least-connections balances on.
//!
//! Kept apart from the decisions because its invariant spans three maps and
//! two parties: a flow's count is added when the flow is recorded and
//! returned exactly once, by whichever comes first of the client's FIN or
//! RST, the backend's, and the agent's idle sweep (agent/src/reaper.rs), or
//! at once if recording the flow fails. The flow's `state` word is the
//! arbiter: whoever swaps it from `FLOW_OPEN` to `FLOW_CLOSED` returns the
//! count, so it only ever changes by atomic exchange.
//!
//! Both tables are LRU hashes: under pressure the kernel evicts the least
//! recently used entries rather than refusing new flows (an insert can still
//! fail for a moment, see [`record`]). The entries' timestamps are for the
//! agent's sweep, which expires idle flows; the LRU keeps its own order.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_coarse_ns};
use sluice_common::{
    reason,
    types::{
        CLOSE_FIN, CLOSE_RST, FLOW_CLOSED, FLOW_EVENT_CLOSE, FLOW_OPEN, FlowKeyV4, FlowV4, NextHop,
        POLICY_NONE, ReplyV4,
    },
};

use crate::{
    atomic,
    flowlog::{self, Flow, What},
    maps::{BACKEND_CONNS, FLOWS_V4, REPLIES_V4},
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Timestamps in flow entries are refreshed at most this often: one store per
/// second per flow instead of one per packet (a store dirties the entry's
/// cache line for every CPU reading it). Idle timeouts are far longer.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

const EEXIST: i32 = 17;

/// The backend a flow's packets are rewritten to.
#[derive(Clone, Copy)]
pub struct Target {
    pub backend_id: u32,
    /// Network order, as in the packet.
    pub addr: u32,
    pub port: u16,
}

impl Target {
    /// Where the flow `flow` goes.
    #[inline(always)]
    pub fn of(flow: &FlowV4) -> Self {
        Self {
            backend_id: flow.backend_id,
            addr: flow.backend_addr,
            port: flow.backend_port,
        }
    }
}

/// What [`record`] found in the flow table.
#[derive(Clone, Copy)]
pub enum Recorded {
    /// The entry is ours: the packet goes to the backend chosen for it.
    Ours,
    /// Another CPU recorded this 5-tuple between our lookup and our insert (a
    /// retransmitted SYN): its choice stands, ours was withdrawn.
    Theirs(Target),
}

/// Whether the tracked `flow` (if any) is a finished TCP connection that this
/// packet, a fresh SYN, reopens: a new connection reusing the 5-tuple
/// (TIME-WAIT recycling), to be balanced again instead of pinned forever.
///
/// # Safety
/// `flow` is a `FLOWS_V4` value from a lookup in this program run.
#[inline(always)]
pub unsafe fn reopens(flow: Option<*mut FlowV4>, tcp: bool, flags: u8) -> bool {
    match flow {
        // SAFETY: guaranteed by the caller; LRU map values stay valid for the
        // program run.
        Some(flow) => tcp && is_fresh_syn(flags) && unsafe { (*flow).state } == FLOW_CLOSED,
        None => false,
    }
}

/// A packet of the established flow `key`: closes it on FIN or RST, keeps it
/// fresh, and returns the entry as it stands.
///
/// # Safety
/// `flow` is `key`'s `FLOWS_V4` value, from a lookup in this program run.
#[inline(always)]
pub unsafe fn established(
    flow: *mut FlowV4,
    key: &FlowKeyV4,
    tcp: bool,
    flags: u8,
    now: u64,
) -> FlowV4 {
    if tcp && flags & (TCP_FIN | TCP_RST) != 0 {
        close(flow, key, flags, now);
    }
    // SAFETY: guaranteed by the caller; plain stores to our own entry.
    unsafe {
        touch(&raw mut (*flow).last_seen_ns, now);
        *flow
    }
}

/// Records the new flow `key` → `target` and counts it open, unless its first
/// packet already closes it. `replace`: the 5-tuple is being reopened (see
/// [`reopens`]), so the closed entry is overwritten rather than kept.
#[inline(always)]
pub fn record(
    key: &FlowKeyV4,
    target: Target,
    frontend_id: u32,
    tcp: bool,
    flags: u8,
    now: u64,
    replace: bool,
) -> Result<Recorded, u32> {
    // A flow whose first packet already closes it never counts as open.
    let counted = !(tcp && flags & TCP_FIN != 0);
    let flow = FlowV4 {
        backend_addr: target.addr,
        backend_port: target.port,
        _pad0: 0,
        backend_id: target.backend_id,
        frontend_id,
        state: if counted { FLOW_OPEN } else { FLOW_CLOSED },
        _pad1: 0,
        last_seen_ns: now,
    };
    if counted {
        add_conns(target.backend_id, 1);
    }
    let flags = if replace { 0 } else { BPF_NOEXIST as u64 };
    let mut inserted = FLOWS_V4.insert(key, flow, flags);
    if matches!(inserted, Err(e) if e != -EEXIST) {
        // An LRU map under eviction pressure can refuse an insert (ENOMEM)
        // when no node is free on this CPU at that instant; once more.
        inserted = FLOWS_V4.insert(key, flow, flags);
    }
    match inserted {
        Ok(()) => Ok(Recorded::Ours),
        // Another CPU created this flow between our lookup and insert (a
        // retransmitted SYN): follow its choice and return our count.
        Err(e) if e == -EEXIST => {
            if counted {
                add_conns(target.backend_id, u64::MAX);
            }
            let winner = FLOWS_V4.get_ptr(key).ok_or(reason::DROP_INTERNAL)?;
            // SAFETY: LRU map values stay valid for the program run.
            let winner = unsafe { *winner };
            Ok(Recorded::Theirs(Target::of(&winner)))
        }
        Err(_) => {
            if counted {
                add_conns(target.backend_id, u64::MAX);
            }
            Err(reason::DROP_FLOW_TABLE_FULL)
        }
    }
}

/// Records the reverse NAT of the new flow `key` → `target`, keyed by the
/// 5-tuple its replies will carry.
#[inline(always)]
pub fn record_reply(
    key: &FlowKeyV4,
    target: Target,
    frontend_id: u32,
    now: u64,
) -> Result<(), u32> {
    let reply_key = FlowKeyV4::new(target.addr, key.src, target.port, key.sport, key.proto);
    let reply = ReplyV4 {
        vip: key.dst,
        vport: key.dport,
        _pad: 0,
        backend_id: target.backend_id,
        frontend_id,
        last_seen_ns: now,
        next_hop: NextHop::default(),
    };
    REPLIES_V4
        .insert(reply_key, reply, 0)
        .map_err(|_| reason::DROP_INTERNAL)
}

/// A reply of the flow `forward` (client → VIP) from backend `backend_id`: a
/// FIN or RST closes the flow. The backend must match: the 5-tuple may have
/// been rebalanced to another backend since this reply entry was made.
#[inline(always)]
pub fn reply_seen(forward: &FlowKeyV4, backend_id: u32, flags: u8) {
    if let Some(flow) = FLOWS_V4.get_ptr_mut(forward) {
        // SAFETY: LRU map values stay valid for the program run.
        if unsafe { (*flow).backend_id } == backend_id {
            close(flow, forward, flags, now_ns());
        }
    }
}

/// Marks the flow `key` (client → VIP) closed and returns its connection
/// count, exactly once even if both directions' FINs race on two CPUs or the
/// agent expires it meanwhile; the one that closes it reports the close.
#[inline(always)]
fn close(flow: *mut FlowV4, key: &FlowKeyV4, flags: u8, now: u64) {
    // SAFETY: `flow` is a live LRU map value; `state` is 4-byte aligned.
    let previous = atomic::swap(unsafe { &raw mut (*flow).state }, FLOW_CLOSED);
    if previous != FLOW_OPEN {
        return;
    }
    // SAFETY: as above.
    let flow = unsafe { *flow };
    add_conns(flow.backend_id, u64::MAX);
    if flowlog::sampled(key.src, key.dst, key.sport, key.dport, key.proto) {
        flowlog::emit(
            Flow {
                key,
                backend: flow.backend_addr,
                backend_port: flow.backend_port,
                frontend_id: flow.frontend_id,
                now,
            },
            What {
                kind: FLOW_EVENT_CLOSE,
                verdict: POLICY_NONE,
                reason: if flags & TCP_RST != 0 {
                    CLOSE_RST
                } else {
                    CLOSE_FIN
                },
                stats_slot: 0,
            },
        );
    }
}

/// Adds `delta` (use `u64::MAX` for −1) to a backend's open-connection count.
/// Atomic: every CPU and the agent's sweep update the same counter.
#[inline(always)]
fn add_conns(backend_id: u32, delta: u64) {
    if let Some(conns) = BACKEND_CONNS.get_ptr_mut(backend_id) {
        atomic::fetch_add(conns, delta);
    }
}

#[inline(always)]
fn is_fresh_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// The clock of every timestamp in the tables: `CLOCK_MONOTONIC_COARSE`
/// (`ktime_get_coarse_ns`), the one the agent's sweep reads too. Tick
/// resolution is plenty at one refresh a second, and it spares the
/// clocksource read of `bpf_ktime_get_ns` on every packet.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Refreshes a reply entry's timestamp (see [`TOUCH_INTERVAL_NS`]).
///
/// # Safety
/// `reply` is a `REPLIES_V4` value from a lookup in this program run.
#[inline(always)]
pub unsafe fn touch_reply(reply: *mut ReplyV4, now: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { touch(&raw mut (*reply).last_seen_ns, now) };
}

/// # Safety
/// `at` points into a live map value.
#[inline(always)]
unsafe fn touch(at: *mut u64, now: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        if now.wrapping_sub(*at) > TOUCH_INTERVAL_NS {
            *at = now;
        }
    }
}
