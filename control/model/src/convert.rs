//! Conversions between the domain objects of [`crate::manifest`] and the API messages of
//! [`sluice_api::v1`], done once at the boundary so the rest of the code sees one or the other.
//!
//! * Domain to message ([`From`]) cannot fail: a domain object is valid by construction.
//!   Defaults are written out explicitly (target port, weight, algorithm), so a message
//!   built here never relies on the zero-means-default rules below.
//! * Message to domain ([`TryFrom`]) validates everything, with the same rules
//!   ([`crate::manifest::rules`]) and the same wording as a manifest, so the control
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

use std::collections::{BTreeMap, HashMap};

use crate::manifest::rules::{self, Problem, UniqueBackends, UniquePermissions, UniquePorts};
use crate::manifest::{
    Algorithm, BackendSpec, DEFAULT_NAMESPACE, EgressRule, Endpoint, Grant, HealthCheck,
    IngressRule, Labels, NetworkPolicy, Object, ObjectKind, ObjectRef, Peer, Permission,
    PolicyPort, PolicyTypes, Probe, Protocol, Rollout, ServiceObject, ServicePort, SessionAffinity,
    Subject, Traffic, VERSION_LABEL, policy, traffic,
};
use sluice_api::v1;

/// Why an API message is not a valid object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// `Object.kind` is not set.
    #[error("object: no kind set, expected one of: Service, Endpoint, Grant")]
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

impl From<ObjectKind> for v1::Kind {
    fn from(kind: ObjectKind) -> Self {
        match kind {
            ObjectKind::Service => Self::Service,
            ObjectKind::Endpoint => Self::Endpoint,
            ObjectKind::Grant => Self::Grant,
            ObjectKind::NetworkPolicy => Self::NetworkPolicy,
        }
    }
}

/// `None` for the kinds that are not objects one applies (Node) and for Unspecified.
pub fn kind_from_proto(kind: v1::Kind) -> Option<ObjectKind> {
    match kind {
        v1::Kind::Service => Some(ObjectKind::Service),
        v1::Kind::Endpoint => Some(ObjectKind::Endpoint),
        v1::Kind::Grant => Some(ObjectKind::Grant),
        v1::Kind::NetworkPolicy => Some(ObjectKind::NetworkPolicy),
        v1::Kind::Node | v1::Kind::Unspecified => None,
    }
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

impl From<&ServicePort> for v1::ServicePort {
    fn from(port: &ServicePort) -> Self {
        let ServicePort {
            port,
            protocol,
            target_port,
        } = *port;
        Self {
            port: port.into(),
            protocol: v1::Protocol::from(protocol) as i32,
            target_port: target_port.into(),
        }
    }
}

impl From<&BackendSpec> for v1::StaticBackend {
    fn from(backend: &BackendSpec) -> Self {
        let BackendSpec {
            address,
            weight,
            version,
            draining,
        } = backend;
        Self {
            address: address.to_string(),
            weight: *weight,
            version: version.clone().unwrap_or_default(),
            draining: *draining,
        }
    }
}

impl From<&ServiceObject> for v1::Service {
    fn from(service: &ServiceObject) -> Self {
        let ServiceObject {
            namespace,
            name,
            labels,
            vip,
            ports,
            algorithm,
            backends,
            selector,
            maglev_table_size,
            traffic:
                Traffic {
                    health_check,
                    drain_timeout_seconds,
                    rollout,
                    session_affinity,
                    topology_aware,
                },
        } = service;
        Self {
            session_affinity_seconds: session_affinity.map_or(0, |a| a.timeout_seconds),
            topology_aware: *topology_aware,
            health_check: health_check.as_ref().map(v1::HealthCheck::from),
            drain_timeout_seconds: drain_timeout_seconds.unwrap_or(0),
            rollout: rollout.as_ref().map(|r| v1::Rollout {
                to: r.to.clone(),
                percent: r.percent,
            }),
            meta: meta(namespace, name, labels),
            vip: vip.map(|vip| vip.to_string()).unwrap_or_default(),
            ports: ports.iter().map(v1::ServicePort::from).collect(),
            algorithm: v1::Algorithm::from(*algorithm) as i32,
            backends: backends.iter().map(v1::StaticBackend::from).collect(),
            selector: to_map(selector),
            maglev_table_size: maglev_table_size.unwrap_or(0),
        }
    }
}

impl From<&Endpoint> for v1::Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        let Endpoint {
            namespace,
            name,
            labels,
            address,
            node,
            zone,
            weight,
            ready,
            draining,
        } = endpoint;
        Self {
            draining: *draining,
            meta: meta(namespace, name, labels),
            address: address.to_string(),
            node: node.clone().unwrap_or_default(),
            zone: zone.clone().unwrap_or_default(),
            weight: *weight,
            ready: *ready,
        }
    }
}

