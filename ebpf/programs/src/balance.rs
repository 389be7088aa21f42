//! What to do with a packet: the hook-independent half of the data plane.
//!
//! [`classify`] parses a frame, sorts it into traffic to a VIP, replies of
//! tracked flows and traffic that is not Sluice's, and returns the rewrite to
//! perform; the XDP and TC modules perform it their own way. This module only ties the
//! per-packet decision together; each concern it consults has its own module,
//! as Cilium splits lb.h, conntrack.h and policy.h:
//!
//! * [`conntrack`]: the flow and reply tables, closes, connection counts;
//! * [`lb`]: the balancing algorithms;
//! * [`affinity`]: client-IP session affinity;
//! * [`policy`]: network policy.
//!
//! Everything here is `#[inline(always)]`, as are the helpers it calls in
//! those modules: each program is one BPF function (only the least-connections
//! step is a separate one, because `bpf_loop` takes a callback). A BPF-to-BPF
//! call would cost a call and return per packet and change what the verifier
//! sees (a static subprogram is verified again at each call site with its
//! caller's state; a global one once, but without packet pointers in its
//! arguments), so an inlining change needs measuring first.

use sluice_common::{
    csum, reason,
    types::{
        FAMILY_V4, FLOW_EVENT_DROP, FlowKeyV4, Frontend, FrontendKeyV4, IPPROTO_TCP, IPPROTO_UDP,
        NO_FRONTEND, NextHop, POLICY_NONE, ReplyV4, TrafficStats,
    },
};

use crate::{
    affinity,
    conntrack::{self, Recorded, Target, now_ns},
    flowlog::{self, Flow, What},
    lb,
    maps::{
        BACKEND_STATS, BACKENDS, FLOWS_V4, FRONTEND_STATS, FRONTENDS_V4, NEXT_HOPS, REPLIES_V4,
        VIPS_V4,
    },
    packet::{Ipv4, L4, TCP_FIN, TCP_RST, parse_ipv4, parse_l4},
    policy,
};

pub enum Verdict {
    /// Not Sluice's traffic: pass untouched, counted under the reason.
    Pass(u32),
    /// Sluice's traffic that cannot be balanced: drop, counted under the reason.
    Drop(u32),
    /// XDP only: the checksum is still offload-pending; leave it to the TC program.
    Defer,
    /// Rewrite and forward.
    Nat(Nat),
}

/// One address and one port to rewrite, plus what forwarding needs afterwards.
#[derive(Clone, Copy)]
pub struct Nat {
    /// `false`: client → backend, destination rewritten (VIP → backend).
    /// `true`: backend → client, source rewritten (backend → VIP).
    pub reply: bool,
    pub old_addr: u32,
    pub new_addr: u32,
    pub old_port: u16,
    pub new_port: u16,
    pub proto: u8,
    /// L4 header offset in the frame, and its checksum as received.
    pub l4_off: usize,
    pub l4_check: u16,
    pub ttl: u8,
    pub tos: u8,
    pub tot_len: u16,
    /// The 4-tuple after the rewrite, for the FIB lookup.
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// The flow entry's cached next hop (null if there is no entry to cache in).
    pub next_hop: *mut NextHop,
    /// `bpf_ktime_get_coarse_ns` when the packet was classified.
    pub now: u64,
}

/// Decides the fate of the frame in `[start, end)`, `pkt_len` bytes in all.
/// With `defer_partial`, packets Sluice must rewrite but whose L4 checksum is
/// offload-pending are returned as [`Verdict::Defer`] before any state changes.
#[inline(always)]
pub fn classify(start: usize, end: usize, pkt_len: usize, defer_partial: bool) -> Verdict {
    let ip = match parse_ipv4(start, end, pkt_len) {
        Ok(ip) => ip,
        Err(why) => return Verdict::Pass(why),
    };
    let to_vip = VIPS_V4.get_ptr(ip.dst).is_some();
    if ip.fragment {
        return if to_vip {
            dropped(&ip, 0, 0, NO_FRONTEND, reason::DROP_VIP_FRAGMENT)
        } else {
            Verdict::Pass(reason::PASS_FRAGMENT)
        };
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return if to_vip {
            dropped(&ip, 0, 0, NO_FRONTEND, reason::DROP_VIP_PROTOCOL)
        } else {
            Verdict::Pass(reason::PASS_OTHER_PROTOCOL)
        };
    }
    let Some(l4) = parse_l4(start, end, &ip) else {
        return if to_vip {
            dropped(&ip, 0, 0, NO_FRONTEND, reason::DROP_VIP_MALFORMED_L4)
        } else {
            Verdict::Pass(reason::PASS_MALFORMED_L4)
        };
    };
    let bytes = pkt_len as u64;
    if to_vip {
        to_service(&ip, &l4, bytes, defer_partial)
    } else {
        from_backend(&ip, &l4, bytes, defer_partial)
    }
}

