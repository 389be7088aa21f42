//! `Describe`: a service with its resolved backends, their state and
//! probers, and how far each node has programmed it. The dashboard shows the
//! same backends ([`Control::resolved_backends`]).

use std::net::{IpAddr, Ipv4Addr};

use sluice_api::v1;
use sluice_model::observe::{BackendRef, BackendState};
use sluice_model::view::compute::{EndpointIndex, resolve};
use sluice_model::view::{ServiceRef, probers};
use sluice_model::wire::observe::address_bytes;
use sluice_model::{Endpoint, Kind as _, Service, Versioned};

use super::{Control, state::State};
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
};

/// A backend of a service at one of its target ports.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// The endpoint it is, by namespace and name; `None`: a static backend.
    pub endpoint: Option<(String, String)>,
    pub state: BackendState,
    /// With a health check: the nodes that probe it.
    pub probers: Vec<String>,
}

impl From<&ResolvedBackend> for v1::ResolvedBackend {
    fn from(b: &ResolvedBackend) -> Self {
        Self {
            address: address_bytes(IpAddr::V4(b.address)),
            port: b.port.into(),
            weight: b.weight,
            endpoint: b.endpoint.as_ref().map(|(namespace, name)| v1::ObjectName {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            state: v1::BackendState::from(b.state) as i32,
            probers: b.probers.clone(),
        }
    }
}

impl Control {
    /// `service`'s backends, one per (address, target port), sorted.
    pub fn resolved_backends(&self, state: &State, service: &Service) -> Vec<ResolvedBackend> {
        let name = ServiceRef {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        };
        let resolved = resolve(
            service,
            &EndpointIndex::new(state.objects.all::<Endpoint>()),
        );
        // The endpoint a selected backend is (the first by name, as
        // resolution takes it); static backends are none.
        let endpoint_at = |address| {
            if service.selector.is_empty() {
                return None;
            }
            state
                .objects
                .all::<Endpoint>()
                .find(|e| e.namespace == service.namespace && e.address == address)
                .map(|e| (e.namespace.clone(), e.name.clone()))
        };
        let nodes: Vec<&str> = state.nodes.keys().map(String::as_str).collect();
        let unhealthy = self.unhealthy();
        let mut backends = Vec::new();
        for port in &service.ports {
            for b in &resolved {
                let backend = BackendRef {
                    service: name.clone(),
                    address: IpAddr::V4(b.address),
                };
                let backend_state = if b.draining {
                    BackendState::Draining
                } else if unhealthy.contains(&backend) {
                    BackendState::Unhealthy
                } else if b.weight == 0 {
                    BackendState::NoShare
                } else {
                    BackendState::Serving
                };
                backends.push(ResolvedBackend {
                    address: b.address,
                    port: port.target_port,
                    weight: b.weight,
                    endpoint: endpoint_at(b.address),
                    state: backend_state,
                    probers: if service.traffic.health_check.is_some() {
                        probers(&nodes, &name.to_string(), &b.address.to_string())
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        backends.sort_by_key(|b| (b.address, b.port));
        backends.dedup();
        backends
    }

    pub fn describe(
        &self,
        caller: &Caller,
        req: &v1::GetRequest,
    ) -> Result<v1::DescribeResponse, ApiError> {
        let namespace = if req.namespace.is_empty() {
            sluice_model::DEFAULT_NAMESPACE.to_owned()
        } else {
            req.namespace.clone()
        };
        let state = self.state();
        rbac::check(
            caller,
            Verb::Get,
            Resource::Services,
            Some(&namespace),
            &state.grants(),
        )?;
        let stored =
            state
                .objects
                .get::<Service>(&namespace, &req.name)
                .ok_or(ApiError::NotFound {
                    kind: "Service",
                    name: format!("{namespace}/{}", req.name),
                })?;
        let name = ServiceRef {
            namespace: namespace.clone(),
            name: req.name.clone(),
        };
        let backends = self
            .resolved_backends(&state, &stored.object)
            .iter()
            .map(v1::ResolvedBackend::from)
            .collect();
        let live = self.cluster_live();
        let nodes = state
            .nodes
            .keys()
            .map(|node| {
                let l = live.get(node).cloned().unwrap_or_default();
                v1::NodeProgramming {
                    node: node.clone(),
                    desired_version: state.view.version,
                    applied_version: l.applied_version,
                    connected: l.watchers > 0,
                    counters: l
                        .counters
                        .iter()
                        .filter(|c| c.service == name)
                        .map(v1::FrontendCounters::from)
                        .collect(),
                }
            })
            .collect();
        let Versioned { object, version } = stored;
        let mut service = object.to_wire();
        if let Some(meta) = service.meta.as_mut() {
            meta.resource_version = *version;
        }
        Ok(v1::DescribeResponse {
            service: Some(service),
            backends,
            nodes,
        })
    }
}