impl From<&HealthCheck> for v1::HealthCheck {
    fn from(check: &HealthCheck) -> Self {
        let HealthCheck {
            probe,
            interval_ms,
            timeout_ms,
            unhealthy_threshold,
            healthy_threshold,
            fail_open,
        } = check;
        let probe = match probe {
            Probe::Http { path, port } => v1::health_check::Probe::Http(v1::HttpProbe {
                path: path.clone(),
                port: port.map_or(0, u32::from),
            }),
            Probe::Tcp { port } => v1::health_check::Probe::Tcp(v1::TcpProbe {
                port: port.map_or(0, u32::from),
            }),
        };
        Self {
            probe: Some(probe),
            interval_ms: *interval_ms,
            timeout_ms: *timeout_ms,
            unhealthy_threshold: *unhealthy_threshold,
            healthy_threshold: *healthy_threshold,
            fail_closed: !fail_open,
        }
    }
}

/// A health check message as the manifest would have it: zeros take the defaults,
/// everything is validated. Errors name the field under `healthCheck`.
pub fn health_check_from_proto(check: v1::HealthCheck) -> Result<HealthCheck, (String, Problem)> {
    let v1::HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        unhealthy_threshold,
        healthy_threshold,
        fail_closed,
    } = check;
    let at = |field: &str| {
        let field = format!("healthCheck.{field}");
        move |problem| (field, problem)
    };
    let probe_port = |port: u32, field: &str| match port {
        0 => Ok(None),
        port => rules::validate_port(port.into())
            .map(Some)
            .map_err(at(field)),
    };
    let probe = match probe {
        Some(v1::health_check::Probe::Http(v1::HttpProbe { path, port })) => {
            traffic::validate_http_path(&path).map_err(at("http.path"))?;
            Probe::Http {
                path,
                port: probe_port(port, "http.port")?,
            }
        }
        Some(v1::health_check::Probe::Tcp(v1::TcpProbe { port })) => Probe::Tcp {
            port: probe_port(port, "tcp.port")?,
        },
        None => return Err(("healthCheck".to_owned(), Problem::ProbeKind)),
    };
    let or = |value: u32, default: u32| if value == 0 { default } else { value };
    let interval_ms =
        traffic::validate_interval(or(interval_ms, traffic::DEFAULT_INTERVAL_MS).into())
            .map_err(at("intervalMs"))?;
    let timeout_ms = traffic::validate_timeout(
        or(timeout_ms, traffic::default_timeout(interval_ms)).into(),
        interval_ms,
    )
    .map_err(at("timeoutMs"))?;
    let unhealthy_threshold = traffic::validate_threshold(
        or(unhealthy_threshold, traffic::DEFAULT_UNHEALTHY_THRESHOLD).into(),
    )
    .map_err(at("unhealthyThreshold"))?;
    let healthy_threshold = traffic::validate_threshold(
        or(healthy_threshold, traffic::DEFAULT_HEALTHY_THRESHOLD).into(),
    )
    .map_err(at("healthyThreshold"))?;
    Ok(HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        unhealthy_threshold,
        healthy_threshold,
        fail_open: !fail_closed,
    })
}

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

fn peers_to_proto(peers: &[Peer]) -> Vec<v1::PolicyPeer> {
    peers
        .iter()
        .map(|peer| match peer {
            Peer::Endpoints {
                selector,
                namespace,
            } => v1::PolicyPeer {
                selector: to_map(selector),
                namespace: namespace.clone().unwrap_or_default(),
                ..Default::default()
            },
            Peer::Cidr { cidr, except } => v1::PolicyPeer {
                cidr: cidr.to_string(),
                except: except.iter().map(ToString::to_string).collect(),
                ..Default::default()
            },
        })
        .collect()
}

fn ports_to_proto(ports: &[PolicyPort]) -> Vec<v1::PolicyPort> {
    ports
        .iter()
        .map(|p| v1::PolicyPort {
            port: p.port.into(),
            protocol: v1::Protocol::from(p.protocol) as i32,
        })
        .collect()
}

impl From<&NetworkPolicy> for v1::NetworkPolicy {
    fn from(policy: &NetworkPolicy) -> Self {
        let NetworkPolicy {
            namespace,
            name,
            labels,
            selector,
            service,
            types,
            ingress,
            egress,
        } = policy;
        let mut policy_types = Vec::new();
        if types.ingress {
            policy_types.push(v1::PolicyType::Ingress as i32);
        }
        if types.egress {
            policy_types.push(v1::PolicyType::Egress as i32);
        }
        Self {
            meta: meta(namespace, name, labels),
            selector: selector.as_ref().map(to_map).unwrap_or_default(),
            service: service.clone().unwrap_or_default(),
            ingress: ingress
                .iter()
                .map(|rule| v1::IngressRule {
                    from: peers_to_proto(&rule.from),
                    ports: ports_to_proto(&rule.ports),
                })
                .collect(),
            egress: egress
                .iter()
                .map(|rule| v1::EgressRule {
                    to: peers_to_proto(&rule.to),
                    ports: ports_to_proto(&rule.ports),
                })
                .collect(),
            policy_types,
        }
    }
}

