//! Services: a stable VIP and ports in front of a set of backends, balanced by
//! one algorithm.
//!
//! The same type serves both ways in: [`Service`] has its VIP (as a
//! standalone agent's manifest must give it, and as the control service
//! stores every service once it allocated one); [`ServiceSpec`] is what an
//! admin applies, where the VIP may be left to the control service.
//!
//! Every value here has been validated, and defaults are filled in (target
//! port, weight, algorithm). They serialize with the manifest's spellings, so
//! printing one as YAML gives a document `sluicectl apply -f` accepts again.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::Serialize;
use sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE;
use sluice_common::types::{IPPROTO_TCP, IPPROTO_UDP};

use crate::grant::Resource;
use crate::kind::{Kind, Labels, ObjectKind, Resolve};
use crate::traffic::Traffic;
use crate::wire::ObjectError;

/// Larger backend sets are rejected, never truncated.
pub const MAX_BACKENDS_PER_SERVICE: usize = 4096;
/// Weights are relative within a service: 1 against 9,999 is a 0.01% canary.
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_PORTS_PER_SERVICE: usize = 64;

/// A service with its VIP. `Vip` is [`Ipv4Addr`], or for a [`ServiceSpec`]
/// `Option<Ipv4Addr>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(bound(serialize = "Vip: Serialize + VipField"))]
pub struct Service<Vip = Ipv4Addr> {
    /// [`crate::DEFAULT_NAMESPACE`] when the manifest gives none; names are
    /// unique per namespace.
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(skip_serializing_if = "VipField::is_unset")]
    pub vip: Vip,
    pub ports: Vec<ServicePort>,
    pub algorithm: Algorithm,
    /// Static backends; empty when `selector` is used (or when there are none,
    /// in which case the data plane drops the service's traffic and counts it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
    /// Endpoint labels (in the service's namespace) that pick the backends;
    /// empty when `backends` is used. Control service only.
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub selector: Labels,
    /// With `algorithm: maglev`: the lookup table's size, a prime; `None`:
    /// [`MAGLEV_DEFAULT_TABLE_SIZE`] (see [`Service::maglev_table_size`]).
    #[serde(rename = "maglevTableSize", skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// A service as an admin applies it: `vip` `None` asks the control service
/// to allocate one from its VIP range.
pub type ServiceSpec = Service<Option<Ipv4Addr>>;

/// Whether a service's VIP field is left out when it is printed.
pub trait VipField {
    fn is_unset(&self) -> bool;
}

impl VipField for Ipv4Addr {
    fn is_unset(&self) -> bool {
        false
    }
}

impl VipField for Option<Ipv4Addr> {
    fn is_unset(&self) -> bool {
        self.is_none()
    }
}

impl<Vip> Service<Vip> {
    /// The same service with another VIP field.
    pub fn with_vip<New>(self, vip: New) -> Service<New> {
        let Service {
            namespace,
            name,
            labels,
            vip: _,
            ports,
            algorithm,
            backends,
            selector,
            maglev_table_size,
            traffic,
        } = self;
        Service {
            namespace,
            name,
            labels,
            vip,
            ports,
            algorithm,
            backends,
            selector,
            maglev_table_size,
            traffic,
        }
    }

    /// The size of the Maglev lookup table (the one place its default is
    /// applied; only meaningful with [`Algorithm::Maglev`]).
    pub fn maglev_table_size(&self) -> u32 {
        self.maglev_table_size.unwrap_or(MAGLEV_DEFAULT_TABLE_SIZE)
    }
}

impl From<Service> for ServiceSpec {
    fn from(service: Service) -> Self {
        let vip = Some(service.vip);
        service.with_vip(vip)
    }
}

impl Kind for Service {
    const KIND: ObjectKind = ObjectKind::Service;
    const TABLE: &'static str = "service";
    const RESOURCE: Resource = Resource::Services;
    type Spec = ServiceSpec;
    type Wire = sluice_api::v1::Service;

    fn to_spec(&self) -> ServiceSpec {
        self.clone().into()
    }

    fn to_wire(&self) -> Self::Wire {
        (&self.to_spec()).into()
    }

    fn from_wire(wire: Self::Wire) -> Result<Self, ObjectError> {
        let spec = ServiceSpec::try_from(wire)?;
        let Some(vip) = spec.vip else {
            return Err(ObjectError::invalid(
                &crate::ObjectRef {
                    kind: ObjectKind::Service,
                    namespace: spec.namespace.clone(),
                    name: spec.name.clone(),
                },
                "vip",
                crate::rules::Problem::Missing,
            ));
        };
        Ok(spec.with_vip(vip))
    }

    fn from_spec<R: Resolve>(spec: ServiceSpec, resolve: &mut R) -> Result<Self, R::Error> {
        let vip = resolve.vip(&spec)?;
        Ok(spec.with_vip(vip))
    }

    fn wrap(wire: Self::Wire) -> sluice_api::v1::Object {
        sluice_api::v1::Object {
            kind: Some(sluice_api::v1::object::Kind::Service(wire)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub protocol: Protocol,
    pub target_port: u16,
}

/// Transport protocol of a service port. Parsing accepts exactly `TCP` and `UDP`
/// (upper case, as Kubernetes spells them); `tcp` is rejected rather than guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the data-plane keys carry it.
    pub const fn ip_proto(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = ParseProtocolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            _ => Err(ParseProtocolError {
                value: s.to_owned(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {value:?}, expected \"TCP\" or \"UDP\"")]
pub struct ParseProtocolError {
    pub value: String,
}

/// How a service picks a backend for a new flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    WeightedLeastConnections,
    /// Consistent hashing (Maglev): a flow's backend follows from its hash,
    /// the same on every node; weights set the shares.
    Maglev,
}

impl Algorithm {
    pub const ALL: [Self; 5] = [
        Self::RoundRobin,
        Self::WeightedRoundRobin,
        Self::LeastConnections,
        Self::WeightedLeastConnections,
        Self::Maglev,
    ];

    /// The manifest spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::WeightedRoundRobin => "weighted-round-robin",
            Self::LeastConnections => "least-connections",
            Self::WeightedLeastConnections => "weighted-least-connections",
            Self::Maglev => "maglev",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Algorithm {
    type Err = ParseAlgorithmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| ParseAlgorithmError {
                value: s.to_owned(),
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {value:?}, expected one of: {}", algorithm_names())]
pub struct ParseAlgorithmError {
    pub value: String,
}

pub(crate) fn algorithm_names() -> String {
    Algorithm::ALL.map(Algorithm::as_str).join(", ")
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct BackendSpec {
    pub address: Ipv4Addr,
    pub weight: u32,
    /// What a rollout moves traffic between.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// No new flows; established ones run until they close or the service's
    /// drain timeout ends them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}
