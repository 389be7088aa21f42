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

use sluice_model::grant::{Grant, Permission, Role, Scope, Subject};
pub use sluice_model::grant::{Resource, Verb};

/// Members of this group are admins of the whole cluster.
pub const ADMIN_GROUP: &str = "system:admins";

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

fn role_allows(role: Role, verb: Verb, resource: Resource) -> bool {
    match role {
        Role::Viewer => {
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
        Role::Editor => {
            role_allows(Role::Viewer, verb, resource)
                || (WRITE.contains(&verb)
                    && matches!(
                        resource,
                        Resource::Services | Resource::Endpoints | Resource::NetworkPolicies
                    ))
        }
        Role::Admin => true,
        // A custom role is its permissions (see `grant_allows`).
        Role::Custom => false,
    }
}

fn permission_allows(p: &Permission, verb: Verb, resource: Resource) -> bool {
    (p.verb == Verb::All || p.verb == verb)
        && (p.resource == Resource::All || p.resource == resource)
}

fn subject_matches(subject: &Subject, caller: &Caller) -> bool {
    match subject {
        Subject::User(user) => *user == caller.name,
        Subject::Group(group) => caller.groups.iter().any(|g| g == group),
    }
}

fn scope_covers(scope: &Scope, resource: Resource, namespace: Option<&str>) -> bool {
    match scope {
        Scope::All => true,
        Scope::Namespace(scope) => resource.namespaced() && namespace == Some(scope.as_str()),
    }
}

fn grant_allows(
    g: &Grant,
    caller: &Caller,
    verb: Verb,
    resource: Resource,
    namespace: Option<&str>,
) -> bool {
    subject_matches(&g.subject, caller)
        && scope_covers(&g.scope, resource, namespace)
        && match g.role {
            Role::Custom => g
                .permissions
                .iter()
                .any(|p| permission_allows(p, verb, resource)),
            role => role_allows(role, verb, resource),
        }
}

/// Whether `caller` may `verb` `resource` (in `namespace`, for namespaced
/// resources; `None` there means across all namespaces, which only a `"*"`
/// scope covers).
pub fn check(
    caller: &Caller,
    verb: Verb,
    resource: Resource,
    namespace: Option<&str>,
    grants: &[&Grant],
) -> Result<(), Denied> {
    if caller.groups.iter().any(|g| g == ADMIN_GROUP) {
        return Ok(());
    }
    let allowed = grants
        .iter()
        .any(|g| grant_allows(g, caller, verb, resource, namespace));
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
    grants: &[&Grant],
) -> Option<Vec<String>> {
    if check(caller, verb, resource, None, grants).is_ok() {
        return None;
    }
    let mut namespaces: Vec<String> = grants
        .iter()
        .filter_map(|g| match &g.scope {
            Scope::Namespace(namespace) => Some(namespace),
            Scope::All => None,
        })
        .filter(|namespace| check(caller, verb, resource, Some(namespace), grants).is_ok())
        .cloned()
        .collect();
    namespaces.sort();
    namespaces.dedup();
    Some(namespaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(subject: Subject, role: Role, scope: &str) -> Grant {
        Grant {
            namespace: "default".into(),
            name: "g".into(),
            labels: Default::default(),
            subject,
            role,
            scope: match scope {
                "*" => Scope::All,
                namespace => Scope::Namespace(namespace.into()),
            },
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
        let grants = [grant(Subject::User("bob".into()), Role::Viewer, "shop")];
        let bob = user("bob", &[]);
        assert!(
            check(
                &bob,
                Verb::Get,
                Resource::Services,
                Some("shop"),
                &grants.iter().collect::<Vec<_>>()
            )
            .is_ok()
        );
        assert!(
            check(
                &bob,
                Verb::Create,
                Resource::Services,
                Some("shop"),
                &grants.iter().collect::<Vec<_>>()
            )
            .is_err()
        );
        assert!(
            check(
                &bob,
                Verb::Get,
                Resource::Services,
                Some("other"),
                &grants.iter().collect::<Vec<_>>()
            )
            .is_err()
        );
        // A namespace scope never covers cluster-scoped kinds.
        assert!(
            check(
                &bob,
                Verb::Get,
                Resource::Nodes,
                None,
                &grants.iter().collect::<Vec<_>>()
            )
            .is_err()
        );
    }

    #[test]
    fn editor_writes_services_via_a_group_but_not_grants() {
        let grants = [grant(Subject::Group("dev".into()), Role::Editor, "*")];
        let carol = user("carol", &["dev"]);
        assert!(
            check(
                &carol,
                Verb::Update,
                Resource::Endpoints,
                Some("x"),
                &grants.iter().collect::<Vec<_>>()
            )
            .is_ok()
        );
        assert!(
            check(
                &carol,
                Verb::Create,
                Resource::Grants,
                Some("x"),
                &grants.iter().collect::<Vec<_>>()
            )
            .is_err()
        );
        assert!(
            check(
                &carol,
                Verb::Create,
                Resource::Tokens,
                None,
                &grants.iter().collect::<Vec<_>>()
            )
            .is_err()
        );
    }

    #[test]
    fn custom_roles_list_their_permissions() {
        let mut g = grant(Subject::User("ops".into()), Role::Custom, "*");
        g.permissions = vec![Permission {
            verb: Verb::Create,
            resource: Resource::Tokens,
        }];
        let ops = user("ops", &[]);
        assert!(check(&ops, Verb::Create, Resource::Tokens, None, &[&g]).is_ok());
        assert!(check(&ops, Verb::Delete, Resource::Nodes, None, &[&g]).is_err());
    }

    #[test]
    fn the_admin_group_needs_no_grant() {
        let root = user("root", &[ADMIN_GROUP]);
        assert!(check(&root, Verb::Delete, Resource::Nodes, None, &[]).is_ok());
    }

    #[test]
    fn listable_namespaces_follow_the_grants() {
        let grants = [
            grant(Subject::User("bob".into()), Role::Viewer, "shop"),
            grant(Subject::User("bob".into()), Role::Viewer, "blog"),
        ];
        let bob = user("bob", &[]);
        assert_eq!(
            namespaces_allowed(
                &bob,
                Verb::List,
                Resource::Services,
                &grants.iter().collect::<Vec<_>>()
            ),
            Some(vec!["blog".to_string(), "shop".to_string()])
        );
        let root = user("root", &[ADMIN_GROUP]);
        assert_eq!(
            namespaces_allowed(&root, Verb::List, Resource::Services, &[]),
            None
        );
    }
}
