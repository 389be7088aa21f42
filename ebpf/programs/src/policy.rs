//! Network policy enforcement: whether a new flow may be opened, counted per
//! verdict, and every refusal reported to the flow log.
//!
//! The compiled policy is installed by the agent (agent/src/policy.rs
//! describes it: identities, rules, generations). Here it is only looked up,
//! once per new flow, after the backend is chosen (the backend is a
//! destination a policy can select) and before the flow is recorded, so a
//! denied flow leaves no state. Established flows are not checked again; the
//! agent ends those a new policy denies.
//!
//! Every lookup is keyed by the generation read once from `POLICY_STATE`, so
//! a flow is judged by one complete policy even while the agent swaps in the
//! next.

use aya_ebpf::maps::lpm_trie::Key;
use sluice_common::{
    reason,
    types::{
        FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowKeyV4, IDENTITY_ANY, IDENTITY_EGRESS_ENFORCED,
        IDENTITY_ENFORCED, IDENTITY_WORLD, POLICY_ALLOWED, POLICY_DENIED, POLICY_NONE,
        PolicyRuleKey, RULE_EGRESS, RULE_INGRESS, policy_identity_key,
    },
};

use crate::{
    flowlog::{self, Flow, What},
    maps::{POLICY_IDENTITIES_V4, POLICY_RULES, POLICY_STATE, POLICY_STATS},
};

/// The `POLICY_STATS` slot of the policy that allowed a flow, or none.
///
/// Not an `Option<u32>`: a `None` leaves its payload undefined, and LLVM may
/// then carry "whatever the register holds" into a spill, for instance a
/// register a helper call has just clobbered, which the verifier refuses
/// (`R1 !read_ok`). Whether it does depends on register allocation across the
/// whole program, so any change elsewhere can trip it. Nor a `u32::MAX`
/// sentinel: without 32-bit jumps LLVM compared the reloaded (zero-extended)
/// slot with a sign-extended -1, which never matched, and the verifier then
/// pruned every denial as dead code. A flag and a slot, both always defined.
#[derive(Clone, Copy)]
pub struct Allowed {
    by_policy: bool,
    slot: u32,
}

impl Allowed {
    /// No policy applied.
    const NONE: Self = Self {
        by_policy: false,
        slot: 0,
    };

    #[inline(always)]
    fn by(slot: u32) -> Self {
        Self {
            by_policy: true,
            slot,
        }
    }

    #[inline(always)]
    fn is_some(self) -> bool {
        self.by_policy
    }

    /// `self` if a policy applied, else `other`.
    #[inline(always)]
    fn or(self, other: Self) -> Self {
        if self.is_some() { self } else { other }
    }
}

/// Network policy for a new flow `key` to backend `dst:port` (network order):
/// the client's egress, if a policy restricts it, must allow the backend;
/// then the service's VIP, if a policy protects it, and the backend, if a
/// policy selects it, must each admit the client (its identity, on that
/// port). Counted per allowing policy, or per denied destination (or source,
/// for egress); a denied flow is also reported to the flow log (every one,
/// not a sample). Returns the last policy that allowed, if any applied.
#[inline(always)]
pub fn admit(
    key: &FlowKeyV4,
    dst: u32,
    port: u16,
    frontend_id: u32,
    now: u64,
) -> Result<Allowed, u32> {
    let Some(state) = POLICY_STATE.get(0) else {
        return Ok(Allowed::NONE);
    };
    if state.enabled == 0 {
        return Ok(Allowed::NONE);
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
    let mut allowed_by = Allowed::NONE;
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
    let vip = ingress(
        generation,
        src_identity,
        key.dst,
        key.dport,
        key.proto,
        event,
    )?;
    let backend = ingress(generation, src_identity, dst, port, key.proto, event)?;
    Ok(backend.or(vip).or(allowed_by))
}

/// The flow-log record of a flow [`admit`] let open: allowed, and by which
/// policy's counter, or no policy at all.
#[inline(always)]
pub fn opened(allowed_by: Allowed) -> What {
    let (verdict, stats_slot) = if allowed_by.is_some() {
        (POLICY_ALLOWED, allowed_by.slot)
    } else {
        (POLICY_NONE, 0)
    };
    What {
        kind: FLOW_EVENT_NEW,
        verdict,
        reason: 0,
        stats_slot,
    }
}

/// The first rule of the four `rule` variants that exists: with the given
/// identities in turn (the destination's for egress, the source's for
/// ingress), alternately on the rule's port and on every port. Returns its
/// counter slot.
#[inline(always)]
fn find_rule(mut rule: PolicyRuleKey, identities: [u32; 4], egress: bool) -> Allowed {
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
            return Allowed::by(found.stats_slot);
        }
    }
    Allowed::NONE
}

/// Counts a verdict (`allowed` by a rule: counted in its slot and returned;
/// else denied, counted in `denied_slot` and reported).
#[inline(always)]
fn count_verdict(allowed: Allowed, denied_slot: u32, event: Flow<'_>) -> Result<Allowed, u32> {
    let slot = if allowed.is_some() {
        allowed.slot
    } else {
        denied_slot
    };
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
fn ingress(
    generation: u32,
    src_identity: u32,
    dst: u32,
    port: u16,
    proto: u8,
    event: Flow<'_>,
) -> Result<Allowed, u32> {
    let Some(target) = POLICY_IDENTITIES_V4.get(Key::new(64, policy_identity_key(generation, dst)))
    else {
        return Ok(Allowed::NONE);
    };
    if target.flags & IDENTITY_ENFORCED == 0 {
        return Ok(Allowed::NONE);
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
