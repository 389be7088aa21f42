//! Conversions between the domain objects of [`crate::manifest`] and the API messages of
//! [`sluice_api::v1`], done once at the boundary so the rest of the code sees one or the other.
//!
//! * Domain to message ([`From`]) cannot fail: a domain object is valid by construction.
//!   Defaults are written out explicitly (target port, weight, algorithm), so a message
//!   built here never relies on the zero-means-default rules below.
//! * Message to domain ([`TryFrom`]) validates everything, with the same rules
//!   ([`crate::rules`]) and the same wording as a manifest, so the control
//!   service rejects exactly what `sluicectl apply` would reject locally. The first
//!   problem found, in field order, is reported as an [`ObjectError`] naming the object,
//!   the field path in the manifest's spelling (`ports[0].targetPort`, `scope`) and the
//!   offending value.
//!
//! proto3 cannot tell an unset scalar from its zero value, so these zeros are defaults:
//! an empty namespace means [`DEFAULT_NAMESPACE`], an empty `vip` means "allocate one", a
//! zero `target_port` means the port itself, a zero `weight` means 1, and
//! `ALGORITHM_UNSPECIFIED` means round-robin. `PROTOCOL_UNSPECIFIED` is rejected (as a
//! missing `protocol` is in a manifest), and so are empty strings where a value is
//! required (an endpoint's `address`, a grant's `role` and `scope`). An endpoint's
//! `ready` is sent as is: `false` means not ready (a manifest defaults it to `true`
//! before it gets here). `resource_version` is the store's business; it is not part of
//! the domain objects and is dropped here.

mod grant;
pub mod observe;
mod policy;
mod service;
pub mod view;

use std::collections::{BTreeMap, HashMap};

use sluice_api::v1;

pub use crate::kind::kind_from_proto;
use crate::kind::{DEFAULT_NAMESPACE, Labels, ObjectKind, ObjectRef};
use crate::rules::{self, Problem};
use crate::service::{Algorithm, Protocol};

pub use observe::ReportError;
pub use service::health_check_from_proto;
pub use view::{ViewError, read_update};

/// Why an API message is not a valid object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// `Object.kind` is not set.
    #[error("object: no kind set, expected one of: Service, Endpoint, Grant, NetworkPolicy")]
    NoKind,
    /// Nodes are created by joining the cluster, not by applying objects.
    #[error("Node {name:?}: nodes join the cluster with a join token and cannot be applied")]
    NodeNotApplicable { name: String },
    /// `object` is boxed to keep `Result<_, ObjectError>` small.
    #[error("{object}: {field}: {problem}")]
    Invalid {
        object: Box<ObjectRef>,
        /// In the manifest's spelling: `ports[1].port`, `labels.app`, `subject.user`.
        field: String,
        problem: Problem,
    },
}

impl ObjectError {
    /// The object the error is about, when the message named one.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            Self::Invalid { object, .. } => Some(object.as_ref()),
            Self::NoKind | Self::NodeNotApplicable { .. } => None,
        }
    }

    /// `problem` at `field` of `object`.
    pub fn invalid(object: &ObjectRef, field: impl Into<String>, problem: Problem) -> Self {
        Self::Invalid {
            object: Box::new(object.clone()),
            field: field.into(),
            problem,
        }
    }
}

/// Builds the errors of one object.
struct Check {
    object: ObjectRef,
}

impl Check {
    /// For `map_err`: `problem` at `field`.
    fn at(&self, field: impl Into<String>) -> impl FnOnce(Problem) -> ObjectError + '_ {
        let field = field.into();
        move |problem| ObjectError::Invalid {
            object: Box::new(self.object.clone()),
            field,
            problem,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Enums and kinds
// ---------------------------------------------------------------------------------------

impl From<Protocol> for v1::Protocol {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => Self::Tcp,
            Protocol::Udp => Self::Udp,
        }
    }
}

impl TryFrom<v1::Protocol> for Protocol {
    type Error = Problem;

    fn try_from(protocol: v1::Protocol) -> Result<Self, Problem> {
        match protocol {
            v1::Protocol::Tcp => Ok(Self::Tcp),
            v1::Protocol::Udp => Ok(Self::Udp),
            v1::Protocol::Unspecified => Err(Problem::UnknownProtocol {
                value: protocol.as_str_name().to_owned(),
            }),
        }
    }
}

impl From<Algorithm> for v1::Algorithm {
    fn from(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::RoundRobin => Self::RoundRobin,
            Algorithm::WeightedRoundRobin => Self::WeightedRoundRobin,
            Algorithm::LeastConnections => Self::LeastConnections,
            Algorithm::WeightedLeastConnections => Self::WeightedLeastConnections,
            Algorithm::Maglev => Self::Maglev,
        }
    }
}

