//! Role-based access for admins: who may do what, decided from grants alone.
//!
//! Deny by default. A grant binds a subject (a user, or a group carried in the
//! user's certificate) to a role on a scope: one namespace, or `"*"` for every
//! namespace and the cluster-scoped kinds (nodes, tokens, users). Members of
//! [`ADMIN_GROUP`] are admins everywhere without a grant: the control service
//! writes the first admin's credentials at its first start, and someone must be
//! able to create the first grant.
//!
//! | role | permissions |
//! |---|---|
//! | viewer | get, list, watch on services, endpoints, grants, nodes |
//! | editor | viewer's, plus create, update, delete on services and endpoints |
//! | admin | every verb on every resource |
//! | custom | the grant's own `permissions` |

use std::fmt;

use sluice_api::v1;

/// Members of this group are admins of the whole cluster.
pub const ADMIN_GROUP: &str = "system:admins";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Delete,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::List => "list",
            Self::Watch => "watch",
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Services,
    Endpoints,
    Grants,
    NetworkPolicies,
    Nodes,
    Tokens,
    Users,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Endpoints => "endpoints",
            Self::Grants => "grants",
            Self::NetworkPolicies => "networkpolicies",
            Self::Nodes => "nodes",
            Self::Tokens => "tokens",
            Self::Users => "users",
        }
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

/// An authenticated admin, from their certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub groups: Vec<String>,
}

/// What was refused, phrased as the permission that was missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Denied {
    pub user: String,
    pub groups: Vec<String>,
    pub verb: Verb,
    pub resource: Resource,
    /// None for cluster-scoped resources.
    pub namespace: Option<String>,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user \"{}\"", self.user)?;
        if !self.groups.is_empty() {
            write!(f, " (groups: {})", self.groups.join(", "))?;
        }
        write!(
            f,
            " lacks the permission `{} {}`",
            self.verb.as_str(),
            self.resource.as_str()
        )?;
        match &self.namespace {
            Some(ns) => write!(f, " in namespace \"{ns}\""),
            None => write!(f, " (cluster-wide)"),
        }?;
        write!(f, "; no grant allows it")
    }
}

const READ: [Verb; 3] = [Verb::Get, Verb::List, Verb::Watch];
const WRITE: [Verb; 3] = [Verb::Create, Verb::Update, Verb::Delete];

fn role_allows(role: &str, verb: Verb, resource: Resource) -> bool {
    match role {
        "viewer" => {
            READ.contains(&verb)
                && matches!(
                    resource,
                    Resource::Services
                        | Resource::Endpoints
                        | Resource::Grants
                        | Resource::NetworkPolicies
                        | Resource::Nodes
                )
        }
        "editor" => {
            role_allows("viewer", verb, resource)
                || (WRITE.contains(&verb)
                    && matches!(
                        resource,
                        Resource::Services | Resource::Endpoints | Resource::NetworkPolicies
                    ))
        }
        "admin" => true,
        _ => false,
    }
}

fn permission_allows(p: &v1::Permission, verb: Verb, resource: Resource) -> bool {
    (p.verb == "*" || p.verb == verb.as_str())
        && (p.resource == "*" || p.resource == resource.as_str())
}

fn subject_matches(subject: Option<&v1::Subject>, caller: &Caller) -> bool {
    match subject.and_then(|s| s.kind.as_ref()) {
        Some(v1::subject::Kind::User(user)) => *user == caller.name,
        Some(v1::subject::Kind::Group(group)) => caller.groups.iter().any(|g| g == group),
        None => false,
    }
}

fn scope_covers(scope: &str, resource: Resource, namespace: Option<&str>) -> bool {
    scope == "*" || (resource.namespaced() && namespace == Some(scope))
}

/// Whether `caller` may `verb` `resource` (in `namespace`, for namespaced
/// resources; `None` there means across all namespaces, which only a `"*"`
/// scope covers).
pub fn check(
    caller: &Caller,
    verb: Verb,
    resource: Resource,
    namespace: Option<&str>,
    grants: &[v1::Grant],
) -> Result<(), Denied> {
    if caller.groups.iter().any(|g| g == ADMIN_GROUP) {
        return Ok(());
    }
    let allowed = grants.iter().any(|g| {
        subject_matches(g.subject.as_ref(), caller)
            && scope_covers(&g.scope_namespace, resource, namespace)
            && if g.role == "custom" {
                g.permissions
                    .iter()
                    .any(|p| permission_allows(p, verb, resource))
            } else {
                role_allows(&g.role, verb, resource)
            }
    });
    if allowed {
        Ok(())
    } else {
        Err(Denied {
            user: caller.name.clone(),
            groups: caller.groups.clone(),
            verb,
            resource,
            namespace: namespace.map(str::to_string),
        })
    }
}