/// Client → VIP: find or create the flow, DNAT to its backend.
///
/// An established flow needs one lookup: its entry names the backend. The
/// service itself is looked up only to open a flow; flows of a service that
/// is deleted are purged by the agent.
#[inline(always)]
fn to_service(ip: &Ipv4, l4: &L4, bytes: u64, defer_partial: bool) -> Verdict {
    // Before any state changes: this packet cannot be rewritten here.
    if defer_partial && checksum_pending(ip, l4) {
        return Verdict::Defer;
    }
    let tcp = ip.proto == IPPROTO_TCP;
    let key = FlowKeyV4::new(ip.src, ip.dst, l4.sport, l4.dport, ip.proto);
    let now = now_ns();
    let existing = FLOWS_V4.get_ptr_mut(key);
    // SAFETY: `existing` comes from the lookup just above.
    let reopen = unsafe { conntrack::reopens(existing, tcp, l4.flags) };
    let target = match existing {
        Some(flow) if !reopen => {
            // SAFETY: `key`'s entry, from the lookup above.
            let flow = unsafe { conntrack::established(flow, &key, tcp, l4.flags, now) };
            account(flow.frontend_id, flow.backend_id, false, bytes, false);
            Target::of(&flow)
        }
        _ => {
            if tcp && l4.flags & TCP_RST != 0 {
                return dropped(
                    ip,
                    l4.sport,
                    l4.dport,
                    NO_FRONTEND,
                    reason::DROP_RST_NO_FLOW,
                );
            }
            let frontend_key = FrontendKeyV4 {
                vip: ip.dst,
                port: l4.dport,
                proto: ip.proto,
                _pad: 0,
            };
            let Some(frontend) = FRONTENDS_V4.get_ptr(frontend_key) else {
                return dropped(
                    ip,
                    l4.sport,
                    l4.dport,
                    NO_FRONTEND,
                    reason::DROP_VIP_UNKNOWN_PORT,
                );
            };
            // SAFETY: a NO_PREALLOC hash value stays valid for the program run (RCU).
            let frontend = unsafe { *frontend };
            let chosen = match open(&frontend, &key, l4.flags, tcp, now, reopen) {
                Ok(chosen) => chosen,
                Err(why) => return dropped(ip, l4.sport, l4.dport, frontend.id, why),
            };
            account(frontend.id, chosen.backend_id, false, bytes, true);
            chosen
        }
    };
    Verdict::Nat(Nat {
        reply: false,
        old_addr: ip.dst,
        new_addr: target.addr,
        old_port: l4.dport,
        new_port: target.port,
        proto: ip.proto,
        l4_off: l4.off,
        l4_check: l4.check,
        ttl: ip.ttl,
        tos: ip.tos,
        tot_len: ip.tot_len,
        src: ip.src,
        dst: target.addr,
        sport: l4.sport,
        dport: target.port,
        // Every flow to a backend has the same next hop.
        next_hop: NEXT_HOPS.get_ptr_mut(target.backend_id).unwrap_or_default(),
        now,
    })
}

/// Backend → client: if this is the reply of a tracked flow, SNAT it to the VIP.
#[inline(always)]
fn from_backend(ip: &Ipv4, l4: &L4, bytes: u64, defer_partial: bool) -> Verdict {
    let key = FlowKeyV4::new(ip.src, ip.dst, l4.sport, l4.dport, ip.proto);
    let Some(reply) = REPLIES_V4.get_ptr_mut(key) else {
        return Verdict::Pass(reason::PASS_NOT_SERVICE);
    };
    if defer_partial && checksum_pending(ip, l4) {
        return Verdict::Defer;
    }
    // SAFETY: LRU map values stay valid for the program run.
    let ReplyV4 {
        vip,
        vport,
        backend_id,
        frontend_id,
        ..
    } = unsafe { *reply };
    if ip.proto == IPPROTO_TCP && l4.flags & (TCP_FIN | TCP_RST) != 0 {
        let forward = FlowKeyV4::new(ip.dst, vip, l4.dport, vport, ip.proto);
        conntrack::reply_seen(&forward, backend_id, l4.flags);
    }
    let now = now_ns();
    // SAFETY: `reply` comes from the lookup above.
    unsafe { conntrack::touch_reply(reply, now) };
    account(frontend_id, backend_id, true, bytes, false);
    Verdict::Nat(Nat {
        reply: true,
        old_addr: ip.src,
        new_addr: vip,
        old_port: l4.sport,
        new_port: vport,
        proto: ip.proto,
        l4_off: l4.off,
        l4_check: l4.check,
        ttl: ip.ttl,
        tos: ip.tos,
        tot_len: ip.tot_len,
        src: vip,
        dst: ip.dst,
        sport: vport,
        dport: l4.dport,
        // SAFETY: a live LRU map value.
        next_hop: unsafe { &raw mut (*reply).next_hop },
        now,
    })
}

