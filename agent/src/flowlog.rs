//! The data plane's flow log, read off its ring buffer: each kernel record
//! (`sluice_common::types::FlowEvent`) becomes a domain flow event, named
//! after the service the view gave its frontend and the policy counter that
//! counted it, and timed by the wall clock. A joined node forwards them to
//! the control service; a standalone agent's log is its flow log.

use std::net::{Ipv4Addr, SocketAddr};

use sluice_common::types::{self as t, FrontendKeyV4};
use sluice_model::Protocol;
use sluice_model::observe::{DropReason, FlowEvent, FlowKind, FlowReason, FlowVerdict};
use sluice_model::policy::compiled::{CompiledPolicy, Slot};
use sluice_model::view::ServiceRef;
use tracing::{debug, info};

use crate::sys;

/// Every record waiting on the flow-log ring.
pub fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<t::FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<t::FlowEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole `FlowEvent` (checked length); read
        // unaligned, as ring buffer records carry no alignment promise.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

/// The records as flow events, timed by the wall clock (the kernel stamps
/// them with the coarse monotonic clock).
pub fn events(
    records: &[t::FlowEvent],
    policy: Option<&CompiledPolicy>,
    service_of: impl Fn(&FrontendKeyV4) -> Option<ServiceRef>,
) -> Vec<FlowEvent> {
    let wall_now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mono_now_ns = sys::coarse_now_ns();
    records
        .iter()
        .map(|e| {
            let age_ms = mono_now_ns.saturating_sub(e.time_ns) / 1_000_000;
            event(e, policy, &service_of, wall_now_ms.saturating_sub(age_ms))
        })
        .collect()
}

/// One kernel record as a flow event.
pub fn event(
    e: &t::FlowEvent,
    policy: Option<&CompiledPolicy>,
    service_of: &impl Fn(&FrontendKeyV4) -> Option<ServiceRef>,
    observed_unix_ms: u64,
) -> FlowEvent {
    let at = |addr: u32, port: u16| {
        SocketAddr::from((Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port)))
    };
    let frontend = FrontendKeyV4 {
        vip: e.vip,
        port: e.vip_port,
        proto: e.proto,
        _pad: 0,
    };
    let (kind, verdict, reason) = match e.kind {
        t::FLOW_EVENT_CLOSE => (
            FlowKind::Close,
            FlowVerdict::Forwarded,
            if e.reason == t::CLOSE_RST {
                FlowReason::Rst
            } else {
                FlowReason::Fin
            },
        ),
        t::FLOW_EVENT_DROP => (
            FlowKind::Drop,
            if e.verdict == t::POLICY_DENIED {
                FlowVerdict::Denied
            } else {
                FlowVerdict::Dropped
            },
            DropReason::from_outcome(e.reason.into()).map_or(FlowReason::Unknown, FlowReason::Drop),
        ),
        _ => (FlowKind::New, FlowVerdict::Forwarded, FlowReason::None),
    };
    let counted_as = match e.verdict {
        t::POLICY_ALLOWED | t::POLICY_DENIED => policy
            .map(|p| p.slot(e.stats_slot).clone())
            .unwrap_or_default(),
        _ => Slot::Unused,
    };
    FlowEvent {
        node: String::new(),
        observed_unix_ms,
        kind,
        verdict,
        reason,
        client: at(e.client, e.client_port),
        vip: at(e.vip, e.vip_port),
        service: service_of(&frontend),
        backend: (e.backend != 0).then(|| at(e.backend, e.backend_port)),
        protocol: if e.proto == t::IPPROTO_UDP {
            Protocol::Udp
        } else {
            Protocol::Tcp
        },
        counted_as,
    }
}

/// A standalone agent's flow log: refusals stand out at info level.
pub fn log(events: &[FlowEvent], name_of: impl Fn(&ServiceRef) -> String) {
    for e in events {
        let service = e.service.as_ref().map(&name_of).unwrap_or_default();
        let backend = e.backend.map(|b| b.to_string()).unwrap_or_default();
        if e.verdict == FlowVerdict::Forwarded {
            debug!(kind = %e.kind, client = %e.client, %service, %backend, reason = %e.reason, "flow");
        } else {
            info!(kind = %e.kind, verdict = %e.verdict, client = %e.client, vip = %e.vip, %service, %backend, reason = %e.reason, "flow not forwarded");
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::reason;
    use sluice_model::policy::compiled::PolicyRef;

    use super::*;

    fn record(kind: u8, verdict: u8, reason: u8) -> t::FlowEvent {
        t::FlowEvent {
            client: u32::from_ne_bytes([198, 18, 1, 2]),
            client_port: 40_000u16.to_be(),
            vip: u32::from_ne_bytes([198, 18, 0, 10]),
            vip_port: 80u16.to_be(),
            backend: u32::from_ne_bytes([198, 19, 0, 11]),
            backend_port: 8080u16.to_be(),
            proto: t::IPPROTO_TCP,
            kind,
            verdict,
            reason,
            stats_slot: 1,
            ..Default::default()
        }
    }

    #[test]
    fn records_become_events_named_by_the_view_and_the_policy() {
        let web = ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let service_of = |_: &FrontendKeyV4| Some(web.clone());
        let allowed_by = Slot::AllowedBy(PolicyRef {
            namespace: "shop".into(),
            name: "web-ingress".into(),
        });
        let policy = CompiledPolicy {
            slots: vec![Slot::Unused, allowed_by.clone()],
            ..Default::default()
        };
        let opened = event(
            &record(t::FLOW_EVENT_NEW, t::POLICY_ALLOWED, 0),
            Some(&policy),
            &service_of,
            7,
        );
        assert_eq!(
            (opened.kind, opened.verdict, opened.reason),
            (FlowKind::New, FlowVerdict::Forwarded, FlowReason::None)
        );
        assert_eq!(opened.counted_as, allowed_by);
        assert_eq!(opened.client.to_string(), "198.18.1.2:40000");
        assert_eq!(
            opened.backend.map(|b| b.to_string()).as_deref(),
            Some("198.19.0.11:8080")
        );
        assert_eq!(opened.service.as_ref(), Some(&web));

        let denied = event(
            &record(
                t::FLOW_EVENT_DROP,
                t::POLICY_DENIED,
                reason::DROP_POLICY as u8,
            ),
            None,
            &service_of,
            7,
        );
        assert_eq!(denied.verdict, FlowVerdict::Denied);
        assert_eq!(denied.reason.to_string(), "drop_policy");
        assert_eq!(denied.counted_as, Slot::Unused, "no policy installed");

        let reset = event(
            &record(t::FLOW_EVENT_CLOSE, 0, t::CLOSE_RST),
            None,
            &|_| None,
            7,
        );
        assert_eq!(
            (reset.kind, reset.reason),
            (FlowKind::Close, FlowReason::Rst)
        );
        assert_eq!(reset.service, None);
    }
}