/// Peers and ports of one rule at `at` (`ingress[0]`), validated as a manifest's.
fn rule_from_proto(
    check: &Check,
    at: &str,
    peers_key: &str,
    peers: Vec<v1::PolicyPeer>,
    ports: Vec<v1::PolicyPort>,
) -> Result<(Vec<Peer>, Vec<PolicyPort>), ObjectError> {
    if peers.len() > policy::MAX_PEERS {
        return Err(check.at(format!("{at}.{peers_key}"))(Problem::TooMany {
            what: "peers",
            count: peers.len(),
            max: policy::MAX_PEERS,
        }));
    }
    let mut out = Vec::with_capacity(peers.len());
    for (j, peer) in peers.into_iter().enumerate() {
        let field = |name: &str| format!("{at}.{peers_key}[{j}].{name}");
        let v1::PolicyPeer {
            selector,
            namespace,
            cidr,
            except,
        } = peer;
        if cidr.is_empty() {
            if !except.is_empty() {
                return Err(check.at(field("except"))(Problem::ExceptWithoutCidr));
            }
            let selector = from_labels(check, &field("selector"), selector)?;
            let namespace = optional(
                check,
                &field("namespace"),
                namespace,
                rules::validate_namespace,
            )?;
            out.push(Peer::Endpoints {
                selector,
                namespace,
            });
            continue;
        }
        if !selector.is_empty() {
            return Err(check.at(format!("{at}.{peers_key}[{j}]"))(
                Problem::PeerKind,
            ));
        }
        if !namespace.is_empty() {
            return Err(check.at(field("namespace"))(Problem::NamespaceWithCidr));
        }
        let cidr = policy::validate_cidr(&cidr).map_err(check.at(field("cidr")))?;
        if except.len() > policy::MAX_EXCEPT {
            return Err(check.at(field("except"))(Problem::TooMany {
                what: "except entries",
                count: except.len(),
                max: policy::MAX_EXCEPT,
            }));
        }
        let mut excepted = Vec::with_capacity(except.len());
        for (k, e) in except.iter().enumerate() {
            let at = field(&format!("except[{k}]"));
            let e = policy::validate_cidr(e).map_err(check.at(&at))?;
            policy::validate_except(cidr, e).map_err(check.at(&at))?;
            excepted.push(e);
        }
        out.push(Peer::Cidr {
            cidr,
            except: excepted,
        });
    }
    let mut domain_ports = Vec::with_capacity(ports.len());
    for (j, p) in ports.into_iter().enumerate() {
        let port = port(check, &format!("{at}.ports[{j}].port"), p.port)?;
        let protocol = protocol_from_proto(p.protocol)
            .map_err(check.at(format!("{at}.ports[{j}].protocol")))?;
        domain_ports.push(PolicyPort { port, protocol });
    }
    Ok((out, domain_ports))
}

impl TryFrom<v1::NetworkPolicy> for NetworkPolicy {
    type Error = ObjectError;

    fn try_from(policy: v1::NetworkPolicy) -> Result<Self, ObjectError> {
        let v1::NetworkPolicy {
            meta,
            selector,
            ingress,
            service,
            egress,
            policy_types,
        } = policy;
        let (check, labels) = from_meta(ObjectKind::NetworkPolicy, meta)?;
        // proto3 cannot tell an empty selector from none: without a service,
        // empty is the whole namespace, as `selector: {}` in a manifest.
        let (selector, service) = if service.is_empty() {
            (Some(from_labels(&check, "selector", selector)?), None)
        } else {
            if !selector.is_empty() {
                return Err(check.at("service")(Problem::PolicyTarget));
            }
            rules::validate_name(&service).map_err(check.at("service"))?;
            (None, Some(service))
        };
        for (key, count) in [("ingress", ingress.len()), ("egress", egress.len())] {
            if count > policy::MAX_RULES {
                return Err(check.at(key)(Problem::TooMany {
                    what: "rules",
                    count,
                    max: policy::MAX_RULES,
                }));
            }
        }
        let mut types = PolicyTypes::default();
        for (i, value) in policy_types.iter().enumerate() {
            match v1::PolicyType::try_from(*value) {
                Ok(v1::PolicyType::Ingress) => types.ingress = true,
                Ok(v1::PolicyType::Egress) => types.egress = true,
                _ => {
                    return Err(check.at(format!("policyTypes[{i}]"))(Problem::PolicyType {
                        value: value.to_string(),
                    }));
                }
            }
        }
        if policy_types.is_empty() {
            types = PolicyTypes {
                ingress: true,
                egress: !egress.is_empty(),
            };
        }
        if !egress.is_empty() && service.is_some() {
            return Err(check.at("egress")(Problem::EgressOnService));
        }
        if !egress.is_empty() && !types.egress {
            return Err(check.at("egress")(Problem::EgressNotInTypes));
        }
        let mut domain_ingress = Vec::with_capacity(ingress.len());
        for (i, v1::IngressRule { from, ports }) in ingress.into_iter().enumerate() {
            let (from, ports) =
                rule_from_proto(&check, &format!("ingress[{i}]"), "from", from, ports)?;
            domain_ingress.push(IngressRule { from, ports });
        }
        let mut domain_egress = Vec::with_capacity(egress.len());
        for (i, v1::EgressRule { to, ports }) in egress.into_iter().enumerate() {
            let (to, ports) = rule_from_proto(&check, &format!("egress[{i}]"), "to", to, ports)?;
            domain_egress.push(EgressRule { to, ports });
        }
        let ObjectRef {
            namespace, name, ..
        } = check.object;
        Ok(Self {
            namespace,
            name,
            labels,
            selector,
            service,
            types,
            ingress: domain_ingress,
            egress: domain_egress,
        })
    }
}

