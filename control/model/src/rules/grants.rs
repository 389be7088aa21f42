//! Roles, scopes, verbs and resources of a Grant.

use super::*;

pub fn validate_role(value: &str) -> Result<Role, Problem> {
    Role::from_name(value).ok_or_else(|| Problem::UnknownRole {
        value: value.to_owned(),
    })
}

/// `"*"` or a namespace.
pub fn validate_scope(value: &str) -> Result<Scope, Problem> {
    if value == Scope::ALL {
        return Ok(Scope::All);
    }
    dns_1123_label(value)
        .map(|()| Scope::Namespace(value.to_owned()))
        .map_err(|problem| Problem::InvalidScope {
            value: value.to_owned(),
            problem,
        })
}

pub fn validate_verb(value: &str) -> Result<Verb, Problem> {
    Verb::from_name(value).ok_or_else(|| Problem::UnknownVerb {
        value: value.to_owned(),
    })
}

pub fn validate_resource(value: &str) -> Result<Resource, Problem> {
    Resource::from_name(value).ok_or_else(|| Problem::UnknownResource {
        value: value.to_owned(),
    })
}

/// `permissions` is required with role custom and forbidden with the others: a fixed
/// role with extra permissions would read as if those were all it grants.
pub fn validate_permission_count(role: Role, count: usize) -> Result<(), Problem> {
    match (role, count) {
        (Role::Custom, 0) => Err(Problem::NoPermissions),
        (Role::Custom, _) | (_, 0) => Ok(()),
        (role, _) => Err(Problem::PermissionsNotCustom { role }),
    }
}
