//! Services and endpoints, and the health checks services carry.

use sluice_api::v1;

use super::{
    ObjectError, algorithm_from_proto, from_labels, from_meta, meta, optional, port,
    protocol_from_proto, required, to_map, weight,
};
use crate::endpoint::{Endpoint, VERSION_LABEL};
use crate::kind::{ObjectKind, ObjectRef};
use crate::rules::{self, Problem, UniqueBackends, UniquePorts};
use crate::service::{BackendSpec, ServicePort, ServiceSpec};
use crate::traffic::{self, HealthCheck, Probe, Rollout, SessionAffinity, Traffic};

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

impl From<&ServiceSpec> for v1::Service {
    fn from(service: &ServiceSpec) -> Self {
        let ServiceSpec {
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

impl TryFrom<v1::Service> for ServiceSpec {
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
