//! Views and compiled policy on the wire: what the control service streams
//! to agents, stores in its view history and agents save for restarts.
//!
//! Domain to message cannot fail and spells every value out. Message to
//! domain validates, applying the wire's zero-means-default rules here and
//! nowhere else (a view saved by an older agent may carry them): a zero
//! target port is the port, a zero Maglev table size the default, zero
//! timeouts none. A frontend that does not read is an error naming it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sluice_api::v1;
use sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE;

use super::{algorithm_from_proto, health_check_from_proto, protocol_from_proto};
use crate::policy::compiled::{
    CompiledPolicy, IdentityEntry, LabelSet, PolicyRef, RuleEntry, Slot,
};
use crate::rules::Problem;
use crate::service::Algorithm;
use crate::view::{Frontend, FrontendKey, ServiceRef, View, ViewBackend, ViewUpdate, ZoneWeights};

/// Why part of a view message does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    #[error("frontend {frontend}: {field}: {problem}")]
    Frontend {
        /// As the message names it: `shop/web 198.18.0.10:80`.
        frontend: String,
        field: &'static str,
        problem: Problem,
    },
    #[error("network policy: {0}")]
    Policy(String),
}

// ---------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------

impl From<&ServiceRef> for v1::ObjectName {
    fn from(service: &ServiceRef) -> Self {
        Self {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        }
    }
}

impl From<v1::ObjectName> for ServiceRef {
    fn from(name: v1::ObjectName) -> Self {
        Self {
            namespace: name.namespace,
            name: name.name,
        }
    }
}

