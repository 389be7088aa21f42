//! One document into one object: the YAML-side checks (types, required and unknown
//! fields) around the shared rules of [`super::rules`].

use std::net::Ipv4Addr;

use super::error::{ControlOnly, ManifestError, Mode};
use super::traffic;
use super::yaml::{
    Cx, Fields, Node, Value, boolean, integer, mapping, sequence, string, wrong_type,
};
use crate::endpoint::{Endpoint, VERSION_LABEL};
use crate::grant::{Grant, Permission, Subject};
use crate::kind::{DEFAULT_NAMESPACE, Labels, Object, ObjectKind, ObjectRef};
use crate::rules::{self, Problem, UniqueBackends, UniquePermissions, UniquePorts};
use crate::service::{Algorithm, BackendSpec, ServicePort, ServiceSpec};
use crate::traffic::validate_version;

const AGENT_SERVICE_FIELDS: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "labels",
    "vip",
    "ports",
    "algorithm",
    "backends",
    "maglevTableSize",
    "healthCheck",
    "drainTimeoutSeconds",
    "rollout",
    "sessionAffinity",
];
const CONTROL_SERVICE_FIELDS: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "labels",
    "vip",
    "ports",
    "algorithm",
    "backends",
    "selector",
    "maglevTableSize",
    "healthCheck",
    "drainTimeoutSeconds",
    "rollout",
    "sessionAffinity",
    "topologyAware",
];
const PORT_FIELDS: &[&str] = &["port", "protocol", "targetPort"];
const BACKEND_FIELDS: &[&str] = &["address", "weight", "version", "draining"];
const ENDPOINT_FIELDS: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "labels",
    "address",
    "node",
    "zone",
    "weight",
    "ready",
    "draining",
];
const GRANT_FIELDS: &[&str] = &[
    "kind",
    "namespace",
    "name",
    "labels",
    "subject",
    "role",
    "scope",
    "permissions",
];
const SUBJECT_FIELDS: &[&str] = &["user", "group"];
const PERMISSION_FIELDS: &[&str] = &["verb", "resource"];

/// A validated object plus the nodes that cross-document checks point at.
pub(super) struct Parsed<'n> {
    pub(super) object: Object,
    /// The document itself, for errors about the object as a whole.
    pub(super) root: &'n Node,
    pub(super) kind_node: &'n Node,
    pub(super) name_node: &'n Node,
    /// A Service's `ports[i]` entries; empty for other kinds.
    pub(super) port_nodes: Vec<&'n Node>,
}

/// Validates one document. `kind`, `name` and `namespace` come first so that later
/// errors can name the object, and so that a document of another kind is reported as
/// such rather than as a pile of unknown fields.
pub(super) fn parse_document<'n>(
    cx: Cx<'_>,
    root: &'n Node,
    mode: Mode,
) -> Result<Parsed<'n>, ManifestError> {
    if !matches!(root.value, Value::Map(_)) {
        return Err(ManifestError::NotAMapping {
            at: cx.at(root),
            found: root.value.describe(),
        });
    }
    let fields = Fields::new(cx, String::new(), root)?;

    let kind_node = fields.require(cx, "kind")?;
    let kind_name = string(cx, "kind", kind_node)?;
    let kind = match ObjectKind::from_name(kind_name) {
        Some(kind) if mode.accepts(kind) => kind,
        Some(kind) => {
            return Err(ManifestError::NeedsControlService {
                at: cx.at(kind_node),
                field: "kind".to_owned(),
                feature: ControlOnly::Kind { kind },
            });
        }
        None => {
            return Err(ManifestError::UnsupportedKind {
                at: cx.at(kind_node),
                kind: kind_name.to_owned(),
                mode,
            });
        }
    };

    let name_node = fields.require(cx, "name")?;
    let name = string(cx, "name", name_node)?;
    rules::validate_name(name).map_err(cx.fail(name_node, "name"))?;
    let namespace = match fields.get("namespace") {
        None => DEFAULT_NAMESPACE,
        Some(node) => {
            let namespace = string(cx, "namespace", node)?;
            rules::validate_namespace(namespace).map_err(cx.fail(node, "namespace"))?;
            namespace
        }
    };
    let id = ObjectRef {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    let cx = Cx {
        object: Some(&id),
        ..cx
    };

    let mut port_nodes = Vec::new();
    let object = match kind {
        ObjectKind::Service => {
            let (service, nodes) = parse_service(cx, &fields, mode, &id)?;
            port_nodes = nodes;
            Object::Service(service)
        }
        ObjectKind::Endpoint => Object::Endpoint(parse_endpoint(cx, &fields, &id)?),
        ObjectKind::Grant => Object::Grant(parse_grant(cx, &fields, &id)?),
        ObjectKind::NetworkPolicy => {
            let labels = labels(cx, &fields, "labels")?;
            Object::NetworkPolicy(super::policy::parse(
                cx,
                &fields,
                &id,
                labels,
                label_entries,
            )?)
        }
    };
    Ok(Parsed {
        object,
        root,
        kind_node,
        name_node,
        port_nodes,
    })
}

