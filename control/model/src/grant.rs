//! Grants: role-based access for admins, deny by default. Who may do what is
//! decided by the control service (`rbac`) from these alone.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::kind::Labels;

/// RBAC: binds a subject to a role on a scope. Deny by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Where the grant object itself lives (who may edit it), not what it grants on.
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Labels::is_empty")]
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

    /// Namespaced resources can be granted per namespace; the others only
    /// with scope `"*"`.
    pub fn namespaced(self) -> bool {
        matches!(
            self,
            Self::Services | Self::Endpoints | Self::Grants | Self::NetworkPolicies
        )
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