/// Unspecified is round-robin, as the proto documents.
impl From<v1::Algorithm> for Algorithm {
    fn from(algorithm: v1::Algorithm) -> Self {
        match algorithm {
            v1::Algorithm::Unspecified | v1::Algorithm::RoundRobin => Self::RoundRobin,
            v1::Algorithm::WeightedRoundRobin => Self::WeightedRoundRobin,
            v1::Algorithm::LeastConnections => Self::LeastConnections,
            v1::Algorithm::WeightedLeastConnections => Self::WeightedLeastConnections,
            v1::Algorithm::Maglev => Self::Maglev,
        }
    }
}

/// A protocol field of a message: an `i32` that may hold any value.
pub fn protocol_from_proto(value: i32) -> Result<Protocol, Problem> {
    match v1::Protocol::try_from(value) {
        Ok(protocol) => Protocol::try_from(protocol),
        Err(_) => Err(Problem::UnknownProtocol {
            value: value.to_string(),
        }),
    }
}

/// An algorithm field of a message: an `i32` that may hold any value.
pub fn algorithm_from_proto(value: i32) -> Result<Algorithm, Problem> {
    v1::Algorithm::try_from(value)
        .map(Algorithm::from)
        .map_err(|_| Problem::UnknownAlgorithm {
            value: value.to_string(),
        })
}

// ---------------------------------------------------------------------------------------
// Domain to message
// ---------------------------------------------------------------------------------------

fn meta(namespace: &str, name: &str, labels: &Labels) -> Option<v1::ObjectMeta> {
    Some(v1::ObjectMeta {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        resource_version: 0,
        labels: to_map(labels),
    })
}

fn to_map(labels: &Labels) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// Message to domain
// ---------------------------------------------------------------------------------------

/// The object's identity and labels, in the order a manifest checks them: name,
/// namespace, labels. An absent `meta` is an empty one (proto3), so it fails on the name.
fn from_meta(
    kind: ObjectKind,
    meta: Option<v1::ObjectMeta>,
) -> Result<(Check, Labels), ObjectError> {
    let v1::ObjectMeta {
        namespace,
        name,
        resource_version: _,
        labels,
    } = meta.unwrap_or_default();
    let namespace = if namespace.is_empty() {
        DEFAULT_NAMESPACE.to_owned()
    } else {
        namespace
    };
    let check = Check {
        object: ObjectRef {
            kind,
            namespace,
            name,
        },
    };
    rules::validate_name(&check.object.name).map_err(check.at("name"))?;
    rules::validate_namespace(&check.object.namespace).map_err(check.at("namespace"))?;
    let labels = from_labels(&check, "labels", labels)?;
    Ok((check, labels))
}

/// Labels or a selector; checked in key order so the first error is deterministic.
fn from_labels(
    check: &Check,
    field: &str,
    labels: HashMap<String, String>,
) -> Result<Labels, ObjectError> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    rules::validate_label_count(labels.len()).map_err(check.at(field))?;
    for (key, value) in &labels {
        rules::validate_label_key(key).map_err(check.at(format!("{field}.{key}")))?;
        rules::validate_label_value(value).map_err(check.at(format!("{field}.{key}")))?;
    }
    Ok(labels)
}

/// A port field. Zero is out of range here; `target_port`'s caller maps its zero first.
fn port(check: &Check, field: &str, value: u32) -> Result<u16, ObjectError> {
    rules::validate_port(value.into()).map_err(check.at(field))
}

/// A weight field: zero means 1.
fn weight(check: &Check, field: &str, value: u32) -> Result<u32, ObjectError> {
    if value == 0 {
        return Ok(1);
    }
    rules::validate_weight(value.into()).map_err(check.at(field))
}

/// A string the message must set.
fn required<'a>(check: &Check, field: &str, value: &'a str) -> Result<&'a str, ObjectError> {
    if value.is_empty() {
        return Err(check.at(field)(Problem::Missing));
    }
    Ok(value)
}

/// An optional string (empty is unset) that `rule` validates.
fn optional(
    check: &Check,
    field: &str,
    value: String,
    rule: fn(&str) -> Result<(), Problem>,
) -> Result<Option<String>, ObjectError> {
    if value.is_empty() {
        return Ok(None);
    }
    rule(&value).map_err(check.at(field))?;
    Ok(Some(value))
}

#[cfg(test)]
mod tests;