impl From<&Object> for v1::Object {
    fn from(object: &Object) -> Self {
        let kind = match object {
            Object::Service(service) => v1::object::Kind::Service(service.into()),
            Object::Endpoint(endpoint) => v1::object::Kind::Endpoint(endpoint.into()),
            Object::Grant(grant) => v1::object::Kind::Grant(grant.into()),
            Object::NetworkPolicy(policy) => v1::object::Kind::NetworkPolicy(policy.into()),
        };
        Self { kind: Some(kind) }
    }
}

// ---------------------------------------------------------------------------------------
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

impl TryFrom<v1::Service> for ServiceObject {
    type Error = ObjectError;

    fn try_from(service: v1::Service) -> Result<Self, ObjectError> {
        let v1::Service {
            meta,
            vip,
            ports,
            algorithm,
            backends,
            selector,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            rollout,
            session_affinity_seconds,
            topology_aware,
        } = service;
        let (check, labels) = from_meta(ObjectKind::Service, meta)?;
        let vip = if vip.is_empty() {
            None
        } else {
            Some(rules::validate_address(&vip).map_err(check.at("vip"))?)
        };

        rules::validate_port_count(ports.len()).map_err(check.at("ports"))?;
        let mut unique = UniquePorts::default();
        let mut domain_ports = Vec::with_capacity(ports.len());
        for (i, entry) in ports.into_iter().enumerate() {
            let v1::ServicePort {
                port: number,
                protocol,
                target_port,
            } = entry;
            let number = port(&check, &format!("ports[{i}].port"), number)?;
            let protocol =
                protocol_from_proto(protocol).map_err(check.at(format!("ports[{i}].protocol")))?;
            let target_port = match target_port {
                0 => number,
                value => port(&check, &format!("ports[{i}].targetPort"), value)?,
            };
            unique
                .insert(i, number, protocol)
                .map_err(check.at(format!("ports[{i}]")))?;
            domain_ports.push(ServicePort {
                port: number,
                protocol,
                target_port,
            });
        }

        let algorithm = algorithm_from_proto(algorithm).map_err(check.at("algorithm"))?;
        let maglev_table_size = match maglev_table_size {
            0 => None,
            size => Some(
                rules::validate_maglev_table_size(size.into(), algorithm)
                    .map_err(check.at("maglevTableSize"))?,
            ),
        };

        rules::validate_backend_count(backends.len()).map_err(check.at("backends"))?;
        let mut unique = UniqueBackends::default();
        let mut domain_backends = Vec::with_capacity(backends.len());
        for (i, entry) in backends.into_iter().enumerate() {
            let v1::StaticBackend {
                address,
                weight: raw_weight,
                version,
                draining,
            } = entry;
            let field = format!("backends[{i}].address");
            let address = rules::validate_address(&address).map_err(check.at(&field))?;
            rules::validate_backend_address(address, vip).map_err(check.at(&field))?;
            let weight = weight(&check, &format!("backends[{i}].weight"), raw_weight)?;
            let version = optional(
                &check,
                &format!("backends[{i}].version"),
                version,
                traffic::validate_version,
            )?;
            unique.insert(i, address).map_err(check.at(&field))?;
            domain_backends.push(BackendSpec {
                address,
                weight,
                version,
                draining,
            });
        }
        let health_check = health_check
            .map(health_check_from_proto)
            .transpose()
            .map_err(|(field, problem)| check.at(field)(problem))?;
        if let Some(health) = &health_check
            && traffic::probe_port(health, &domain_ports).is_none()
        {
            return Err(check.at("healthCheck")(Problem::ProbePort));
        }
        let session_affinity = match session_affinity_seconds {
            0 => None,
            value => Some(SessionAffinity {
                timeout_seconds: traffic::validate_affinity_timeout(value.into())
                    .map_err(check.at("sessionAffinity.clientIP.timeoutSeconds"))?,
            }),
        };
        let drain_timeout_seconds = match drain_timeout_seconds {
            0 => None,
            value => Some(
                traffic::validate_drain_timeout(value.into())
                    .map_err(check.at("drainTimeoutSeconds"))?,
            ),
        };
        let rollout = rollout
            .map(|v1::Rollout { to, percent }| {
                traffic::validate_version(&to).map_err(check.at("rollout.to"))?;
                let percent = traffic::validate_percent(percent.into())
                    .map_err(check.at("rollout.percent"))?;
                Ok::<_, ObjectError>(Rollout { to, percent })
            })
            .transpose()?;

        // An empty map is an absent selector (proto3), never an empty one.
        let selector = from_labels(&check, "selector", selector)?;
        rules::validate_backends_or_selector(!domain_backends.is_empty(), !selector.is_empty())
            .map_err(check.at("selector"))?;

        let ObjectRef {
            namespace, name, ..
        } = check.object;
        Ok(Self {
            namespace,
            name,
            labels,
            vip,
            ports: domain_ports,
            algorithm,
            backends: domain_backends,
            selector,
            maglev_table_size,
            traffic: Traffic {
                health_check,
                drain_timeout_seconds,
                rollout,
                session_affinity,
                topology_aware,
            },
        })
    }
}

