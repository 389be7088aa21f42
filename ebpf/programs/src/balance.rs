//! What to do with a packet: the hook-independent half of the data plane.
//!
//! [`classify`] parses, finds the service or the tracked flow, picks a backend
//! for a new flow and keeps the connection table and counters. It returns the
//! rewrite to perform; the XDP and TC modules perform it their own way.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_ktime_get_coarse_ns, bpf_loop},
    maps::lpm_trie::Key,
};
use sluice_common::{
    csum,
    layout::LC_SCAN_WINDOW,
    maglev, reason,
    types::{
        AffinityKeyV4, AffinityV4, CLOSE_FIN, CLOSE_RST, FAMILY_V4, FLOW_CLOSED, FLOW_EVENT_CLOSE,
        FLOW_EVENT_DROP, FLOW_EVENT_NEW, FLOW_OPEN, FlowKeyV4, FlowV4, Frontend, FrontendKeyV4,
        IDENTITY_ANY, IDENTITY_EGRESS_ENFORCED, IDENTITY_ENFORCED, IDENTITY_WORLD, IPPROTO_TCP,
        IPPROTO_UDP, NO_FRONTEND, NextHop, POLICY_ALLOWED, POLICY_DENIED, POLICY_NONE,
        PolicyRuleKey, RULE_EGRESS, RULE_INGRESS, ReplyV4, TrafficStats, algorithm,
        policy_identity_key,
    },
};

use crate::{
    atomic,
    flowlog::{self, Flow, What},
    maps::{
        AFFINITY_V4, BACKEND_CONNS, BACKEND_STATS, BACKENDS, FLOWS_V4, FRONTEND_STATS,
        FRONTENDS_V4, NEXT_HOPS, POLICY_IDENTITIES_V4, POLICY_RULES, POLICY_STATE, POLICY_STATS,
        REPLIES_V4, RR_CURSORS, SLOTS, VIPS_V4,
    },
    packet::{Ipv4, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse_ipv4, parse_l4},
};

/// Timestamps in flow entries are refreshed at most this often: one store per
/// second per flow instead of one per packet. Idle timeouts are far longer.
const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

