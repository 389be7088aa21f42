//! Reports on the wire: the flow log, counters, policy verdict counts, probe
//! verdicts. Addresses travel as bytes (4 for IPv4, 16 for IPv6).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sluice_api::v1;

use super::protocol_from_proto;
use crate::observe::{
    BackendCounters, BackendRef, BackendState, DropReason, FlowEvent, FlowFilter, FlowKind,
    FlowReason, FlowVerdict, FrontendCounters, PolicyCounter, TrafficCounts,
};
use crate::policy::compiled::Slot;
use crate::rules::Problem;
use crate::view::{FrontendKey, ServiceRef};

/// Why a report does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("{field}: an address is 4 or 16 bytes, got {len}")]
    Address { field: &'static str, len: usize },
    #[error("{field}: {value} is not an IPv4 address (IPv6 is not supported yet)")]
    NotIpv4 { field: &'static str, value: IpAddr },
    #[error("{field}: port {value} is out of range")]
    Port { field: &'static str, value: u32 },
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("{field}: unknown value {value}")]
    UnknownValue { field: &'static str, value: i32 },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: Problem,
    },
}

pub fn address_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

pub fn address_from_bytes(field: &'static str, bytes: &[u8]) -> Result<IpAddr, ReportError> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(ReportError::Address {
        field,
        len: bytes.len(),
    })
}

fn ipv4_from_bytes(field: &'static str, bytes: &[u8]) -> Result<Ipv4Addr, ReportError> {
    match address_from_bytes(field, bytes)? {
        IpAddr::V4(v4) => Ok(v4),
        value => Err(ReportError::NotIpv4 { field, value }),
    }
}

fn port(field: &'static str, value: u32) -> Result<u16, ReportError> {
    u16::try_from(value).map_err(|_| ReportError::Port { field, value })
}

pub fn socket_to_proto(addr: SocketAddr) -> v1::SocketAddress {
    v1::SocketAddress {
        address: address_bytes(addr.ip()),
        port: addr.port().into(),
    }
}

fn socket(field: &'static str, addr: v1::SocketAddress) -> Result<SocketAddr, ReportError> {
    Ok(SocketAddr::new(
        address_from_bytes(field, &addr.address)?,
        port(field, addr.port)?,
    ))
}

// ---------------------------------------------------------------------------------------
// Flow log
// ---------------------------------------------------------------------------------------

impl From<FlowKind> for v1::FlowKind {
    fn from(kind: FlowKind) -> Self {
        match kind {
            FlowKind::New => Self::New,
            FlowKind::Close => Self::Close,
            FlowKind::Drop => Self::Drop,
        }
    }
}

fn kind_from_proto(value: i32) -> Option<FlowKind> {
    match v1::FlowKind::try_from(value).ok()? {
        v1::FlowKind::New => Some(FlowKind::New),
        v1::FlowKind::Close => Some(FlowKind::Close),
        v1::FlowKind::Drop => Some(FlowKind::Drop),
        v1::FlowKind::Unspecified => None,
    }
}

impl From<FlowVerdict> for v1::FlowVerdict {
    fn from(verdict: FlowVerdict) -> Self {
        match verdict {
            FlowVerdict::Forwarded => Self::Forwarded,
            FlowVerdict::Denied => Self::Denied,
            FlowVerdict::Dropped => Self::Dropped,
        }
    }
}

fn verdict_from_proto(value: i32) -> Option<FlowVerdict> {
    match v1::FlowVerdict::try_from(value).ok()? {
        v1::FlowVerdict::Forwarded => Some(FlowVerdict::Forwarded),
        v1::FlowVerdict::Denied => Some(FlowVerdict::Denied),
        v1::FlowVerdict::Dropped => Some(FlowVerdict::Dropped),
        v1::FlowVerdict::Unspecified => None,
    }
}

impl From<DropReason> for v1::FlowReason {
    fn from(reason: DropReason) -> Self {
        match reason {
            DropReason::VipFragment => Self::DropVipFragment,
            DropReason::VipMalformedL4 => Self::DropVipMalformedL4,
            DropReason::VipUnknownPort => Self::DropVipUnknownPort,
            DropReason::VipProtocol => Self::DropVipProtocol,
            DropReason::NoBackend => Self::DropNoBackend,
            DropReason::RstNoFlow => Self::DropRstNoFlow,
            DropReason::Internal => Self::DropInternal,
            DropReason::FlowTableFull => Self::DropFlowTableFull,
            DropReason::Policy => Self::DropPolicy,
        }
    }
}

