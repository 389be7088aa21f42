//! The objects the control service stores: what [`super::parse_objects`] returns and
//! what [`crate::convert`] turns into API messages and back. Every value here has been
//! validated; defaults are filled in (namespace, weight, readiness, target port).
//!
//! They serialize with the manifest's spellings (`Object` is tagged with `kind`), so
//! printing one as YAML gives a document `sluicectl apply -f` accepts again.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Serialize, Serializer};

use super::{Algorithm, BackendSpec, Service, ServicePort, Traffic, policy::NetworkPolicy};

/// Where objects go when a manifest or a request names no namespace, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Labels and selectors: sorted, so output and comparisons are stable.
pub type Labels = BTreeMap<String, String>;

/// The kinds of object a manifest can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ObjectKind {
    Service,
    Endpoint,
    Grant,
    NetworkPolicy,
}

impl ObjectKind {
    pub const ALL: [Self; 4] = [
        Self::Service,
        Self::Endpoint,
        Self::Grant,
        Self::NetworkPolicy,
    ];

    /// The manifest spelling (`kind: Service`); case-sensitive, as in Kubernetes.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::Endpoint => "Endpoint",
            Self::Grant => "Grant",
            Self::NetworkPolicy => "NetworkPolicy",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one object; displays as `Service "shop/web"`, as every error message does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            kind,
            namespace,
            name,
        } = self;
        // Debug-quoted: an object rejected for its name may hold any characters.
        write!(f, "{kind} {:?}", format!("{namespace}/{name}"))
    }
}

/// One document of a control-mode manifest, or one object of an API call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Object {
    Service(ServiceObject),
    Endpoint(Endpoint),
    Grant(Grant),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Self::Service(_) => ObjectKind::Service,
            Self::Endpoint(_) => ObjectKind::Endpoint,
            Self::Grant(_) => ObjectKind::Grant,
            Self::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
        }
    }

    pub fn namespace(&self) -> &str {
        match self {
            Self::Service(s) => &s.namespace,
            Self::Endpoint(e) => &e.namespace,
            Self::Grant(g) => &g.namespace,
            Self::NetworkPolicy(p) => &p.namespace,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Service(s) => &s.name,
            Self::Endpoint(e) => &e.name,
            Self::Grant(g) => &g.name,
            Self::NetworkPolicy(p) => &p.name,
        }
    }

    pub fn labels(&self) -> &Labels {
        match self {
            Self::Service(s) => &s.labels,
            Self::Endpoint(e) => &e.labels,
            Self::Grant(g) => &g.labels,
            Self::NetworkPolicy(p) => &p.labels,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: self.kind(),
            namespace: self.namespace().to_owned(),
            name: self.name().to_owned(),
        }
    }
}

/// A service as the control service sees it: the VIP may be left to the control service
/// to allocate, and backends may be static or selected endpoints (never both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceObject {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// `None`: the control service allocates one from its VIP range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub algorithm: Algorithm,
    /// Static backends; empty when `selector` is used (or when there are none, in which
    /// case the data plane drops the service's traffic and counts it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendSpec>,
    /// Endpoint labels (in the service's namespace) that pick the backends; empty when
    /// `backends` is used.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: Labels,
    /// With `algorithm: maglev`: the lookup table's size, a prime.
    #[serde(rename = "maglevTableSize", skip_serializing_if = "Option::is_none")]
    pub maglev_table_size: Option<u32>,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// A standalone agent's service is a control-mode service with a VIP and static backends.
impl From<Service> for ServiceObject {
    fn from(service: Service) -> Self {
        let Service {
            namespace,
            name,
            labels,
            vip,
            ports,
            algorithm,
            backends,
            maglev_table_size,
            traffic,
        } = service;
        Self {
            namespace,
            name,
            labels,
            vip: Some(vip),
            ports,
            algorithm,
            backends,
            selector: Labels::new(),
            maglev_table_size,
            traffic,
        }
    }
}

/// A backend registered with the control service; services select endpoints by label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    pub address: Ipv4Addr,
    /// The node the endpoint runs on (a DNS-1123 subdomain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// 1..=[`super::MAX_WEIGHT`], 1 when not given.
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

/// RBAC: binds a subject to a role on a scope. Deny by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Where the grant object itself lives (who may edit it), not what it grants on.
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    pub subject: Subject,
    pub role: Role,
    /// What the grant applies to.
    pub scope: Scope,
    /// Non-empty exactly when `role` is [`Role::Custom`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<Permission>,
}

/// Who a grant applies to: a user, or every member of a group (groups come from the
/// user's certificate).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    User(String),
    Group(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Editor,
    Admin,
    /// The grant's own `permissions`.
    Custom,
}

impl Role {
    pub const ALL: [Self; 4] = [Self::Viewer, Self::Editor, Self::Admin, Self::Custom];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Admin => "admin",
            Self::Custom => "custom",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a grant applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `"*"`: every namespace, and the cluster-scoped kinds (nodes, tokens, users).
    All,
    Namespace(String),
}

impl Scope {
    /// The spelling of [`Scope::All`].
    pub const ALL: &'static str = "*";

    pub fn as_str(&self) -> &str {
        match self {
            Self::All => Self::ALL,
            Self::Namespace(namespace) => namespace,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// As the manifest spells it: a plain string.
impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One permission of a custom role: a verb on a resource kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Permission {
    pub verb: Verb,
    pub resource: Resource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Verb {
    #[serde(rename = "get")]
    Get,
    #[serde(rename = "list")]
    List,
    #[serde(rename = "watch")]
    Watch,
    #[serde(rename = "create")]
    Create,
    #[serde(rename = "update")]
    Update,
    #[serde(rename = "delete")]
    Delete,
    /// `"*"`: every verb.
    #[serde(rename = "*")]
    All,
}

impl Verb {
    pub const ALL: [Self; 7] = [
        Self::Get,
        Self::List,
        Self::Watch,
        Self::Create,
        Self::Update,
        Self::Delete,
        Self::All,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::All => "*",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|verb| verb.as_str() == name)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Resource {
    #[serde(rename = "services")]
    Services,
    #[serde(rename = "endpoints")]
    Endpoints,
    #[serde(rename = "grants")]
    Grants,
    #[serde(rename = "networkpolicies")]
    NetworkPolicies,
    #[serde(rename = "nodes")]
    Nodes,
    #[serde(rename = "tokens")]
    Tokens,
    #[serde(rename = "users")]
    Users,
    /// `"*"`: every resource.
    #[serde(rename = "*")]
    All,
}

impl Resource {
    pub const ALL: [Self; 8] = [
        Self::Services,
        Self::Endpoints,
        Self::Grants,
        Self::NetworkPolicies,
        Self::Nodes,
        Self::Tokens,
        Self::Users,
        Self::All,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Endpoints => "endpoints",
            Self::Grants => "grants",
            Self::NetworkPolicies => "networkpolicies",
            Self::Nodes => "nodes",
            Self::Tokens => "tokens",
            Self::Users => "users",
            Self::All => "*",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|resource| resource.as_str() == name)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
