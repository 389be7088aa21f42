//! Endpoints: backends registered with the control service, which services
//! select by label.

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::kind::Labels;

/// A backend registered with the control service; services select endpoints by label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    pub address: Ipv4Addr,
    /// The node the endpoint runs on (a DNS-1123 subdomain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// 1..=[`crate::service::MAX_WEIGHT`], 1 when not given.
    pub weight: u32,
    /// Only ready endpoints receive traffic; true when not given.
    pub ready: bool,
    /// No new flows; established ones run until they close or the service's
    /// drain timeout ends them. (The version a rollout uses is the `version` label.)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// The label that carries an endpoint's version for rollouts.
pub const VERSION_LABEL: &str = "version";
