//! What nodes report of their data planes: the flow log, traffic counters,
//! network-policy verdict counts and probe verdicts, as data. Text is made
//! from them only where they are shown (`sluicectl`, the dashboard, the
//! metrics pages, a standalone agent's log), with the `Display` and
//! `as_str` spellings here, so every program spells them alike.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use sluice_common::reason;

use crate::policy::compiled::Slot;
use crate::service::Protocol;
use crate::view::{FrontendKey, ServiceRef};

/// What happened to a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowKind {
    /// The data plane opened it (chose a backend).
    New,
    /// A TCP flow ended by FIN or RST.
    Close,
    /// A packet to a VIP was dropped.
    Drop,
}

/// Whether the flow went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowVerdict {
    Forwarded,
    /// Refused by network policy.
    Denied,
    /// Dropped for any other reason.
    Dropped,
}

/// Why a flow closed or a packet was dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum FlowReason {
    /// A new flow has none.
    #[default]
    None,
    Fin,
    Rst,
    /// A drop, by its data-plane outcome (one of the `DROP_*` of
    /// [`sluice_common::reason`]).
    Drop(DropReason),
    /// A reason this build does not know (a newer data plane).
    Unknown,
}

/// The data plane's reasons to drop a packet addressed to a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    VipFragment,
    VipMalformedL4,
    VipUnknownPort,
    VipProtocol,
    NoBackend,
    RstNoFlow,
    Internal,
    FlowTableFull,
    Policy,
}

impl DropReason {
    pub const ALL: [Self; 9] = [
        Self::VipFragment,
        Self::VipMalformedL4,
        Self::VipUnknownPort,
        Self::VipProtocol,
        Self::NoBackend,
        Self::RstNoFlow,
        Self::Internal,
        Self::FlowTableFull,
        Self::Policy,
    ];

    /// The data plane's outcome index (`sluice_common::reason`).
    pub const fn outcome(self) -> u32 {
        match self {
            Self::VipFragment => reason::DROP_VIP_FRAGMENT,
            Self::VipMalformedL4 => reason::DROP_VIP_MALFORMED_L4,
            Self::VipUnknownPort => reason::DROP_VIP_UNKNOWN_PORT,
            Self::VipProtocol => reason::DROP_VIP_PROTOCOL,
            Self::NoBackend => reason::DROP_NO_BACKEND,
            Self::RstNoFlow => reason::DROP_RST_NO_FLOW,
            Self::Internal => reason::DROP_INTERNAL,
            Self::FlowTableFull => reason::DROP_FLOW_TABLE_FULL,
            Self::Policy => reason::DROP_POLICY,
        }
    }

    pub fn from_outcome(outcome: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.outcome() == outcome)
    }

    /// As status and metrics name the outcome: `drop_policy`.
    pub fn as_str(self) -> &'static str {
        reason::NAMES[self.outcome() as usize]
    }
}

impl FlowKind {
    pub const ALL: [Self; 3] = [Self::New, Self::Close, Self::Drop];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Close => "close",
            Self::Drop => "drop",
        }
    }
}

impl FlowVerdict {
    pub const ALL: [Self; 3] = [Self::Forwarded, Self::Denied, Self::Dropped];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Denied => "denied",
            Self::Dropped => "dropped",
        }
    }
}

impl FlowReason {
    /// `fin`, `rst`, a drop's outcome name; empty for none.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::Drop(reason) => reason.as_str(),
            Self::Unknown => "unknown",
        }
    }
}

macro_rules! display_and_parse {
    ($($ty:ty: $what:literal),+) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownName {
                    what: $what,
                    value: s.to_owned(),
                    expected: Self::ALL.map(Self::as_str).join(", "),
                })
            }
        }
    )+};
}
display_and_parse!(FlowKind: "kind", FlowVerdict: "verdict");

impl fmt::Display for FlowReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is none of the values it should be.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}, expected one of: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// One flow-log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The node that reported it; empty until the control service names it.
    pub node: String,
    /// When the data plane saw it, in milliseconds since the Unix epoch, by
    /// the node's clock.
    pub observed_unix_ms: u64,
    pub kind: FlowKind,
    pub verdict: FlowVerdict,
    pub reason: FlowReason,
    pub client: SocketAddr,
    /// The service's VIP and port the client addressed.
    pub vip: SocketAddr,
    /// `None` when no service port matched.
    pub service: Option<ServiceRef>,
    /// `None` when no backend was chosen.
    pub backend: Option<SocketAddr>,
    pub protocol: Protocol,
    /// The network-policy counter that counted it; unused without policy.
    pub counted_as: Slot,
}

/// What the flow log is asked for: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub verdict: Option<FlowVerdict>,
    pub kind: Option<FlowKind>,
    pub service: Option<ServiceRef>,
}

impl FlowFilter {
    pub fn matches(&self, event: &FlowEvent) -> bool {
        self.verdict.is_none_or(|v| v == event.verdict)
            && self.kind.is_none_or(|k| k == event.kind)
            && self
                .service
                .as_ref()
                .is_none_or(|s| event.service.as_ref() == Some(s))
    }
}

/// Packets, bytes and flows, as a node counted them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficCounts {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Open now (a gauge, not a running total).
    pub active_connections: u64,
}

/// The sum, saturating.
impl std::ops::Add for TrafficCounts {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(other.packets),
            bytes: self.bytes.saturating_add(other.bytes),
            new_flows: self.new_flows.saturating_add(other.new_flows),
            active_connections: self
                .active_connections
                .saturating_add(other.active_connections),
        }
    }
}

/// A service port's counters on one node, with its backends'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendCounters {
    pub service: ServiceRef,
    pub key: FrontendKey,
    pub counts: TrafficCounts,
    pub backends: Vec<BackendCounters>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCounters {
    pub address: IpAddr,
    pub port: u16,
    pub counts: TrafficCounts,
}

/// Network-policy verdicts one counter slot counted on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyCounter {
    pub counts: Slot,
    pub allowed: u64,
    pub denied: u64,
}

/// What a service's backend does with new flows now, as `describe` and the
/// dashboard show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Takes new flows.
    Serving,
    /// Marked draining: no new flows, established ones finish.
    Draining,
    /// Its probers find it unhealthy.
    Unhealthy,
    /// The far side of a rollout: weight zero.
    NoShare,
}

impl BackendState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
            Self::NoShare => "no share",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend of a service, as probe verdicts name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendRef {
    pub service: ServiceRef,
    pub address: IpAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_data_planes_and_parse_back() {
        for kind in FlowKind::ALL {
            assert_eq!(kind.to_string().parse(), Ok(kind));
        }
        for verdict in FlowVerdict::ALL {
            assert_eq!(verdict.to_string().parse(), Ok(verdict));
        }
        let e = "allowed".parse::<FlowVerdict>().expect_err("not a verdict");
        assert_eq!(
            e.to_string(),
            "unknown verdict \"allowed\", expected one of: forwarded, denied, dropped"
        );
        for drop in DropReason::ALL {
            assert_eq!(DropReason::from_outcome(drop.outcome()), Some(drop));
            assert!(drop.as_str().starts_with("drop_"), "{drop:?}");
        }
        assert_eq!(DropReason::from_outcome(reason::FWD_XDP), None);
        assert_eq!(
            FlowReason::Drop(DropReason::Policy).to_string(),
            "drop_policy"
        );
        assert_eq!(FlowReason::None.to_string(), "");
    }
}
