//! Sluice's domain model: the validated objects admins declare, how they are
//! read from YAML manifests, and the pure computations over them that both
//! the control service and a standalone agent run. See docs/architecture.md.
//!
//! | module | what |
//! |---|---|
//! | [`kind`] | the kinds of object, registered once; [`Object`], [`ObjectRef`], [`Versioned`] |
//! | [`service`], [`endpoint`], [`grant`], [`policy`], [`node`] | the objects, validated, defaults applied |
//! | [`traffic`] | a service's health check, draining, rollout, affinity; `rollout_weights` |
//! | [`rules`] | the value rules, one implementation each, shared by manifests and API messages |
//! | [`view`] | what a node programs: frontends computed from services and endpoints, diffs, updates |
//! | [`policy::compile`] | network policies compiled into identities, rules and counter slots |
//! | [`observe`] | what nodes report: flow log, counters, policy verdict counts, probe verdicts |
//! | [`manifest`] | YAML manifests: standalone (a list of services) and control (any object) |
//! | [`wire`] | conversions to and from the API's messages, used only at the edges |

pub mod endpoint;
pub mod grant;
pub mod index;
pub mod kind;
pub mod manifest;
pub mod node;
pub mod observe;
pub mod policy;
pub mod rules;
pub mod service;
pub mod traffic;
pub mod view;
pub mod wire;

pub use endpoint::{Endpoint, VERSION_LABEL};
pub use grant::{Grant, Permission, Resource, Role, Scope, Subject, Verb};
pub use kind::{
    DEFAULT_NAMESPACE, Kind, Labels, Meta, Object, ObjectKind, ObjectRef, Objects, Versioned,
};
pub use node::Node;
pub use policy::NetworkPolicy;
pub use service::{Algorithm, BackendSpec, Protocol, Service, ServicePort, ServiceSpec};

/// An error and its causes on one line (`error: cause: cause`), as the
/// programs print and log them. A cause whose text the message already
/// carries (many errors repeat their source) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