fn parse_service<'n>(
    cx: Cx<'_>,
    fields: &Fields<'n>,
    mode: Mode,
    id: &ObjectRef,
) -> Result<(ServiceSpec, Vec<&'n Node>), ManifestError> {
    let allowed = match mode {
        Mode::Agent => {
            // Before the unknown-field check, which would call it a typo.
            if let Some(key) = fields.key("selector") {
                return Err(ManifestError::NeedsControlService {
                    at: cx.at(key),
                    field: "selector".to_owned(),
                    feature: ControlOnly::Selector,
                });
            }
            if let Some(key) = fields.key("topologyAware") {
                return Err(ManifestError::NeedsControlService {
                    at: cx.at(key),
                    field: "topologyAware".to_owned(),
                    feature: ControlOnly::TopologyAware,
                });
            }
            AGENT_SERVICE_FIELDS
        }
        Mode::Control => CONTROL_SERVICE_FIELDS,
    };
    fields.deny_unknown(cx, allowed)?;
    let labels = labels(cx, fields, "labels")?;
    let vip = match mode {
        // A standalone agent has no one to allocate a VIP.
        Mode::Agent => Some(address(cx, "vip", fields.require(cx, "vip")?)?),
        Mode::Control => fields
            .get("vip")
            .map(|node| address(cx, "vip", node))
            .transpose()?,
    };
    let (ports, port_nodes) = parse_ports(cx, fields.require(cx, "ports")?)?;
    let algorithm = match fields.get("algorithm") {
        None => Algorithm::default(),
        Some(node) => rules::validate_algorithm(string(cx, "algorithm", node)?)
            .map_err(cx.fail(node, "algorithm"))?,
    };
    let maglev_table_size = fields
        .get("maglevTableSize")
        .map(|node| {
            rules::validate_maglev_table_size(integer(cx, "maglevTableSize", node)?, algorithm)
                .map_err(cx.fail(node, "maglevTableSize"))
        })
        .transpose()?;
    let backends_node = fields.get("backends");
    let backends = match backends_node {
        None => Vec::new(),
        Some(node) => parse_backends(cx, node, vip)?,
    };
    let selector_node = fields.get("selector");
    let selector = match selector_node {
        None => Labels::new(),
        Some(node) => {
            let entries = mapping(cx, "selector", node)?;
            rules::validate_selector_count(entries.len()).map_err(cx.fail(node, "selector"))?;
            label_entries(cx, "selector", entries)?
        }
    };
    if let Some(node) = selector_node {
        rules::validate_backends_or_selector(backends_node.is_some(), true)
            .map_err(cx.fail(node, "selector"))?;
    }
    let traffic = traffic::parse(cx, fields, &ports)?;

    let service = ServiceSpec {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        labels,
        vip,
        ports,
        algorithm,
        backends,
        selector,
        maglev_table_size,
        traffic,
    };
    Ok((service, port_nodes))
}

fn parse_ports<'n>(
    cx: Cx<'_>,
    node: &'n Node,
) -> Result<(Vec<ServicePort>, Vec<&'n Node>), ManifestError> {
    let entries = sequence(cx, "ports", node)?;
    rules::validate_port_count(entries.len()).map_err(cx.fail(node, "ports"))?;

    let mut ports = Vec::with_capacity(entries.len());
    let mut unique = UniquePorts::default();
    for (i, entry) in entries.iter().enumerate() {
        let fields = Fields::new(cx, format!("ports[{i}]"), entry)?;
        fields.deny_unknown(cx, PORT_FIELDS)?;
        let port = port_number(cx, &fields.path("port"), fields.require(cx, "port")?)?;
        let protocol_field = fields.path("protocol");
        let protocol_node = fields.require(cx, "protocol")?;
        let protocol = rules::validate_protocol(string(cx, &protocol_field, protocol_node)?)
            .map_err(cx.fail(protocol_node, &protocol_field))?;
        let target_port = match fields.get("targetPort") {
            Some(node) => port_number(cx, &fields.path("targetPort"), node)?,
            None => port,
        };
        unique
            .insert(i, port, protocol)
            .map_err(cx.fail(entry, &fields.path))?;
        ports.push(ServicePort {
            port,
            protocol,
            target_port,
        });
    }
    Ok((ports, entries.iter().collect()))
}