/// `namespace/name`, as a frontend message names its service.
fn service_ref(text: &str) -> ServiceRef {
    let (namespace, name) = text.split_once('/').unwrap_or(("", text));
    ServiceRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

impl From<&Slot> for v1::PolicySlot {
    fn from(slot: &Slot) -> Self {
        use v1::policy_slot::Counts;
        let set = |s: &LabelSet| v1::LabelSet {
            namespace: s.namespace.clone(),
            labels: s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let counts = match slot {
            Slot::Unused => None,
            Slot::AllowedBy(p) => Some(Counts::AllowedBy(v1::ObjectName {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
            })),
            Slot::DeniedTo(s) => Some(Counts::DeniedTo(set(s))),
            Slot::EgressDeniedFrom(s) => Some(Counts::EgressDeniedFrom(set(s))),
            Slot::DeniedToService(s) => Some(Counts::DeniedToService(s.into())),
        };
        Self { counts }
    }
}

impl From<v1::PolicySlot> for Slot {
    fn from(slot: v1::PolicySlot) -> Self {
        use v1::policy_slot::Counts;
        let set = |s: v1::LabelSet| LabelSet {
            namespace: s.namespace,
            labels: s.labels.into_iter().collect(),
        };
        match slot.counts {
            None => Self::Unused,
            Some(Counts::AllowedBy(p)) => Self::AllowedBy(PolicyRef {
                namespace: p.namespace,
                name: p.name,
            }),
            Some(Counts::DeniedTo(s)) => Self::DeniedTo(set(s)),
            Some(Counts::EgressDeniedFrom(s)) => Self::EgressDeniedFrom(set(s)),
            Some(Counts::DeniedToService(s)) => Self::DeniedToService(s.into()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Compiled policy
// ---------------------------------------------------------------------------------------

impl From<&CompiledPolicy> for v1::PolicyView {
    fn from(policy: &CompiledPolicy) -> Self {
        let CompiledPolicy {
            identities,
            rules,
            slots,
        } = policy;
        Self {
            identities: identities
                .iter()
                .map(|i| v1::PolicyIdentity {
                    prefix: i.prefix.to_string(),
                    identity: i.identity,
                    enforced: i.enforced,
                    stats_slot: i.stats_slot,
                    egress_enforced: i.egress_enforced,
                    egress_slot: i.egress_slot,
                })
                .collect(),
            rules: rules
                .iter()
                .map(|r| v1::PolicyRuleView {
                    egress: r.egress,
                    dst: r.dst,
                    src: r.src,
                    port: r.port.into(),
                    protocol: r.protocol.into(),
                    stats_slot: r.stats_slot,
                })
                .collect(),
            slots: slots.iter().map(v1::PolicySlot::from).collect(),
        }
    }
}

impl TryFrom<v1::PolicyView> for CompiledPolicy {
    type Error = ViewError;

    fn try_from(policy: v1::PolicyView) -> Result<Self, ViewError> {
        let v1::PolicyView {
            identities,
            rules,
            slots,
        } = policy;
        let identities = identities
            .into_iter()
            .map(|i| {
                let prefix: Ipv4Net = i.prefix.parse().map_err(|_| {
                    ViewError::Policy(format!(
                        "identity {}: bad prefix {:?}",
                        i.identity, i.prefix
                    ))
                })?;
                Ok(IdentityEntry {
                    prefix,
                    identity: i.identity,
                    enforced: i.enforced,
                    stats_slot: i.stats_slot,
                    egress_enforced: i.egress_enforced,
                    egress_slot: i.egress_slot,
                })
            })
            .collect::<Result<Vec<_>, ViewError>>()?;
        let rules = rules
            .into_iter()
            .map(|r| {
                Ok(RuleEntry {
                    egress: r.egress,
                    dst: r.dst,
                    src: r.src,
                    port: u16::try_from(r.port)
                        .map_err(|_| ViewError::Policy(format!("rule port {}", r.port)))?,
                    protocol: u8::try_from(r.protocol)
                        .map_err(|_| ViewError::Policy(format!("rule protocol {}", r.protocol)))?,
                    stats_slot: r.stats_slot,
                })
            })
            .collect::<Result<Vec<_>, ViewError>>()?;
        Ok(Self {
            identities,
            rules,
            slots: slots.into_iter().map(Slot::from).collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Frontends
// ---------------------------------------------------------------------------------------

impl From<FrontendKey> for v1::FrontendKey {
    fn from(key: FrontendKey) -> Self {
        Self {
            vip: key.vip.to_string(),
            port: key.port.into(),
            protocol: v1::Protocol::from(key.protocol) as i32,
        }
    }
}

fn key_from_proto(
    vip: &str,
    port: u32,
    protocol: i32,
    at: impl Fn(&'static str, Problem) -> ViewError,
) -> Result<FrontendKey, ViewError> {
    let vip: Ipv4Addr = vip.parse().map_err(|_| {
        at(
            "vip",
            Problem::InvalidAddress {
                value: vip.to_owned(),
                problem: crate::rules::AddressProblem::NotIpv4,
            },
        )
    })?;
    let port = u16::try_from(port)
        .map_err(|_| at("port", Problem::PortOutOfRange { value: port.into() }))?;
    let protocol = protocol_from_proto(protocol).map_err(|p| at("protocol", p))?;
    Ok(FrontendKey {
        vip,
        port,
        protocol,
    })
}

impl TryFrom<v1::FrontendKey> for FrontendKey {
    type Error = ViewError;

    fn try_from(key: v1::FrontendKey) -> Result<Self, ViewError> {
        let name = format!("{}:{}", key.vip, key.port);
        key_from_proto(&key.vip, key.port, key.protocol, |field, problem| {
            ViewError::Frontend {
                frontend: name.clone(),
                field,
                problem,
            }
        })
    }
}

impl From<&Frontend> for v1::FrontendView {
    fn from(frontend: &Frontend) -> Self {
        let Frontend {
            key,
            service,
            target_port,
            algorithm,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
            backends,
        } = frontend;
        Self {
            service: service.to_string(),
            vip: key.vip.to_string(),
            port: key.port.into(),
            protocol: v1::Protocol::from(key.protocol) as i32,
            target_port: (*target_port).into(),
            algorithm: v1::Algorithm::from(*algorithm) as i32,
            maglev_table_size: *maglev_table_size,
            health_check: health_check.as_ref().map(v1::HealthCheck::from),
            drain_timeout_seconds: drain_timeout_seconds.unwrap_or(0),
            session_affinity_seconds: session_affinity_seconds.unwrap_or(0),
            zones: zones
                .iter()
                .map(|z| v1::ZoneWeights {
                    zone: z.zone.clone(),
                    weights: z.weights.clone(),
                })
                .collect(),
            backends: backends
                .iter()
                .map(|b| v1::ViewBackend {
                    address: b.address.to_string(),
                    weight: b.weight,
                    draining: b.draining,
                    probers: b.probers.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::FrontendView> for Frontend {
    type Error = ViewError;

    fn try_from(frontend: v1::FrontendView) -> Result<Self, ViewError> {
        let v1::FrontendView {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            backends,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
        } = frontend;
        let name = format!("{service} {vip}:{port}");
        let at = |field: &'static str, problem: Problem| ViewError::Frontend {
            frontend: name.clone(),
            field,
            problem,
        };
        let key = key_from_proto(&vip, port, protocol, at)?;
        let target_port = match target_port {
            0 => key.port,
            value => u16::try_from(value).map_err(|_| {
                at(
                    "targetPort",
                    Problem::PortOutOfRange {
                        value: value.into(),
                    },
                )
            })?,
        };
        let algorithm = algorithm_from_proto(algorithm).map_err(|p| at("algorithm", p))?;
        let maglev_table_size = match (algorithm, maglev_table_size) {
            (Algorithm::Maglev, 0) => MAGLEV_DEFAULT_TABLE_SIZE,
            (Algorithm::Maglev, size) => size,
            _ => 0,
        };
        let health_check = health_check
            .map(health_check_from_proto)
            .transpose()
            .map_err(|(_, problem)| at("healthCheck", problem))?;
        let backends = backends
            .into_iter()
            .map(|b| {
                let address = b.address.parse().map_err(|_| {
                    at(
                        "backends",
                        Problem::InvalidAddress {
                            value: b.address.clone(),
                            problem: crate::rules::AddressProblem::NotIpv4,
                        },
                    )
                })?;
                Ok(ViewBackend {
                    address,
                    weight: b.weight,
                    draining: b.draining,
                    probers: b.probers,
                })
            })
            .collect::<Result<Vec<_>, ViewError>>()?;
        Ok(Self {
            key,
            service: service_ref(&service),
            target_port,
            algorithm,
            maglev_table_size,
            health_check,
            drain_timeout_seconds: (drain_timeout_seconds != 0).then_some(drain_timeout_seconds),
            session_affinity_seconds: (session_affinity_seconds != 0)
                .then_some(session_affinity_seconds),
            zones: zones
                .into_iter()
                .map(|z| ZoneWeights {
                    zone: z.zone,
                    weights: z.weights,
                })
                .collect(),
            backends,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Updates
// ---------------------------------------------------------------------------------------

impl From<&ViewUpdate> for v1::ViewUpdate {
    fn from(update: &ViewUpdate) -> Self {
        let ViewUpdate {
            version,
            snapshot,
            upsert,
            remove,
            policy,
        } = update;
        Self {
            version: *version,
            snapshot: *snapshot,
            upsert: upsert.iter().map(v1::FrontendView::from).collect(),
            remove: remove.iter().copied().map(v1::FrontendKey::from).collect(),
            policy: policy.as_ref().map(v1::PolicyView::from),
        }
    }
}

/// Strict: the control service reads back its own history with it.
impl TryFrom<v1::ViewUpdate> for ViewUpdate {
    type Error = ViewError;

    fn try_from(update: v1::ViewUpdate) -> Result<Self, ViewError> {
        let (update, mut errors) = read_update(update)?;
        match errors.is_empty() {
            true => Ok(update),
            false => Err(errors.swap_remove(0)),
        }
    }
}

/// An update as an agent reads it from the stream: a frontend that does not
/// read (from a newer control service) is dropped from the view rather than
/// kept at its old value or stopping every other change, and reported. A
/// compiled policy that does not read fails the whole update: half a policy
/// is not a safe one.
pub fn read_update(update: v1::ViewUpdate) -> Result<(ViewUpdate, Vec<ViewError>), ViewError> {
    let v1::ViewUpdate {
        version,
        snapshot,
        upsert,
        remove,
        policy,
    } = update;
    let mut errors = Vec::new();
    let mut keys = Vec::new();
    for key in remove {
        match FrontendKey::try_from(key) {
            Ok(key) => keys.push(key),
            Err(e) => errors.push(e),
        }
    }
    let mut frontends = Vec::new();
    for frontend in upsert {
        let readable_key = key_from_proto(
            &frontend.vip,
            frontend.port,
            frontend.protocol,
            |field, problem| ViewError::Frontend {
                frontend: String::new(),
                field,
                problem,
            },
        );
        match Frontend::try_from(frontend) {
            Ok(frontend) => frontends.push(frontend),
            Err(e) => {
                keys.extend(readable_key.ok());
                errors.push(e);
            }
        }
    }
    let policy = policy.map(CompiledPolicy::try_from).transpose()?;
    let update = ViewUpdate {
        version,
        snapshot,
        upsert: frontends,
        remove: keys,
        policy,
    };
    Ok((update, errors))
}

/// A whole view as one snapshot message (what agents save).
impl From<&View> for v1::ViewUpdate {
    fn from(view: &View) -> Self {
        (&view.snapshot()).into()
    }
}