/// The namespaces in which `caller` may `verb` `resource`: `None` means all.
pub fn namespaces_allowed(
    caller: &Caller,
    verb: Verb,
    resource: Resource,
    grants: &[v1::Grant],
) -> Option<Vec<String>> {
    if check(caller, verb, resource, None, grants).is_ok() {
        return None;
    }
    let mut namespaces: Vec<String> = grants
        .iter()
        .filter(|g| g.scope_namespace != "*")
        .filter(|g| check(caller, verb, resource, Some(&g.scope_namespace), grants).is_ok())
        .map(|g| g.scope_namespace.clone())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    Some(namespaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(subject: v1::subject::Kind, role: &str, scope: &str) -> v1::Grant {
        v1::Grant {
            meta: None,
            subject: Some(v1::Subject {
                kind: Some(subject),
            }),
            role: role.into(),
            scope_namespace: scope.into(),
            permissions: Vec::new(),
        }
    }

    fn user(name: &str, groups: &[&str]) -> Caller {
        Caller {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn deny_by_default_and_say_what_is_missing() {
        let err = check(
            &user("alice", &["dev"]),
            Verb::Update,
            Resource::Services,
            Some("shop"),
            &[],
        )
        .expect_err("no grants");
        assert_eq!(
            err.to_string(),
            "user \"alice\" (groups: dev) lacks the permission `update services` in namespace \"shop\"; no grant allows it"
        );
    }

    #[test]
    fn viewer_reads_but_cannot_write() {
        let grants = [grant(
            v1::subject::Kind::User("bob".into()),
            "viewer",
            "shop",
        )];
        let bob = user("bob", &[]);
        assert!(check(&bob, Verb::Get, Resource::Services, Some("shop"), &grants).is_ok());
        assert!(
            check(
                &bob,
                Verb::Create,
                Resource::Services,
                Some("shop"),
                &grants
            )
            .is_err()
        );
        assert!(check(&bob, Verb::Get, Resource::Services, Some("other"), &grants).is_err());
        // A namespace scope never covers cluster-scoped kinds.
        assert!(check(&bob, Verb::Get, Resource::Nodes, None, &grants).is_err());
    }

    #[test]
    fn editor_writes_services_via_a_group_but_not_grants() {
        let grants = [grant(v1::subject::Kind::Group("dev".into()), "editor", "*")];
        let carol = user("carol", &["dev"]);
        assert!(
            check(
                &carol,
                Verb::Update,
                Resource::Endpoints,
                Some("x"),
                &grants
            )
            .is_ok()
        );
        assert!(check(&carol, Verb::Create, Resource::Grants, Some("x"), &grants).is_err());
        assert!(check(&carol, Verb::Create, Resource::Tokens, None, &grants).is_err());
    }

    #[test]
    fn custom_roles_list_their_permissions() {
        let mut g = grant(v1::subject::Kind::User("ops".into()), "custom", "*");
        g.permissions = vec![v1::Permission {
            verb: "create".into(),
            resource: "tokens".into(),
        }];
        let ops = user("ops", &[]);
        assert!(check(&ops, Verb::Create, Resource::Tokens, None, &[g.clone()]).is_ok());
        assert!(check(&ops, Verb::Delete, Resource::Nodes, None, &[g]).is_err());
    }

    #[test]
    fn the_admin_group_needs_no_grant() {
        let root = user("root", &[ADMIN_GROUP]);
        assert!(check(&root, Verb::Delete, Resource::Nodes, None, &[]).is_ok());
    }

    #[test]
    fn listable_namespaces_follow_the_grants() {
        let grants = [
            grant(v1::subject::Kind::User("bob".into()), "viewer", "shop"),
            grant(v1::subject::Kind::User("bob".into()), "viewer", "blog"),
        ];
        let bob = user("bob", &[]);
        assert_eq!(
            namespaces_allowed(&bob, Verb::List, Resource::Services, &grants),
            Some(vec!["blog".to_string(), "shop".to_string()])
        );
        let root = user("root", &[ADMIN_GROUP]);
        assert_eq!(
            namespaces_allowed(&root, Verb::List, Resource::Services, &[]),
            None
        );
    }
}
