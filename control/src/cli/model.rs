//! What the control service answers, converted once at the boundary into the
//! domain objects of [`sluice_model`] (services, endpoints, grants, policies,
//! counters) or into the shapes `sluicectl` prints (nodes, describe). Nothing
//! past this module sees a protobuf message.

use std::time::SystemTime;

use serde::Serialize;
use sluice_api::v1;
use sluice_model::observe::{FrontendCounters, PolicyCounter, TrafficCounts};
use sluice_model::wire::observe::{address_from_bytes, backend_state_from_proto};
use sluice_model::{Object, ObjectKind, ServiceSpec, Versioned};

use super::error::CliError;
use crate::clock;

/// An object as stored: the domain object and the store revision that last
/// changed it.
pub type Stored = Versioned<Object>;

pub fn stored(object: v1::Object) -> Result<Stored, CliError> {
    Versioned::<Object>::from_wire(object).map_err(|source| CliError::BadResponse {
        what: "object",
        source: Box::new(source),
    })
}

/// `service/shop/web`, as `apply` and `delete` report objects.
pub fn object_path(kind: ObjectKind, namespace: &str, name: &str) -> String {
    format!("{}/{namespace}/{name}", kind.as_str().to_ascii_lowercase())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
    /// An outcome this `sluicectl` does not know (a newer server).
    Applied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
            Self::Applied => "applied",
        }
    }
}

impl From<i32> for Outcome {
    fn from(value: i32) -> Self {
        match v1::ApplyOutcome::try_from(value) {
            Ok(v1::ApplyOutcome::Created) => Self::Created,
            Ok(v1::ApplyOutcome::Configured) => Self::Configured,
            Ok(v1::ApplyOutcome::Unchanged) => Self::Unchanged,
            Ok(v1::ApplyOutcome::Unspecified) | Err(_) => Self::Applied,
        }
    }
}

/// One object of an `Apply`: what happened and what is stored now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    pub stored: Stored,
}

impl TryFrom<v1::ApplyResult> for Applied {
    type Error = CliError;

    fn try_from(result: v1::ApplyResult) -> Result<Self, CliError> {
        let v1::ApplyResult {
            outcome, object, ..
        } = result;
        let object = object.ok_or(CliError::IncompleteResponse {
            what: "applied object",
        })?;
        Ok(Self {
            outcome: Outcome::from(outcome),
            stored: stored(object)?,
        })
    }
}

/// Packets, bytes and flows, as a node reports them.
pub type Traffic = TrafficCounts;

/// One service port's traffic on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendTraffic {
    /// `namespace/name`.
    pub service: String,
    pub vip: String,
    pub port: u32,
    pub protocol: String,
    #[serde(flatten)]
    pub traffic: Traffic,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendTraffic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendTraffic {
    pub address: String,
    pub port: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
}

impl From<&FrontendCounters> for FrontendTraffic {
    fn from(counters: &FrontendCounters) -> Self {
        let FrontendCounters {
            service,
            key,
            counts,
            backends,
        } = counters;
        Self {
            service: service.to_string(),
            vip: key.vip.to_string(),
            port: key.port.into(),
            protocol: key.protocol.to_string(),
            traffic: *counts,
            backends: backends
                .iter()
                .map(|b| BackendTraffic {
                    address: b.address.to_string(),
                    port: b.port.into(),
                    traffic: b.counts,
                })
                .collect(),
        }
    }
}

/// What of a node's report reads; the rest a newer server sent is left out.
fn readable<W, D: TryFrom<W>>(entries: Vec<W>) -> Vec<D> {
    entries
        .into_iter()
        .filter_map(|e| D::try_from(e).ok())
        .collect()
}

/// A node as `get nodes` shows it (`-o json|yaml` print this shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    pub connected: bool,
    /// The view version the agent last programmed, and the one it should have.
    pub applied_version: u64,
    pub desired_version: u64,
    /// RFC 3339; `None` if the agent never reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_report: Option<String>,
    pub joined_at: String,
    pub certificate_serial: String,
    /// RFC 3339.
    pub certificate_expires: String,
    pub resource_version: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<FrontendTraffic>,
    /// Network-policy verdicts, per counter.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<PolicyVerdicts>,
    /// When the node last reported, and its counters then (for `top`).
    #[serde(skip)]
    pub reported: Option<SystemTime>,
    #[serde(skip)]
    pub counters: Vec<FrontendCounters>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyVerdicts {
    pub counts: String,
    pub allowed: u64,
    pub denied: u64,
}

