//! `kind: NetworkPolicy` (control service only): which sources may open flows
//! to which endpoints.
//!
//! ```yaml
//! kind: NetworkPolicy
//! namespace: shop
//! name: web-ingress
//! selector: { app: web }          # endpoints of the namespace it protects; {} for all of them
//! # service: web                  # or instead: this service's VIP (rule ports: its ports),
//! #                               # e.g. for clients outside the cluster by CIDR
//! ingress:                        # absent or empty: they accept nothing (default deny)
//!   - from:                       # absent: every source
//!       - selector: { app: frontend }      # endpoints by label, any namespace...
//!         namespace: shop                  # ...or this one only
//!       - cidr: 198.18.100.0/24            # addresses that are not endpoints
//!         except: [198.18.100.128/25]
//!     ports: [{ port: 8080, protocol: TCP }]   # target ports; absent: every port
//! egress:                         # optional: where the selected endpoints may open flows
//!   - to: [{ selector: { app: db } }]      # the same peers; absent: everywhere
//!     ports: [{ port: 5432, protocol: TCP }]
//! # policyTypes: [Ingress, Egress]  # as in Kubernetes; default: Ingress, plus Egress
//! #                                 # when the policy has an egress field
//! ```

pub mod compile;
pub mod compiled;

use ipnet::Ipv4Net;
use serde::{Serialize, Serializer};

use crate::kind::Labels;
use crate::rules::Problem;
use crate::service::Protocol;

/// At most this many ingress rules per policy, peers per rule, except entries
/// per CIDR.
pub const MAX_RULES: usize = 64;
pub const MAX_PEERS: usize = 64;
pub const MAX_EXCEPT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// The endpoints of the namespace it protects (empty: all of them);
    /// `None` when it protects a service's VIP instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    /// Instead of `selector`: the service whose VIP the policy protects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What the policy restricts for what it selects.
    #[serde(rename = "policyTypes")]
    pub types: PolicyTypes,
    pub ingress: Vec<IngressRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

/// As Kubernetes' `policyTypes`: ingress is restricted unless only Egress is
/// listed; egress when Egress is listed, or, without `policyTypes`, when the
/// policy has an `egress` field (even empty: no egress allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

impl PolicyTypes {
    /// What a policy without `policyTypes` restricts (the one place this
    /// default is applied): ingress, and egress if it has egress rules
    /// (`egress_given`; a manifest also counts an empty `egress` field).
    pub fn implied(egress_given: bool) -> Self {
        Self {
            ingress: true,
            egress: egress_given,
        }
    }
}

impl Serialize for PolicyTypes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut names = Vec::new();
        if self.ingress {
            names.push("Ingress");
        }
        if self.egress {
            names.push("Egress");
        }
        names.serialize(serializer)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EgressRule {
    /// Empty: every destination.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    /// Empty: every port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IngressRule {
    /// Empty: every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    /// Empty: every port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PolicyPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Peer {
    Endpoints {
        selector: Labels,
        /// `None`: any namespace.
        #[serde(skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    Cidr {
        cidr: Cidr,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        except: Vec<Cidr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PolicyPort {
    pub port: u16,
    pub protocol: Protocol,
}

/// An IPv4 prefix with no host bits set (validated by [`validate_cidr`]).
pub type Cidr = Ipv4Net;

pub fn validate_cidr(text: &str) -> Result<Cidr, Problem> {
    let bad = || Problem::InvalidCidr {
        value: text.to_owned(),
    };
    // ipnet reads "a.b.c.d/len" only (no default length, no '+'), as a manifest must give it.
    let cidr: Ipv4Net = text.parse().map_err(|_| bad())?;
    if cidr.trunc() != cidr {
        return Err(Problem::CidrHostBits {
            value: text.to_owned(),
            canonical: cidr.trunc().to_string(),
        });
    }
    Ok(cidr)
}

/// An `except` entry must lie strictly inside its CIDR.
pub fn validate_except(cidr: Cidr, except: Cidr) -> Result<(), Problem> {
    if except.prefix_len() > cidr.prefix_len() && cidr.contains(&except) {
        Ok(())
    } else {
        Err(Problem::ExceptOutside {
            except: except.to_string(),
            cidr: cidr.to_string(),
        })
    }
}