fn parse_backends(
    cx: Cx<'_>,
    node: &Node,
    vip: Option<Ipv4Addr>,
) -> Result<Vec<BackendSpec>, ManifestError> {
    let entries = sequence(cx, "backends", node)?;
    rules::validate_backend_count(entries.len()).map_err(cx.fail(node, "backends"))?;

    let mut backends = Vec::with_capacity(entries.len());
    let mut unique = UniqueBackends::default();
    for (i, entry) in entries.iter().enumerate() {
        let fields = Fields::new(cx, format!("backends[{i}]"), entry)?;
        fields.deny_unknown(cx, BACKEND_FIELDS)?;
        let address_field = fields.path("address");
        let address_node = fields.require(cx, "address")?;
        let address = address(cx, &address_field, address_node)?;
        rules::validate_backend_address(address, vip)
            .map_err(cx.fail(address_node, &address_field))?;
        let weight = match fields.get("weight") {
            Some(node) => weight(cx, &fields.path("weight"), node)?,
            None => 1,
        };
        let version = match fields.get("version") {
            Some(node) => {
                let field = fields.path("version");
                let version = string(cx, &field, node)?;
                validate_version(version).map_err(cx.fail(node, &field))?;
                Some(version.to_owned())
            }
            None => None,
        };
        let draining = match fields.get("draining") {
            Some(node) => boolean(cx, &fields.path("draining"), node)?,
            None => false,
        };
        unique
            .insert(i, address)
            .map_err(cx.fail(address_node, &address_field))?;
        backends.push(BackendSpec {
            address,
            weight,
            version,
            draining,
        });
    }
    Ok(backends)
}

fn parse_endpoint(
    cx: Cx<'_>,
    fields: &Fields<'_>,
    id: &ObjectRef,
) -> Result<Endpoint, ManifestError> {
    fields.deny_unknown(cx, ENDPOINT_FIELDS)?;
    let labels = labels(cx, fields, "labels")?;
    let address = address(cx, "address", fields.require(cx, "address")?)?;
    let node = optional_string(cx, fields, "node", rules::validate_node)?;
    let zone = optional_string(cx, fields, "zone", rules::validate_zone)?;
    let weight = match fields.get("weight") {
        Some(node) => weight(cx, "weight", node)?,
        None => 1,
    };
    let ready = match fields.get("ready") {
        Some(node) => boolean(cx, "ready", node)?,
        None => true,
    };
    let draining = match fields.get("draining") {
        Some(node) => boolean(cx, "draining", node)?,
        None => false,
    };
    if let Some(version) = labels.get(VERSION_LABEL) {
        let field = format!("labels.{}", VERSION_LABEL);
        let node = fields.get("labels").unwrap_or(fields.node);
        validate_version(version).map_err(cx.fail(node, &field))?;
    }
    Ok(Endpoint {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        labels,
        address,
        node,
        zone,
        weight,
        ready,
        draining,
    })
}