/// Opens a flow: picks a backend (the client's affine one, if the service has
/// affinity and it still holds; else the frontend's algorithm's), asks policy
/// whether the client may reach it, and records the flow in both directions.
/// The order matters: policy judges the backend actually chosen, and a flow it
/// refuses leaves no state behind.
#[inline(always)]
fn open(
    frontend: &Frontend,
    key: &FlowKeyV4,
    flags: u8,
    tcp: bool,
    now: u64,
    replace: bool,
) -> Result<Target, u32> {
    if frontend.slot_count == 0 {
        return Err(reason::DROP_NO_BACKEND);
    }
    let affinity = affinity::enabled(frontend);
    let affine = if affinity {
        affinity::backend(frontend, key.src, now)
    } else {
        None
    };
    let backend_id = match affine {
        Some(id) => id,
        None => lb::select(frontend, key)?,
    };
    let backend = BACKENDS.get(backend_id).ok_or(reason::DROP_INTERNAL)?;
    if backend.family != FAMILY_V4 {
        return Err(reason::DROP_INTERNAL);
    }
    let target = Target {
        backend_id,
        addr: backend.addr[0],
        port: backend.port,
    };
    let allowed_by = policy::admit(key, target.addr, target.port, frontend.id, now)?;
    if let Recorded::Theirs(winner) =
        conntrack::record(key, target, frontend.id, tcp, flags, now, replace)?
    {
        return Ok(winner);
    }
    if flowlog::sampled(key.src, key.dst, key.sport, key.dport, key.proto) {
        flowlog::emit(
            Flow {
                key,
                backend: target.addr,
                backend_port: target.port,
                frontend_id: frontend.id,
                now,
            },
            policy::opened(allowed_by),
        );
    }
    if affinity && affine.is_none() {
        affinity::remember(frontend.id, key.src, backend_id, now);
    }
    conntrack::record_reply(key, target, frontend.id, now)?;
    Ok(target)
}

/// A packet to a VIP that cannot be balanced: reported to the flow log if
/// sampled (policy refusals were reported, all of them, when counted).
#[inline(always)]
fn dropped(ip: &Ipv4, sport: u16, dport: u16, frontend_id: u32, why: u32) -> Verdict {
    if why != reason::DROP_POLICY && flowlog::sampled(ip.src, ip.dst, sport, dport, ip.proto) {
        let key = FlowKeyV4::new(ip.src, ip.dst, sport, dport, ip.proto);
        flowlog::emit(
            Flow {
                key: &key,
                backend: 0,
                backend_port: 0,
                frontend_id,
                now: now_ns(),
            },
            What {
                kind: FLOW_EVENT_DROP,
                verdict: POLICY_NONE,
                reason: why as u8,
                stats_slot: 0,
            },
        );
    }
    Verdict::Drop(why)
}

/// True when the L4 checksum field holds only the pseudo-header sum: the packet
/// comes from a local socket whose checksum offload has not run yet. Bytes
/// rewritten in XDP could not be reflected in it correctly (see `csum`).
#[inline(always)]
fn checksum_pending(ip: &Ipv4, l4: &L4) -> bool {
    if ip.proto == IPPROTO_UDP && l4.check == 0 {
        return false; // UDP without checksum
    }
    let segment = ip.tot_len - ip.hlen as u16;
    l4.check == csum::pseudo_header_v4(ip.src, ip.dst, ip.proto, segment)
}

#[inline(always)]
fn account(frontend_id: u32, backend_id: u32, reply: bool, bytes: u64, new_flow: bool) {
    if let Some(s) = FRONTEND_STATS.get_ptr_mut(frontend_id) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it meanwhile.
        add_traffic(unsafe { &mut *s }, reply, bytes, new_flow);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        add_traffic(unsafe { &mut *s }, reply, bytes, new_flow);
    }
}

#[inline(always)]
fn add_traffic(stats: &mut TrafficStats, reply: bool, bytes: u64, new_flow: bool) {
    if reply {
        stats.rev_packets += 1;
        stats.rev_bytes += bytes;
    } else {
        stats.fwd_packets += 1;
        stats.fwd_bytes += bytes;
    }
    if new_flow {
        stats.new_flows += 1;
    }
}