impl TryFrom<v1::Endpoint> for Endpoint {
    type Error = ObjectError;

    fn try_from(endpoint: v1::Endpoint) -> Result<Self, ObjectError> {
        let v1::Endpoint {
            meta,
            address,
            node,
            zone,
            weight: raw_weight,
            ready,
            draining,
        } = endpoint;
        let (check, labels) = from_meta(ObjectKind::Endpoint, meta)?;
        if let Some(version) = labels.get(VERSION_LABEL) {
            traffic::validate_version(version)
                .map_err(check.at(format!("labels.{VERSION_LABEL}")))?;
        }
        let address = rules::validate_address(required(&check, "address", &address)?)
            .map_err(check.at("address"))?;
        let node = optional(&check, "node", node, rules::validate_node)?;
        let zone = optional(&check, "zone", zone, rules::validate_zone)?;
        let weight = weight(&check, "weight", raw_weight)?;
        let ObjectRef {
            namespace, name, ..
        } = check.object;
        Ok(Self {
            namespace,
            name,
            labels,
            address,
            node,
            zone,
            weight,
            ready,
            draining,
        })
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

impl TryFrom<v1::Object> for Object {
    type Error = ObjectError;

    fn try_from(object: v1::Object) -> Result<Self, ObjectError> {
        match object.kind {
            None => Err(ObjectError::NoKind),
            Some(v1::object::Kind::Service(service)) => service.try_into().map(Self::Service),
            Some(v1::object::Kind::Endpoint(endpoint)) => endpoint.try_into().map(Self::Endpoint),
            Some(v1::object::Kind::Grant(grant)) => grant.try_into().map(Self::Grant),
            Some(v1::object::Kind::NetworkPolicy(policy)) => {
                policy.try_into().map(Self::NetworkPolicy)
            }
            Some(v1::object::Kind::Node(node)) => Err(ObjectError::NodeNotApplicable {
                name: node.meta.map(|m| m.name).unwrap_or_default(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::manifest::{Resource, Role, Scope, Verb, parse_objects};

    fn addr(s: &str) -> Ipv4Addr {
        match s.parse() {
            Ok(a) => a,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn service() -> ServiceObject {
        ServiceObject {
            namespace: "shop".to_owned(),
            name: "web".to_owned(),
            labels: labels(&[("tier", "frontend")]),
            vip: Some(addr("198.18.0.10")),
            ports: vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: 8080,
                },
                ServicePort {
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: 53,
                },
            ],
            algorithm: Algorithm::WeightedLeastConnections,
            backends: vec![
                BackendSpec {
                    address: addr("198.19.1.2"),
                    weight: 3,
                    draining: false,
                    version: None,
                },
                BackendSpec {
                    address: addr("198.19.1.3"),
                    weight: 1,
                    draining: false,
                    version: None,
                },
            ],
            selector: Labels::new(),
            maglev_table_size: None,
            traffic: Default::default(),
        }
    }

    fn selecting_service() -> ServiceObject {
        ServiceObject {
            vip: None,
            backends: Vec::new(),
            selector: labels(&[("app", "web"), ("app.kubernetes.io/part-of", "shop")]),
            maglev_table_size: None,
            algorithm: Algorithm::RoundRobin,
            ..service()
        }
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            namespace: "shop".to_owned(),
            name: "web-1".to_owned(),
            labels: labels(&[("app", "web")]),
            address: addr("198.19.1.2"),
            node: Some("node-1.eu".to_owned()),
            zone: Some("eu-west-1a".to_owned()),
            weight: 2,
            ready: false,
            draining: false,
        }
    }

    fn grant() -> Grant {
        Grant {
            namespace: "default".to_owned(),
            name: "ops".to_owned(),
            labels: Labels::new(),
            subject: Subject::Group("dev".to_owned()),
            role: Role::Custom,
            scope: Scope::All,
            permissions: vec![
                Permission {
                    verb: Verb::Get,
                    resource: Resource::Services,
                },
                Permission {
                    verb: Verb::All,
                    resource: Resource::Endpoints,
                },
            ],
        }
    }

    /// A way to break a valid message, the field it breaks, and what the message says.
    type Case<T> = (fn(&mut T), &'static str, &'static [&'static str]);

    fn invalid<T: std::fmt::Debug>(result: Result<T, ObjectError>) -> ObjectError {
        match result {
            Ok(value) => panic!("expected an error, got {value:?}"),
            Err(e) => e,
        }
    }

    /// The error is about `field` of `object`, and its message has every part.
    fn assert_invalid(e: &ObjectError, object: &str, field: &str, parts: &[&str]) {
        assert!(
            matches!(e, ObjectError::Invalid { field: f, .. } if f == field),
            "{e:?} is not about {field}"
        );
        let message = e.to_string();
        assert!(
            message.starts_with(&format!("{object}: {field}: ")),
            "{message:?} does not start with {object}: {field}"
        );
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }

    // --- Round trips ------------------------------------------------------------------

    #[test]
    fn every_kind_round_trips() {
        for object in [
            Object::Service(service()),
            Object::Service(selecting_service()),
            Object::Endpoint(endpoint()),
            Object::Endpoint(Endpoint {
                node: None,
                zone: None,
                labels: Labels::new(),
                ..endpoint()
            }),
            Object::Grant(grant()),
            Object::Grant(Grant {
                subject: Subject::User("alice@example.com".to_owned()),
                role: Role::Viewer,
                scope: Scope::Namespace("shop".to_owned()),
                permissions: Vec::new(),
                ..grant()
            }),
        ] {
            let message = v1::Object::from(&object);
            let back = Object::try_from(message.clone());
            assert_eq!(back.as_ref().ok(), Some(&object), "{message:?}: {back:?}");
            // And through the wire.
            let bytes = prost::Message::encode_to_vec(&message);
            let decoded = <v1::Object as prost::Message>::decode(bytes.as_slice());
            assert_eq!(decoded.ok(), Some(message));
        }
    }

    #[test]
    fn every_algorithm_round_trips() {
        for algorithm in Algorithm::ALL {
            let proto = v1::Algorithm::from(algorithm) as i32;
            assert_eq!(algorithm_from_proto(proto), Ok(algorithm));
        }
    }

    #[test]
    fn manifest_objects_round_trip() {
        let text = "\
kind: Service
namespace: shop
name: web
ports: [{ port: 80, protocol: TCP }]
selector: { app: web }
---
kind: Endpoint
namespace: shop
name: web-1
labels: { app: web }
address: 198.19.1.2
---
kind: Grant
name: alice
subject: { user: alice }
role: admin
scope: shop
";
        let objects = match parse_objects("all.yaml", text) {
            Ok(objects) => objects,
            Err(e) => panic!("{e}"),
        };
        for object in objects {
            let back = Object::try_from(v1::Object::from(&object));
            assert_eq!(back.ok(), Some(object));
        }
    }

    #[test]
    fn domain_to_proto_spells_defaults_out() {
        let proto = v1::Service::from(&service());
        assert_eq!(proto.ports[0].protocol, v1::Protocol::Tcp as i32);
        assert_eq!(proto.ports[1].protocol, v1::Protocol::Udp as i32);
        assert_eq!(proto.ports[1].target_port, 53, "never the zero default");
        assert_eq!(
            proto.algorithm,
            v1::Algorithm::WeightedLeastConnections as i32
        );
        assert_eq!(proto.vip, "198.18.0.10");
        let meta = proto.meta.unwrap_or_default();
        assert_eq!(
            (meta.namespace.as_str(), meta.name.as_str()),
            ("shop", "web")
        );
        assert_eq!(meta.resource_version, 0);

        assert_eq!(v1::Service::from(&selecting_service()).vip, "");
        let grant = v1::Grant::from(&grant());
        assert_eq!(grant.scope_namespace, "*");
        assert_eq!(grant.role, "custom");
        assert_eq!(grant.permissions[1].verb, "*");
        assert_eq!(
            grant.subject.and_then(|s| s.kind),
            Some(v1::subject::Kind::Group("dev".to_owned()))
        );
    }

    // --- Zero means default -----------------------------------------------------------

    #[test]
    fn proto_zero_values_take_their_defaults() {
        let mut proto = v1::Service::from(&service());
        proto.meta = Some(v1::ObjectMeta {
            name: "web".to_owned(),
            ..Default::default()
        });
        proto.vip = String::new();
        proto.ports[0].target_port = 0;
        proto.algorithm = v1::Algorithm::Unspecified as i32;
        proto.backends[0].weight = 0;
        let service = match ServiceObject::try_from(proto) {
            Ok(service) => service,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(service.namespace, DEFAULT_NAMESPACE);
        assert_eq!(service.vip, None);
        assert_eq!(service.ports[0].target_port, 80);
        assert_eq!(service.algorithm, Algorithm::RoundRobin);
        assert_eq!(service.backends[0].weight, 1);

        let mut proto = v1::Endpoint::from(&endpoint());
        proto.weight = 0;
        proto.node = String::new();
        proto.zone = String::new();
        let endpoint = Endpoint::try_from(proto).ok();
        assert_eq!(
            endpoint.map(|e| (e.weight, e.node, e.zone)),
            Some((1, None, None))
        );
    }

    // --- Proto-side validation --------------------------------------------------------

    #[test]
    fn service_errors_name_object_field_and_value() {
        let cases: [Case<v1::Service>; 14] = [
            (
                |s| s.ports[1].port = 0,
                "ports[1].port",
                &["must be between 1 and 65535, got 0"],
            ),
            (
                |s| s.ports[0].port = 70_000,
                "ports[0].port",
                &["got 70000"],
            ),
            (
                |s| s.ports[0].target_port = 65_536,
                "ports[0].targetPort",
                &["got 65536"],
            ),
            (
                |s| s.ports[0].protocol = v1::Protocol::Unspecified as i32,
                "ports[0].protocol",
                &["must be \"TCP\" or \"UDP\", got \"PROTOCOL_UNSPECIFIED\""],
            ),
            (
                |s| s.ports[0].protocol = 9,
                "ports[0].protocol",
                &["got \"9\""],
            ),
            (
                |s| s.ports[1] = s.ports[0],
                "ports[1]",
                &["port 80/TCP is already listed as ports[0]"],
            ),
            (|s| s.ports.clear(), "ports", &["at least one port"]),
            (
                |s| s.algorithm = 42,
                "algorithm",
                &["unknown algorithm \"42\"", "round-robin"],
            ),
            (
                |s| s.vip = "2001:db8::1".to_owned(),
                "vip",
                &["IPv6 is not supported yet", "\"2001:db8::1\""],
            ),
            (
                |s| s.backends[1].address = "198.18.0.10".to_owned(),
                "backends[1].address",
                &["198.18.0.10 is the service's own VIP"],
            ),
            (
                |s| s.backends[1].address = s.backends[0].address.clone(),
                "backends[1].address",
                &["backend 198.19.1.2 is already listed as backends[0]"],
            ),
            (
                |s| s.backends[0].weight = 10_001,
                "backends[0].weight",
                &["must be between 1 and 10000, got 10001"],
            ),
            (
                |s| {
                    s.selector.insert("app".to_owned(), "web".to_owned());
                },
                "selector",
                &["mutually exclusive"],
            ),
            (
                |s| {
                    s.selector.clear();
                    s.backends.clear();
                    s.selector.insert("app".to_owned(), "web/1".to_owned());
                },
                "selector.app",
                &["label value \"web/1\" is invalid", "'/'"],
            ),
        ];
        for (break_it, field, parts) in cases {
            let mut proto = v1::Service::from(&service());
            break_it(&mut proto);
            let e = invalid(ServiceObject::try_from(proto));
            assert_invalid(&e, "Service \"shop/web\"", field, parts);
            assert_eq!(
                e.object().map(ToString::to_string).as_deref(),
                Some("Service \"shop/web\"")
            );
        }
    }

    #[test]
    fn too_many_ports_and_backends() {
        let mut proto = v1::Service::from(&service());
        proto.ports = (1..=65)
            .map(|port| v1::ServicePort {
                port,
                protocol: v1::Protocol::Tcp as i32,
                target_port: 0,
            })
            .collect();
        let e = invalid(ServiceObject::try_from(proto));
        assert_invalid(
            &e,
            "Service \"shop/web\"",
            "ports",
            &["at most 64", "got 65"],
        );

        let mut proto = v1::Service::from(&service());
        proto.backends = (0..=4096)
            .map(|i| v1::StaticBackend {
                address: format!("198.19.{}.{}", i / 250, i % 250 + 1),
                weight: 0,
                draining: Default::default(),
                version: Default::default(),
            })
            .collect();
        let e = invalid(ServiceObject::try_from(proto));
        assert_invalid(
            &e,
            "Service \"shop/web\"",
            "backends",
            &["at most 4096", "got 4097"],
        );
    }

    #[test]
    fn meta_errors() {
        let mut proto = v1::Service::from(&service());
        proto.meta = None;
        let e = invalid(ServiceObject::try_from(proto));
        assert_invalid(&e, "Service \"default/\"", "name", &["\"\"", "it is empty"]);

        let mut proto = v1::Endpoint::from(&endpoint());
        if let Some(meta) = proto.meta.as_mut() {
            meta.namespace = "Shop".to_owned();
        }
        let e = invalid(Endpoint::try_from(proto));
        assert_invalid(
            &e,
            "Endpoint \"Shop/web-1\"",
            "namespace",
            &["\"Shop\" is not a valid namespace", "'S'", "DNS-1123"],
        );

        let mut proto = v1::Grant::from(&grant());
        if let Some(meta) = proto.meta.as_mut() {
            meta.labels.insert("-bad".to_owned(), "x".to_owned());
        }
        let e = invalid(Grant::try_from(proto));
        assert_invalid(
            &e,
            "Grant \"default/ops\"",
            "labels.-bad",
            &["label key \"-bad\" is invalid"],
        );
    }

    #[test]
    fn endpoint_errors() {
        let cases: [Case<v1::Endpoint>; 5] = [
            (
                |e| e.address.clear(),
                "address",
                &["missing required field"],
            ),
            (
                |e| e.address = "127.0.0.1".to_owned(),
                "address",
                &["loopback", "\"127.0.0.1\""],
            ),
            (
                |e| e.node = "node_1".to_owned(),
                "node",
                &["\"node_1\" is not a valid node name", "'_'"],
            ),
            (
                |e| e.zone = "eu west".to_owned(),
                "zone",
                &["\"eu west\" is not a valid zone"],
            ),
            (|e| e.weight = 20_000, "weight", &["got 20000"]),
        ];
        for (break_it, field, parts) in cases {
            let mut proto = v1::Endpoint::from(&endpoint());
            break_it(&mut proto);
            let e = invalid(Endpoint::try_from(proto));
            assert_invalid(&e, "Endpoint \"shop/web-1\"", field, parts);
        }
    }

    #[test]
    fn grant_errors() {
        let cases: [Case<v1::Grant>; 10] = [
            (
                |g| g.subject = None,
                "subject",
                &["exactly one of user, group"],
            ),
            (
                |g| g.subject = Some(v1::Subject { kind: None }),
                "subject",
                &["got neither"],
            ),
            (
                |g| {
                    g.subject = Some(v1::Subject {
                        kind: Some(v1::subject::Kind::User("al ice".to_owned())),
                    });
                },
                "subject.user",
                &["\"al ice\" is not a valid user or group name"],
            ),
            (|g| g.role.clear(), "role", &["missing required field"]),
            (
                |g| g.role = "owner".to_owned(),
                "role",
                &["unknown role \"owner\""],
            ),
            (
                |g| g.scope_namespace.clear(),
                "scope",
                &["missing required field"],
            ),
            (
                |g| g.scope_namespace = "Shop".to_owned(),
                "scope",
                &["\"Shop\" is neither \"*\""],
            ),
            (
                |g| g.permissions.clear(),
                "permissions",
                &["role custom needs at least one permission"],
            ),
            (
                |g| g.permissions[1].resource = "pods".to_owned(),
                "permissions[1].resource",
                &["unknown resource \"pods\""],
            ),
            (
                |g| g.permissions[1] = g.permissions[0].clone(),
                "permissions[1]",
                &["get on services is already listed as permissions[0]"],
            ),
        ];
        for (break_it, field, parts) in cases {
            let mut proto = v1::Grant::from(&grant());
            break_it(&mut proto);
            let e = invalid(Grant::try_from(proto));
            assert_invalid(&e, "Grant \"default/ops\"", field, parts);
        }

        let mut proto = v1::Grant::from(&grant());
        proto.role = "viewer".to_owned();
        let e = invalid(Grant::try_from(proto));
        assert_invalid(
            &e,
            "Grant \"default/ops\"",
            "permissions",
            &["only role custom takes permissions; role viewer"],
        );
    }

    #[test]
    fn objects_without_kind_and_nodes_are_rejected() {
        let e = invalid(Object::try_from(v1::Object { kind: None }));
        assert_eq!(e, ObjectError::NoKind);
        let node = v1::Object {
            kind: Some(v1::object::Kind::Node(v1::Node {
                meta: Some(v1::ObjectMeta {
                    name: "node-1".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let e = invalid(Object::try_from(node));
        assert!(
            matches!(&e, ObjectError::NodeNotApplicable { name } if name == "node-1"),
            "{e:?}"
        );
        assert!(e.to_string().contains("join token"), "{e}");
    }

    #[test]
    fn kinds_convert_both_ways() {
        for kind in ObjectKind::ALL {
            assert_eq!(kind_from_proto(kind.into()), Some(kind));
        }
        assert_eq!(kind_from_proto(v1::Kind::Node), None);
        assert_eq!(kind_from_proto(v1::Kind::Unspecified), None);
    }

    /// A manifest and an API call that break the same rule give the same reason.
    #[test]
    fn manifest_and_api_agree_on_wording() {
        let text = "\
kind: Service
namespace: shop
name: web
vip: 198.18.0.10
ports: [{ port: 80, protocol: TCP }, { port: 81, protocol: TCP }]
backends: [{ address: 198.19.1.2, weight: 0 }]
";
        let from_manifest = match parse_objects("web.yaml", text) {
            Ok(objects) => panic!("expected an error, got {objects:?}"),
            Err(e) => e.to_string(),
        };
        let mut proto = v1::Service::from(&service());
        proto.backends.truncate(1);
        // Zero means "default" in a message, so break the rule with the other bound.
        proto.backends[0].weight = 10_001;
        let from_api = invalid(ServiceObject::try_from(proto)).to_string();
        let reason = |message: &str| {
            message
                .split_once("backends[0].weight: ")
                .map(|(_, reason)| {
                    reason
                        .replace("got 0", "got N")
                        .replace("got 10001", "got N")
                })
        };
        assert!(reason(&from_manifest).is_some(), "{from_manifest}");
        assert_eq!(reason(&from_manifest), reason(&from_api));
    }
}
