//! Idle-flow expiry: the half of connection tracking the kernel cannot do.
//!
//! The kernel closes a TCP flow when it sees FIN or RST and returns its
//! connection count at once (least-connections depends on it). Flows that just
//! stop (UDP, crashed peers, half-open TCP) are expired here, returning their
//! count too. A sweep also learns which retired backends still have flows;
//! those without are freed so their ids can be recycled.

use std::{collections::BTreeSet, time::Duration};

use sluice_common::types::{FLOW_OPEN, FlowKeyV4, FlowV4, IPPROTO_TCP};

use crate::{
    apply::{self, ApplyError},
    maps::Maps,
    reconcile::State,
};

/// Idle times after which a flow is forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Open TCP flow with no packet either way.
    pub tcp_open: Duration,
    /// TCP flow after FIN/RST (late segments of the close still find it).
    pub tcp_closed: Duration,
    /// UDP flow.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_open: Duration::from_secs(3600),
            tcp_closed: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    fn of(&self, key: &FlowKeyV4, flow: &FlowV4) -> Duration {
        match (key.proto == IPPROTO_TCP, flow.state == FLOW_OPEN) {
            (true, true) => self.tcp_open,
            (true, false) => self.tcp_closed,
            (false, _) => self.udp,
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub flows: usize,
    pub expired: usize,
    pub orphan_replies: usize,
    pub backends_freed: Vec<u32>,
}

/// One pass over the connection table at time `now_ns` (the clock of
/// `bpf_ktime_get_coarse_ns`, see [`crate::sys::coarse_now_ns`]).
pub fn sweep(
    maps: &mut Maps,
    state: &mut State,
    timeouts: &Timeouts,
    now_ns: u64,
) -> Result<Sweep, ApplyError> {
    let mut report = Sweep::default();
    let mut referenced = BTreeSet::new();
    let mut expired = Vec::new();
    for entry in maps.flows.iter() {
        let Ok((key, flow)) = entry else {
            // The entry went away while listing (LRU or the kernel): skip it.
            continue;
        };
        report.flows += 1;
        let limit = timeouts.of(&key, &flow).as_nanos() as u64;
        let mut last = flow.last_seen_ns;
        if now_ns.saturating_sub(last) > limit {
            // A quiet client may still be receiving: the reply side counts too.
            if let Ok(reply) = maps.replies.get(&reply_key(&key, &flow), 0) {
                last = last.max(reply.last_seen_ns);
            }
        }
        if now_ns.saturating_sub(last) > limit {
            expired.push((key, flow));
        } else {
            referenced.insert(flow.backend_id);
        }
    }
    for (key, flow) in &expired {
        apply::forget_flow(maps, key, flow)?;
    }
    report.expired = expired.len();

    // Reply entries whose flow was evicted by the LRU, or rebalanced to another
    // backend, are never reached through a flow: expire them on their own.
    let longest = timeouts.tcp_open.max(timeouts.udp).as_nanos() as u64;
    let orphans: Vec<FlowKeyV4> = maps
        .replies
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, r)| now_ns.saturating_sub(r.last_seen_ns) > longest)
        .map(|(k, _)| k)
        .collect();
    for key in &orphans {
        let _ = maps.replies.remove(key);
    }
    report.orphan_replies = orphans.len();

    report.backends_freed = apply::free_idle_backends(maps, state, &referenced)?;
    Ok(report)
}

/// The reply-direction key of a flow.
pub fn reply_key(key: &FlowKeyV4, flow: &FlowV4) -> FlowKeyV4 {
    FlowKeyV4::new(
        flow.backend_addr,
        key.src,
        flow.backend_port,
        key.sport,
        key.proto,
    )
}

#[cfg(test)]
mod tests {
    use sluice_common::types::{FLOW_CLOSED, IPPROTO_UDP};

    use super::*;

    #[test]
    fn timeouts_follow_protocol_and_state() {
        let t = Timeouts::default();
        let tcp = FlowKeyV4 {
            proto: IPPROTO_TCP,
            ..Default::default()
        };
        let udp = FlowKeyV4 {
            proto: IPPROTO_UDP,
            ..Default::default()
        };
        let open = FlowV4::default();
        let closed = FlowV4 {
            state: FLOW_CLOSED,
            ..Default::default()
        };
        assert_eq!(t.of(&tcp, &open), t.tcp_open);
        assert_eq!(t.of(&tcp, &closed), t.tcp_closed);
        assert_eq!(t.of(&udp, &open), t.udp);
    }

    #[test]
    fn reply_key_mirrors_the_flow() {
        let key = FlowKeyV4::new(1, 2, 3, 4, IPPROTO_TCP);
        let flow = FlowV4 {
            backend_addr: 9,
            backend_port: 8,
            ..Default::default()
        };
        let r = reply_key(&key, &flow);
        assert_eq!((r.src, r.dst, r.sport, r.dport), (9, 1, 8, 3));
    }
}