const EEXIST: i32 = 17;

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
    // A closed flow seeing a fresh SYN is a new connection reusing the 5-tuple
    // (TIME-WAIT recycling): balance it again instead of pinning it forever.
    let reopen = match existing {
        // SAFETY: LRU map values stay valid for the program run.
        Some(flow) => tcp && is_fresh_syn(l4.flags) && unsafe { (*flow).state } == FLOW_CLOSED,
        None => false,
    };
    let (backend_id, backend_addr, backend_port) = match existing {
        Some(flow) if !reopen => {
            if tcp && l4.flags & (TCP_FIN | TCP_RST) != 0 {
                close(flow, &key, l4.flags, now);
            }
            // SAFETY: as above; plain stores to our own entry.
            let FlowV4 {
                backend_addr,
                backend_port,
                backend_id,
                frontend_id,
                ..
            } = unsafe {
                touch(&raw mut (*flow).last_seen_ns, now);
                *flow
            };
            account(frontend_id, backend_id, false, bytes, false);
            (backend_id, backend_addr, backend_port)
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
            account(frontend.id, chosen.0, false, bytes, true);
            chosen
        }
    };
    Verdict::Nat(Nat {
        reply: false,
        old_addr: ip.dst,
        new_addr: backend_addr,
        old_port: l4.dport,
        new_port: backend_port,
        proto: ip.proto,
        l4_off: l4.off,
        l4_check: l4.check,
        ttl: ip.ttl,
        tos: ip.tos,
        tot_len: ip.tot_len,
        src: ip.src,
        dst: backend_addr,
        sport: l4.sport,
        dport: backend_port,
        // Every flow to a backend has the same next hop.
        next_hop: NEXT_HOPS.get_ptr_mut(backend_id).unwrap_or_default(),
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
        if let Some(flow) = FLOWS_V4.get_ptr_mut(forward) {
            // The 5-tuple may have been rebalanced to another backend since.
            // SAFETY: LRU map values stay valid for the program run.
            if unsafe { (*flow).backend_id } == backend_id {
                close(flow, &forward, l4.flags, now_ns());
            }
        }
    }
    let now = now_ns();
    // SAFETY: as above.
    unsafe { touch(&raw mut (*reply).last_seen_ns, now) };
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

/// Picks a backend (the client's affine one, if the service has affinity and
/// it still holds) and records the flow in both directions.
#[inline(always)]
fn open(
    frontend: &Frontend,
    key: &FlowKeyV4,
    flags: u8,
    tcp: bool,
    now: u64,
    replace: bool,
) -> Result<(u32, u32, u16), u32> {
    if frontend.slot_count == 0 {
        return Err(reason::DROP_NO_BACKEND);
    }
    let affinity = frontend.affinity_timeout_s != 0;
    let affine = if affinity {
        affine_backend(frontend, key.src, now)
    } else {
        None
    };
    let backend_id = match affine {
        Some(id) => id,
        None => select(frontend, key)?,
    };
    let backend = BACKENDS.get(backend_id).ok_or(reason::DROP_INTERNAL)?;
    if backend.family != FAMILY_V4 {
        return Err(reason::DROP_INTERNAL);
    }
    let policy_slot = admit(key, backend.addr[0], backend.port, frontend.id, now)?;
    // A flow whose first packet already closes it never counts as open.
    let counted = !(tcp && flags & TCP_FIN != 0);
    let flow = FlowV4 {
        backend_addr: backend.addr[0],
        backend_port: backend.port,
        _pad0: 0,
        backend_id,
        frontend_id: frontend.id,
        state: if counted { FLOW_OPEN } else { FLOW_CLOSED },
        _pad1: 0,
        last_seen_ns: now,
    };
    if counted {
        add_conns(backend_id, 1);
    }
    let flags = if replace { 0 } else { BPF_NOEXIST as u64 };
    let mut inserted = FLOWS_V4.insert(key, flow, flags);
    if matches!(inserted, Err(e) if e != -EEXIST) {
        // An LRU map under eviction pressure can refuse an insert (ENOMEM)
        // when no node is free on this CPU at that instant; once more.
        inserted = FLOWS_V4.insert(key, flow, flags);
    }
    match inserted {
        Ok(()) => {}
        // Another CPU created this flow between our lookup and insert (a
        // retransmitted SYN): follow its choice and return our count.
        Err(e) if e == -EEXIST => {
            if counted {
                add_conns(backend_id, u64::MAX);
            }
            let winner = FLOWS_V4.get_ptr(key).ok_or(reason::DROP_INTERNAL)?;
            // SAFETY: LRU map values stay valid for the program run.
            let winner = unsafe { *winner };
            return Ok((winner.backend_id, winner.backend_addr, winner.backend_port));
        }
        Err(_) => {
            if counted {
                add_conns(backend_id, u64::MAX);
            }
            return Err(reason::DROP_FLOW_TABLE_FULL);
        }
    }
    if flowlog::sampled(key.src, key.dst, key.sport, key.dport, key.proto) {
        let (verdict, stats_slot) = match policy_slot {
            Some(slot) => (POLICY_ALLOWED, slot),
            None => (POLICY_NONE, 0),
        };
        flowlog::emit(
            Flow {
                key,
                backend: backend.addr[0],
                backend_port: backend.port,
                frontend_id: frontend.id,
                now,
            },
            What {
                kind: FLOW_EVENT_NEW,
                verdict,
                reason: 0,
                stats_slot,
            },
        );
    }
    if affinity && affine.is_none() {
        // Best effort: a client that cannot be remembered (the LRU refused a
        // node right now) is balanced afresh next time, nothing worse.
        let _ = AFFINITY_V4.insert(
            AffinityKeyV4 {
                frontend_id: frontend.id,
                client: key.src,
            },
            AffinityV4 {
                backend_id,
                _pad: 0,
                last_seen_ns: now,
            },
            0,
        );
    }
    let reply_key = FlowKeyV4::new(
        flow.backend_addr,
        key.src,
        flow.backend_port,
        key.sport,
        key.proto,
    );
    let reply = ReplyV4 {
        vip: key.dst,
        vport: key.dport,
        _pad: 0,
        backend_id,
        frontend_id: frontend.id,
        last_seen_ns: now,
        next_hop: NextHop::default(),
    };
    REPLIES_V4
        .insert(reply_key, reply, 0)
        .map_err(|_| reason::DROP_INTERNAL)?;
    Ok((backend_id, flow.backend_addr, flow.backend_port))
}

/// Network policy for a new flow `key` to backend `dst:port` (network order):
/// the client's egress, if a policy restricts it, must allow the backend;
/// then the service's VIP, if a policy protects it, and the backend, if a
/// policy selects it, must each admit the client (its identity, on that
/// port). Counted per allowing policy, or per denied destination (or source,
/// for egress); a denied flow is also reported to the flow log (every one,
/// not a sample). Returns the counter slot of the last policy that allowed,
/// `None` if no policy applied.
#[inline(always)]
fn admit(
    key: &FlowKeyV4,
    dst: u32,
    port: u16,
    frontend_id: u32,
    now: u64,
) -> Result<Option<u32>, u32> {
    let Some(state) = POLICY_STATE.get(0) else {
        return Ok(None);
    };
    if state.enabled == 0 {
        return Ok(None);
    }
    let generation = state.generation;
    let source = POLICY_IDENTITIES_V4.get(Key::new(64, policy_identity_key(generation, key.src)));
    let src_identity = source.map_or(IDENTITY_WORLD, |i| i.identity);
    let event = Flow {
        key,
        backend: dst,
        backend_port: port,
        frontend_id,
        now,
    };
    let mut allowed_by = None;
    if let Some(source) = source
        && source.flags & IDENTITY_EGRESS_ENFORCED != 0
    {
        let target = POLICY_IDENTITIES_V4
            .get(Key::new(64, policy_identity_key(generation, dst)))
            .map_or(IDENTITY_WORLD, |i| i.identity);
        let rule = PolicyRuleKey {
            generation,
            dst: target,
            src: src_identity,
            port,
            proto: key.proto,
            direction: RULE_EGRESS,
        };
        // This destination on this port, on every port, then every
        // destination on this port, then everything.
        let allowed = find_rule(rule, [target, target, IDENTITY_ANY, IDENTITY_ANY], true);
        allowed_by = count_verdict(allowed, source.egress_slot, event)?;
    }
    let vip = verdict(
        generation,
        src_identity,
        key.dst,
        key.dport,
        key.proto,
        event,
    )?;
    let backend = verdict(generation, src_identity, dst, port, key.proto, event)?;
    Ok(backend.or(vip).or(allowed_by))
}

/// The first rule of the four `rule` variants that exists: with the given
/// identities in turn (the destination's for egress, the source's for
/// ingress), alternately on the rule's port and on every port. Returns its
/// counter slot.
#[inline(always)]
fn find_rule(mut rule: PolicyRuleKey, identities: [u32; 4], egress: bool) -> Option<u32> {
    let (port, proto) = (rule.port, rule.proto);
    for (i, identity) in identities.into_iter().enumerate() {
        if egress {
            rule.dst = identity;
        } else {
            rule.src = identity;
        }
        (rule.port, rule.proto) = if i % 2 == 0 { (port, proto) } else { (0, 0) };
        // SAFETY: hash map values stay valid for the program run; read at once.
        if let Some(found) = unsafe { POLICY_RULES.get(rule) } {
            return Some(found.stats_slot);
        }
    }
    None
}

/// Counts a verdict (`allowed`: the allowing rule's slot, returned; `None`:
/// denied, counted in `denied_slot` and reported).
#[inline(always)]
fn count_verdict(
    allowed: Option<u32>,
    denied_slot: u32,
    event: Flow<'_>,
) -> Result<Option<u32>, u32> {
    let slot = allowed.unwrap_or(denied_slot);
    if let Some(stats) = POLICY_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, only this program run touches it now.
        unsafe {
            if allowed.is_some() {
                (*stats).allowed += 1;
            } else {
                (*stats).denied += 1;
            }
        }
    }
    if allowed.is_some() {
        return Ok(allowed);
    }
    flowlog::emit(
        event,
        What {
            kind: FLOW_EVENT_DROP,
            verdict: POLICY_DENIED,
            reason: reason::DROP_POLICY as u8,
            stats_slot: slot,
        },
    );
    Err(reason::DROP_POLICY)
}