impl From<FlowReason> for v1::FlowReason {
    fn from(reason: FlowReason) -> Self {
        match reason {
            FlowReason::None | FlowReason::Unknown => Self::Unspecified,
            FlowReason::Fin => Self::Fin,
            FlowReason::Rst => Self::Rst,
            FlowReason::Drop(drop) => drop.into(),
        }
    }
}

/// Unspecified is none for a new flow, unknown otherwise.
fn reason_from_proto(value: i32, kind: FlowKind) -> FlowReason {
    let Ok(reason) = v1::FlowReason::try_from(value) else {
        return FlowReason::Unknown;
    };
    let drop = |outcome: DropReason| FlowReason::Drop(outcome);
    match reason {
        v1::FlowReason::Unspecified if kind == FlowKind::New => FlowReason::None,
        v1::FlowReason::Unspecified => FlowReason::Unknown,
        v1::FlowReason::Fin => FlowReason::Fin,
        v1::FlowReason::Rst => FlowReason::Rst,
        v1::FlowReason::DropVipFragment => drop(DropReason::VipFragment),
        v1::FlowReason::DropVipMalformedL4 => drop(DropReason::VipMalformedL4),
        v1::FlowReason::DropVipUnknownPort => drop(DropReason::VipUnknownPort),
        v1::FlowReason::DropVipProtocol => drop(DropReason::VipProtocol),
        v1::FlowReason::DropNoBackend => drop(DropReason::NoBackend),
        v1::FlowReason::DropRstNoFlow => drop(DropReason::RstNoFlow),
        v1::FlowReason::DropInternal => drop(DropReason::Internal),
        v1::FlowReason::DropFlowTableFull => drop(DropReason::FlowTableFull),
        v1::FlowReason::DropPolicy => drop(DropReason::Policy),
    }
}

fn counted_as_proto(slot: &Slot) -> Option<v1::PolicySlot> {
    (*slot != Slot::Unused).then(|| slot.into())
}

impl From<&FlowEvent> for v1::FlowEvent {
    fn from(event: &FlowEvent) -> Self {
        let FlowEvent {
            node,
            observed_unix_ms,
            kind,
            verdict,
            reason,
            client,
            vip,
            service,
            backend,
            protocol,
            counted_as,
        } = event;
        Self {
            node: node.clone(),
            kind: v1::FlowKind::from(*kind) as i32,
            verdict: v1::FlowVerdict::from(*verdict) as i32,
            reason: v1::FlowReason::from(*reason) as i32,
            client: Some(socket_to_proto(*client)),
            vip: Some(socket_to_proto(*vip)),
            service: service.as_ref().map(v1::ObjectName::from),
            backend: backend.map(socket_to_proto),
            protocol: v1::Protocol::from(*protocol) as i32,
            counted_as: counted_as_proto(counted_as),
            observed_unix_ms: *observed_unix_ms,
        }
    }
}

impl TryFrom<v1::FlowEvent> for FlowEvent {
    type Error = ReportError;

    fn try_from(event: v1::FlowEvent) -> Result<Self, ReportError> {
        let v1::FlowEvent {
            node,
            kind,
            verdict,
            reason,
            client,
            vip,
            service,
            backend,
            protocol,
            counted_as,
            observed_unix_ms,
        } = event;
        let kind = kind_from_proto(kind).ok_or(ReportError::Missing { field: "kind" })?;
        let verdict =
            verdict_from_proto(verdict).ok_or(ReportError::Missing { field: "verdict" })?;
        let required = |field, addr: Option<v1::SocketAddress>| {
            socket(field, addr.ok_or(ReportError::Missing { field })?)
        };
        Ok(Self {
            node,
            observed_unix_ms,
            kind,
            verdict,
            reason: reason_from_proto(reason, kind),
            client: required("client", client)?,
            vip: required("vip", vip)?,
            service: service.map(ServiceRef::from),
            backend: backend.map(|b| socket("backend", b)).transpose()?,
            protocol: protocol_from_proto(protocol).map_err(|problem| ReportError::Invalid {
                field: "protocol",
                problem,
            })?,
            counted_as: counted_as.map(Slot::from).unwrap_or_default(),
        })
    }
}

