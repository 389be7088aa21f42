//! Grants.

use sluice_api::v1;

use super::{ObjectError, from_meta, meta, required};
use crate::grant::{Grant, Permission, Subject};
use crate::kind::{ObjectKind, ObjectRef};
use crate::rules::{self, Problem, UniquePermissions};

impl From<&Subject> for v1::Subject {
    fn from(subject: &Subject) -> Self {
        let kind = match subject {
            Subject::User(user) => v1::subject::Kind::User(user.clone()),
            Subject::Group(group) => v1::subject::Kind::Group(group.clone()),
        };
        Self { kind: Some(kind) }
    }
}

impl From<&Permission> for v1::Permission {
    fn from(permission: &Permission) -> Self {
        let Permission { verb, resource } = *permission;
        Self {
            verb: verb.as_str().to_owned(),
            resource: resource.as_str().to_owned(),
        }
    }
}

impl From<&Grant> for v1::Grant {
    fn from(grant: &Grant) -> Self {
        let Grant {
            namespace,
            name,
            labels,
            subject,
            role,
            scope,
            permissions,
        } = grant;
        Self {
            meta: meta(namespace, name, labels),
            subject: Some(subject.into()),
            role: role.as_str().to_owned(),
            scope_namespace: scope.as_str().to_owned(),
            permissions: permissions.iter().map(v1::Permission::from).collect(),
        }
    }
}

impl TryFrom<v1::Grant> for Grant {
    type Error = ObjectError;

    fn try_from(grant: v1::Grant) -> Result<Self, ObjectError> {
        let v1::Grant {
            meta,
            subject,
            role,
            scope_namespace,
            permissions,
        } = grant;
        let (check, labels) = from_meta(ObjectKind::Grant, meta)?;

        let subject = match subject.and_then(|s| s.kind) {
            None => return Err(check.at("subject")(Problem::NoSubject)),
            Some(v1::subject::Kind::User(user)) => {
                rules::validate_subject(&user).map_err(check.at("subject.user"))?;
                Subject::User(user)
            }
            Some(v1::subject::Kind::Group(group)) => {
                rules::validate_subject(&group).map_err(check.at("subject.group"))?;
                Subject::Group(group)
            }
        };
        let role =
            rules::validate_role(required(&check, "role", &role)?).map_err(check.at("role"))?;
        let scope = rules::validate_scope(required(&check, "scope", &scope_namespace)?)
            .map_err(check.at("scope"))?;

        rules::validate_permission_count(role, permissions.len())
            .map_err(check.at("permissions"))?;
        let mut unique = UniquePermissions::default();
        let mut domain_permissions = Vec::with_capacity(permissions.len());
        for (i, entry) in permissions.into_iter().enumerate() {
            let v1::Permission { verb, resource } = entry;
            let verb_field = format!("permissions[{i}].verb");
            let verb = rules::validate_verb(required(&check, &verb_field, &verb)?)
                .map_err(check.at(&verb_field))?;
            let resource_field = format!("permissions[{i}].resource");
            let resource = rules::validate_resource(required(&check, &resource_field, &resource)?)
                .map_err(check.at(&resource_field))?;
            let permission = Permission { verb, resource };
            unique
                .insert(i, permission)
                .map_err(check.at(format!("permissions[{i}]")))?;
            domain_permissions.push(permission);
        }

        let ObjectRef {
            namespace, name, ..
        } = check.object;
        Ok(Self {
            namespace,
            name,
            labels,
            subject,
            role,
            scope,
            permissions: domain_permissions,
        })
    }
}
