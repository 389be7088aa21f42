//! What the control service answers, converted once at the boundary into the
//! domain objects of [`sluice_model::manifest`] (services, endpoints, grants) or into
//! the shapes `sluicectl` prints (nodes, describe). Nothing past this module sees a
//! protobuf message.

use serde::Serialize;
use sluice_api::v1;
use sluice_model::wire::protocol_from_proto;
use sluice_model::{Object, ObjectKind, ServiceSpec};

use super::error::CliError;

/// An object as stored: the domain object and the store revision that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub object: Object,
    pub version: u64,
}

impl TryFrom<v1::Object> for Stored {
    type Error = CliError;

    fn try_from(object: v1::Object) -> Result<Self, CliError> {
        let meta = match &object.kind {
            Some(v1::object::Kind::Service(s)) => s.meta.as_ref(),
            Some(v1::object::Kind::Endpoint(e)) => e.meta.as_ref(),
            Some(v1::object::Kind::Grant(g)) => g.meta.as_ref(),
            Some(v1::object::Kind::NetworkPolicy(p)) => p.meta.as_ref(),
            Some(v1::object::Kind::Node(n)) => n.meta.as_ref(),
            None => None,
        };
        let version = meta.map_or(0, |m| m.resource_version);
        let object = Object::try_from(object).map_err(|source| CliError::BadResponse {
            what: "object",
            source: Box::new(source),
        })?;
        Ok(Self { object, version })
    }
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
            stored: Stored::try_from(object)?,
        })
    }
}

/// Packets, bytes and flows, as a node reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub active_connections: u64,
}

impl Traffic {
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

impl From<Option<v1::TrafficCounters>> for Traffic {
    fn from(counters: Option<v1::TrafficCounters>) -> Self {
        let v1::TrafficCounters {
            packets,
            bytes,
            new_flows,
            active_connections,
        } = counters.unwrap_or_default();
        Self {
            packets,
            bytes,
            new_flows,
            active_connections,
        }
    }
}

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

impl From<v1::FrontendCounters> for FrontendTraffic {
    fn from(counters: v1::FrontendCounters) -> Self {
        let v1::FrontendCounters {
            service,
            vip,
            port,
            protocol,
            counters,
            backends,
        } = counters;
        Self {
            service,
            vip,
            port,
            protocol: protocol_name(protocol),
            traffic: counters.into(),
            backends: backends
                .into_iter()
                .map(|b| {
                    let v1::BackendCounters {
                        address,
                        port,
                        counters,
                    } = b;
                    BackendTraffic {
                        address,
                        port,
                        traffic: counters.into(),
                    }
                })
                .collect(),
        }
    }
}

/// `TCP`, `UDP`, or the number a newer server sent.
fn protocol_name(value: i32) -> String {
    protocol_from_proto(value).map_or_else(|_| value.to_string(), |p| p.as_str().to_owned())
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
            certificate_expires,
            joined_at,
            status,
        } = node;
        let meta = meta.unwrap_or_default();
        let v1::NodeStatus {
            applied_version,
            desired_version,
            last_report,
            connected,
            counters,
            policy_counters,
        } = status.unwrap_or_default();
        Self {
            name: meta.name,
            zone,
            connected,
            applied_version,
            desired_version,
            last_report: Some(last_report).filter(|r| !r.is_empty()),
            joined_at,
            certificate_serial,
            certificate_expires,
            resource_version: meta.resource_version,
            traffic: counters.into_iter().map(FrontendTraffic::from).collect(),
            policy: policy_counters
                .into_iter()
                .map(|c| PolicyVerdicts {
                    counts: c.counts,
                    allowed: c.allowed,
                    denied: c.denied,
                })
                .collect(),
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
                    source,
                    state,
                    probers,
                } = b;
                ResolvedBackend {
                    address,
                    port,
                    weight,
                    source,
                    state,
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
                    .map(|c| Traffic::from(c.counters))
                    .reduce(Traffic::add);
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