impl FlowFilter {
    /// The request for this filter.
    pub fn to_request(&self, follow: bool) -> v1::WatchFlowsRequest {
        v1::WatchFlowsRequest {
            follow,
            verdict: self
                .verdict
                .map_or(v1::FlowVerdict::Unspecified, v1::FlowVerdict::from)
                as i32,
            kind: self
                .kind
                .map_or(v1::FlowKind::Unspecified, v1::FlowKind::from) as i32,
            service: self.service.as_ref().map(v1::ObjectName::from),
        }
    }

    /// The filter a request asks for (unspecified values filter nothing;
    /// values this build does not know are refused).
    pub fn of_request(request: &v1::WatchFlowsRequest) -> Result<Self, ReportError> {
        fn known<T>(
            field: &'static str,
            value: i32,
            parsed: Option<T>,
        ) -> Result<Option<T>, ReportError> {
            match (value, parsed) {
                (0, _) => Ok(None),
                (_, Some(parsed)) => Ok(Some(parsed)),
                (value, None) => Err(ReportError::UnknownValue { field, value }),
            }
        }
        Ok(Self {
            verdict: known(
                "verdict",
                request.verdict,
                verdict_from_proto(request.verdict),
            )?,
            kind: known("kind", request.kind, kind_from_proto(request.kind))?,
            service: request.service.clone().map(ServiceRef::from),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Counters and verdicts
// ---------------------------------------------------------------------------------------

impl From<TrafficCounts> for v1::TrafficCounters {
    fn from(c: TrafficCounts) -> Self {
        let TrafficCounts {
            packets,
            bytes,
            new_flows,
            active_connections,
        } = c;
        Self {
            packets,
            bytes,
            new_flows,
            active_connections,
        }
    }
}

impl From<v1::TrafficCounters> for TrafficCounts {
    fn from(c: v1::TrafficCounters) -> Self {
        let v1::TrafficCounters {
            packets,
            bytes,
            new_flows,
            active_connections,
        } = c;
        Self {
            packets,
            bytes,
            new_flows,
            active_connections,
        }
    }
}

impl From<&FrontendCounters> for v1::FrontendCounters {
    fn from(f: &FrontendCounters) -> Self {
        Self {
            service: Some((&f.service).into()),
            vip: f.key.vip.octets().to_vec(),
            port: f.key.port.into(),
            protocol: v1::Protocol::from(f.key.protocol) as i32,
            counters: Some(f.counts.into()),
            backends: f
                .backends
                .iter()
                .map(|b| v1::BackendCounters {
                    address: address_bytes(b.address),
                    port: b.port.into(),
                    counters: Some(b.counts.into()),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::FrontendCounters> for FrontendCounters {
    type Error = ReportError;

    fn try_from(f: v1::FrontendCounters) -> Result<Self, ReportError> {
        let v1::FrontendCounters {
            service,
            vip,
            port: vip_port,
            protocol,
            counters,
            backends,
        } = f;
        let key = FrontendKey {
            vip: ipv4_from_bytes("vip", &vip)?,
            port: port("port", vip_port)?,
            protocol: protocol_from_proto(protocol).map_err(|problem| ReportError::Invalid {
                field: "protocol",
                problem,
            })?,
        };
        let backends = backends
            .into_iter()
            .map(|b| {
                Ok(BackendCounters {
                    address: address_from_bytes("backends.address", &b.address)?,
                    port: port("backends.port", b.port)?,
                    counts: b.counters.unwrap_or_default().into(),
                })
            })
            .collect::<Result<_, ReportError>>()?;
        Ok(Self {
            service: service
                .map(ServiceRef::from)
                .ok_or(ReportError::Missing { field: "service" })?,
            key,
            counts: counters.unwrap_or_default().into(),
            backends,
        })
    }
}

impl From<&PolicyCounter> for v1::PolicyCounter {
    fn from(c: &PolicyCounter) -> Self {
        Self {
            counts: Some((&c.counts).into()),
            allowed: c.allowed,
            denied: c.denied,
        }
    }
}

impl From<v1::PolicyCounter> for PolicyCounter {
    fn from(c: v1::PolicyCounter) -> Self {
        Self {
            counts: c.counts.map(Slot::from).unwrap_or_default(),
            allowed: c.allowed,
            denied: c.denied,
        }
    }
}

impl From<BackendState> for v1::BackendState {
    fn from(state: BackendState) -> Self {
        match state {
            BackendState::Serving => Self::Serving,
            BackendState::Draining => Self::Draining,
            BackendState::Unhealthy => Self::Unhealthy,
            BackendState::NoShare => Self::NoShare,
        }
    }
}

/// `None`: unspecified, or a state this build does not know.
pub fn backend_state_from_proto(value: i32) -> Option<BackendState> {
    match v1::BackendState::try_from(value).ok()? {
        v1::BackendState::Serving => Some(BackendState::Serving),
        v1::BackendState::Draining => Some(BackendState::Draining),
        v1::BackendState::Unhealthy => Some(BackendState::Unhealthy),
        v1::BackendState::NoShare => Some(BackendState::NoShare),
        v1::BackendState::Unspecified => None,
    }
}

impl From<&BackendRef> for v1::BackendRef {
    fn from(b: &BackendRef) -> Self {
        Self {
            service: Some((&b.service).into()),
            address: address_bytes(b.address),
        }
    }
}

impl TryFrom<v1::BackendRef> for BackendRef {
    type Error = ReportError;

    fn try_from(b: v1::BackendRef) -> Result<Self, ReportError> {
        Ok(Self {
            service: b
                .service
                .map(ServiceRef::from)
                .ok_or(ReportError::Missing { field: "service" })?,
            address: address_from_bytes("address", &b.address)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> FlowEvent {
        FlowEvent {
            node: "node-1".into(),
            observed_unix_ms: 1_700_000_000_123,
            kind: FlowKind::Drop,
            verdict: FlowVerdict::Denied,
            reason: FlowReason::Drop(DropReason::Policy),
            client: "198.18.1.2:40000".parse().expect("addr"),
            vip: "198.18.0.10:80".parse().expect("addr"),
            service: Some(ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            }),
            backend: Some("[2001:2::1]:8080".parse().expect("addr")),
            protocol: crate::service::Protocol::Tcp,
            counted_as: Slot::DeniedToService(ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            }),
        }
    }

    #[test]
    fn flow_events_round_trip_with_both_families() {
        let e = event();
        assert_eq!(FlowEvent::try_from(v1::FlowEvent::from(&e)), Ok(e.clone()));
        let new = FlowEvent {
            kind: FlowKind::New,
            verdict: FlowVerdict::Forwarded,
            reason: FlowReason::None,
            backend: None,
            counted_as: Slot::Unused,
            ..e
        };
        let message = v1::FlowEvent::from(&new);
        assert_eq!(message.counted_as, None, "an unused slot is sent as none");
        assert_eq!(FlowEvent::try_from(message), Ok(new));
    }

    #[test]
    fn bad_reports_name_the_field() {
        let mut message = v1::FlowEvent::from(&event());
        message.client = Some(v1::SocketAddress {
            address: vec![1, 2, 3],
            port: 1,
        });
        assert_eq!(
            FlowEvent::try_from(message).map_err(|e| e.to_string()),
            Err("client: an address is 4 or 16 bytes, got 3".to_owned())
        );
        let mut message = v1::FlowEvent::from(&event());
        message.kind = 0;
        assert!(FlowEvent::try_from(message).is_err());
    }

    #[test]
    fn filters_round_trip() {
        let filter = FlowFilter {
            verdict: Some(FlowVerdict::Dropped),
            kind: None,
            service: Some(ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
            }),
        };
        assert_eq!(FlowFilter::of_request(&filter.to_request(true)), Ok(filter));
        assert_eq!(
            FlowFilter::of_request(&FlowFilter::default().to_request(false)),
            Ok(FlowFilter::default())
        );
        let unknown = v1::WatchFlowsRequest {
            verdict: 42,
            ..Default::default()
        };
        assert_eq!(
            FlowFilter::of_request(&unknown).map_err(|e| e.to_string()),
            Err("verdict: unknown value 42".to_owned())
        );
    }
}