impl From<v1::Node> for NodeInfo {
    fn from(node: v1::Node) -> Self {
        let v1::Node {
            meta,
            zone,
            certificate_serial,
            certificate_expires_unix_ms,
            joined_unix_ms,
            status,
        } = node;
        let meta = meta.unwrap_or_default();
        let v1::NodeStatus {
            applied_version,
            desired_version,
            last_report_unix_ms,
            connected,
            counters,
            policy_counters,
        } = status.unwrap_or_default();
        let reported = (last_report_unix_ms != 0).then(|| clock::from_unix_ms(last_report_unix_ms));
        let counters: Vec<FrontendCounters> = readable(counters);
        Self {
            name: meta.name,
            zone,
            connected,
            applied_version,
            desired_version,
            last_report: reported.map(clock::rfc3339),
            joined_at: clock::rfc3339(clock::from_unix_ms(joined_unix_ms)),
            certificate_serial,
            certificate_expires: clock::rfc3339(clock::from_unix_ms(certificate_expires_unix_ms)),
            resource_version: meta.resource_version,
            traffic: counters.iter().map(FrontendTraffic::from).collect(),
            policy: policy_counters
                .into_iter()
                .map(PolicyCounter::from)
                .map(|c| PolicyVerdicts {
                    counts: c.counts.to_string(),
                    allowed: c.allowed,
                    denied: c.denied,
                })
                .collect(),
            reported,
            counters,
        }
    }
}

impl TryFrom<v1::Object> for NodeInfo {
    type Error = CliError;

    fn try_from(object: v1::Object) -> Result<Self, CliError> {
        match object.kind {
            Some(v1::object::Kind::Node(node)) => Ok(node.into()),
            _ => Err(CliError::IncompleteResponse { what: "node" }),
        }
    }
}

/// `describe service`: the service, where its traffic goes, and each node's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Described {
    pub service: ServiceSpec,
    pub resource_version: u64,
    pub backends: Vec<ResolvedBackend>,
    pub nodes: Vec<Programming>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResolvedBackend {
    pub address: String,
    pub port: u32,
    pub weight: u32,
    /// `static`, or the endpoint's `namespace/name`.
    pub source: String,
    /// serving, draining, unhealthy or no share.
    pub state: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probers: Vec<String>,
}

/// One node's programming of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Programming {
    pub node: String,
    pub connected: bool,
    pub applied_version: u64,
    pub desired_version: u64,
    /// Summed over the service's ports; `None` when the node reported none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic: Option<Traffic>,
}

impl TryFrom<v1::DescribeResponse> for Described {
    type Error = CliError;

    fn try_from(response: v1::DescribeResponse) -> Result<Self, CliError> {
        let v1::DescribeResponse {
            service,
            backends,
            nodes,
        } = response;
        let service = service.ok_or(CliError::IncompleteResponse { what: "service" })?;
        let resource_version = service.meta.as_ref().map_or(0, |m| m.resource_version);
        let service = ServiceSpec::try_from(service).map_err(|source| CliError::BadResponse {
            what: "service",
            source: Box::new(source),
        })?;
        let backends = backends
            .into_iter()
            .map(|b| {
                let v1::ResolvedBackend {
                    address,
                    port,
                    weight,
                    endpoint,
                    state,
                    probers,
                } = b;
                ResolvedBackend {
                    address: address_from_bytes("address", &address)
                        .map_or_else(|e| e.to_string(), |a| a.to_string()),
                    port,
                    weight,
                    source: endpoint.map_or_else(
                        || "static".to_owned(),
                        |e| format!("{}/{}", e.namespace, e.name),
                    ),
                    state: backend_state_from_proto(state)
                        .map_or_else(|| format!("unknown ({state})"), |s| s.to_string()),
                    probers,
                }
            })
            .collect();
        let nodes = nodes
            .into_iter()
            .map(|n| {
                let v1::NodeProgramming {
                    node,
                    desired_version,
                    applied_version,
                    connected,
                    counters,
                } = n;
                let traffic = counters
                    .into_iter()
                    .map(|c| Traffic::from(c.counters.unwrap_or_default()))
                    .reduce(std::ops::Add::add);
                Programming {
                    node,
                    connected,
                    applied_version,
                    desired_version,
                    traffic,
                }
            })
            .collect();
        Ok(Self {
            service,
            resource_version,
            backends,
            nodes,
        })
    }
}

/// `whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// `user` or `node`.
    pub kind: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl From<v1::WhoAmIResponse> for Identity {
    fn from(response: v1::WhoAmIResponse) -> Self {
        let v1::WhoAmIResponse { kind, name, groups } = response;
        Self { kind, name, groups }
    }
}

/// `token create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinToken {
    /// Shown once; the control service keeps only its hash.
    pub token: String,
    /// RFC 3339.
    pub expires: String,
    /// `sha256:<hex>` of the cluster CA; the joining node pins it.
    pub ca_hash: String,
    /// The command that joins a node with it (fill in the node and interfaces).
    pub join_command: String,
}

impl JoinToken {
    pub fn new(response: v1::CreateJoinTokenResponse, server: &str) -> Self {
        let v1::CreateJoinTokenResponse {
            token,
            expires,
            ca_hash,
        } = response;
        let join_command = format!(
            "sluice-agent join --control {server} --token {token} --ca-hash {ca_hash} \
             --node <NAME> --interface <IF>"
        );
        Self {
            token,
            expires,
            ca_hash,
            join_command,
        }
    }
}

/// `user create`: what was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    pub name: String,
    pub groups: Vec<String>,
    pub config: String,
    pub server: String,
    /// RFC 3339.
    pub certificate_expires: String,
}
