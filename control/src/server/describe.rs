//! `Describe`: a service with its resolved backends, their state and
//! probers, and how far each node has programmed it.

use std::net::IpAddr;

use sluice_api::v1;
use sluice_model::observe::BackendRef;
use sluice_model::view::compute::{EndpointIndex, resolve};
use sluice_model::view::{ServiceRef, probers};
use sluice_model::wire::observe::address_bytes;
use sluice_model::{Endpoint, Kind as _, Service, Versioned};

use super::Control;
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
};

impl Control {
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
        let stored = state
            .objects
            .get::<Service>(&namespace, &req.name)
            .ok_or(ApiError::NotFound {
                kind: "Service",
                name: format!("{namespace}/{}", req.name),
            })?;
        let service = &stored.object;
        let name = ServiceRef {
            namespace: namespace.clone(),
            name: req.name.clone(),
        };
        let endpoints = state.objects.all::<Endpoint>();
        let resolved = resolve(service, &EndpointIndex::new(endpoints));
        // The endpoint a selected backend is (the first by name, as
        // resolution takes it); static backends are none.
        let endpoint_at = |address| {
            if service.selector.is_empty() {
                return None;
            }
            state
                .objects
                .all::<Endpoint>()
                .find(|e| e.namespace == namespace && e.address == address)
                .map(|e| v1::ObjectName {
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                })
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
                    v1::BackendState::Draining
                } else if unhealthy.contains(&backend) {
                    v1::BackendState::Unhealthy
                } else if b.weight == 0 {
                    v1::BackendState::NoShare
                } else {
                    v1::BackendState::Serving
                };
                backends.push(v1::ResolvedBackend {
                    address: address_bytes(IpAddr::V4(b.address)),
                    port: port.target_port.into(),
                    weight: b.weight,
                    endpoint: endpoint_at(b.address),
                    state: backend_state as i32,
                    probers: if service.traffic.health_check.is_some() {
                        probers(&nodes, &name.to_string(), &b.address.to_string())
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        backends.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        backends.dedup();
        let live = self.live();
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