/// Whether destination `dst:port` (a VIP or a backend) admits `src_identity`;
/// open unless its identity is enforced.
#[inline(always)]
fn verdict(
    generation: u32,
    src_identity: u32,
    dst: u32,
    port: u16,
    proto: u8,
    event: Flow<'_>,
) -> Result<Option<u32>, u32> {
    let Some(target) = POLICY_IDENTITIES_V4.get(Key::new(64, policy_identity_key(generation, dst)))
    else {
        return Ok(None);
    };
    if target.flags & IDENTITY_ENFORCED == 0 {
        return Ok(None);
    }
    let rule = PolicyRuleKey {
        generation,
        dst: target.identity,
        src: src_identity,
        port,
        proto,
        direction: RULE_INGRESS,
    };
    // This source on this port, on every port, then every source on this
    // port, then everything.
    let allowed = find_rule(
        rule,
        [src_identity, src_identity, IDENTITY_ANY, IDENTITY_ANY],
        false,
    );
    count_verdict(allowed, target.stats_slot, event)
}

/// The backend `client`'s last new flow to this frontend went to, if that was
/// within the frontend's affinity timeout and the backend is still in
/// rotation; the timeout then restarts. Otherwise `None`: balance as usual.
#[inline(always)]
fn affine_backend(frontend: &Frontend, client: u32, now: u64) -> Option<u32> {
    let key = AffinityKeyV4 {
        frontend_id: frontend.id,
        client,
    };
    let entry = AFFINITY_V4.get_ptr_mut(key)?;
    // SAFETY: LRU map values stay valid for the program run.
    let AffinityV4 {
        backend_id,
        last_seen_ns,
        ..
    } = unsafe { *entry };
    // Saturating: another CPU may have stored a time a little later than ours.
    let idle = now.saturating_sub(last_seen_ns);
    if idle > u64::from(frontend.affinity_timeout_s) * 1_000_000_000 {
        return None;
    }
    // The entry may predate a drain, a removal or a rollout step: user space
    // reflects all of them in the backend entry, so no slot table walk.
    if !BACKENDS.get(backend_id)?.in_rotation(frontend.id) {
        return None;
    }
    // SAFETY: as above. Racing stores from other CPUs all write "just now".
    unsafe { (*entry).last_seen_ns = now };
    Some(backend_id)
}