fn parse_grant(cx: Cx<'_>, fields: &Fields<'_>, id: &ObjectRef) -> Result<Grant, ManifestError> {
    fields.deny_unknown(cx, GRANT_FIELDS)?;
    let labels = labels(cx, fields, "labels")?;

    let subject_node = fields.require(cx, "subject")?;
    let subject_fields = Fields::new(cx, "subject".to_owned(), subject_node)?;
    subject_fields.deny_unknown(cx, SUBJECT_FIELDS)?;
    let user = subject_fields.get("user");
    let group = subject_fields.get("group");
    let (field, node, make): (_, _, fn(String) -> Subject) = match (user, group) {
        (Some(node), None) => ("subject.user", node, Subject::User),
        (None, Some(node)) => ("subject.group", node, Subject::Group),
        (None, None) => return Err(cx.invalid(subject_node, "subject", Problem::NoSubject)),
        (Some(user), Some(group)) => {
            let problem = Problem::TwoSubjects {
                user: string(cx, "subject.user", user)?.to_owned(),
                group: string(cx, "subject.group", group)?.to_owned(),
            };
            return Err(cx.invalid(subject_node, "subject", problem));
        }
    };
    let name = string(cx, field, node)?;
    rules::validate_subject(name).map_err(cx.fail(node, field))?;
    let subject = make(name.to_owned());

    let role_node = fields.require(cx, "role")?;
    let role =
        rules::validate_role(string(cx, "role", role_node)?).map_err(cx.fail(role_node, "role"))?;
    let scope_node = fields.require(cx, "scope")?;
    let scope = rules::validate_scope(string(cx, "scope", scope_node)?)
        .map_err(cx.fail(scope_node, "scope"))?;

    let permission_nodes = match fields.get("permissions") {
        Some(node) => sequence(cx, "permissions", node)?,
        None => &[],
    };
    // A missing list points at the document, as a missing field does.
    let count_node = fields.get("permissions").unwrap_or(fields.node);
    rules::validate_permission_count(role, permission_nodes.len())
        .map_err(cx.fail(count_node, "permissions"))?;
    let mut permissions = Vec::with_capacity(permission_nodes.len());
    let mut unique = UniquePermissions::default();
    for (i, entry) in permission_nodes.iter().enumerate() {
        let fields = Fields::new(cx, format!("permissions[{i}]"), entry)?;
        fields.deny_unknown(cx, PERMISSION_FIELDS)?;
        let verb_field = fields.path("verb");
        let verb_node = fields.require(cx, "verb")?;
        let verb = rules::validate_verb(string(cx, &verb_field, verb_node)?)
            .map_err(cx.fail(verb_node, &verb_field))?;
        let resource_field = fields.path("resource");
        let resource_node = fields.require(cx, "resource")?;
        let resource = rules::validate_resource(string(cx, &resource_field, resource_node)?)
            .map_err(cx.fail(resource_node, &resource_field))?;
        let permission = Permission { verb, resource };
        unique
            .insert(i, permission)
            .map_err(cx.fail(entry, &fields.path))?;
        permissions.push(permission);
    }

    Ok(Grant {
        namespace: id.namespace.clone(),
        name: id.name.clone(),
        labels,
        subject,
        role,
        scope,
        permissions,
    })
}

/// The `key` labels map of `fields`; empty when absent.
fn labels(cx: Cx<'_>, fields: &Fields<'_>, key: &str) -> Result<Labels, ManifestError> {
    let Some(node) = fields.get(key) else {
        return Ok(Labels::new());
    };
    let field = fields.path(key);
    let entries = mapping(cx, &field, node)?;
    rules::validate_label_count(entries.len()).map_err(cx.fail(node, &field))?;
    label_entries(cx, &field, entries)
}

/// Label keys and values are strings, as written: `version: 2` is rejected rather than
/// turned into `"2"`, in line with the module's convention on types.
fn label_entries(
    cx: Cx<'_>,
    field: &str,
    entries: &[(Node, Node)],
) -> Result<Labels, ManifestError> {
    let mut labels = Labels::new();
    for (key_node, value_node) in entries {
        let key = match &key_node.value {
            Value::Str(key) => key,
            other => return Err(wrong_type(cx, field, key_node, "a string key", other)),
        };
        let entry_field = format!("{field}.{key}");
        rules::validate_label_key(key).map_err(cx.fail(key_node, &entry_field))?;
        let value = string(cx, &entry_field, value_node)?;
        rules::validate_label_value(value).map_err(cx.fail(value_node, &entry_field))?;
        labels.insert(key.clone(), value.to_owned());
    }
    Ok(labels)
}

/// An optional top-level string that `rule` validates.
fn optional_string(
    cx: Cx<'_>,
    fields: &Fields<'_>,
    key: &str,
    rule: fn(&str) -> Result<(), Problem>,
) -> Result<Option<String>, ManifestError> {
    let Some(node) = fields.get(key) else {
        return Ok(None);
    };
    let value = string(cx, key, node)?;
    rule(value).map_err(cx.fail(node, key))?;
    Ok(Some(value.to_owned()))
}

fn address(cx: Cx<'_>, field: &str, node: &Node) -> Result<Ipv4Addr, ManifestError> {
    rules::validate_address(string(cx, field, node)?).map_err(cx.fail(node, field))
}

fn port_number(cx: Cx<'_>, field: &str, node: &Node) -> Result<u16, ManifestError> {
    rules::validate_port(integer(cx, field, node)?).map_err(cx.fail(node, field))
}

fn weight(cx: Cx<'_>, field: &str, node: &Node) -> Result<u32, ManifestError> {
    rules::validate_weight(integer(cx, field, node)?).map_err(cx.fail(node, field))
}