/// One shared cursor per frontend: round-robin walks the slot table with it,
/// least-connections starts its scan there so that ties rotate. Maglev needs
/// no cursor: its table is indexed by the flow's hash.
#[inline(always)]
fn select(frontend: &Frontend, key: &FlowKeyV4) -> Result<u32, u32> {
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
        best: first.0,
        failed: 0,
        best_conns: first.1,
        best_weight: first.2,
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
        Ok((id, conns, weight)) => {
            // conns / weight < best_conns / best_weight, without division.
            if conns * scan.best_weight < scan.best_conns * weight {
                scan.best = id;
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

/// The backend in slot `pos`, its open connections and its weight (1 unless
/// `weighted`).
#[inline(always)]
fn candidate(slot_base: u32, pos: u32, weighted: bool) -> Result<(u32, u64, u64), u32> {
    let id = *SLOTS.get(slot_base + pos).ok_or(reason::DROP_INTERNAL)?;
    let conns = match BACKEND_CONNS.get_ptr(id) {
        // SAFETY: array values live as long as the map; an aligned u64 read is
        // never torn.
        Some(p) => unsafe { core::ptr::read_volatile(p) },
        None => return Err(reason::DROP_INTERNAL),
    };
    let weight = if weighted {
        match BACKENDS.get(id) {
            Some(b) if b.weight > 0 => b.weight as u64,
            _ => 1,
        }
    } else {
        1
    };
    Ok((id, conns, weight))
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

/// Adds `delta` (use `u64::MAX` for −1) to a backend's open-connection count.
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
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
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
