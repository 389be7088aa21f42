//! `Resources`: services, endpoints, grants and network policies, for admins.
//!
//! Apply converts every object at the boundary (proto → validated domain
//! object → canonical proto), checks RBAC, allocates VIPs, compares with what
//! is stored (created / configured / unchanged), and commits all of it in one
//! transaction, or nothing. An object that carries a resource version must
//! still be at that version (optimistic concurrency): two admins who read the
//! same version and both update it cannot both win.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_api::v1;
use tonic::{Request, Response, Status};

use super::{Control, state::Draft};
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
    store::{Expect, kind},
    view,
    vip::VipError,
};

pub struct ResourcesApi(pub Arc<Control>);

fn resource_of(kind: v1::Kind) -> Result<(Resource, &'static str), ApiError> {
    match kind {
        v1::Kind::Service => Ok((Resource::Services, "Service")),
        v1::Kind::Endpoint => Ok((Resource::Endpoints, "Endpoint")),
        v1::Kind::Grant => Ok((Resource::Grants, "Grant")),
        v1::Kind::NetworkPolicy => Ok((Resource::NetworkPolicies, "NetworkPolicy")),
        v1::Kind::Node => Ok((Resource::Nodes, "Node")),
        v1::Kind::Unspecified => Err(ApiError::Invalid {
            message: "kind: must be one of service, endpoint, grant, networkpolicy, node"
                .to_string(),
        }),
    }
}

fn namespace_or_default(ns: &str) -> String {
    if ns.is_empty() {
        "default".to_string()
    } else {
        ns.to_string()
    }
}

fn version_of(meta: Option<&v1::ObjectMeta>) -> u64 {
    meta.map_or(0, |m| m.resource_version)
}

/// Equal for apply's purposes: everything but the resource version.
fn same<T: Clone + PartialEq>(a: &T, b: &T, strip: impl Fn(&mut T)) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    strip(&mut a);
    strip(&mut b);
    a == b
}

fn strip_meta(meta: &mut Option<v1::ObjectMeta>) {
    if let Some(m) = meta.as_mut() {
        m.resource_version = 0;
    }
}

impl Control {
    /// Apply: all objects or none.
    pub async fn apply(
        &self,
        caller: &Caller,
        objects: Vec<v1::Object>,
        dry_run: bool,
    ) -> Result<Vec<v1::ApplyResult>, ApiError> {
        // Convert and validate every object before touching anything.
        let mut parsed = Vec::with_capacity(objects.len());
        let mut seen = HashSet::new();
        for (i, object) in objects.into_iter().enumerate() {
            let sent_version = match &object.kind {
                Some(v1::object::Kind::Service(s)) => version_of(s.meta.as_ref()),
                Some(v1::object::Kind::Endpoint(e)) => version_of(e.meta.as_ref()),
                Some(v1::object::Kind::Grant(g)) => version_of(g.meta.as_ref()),
                Some(v1::object::Kind::NetworkPolicy(p)) => version_of(p.meta.as_ref()),
                Some(v1::object::Kind::Node(_)) => {
                    return Err(ApiError::Invalid {
                        message: format!(
                            "objects[{i}]: nodes join with a token; they cannot be applied"
                        ),
                    });
                }
                None => {
                    return Err(ApiError::Invalid {
                        message: format!("objects[{i}]: empty object"),
                    });
                }
            };
            let domain = sluice_model::Object::try_from(object).map_err(|e| ApiError::Invalid {
                message: e.to_string(),
            })?;
            if !seen.insert(domain.object_ref()) {
                return Err(ApiError::Invalid {
                    message: format!("{} appears twice in one apply", domain.object_ref()),
                });
            }
            parsed.push((domain, sent_version));
        }
        let caller = caller.clone();
        let pool = self.pool;
        let mut results = self
            .mutate(dry_run, move |draft| {
                let grants = draft.state.grants();
                let mut vips = Vips::of(&draft.state);
                let mut results = Vec::with_capacity(parsed.len());
                for (object, sent) in parsed {
                    let what = object.object_ref();
                    let applied =
                        apply_one(draft, &caller, &grants, &pool, &mut vips, object, sent)
                            .map_err(|e| match e {
                                // Name the object and the field, as manifest errors do.
                                ApiError::Vip(v) if !matches!(v, VipError::Exhausted { .. }) => {
                                    ApiError::Invalid {
                                        message: format!("{what}: vip: {v}"),
                                    }
                                }
                                other => other,
                            })?;
                    results.push(applied);
                }
                Ok(results)
            })
            .await?;
        if !dry_run {
            // Report the objects as stored: with the version the commit gave them.
            let state = self.state();
            for result in &mut results {
                let key = (result.namespace.clone(), result.name.clone());
                let stored = match v1::Kind::try_from(result.kind) {
                    Ok(v1::Kind::Service) => state
                        .services
                        .get(&key)
                        .cloned()
                        .map(v1::object::Kind::Service),
                    Ok(v1::Kind::Endpoint) => state
                        .endpoints
                        .get(&key)
                        .cloned()
                        .map(v1::object::Kind::Endpoint),
                    Ok(v1::Kind::Grant) => {
                        state.grants.get(&key).cloned().map(v1::object::Kind::Grant)
                    }
                    Ok(v1::Kind::NetworkPolicy) => state
                        .policies
                        .get(&key)
                        .cloned()
                        .map(v1::object::Kind::NetworkPolicy),
                    _ => None,
                };
                if let Some(kind) = stored {
                    result.object = Some(v1::Object { kind: Some(kind) });
                }
            }
        }
        Ok(results)
    }

    pub async fn delete(&self, caller: &Caller, req: v1::DeleteRequest) -> Result<(), ApiError> {
        let kind = v1::Kind::try_from(req.kind).unwrap_or(v1::Kind::Unspecified);
        let (resource, kind_name) = resource_of(kind)?;
        if resource == Resource::Nodes {
            return Err(ApiError::Invalid {
                message: "nodes are removed with `sluicectl node remove` (RemoveNode), which also revokes their certificate".into(),
            });
        }
        let ns = namespace_or_default(&req.namespace);
        rbac::check(
            caller,
            Verb::Delete,
            resource,
            Some(&ns),
            &self.state().grants(),
        )?;
        let key = (ns.clone(), req.name.clone());
        self.mutate(false, move |draft| {
            let current = match kind {
                v1::Kind::Service => draft
                    .state
                    .services
                    .remove(&key)
                    .map(|s| version_of(s.meta.as_ref())),
                v1::Kind::Endpoint => draft
                    .state
                    .endpoints
                    .remove(&key)
                    .map(|e| version_of(e.meta.as_ref())),
                v1::Kind::NetworkPolicy => draft
                    .state
                    .policies
                    .remove(&key)
                    .map(|p| version_of(p.meta.as_ref())),
                _ => draft
                    .state
                    .grants
                    .remove(&key)
                    .map(|g| version_of(g.meta.as_ref())),
            };
            let Some(current) = current else {
                return Err(ApiError::NotFound {
                    kind: kind_name,
                    name: format!("{ns}/{}", req.name),
                });
            };
            if req.resource_version != 0 && req.resource_version != current {
                return Err(ApiError::Conflict {
                    kind: kind_name,
                    name: format!("{ns}/{}", req.name),
                    expected: req.resource_version,
                    actual: current.to_string(),
                });
            }
            let store_kind = match kind {
                v1::Kind::Service => kind::SERVICE,
                v1::Kind::Endpoint => kind::ENDPOINT,
                v1::Kind::NetworkPolicy => kind::NETWORK_POLICY,
                _ => kind::GRANT,
            };
            draft.delete(store_kind, &ns, &req.name, Expect::Version(current));
            Ok(())
        })
        .await
    }

    pub fn get(&self, caller: &Caller, req: &v1::GetRequest) -> Result<v1::Object, ApiError> {
        let kind = v1::Kind::try_from(req.kind).unwrap_or(v1::Kind::Unspecified);
        let (resource, kind_name) = resource_of(kind)?;
        let state = self.state();
        let grants = state.grants();
        if resource == Resource::Nodes {
            rbac::check(caller, Verb::Get, resource, None, &grants)?;
            return self
                .node_object(&state, &req.name)
                .map(|n| v1::Object {
                    kind: Some(v1::object::Kind::Node(n)),
                })
                .ok_or(ApiError::NotFound {
                    kind: kind_name,
                    name: req.name.clone(),
                });
        }
        let ns = namespace_or_default(&req.namespace);
        rbac::check(caller, Verb::Get, resource, Some(&ns), &grants)?;
        let key = (ns.clone(), req.name.clone());
        let found = match kind {
            v1::Kind::Service => state
                .services
                .get(&key)
                .cloned()
                .map(v1::object::Kind::Service),
            v1::Kind::Endpoint => state
                .endpoints
                .get(&key)
                .cloned()
                .map(v1::object::Kind::Endpoint),
            v1::Kind::NetworkPolicy => state
                .policies
                .get(&key)
                .cloned()
                .map(v1::object::Kind::NetworkPolicy),
            _ => state.grants.get(&key).cloned().map(v1::object::Kind::Grant),
        };
        found
            .map(|kind| v1::Object { kind: Some(kind) })
            .ok_or(ApiError::NotFound {
                kind: kind_name,
                name: format!("{ns}/{}", req.name),
            })
    }

    pub fn list(
        &self,
        caller: &Caller,
        req: &v1::ListRequest,
    ) -> Result<v1::ListResponse, ApiError> {
        let kind = v1::Kind::try_from(req.kind).unwrap_or(v1::Kind::Unspecified);
        let (resource, _) = resource_of(kind)?;
        let state = self.state();
        let grants = state.grants();
        if resource == Resource::Nodes {
            rbac::check(caller, Verb::List, resource, None, &grants)?;
            let objects = state
                .nodes
                .keys()
                .filter_map(|name| self.node_object(&state, name))
                .map(|n| v1::Object {
                    kind: Some(v1::object::Kind::Node(n)),
                })
                .collect();
            return Ok(v1::ListResponse {
                objects,
                revision: state.revision,
            });
        }
        // One namespace: the caller needs list there. All namespaces: those
        // the caller may list (an empty answer, not an error, if none).
        let allowed: Option<BTreeSet<String>> = if req.namespace.is_empty() {
            rbac::namespaces_allowed(caller, Verb::List, resource, &grants)
                .map(|v| v.into_iter().collect())
        } else {
            rbac::check(caller, Verb::List, resource, Some(&req.namespace), &grants)?;
            Some(BTreeSet::from([req.namespace.clone()]))
        };
        let visible = |ns: &String| allowed.as_ref().is_none_or(|a| a.contains(ns));
        let objects = match kind {
            v1::Kind::Service => state
                .services
                .iter()
                .filter(|((ns, _), _)| visible(ns))
                .map(|(_, s)| v1::object::Kind::Service(s.clone()))
                .collect::<Vec<_>>(),
            v1::Kind::Endpoint => state
                .endpoints
                .iter()
                .filter(|((ns, _), _)| visible(ns))
                .map(|(_, e)| v1::object::Kind::Endpoint(e.clone()))
                .collect(),
            v1::Kind::NetworkPolicy => state
                .policies
                .iter()
                .filter(|((ns, _), _)| visible(ns))
                .map(|(_, p)| v1::object::Kind::NetworkPolicy(p.clone()))
                .collect(),
            _ => state
                .grants
                .iter()
                .filter(|((ns, _), _)| visible(ns))
                .map(|(_, g)| v1::object::Kind::Grant(g.clone()))
                .collect(),
        };
        Ok(v1::ListResponse {
            objects: objects
                .into_iter()
                .map(|k| v1::Object { kind: Some(k) })
                .collect(),
            revision: state.revision,
        })
    }

    pub fn describe(
        &self,
        caller: &Caller,
        req: &v1::GetRequest,
    ) -> Result<v1::DescribeResponse, ApiError> {
        let ns = namespace_or_default(&req.namespace);
        let state = self.state();
        rbac::check(
            caller,
            Verb::Get,
            Resource::Services,
            Some(&ns),
            &state.grants(),
        )?;
        let service = state
            .services
            .get(&(ns.clone(), req.name.clone()))
            .cloned()
            .ok_or(ApiError::NotFound {
                kind: "Service",
                name: format!("{ns}/{}", req.name),
            })?;
        let endpoints: Vec<&v1::Endpoint> = state.endpoints.values().collect();
        let resolved = view::resolve(&service, &ns, &view::EndpointIndex::new(&endpoints));
        let target = |port: &v1::ServicePort| {
            if port.target_port == 0 {
                port.port
            } else {
                port.target_port
            }
        };
        let source_of = |address: &str| -> String {
            if service.selector.is_empty() {
                "static".to_string()
            } else {
                state
                    .endpoints
                    .iter()
                    .find(|((e_ns, _), e)| *e_ns == ns && e.address == address)
                    .map_or_else(
                        || "endpoint".to_string(),
                        |((e_ns, e_name), _)| format!("{e_ns}/{e_name}"),
                    )
            }
        };
        let nodes: Vec<&str> = state.nodes.keys().map(String::as_str).collect();
        let service_name = format!("{ns}/{}", req.name);
        let unhealthy = self.unhealthy();
        let mut backends = Vec::new();
        for port in &service.ports {
            for b in &resolved {
                let state = if b.draining {
                    "draining"
                } else if unhealthy.contains(&(service_name.clone(), b.address.clone())) {
                    "unhealthy"
                } else if b.weight == 0 {
                    "no share"
                } else {
                    "serving"
                };
                backends.push(v1::ResolvedBackend {
                    address: b.address.clone(),
                    port: target(port),
                    weight: b.weight,
                    source: source_of(&b.address),
                    state: state.to_owned(),
                    probers: if service.health_check.is_some() {
                        view::probers(&nodes, &service_name, &b.address)
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        backends.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        backends.dedup();
        let service_name = format!("{ns}/{}", req.name);
        let live = self.live();
        let nodes = state
            .nodes
            .keys()
            .map(|node| {
                let l = live.get(node).cloned().unwrap_or_default();
                v1::NodeProgramming {
                    node: node.clone(),
                    desired_version: state.view_version,
                    applied_version: l.applied_version,
                    connected: l.watchers > 0,
                    counters: l
                        .counters
                        .iter()
                        .filter(|c| c.service == service_name)
                        .cloned()
                        .collect(),
                }
            })
            .collect();
        Ok(v1::DescribeResponse {
            service: Some(service),
            backends,
            nodes,
        })
    }
}

/// Validates, authorizes and drafts one object; returns its outcome.
/// The VIPs services hold, kept up to date through one apply (rebuilding
/// them for each service of a large batch would cost services²).
struct Vips {
    taken: BTreeSet<Ipv4Addr>,
    owner: HashMap<Ipv4Addr, (String, String)>,
}

impl Vips {
    fn of(state: &super::state::State) -> Self {
        let mut vips = Vips {
            taken: BTreeSet::new(),
            owner: HashMap::new(),
        };
        for (key, service) in &state.services {
            if let Ok(vip) = service.vip.parse() {
                vips.taken.insert(vip);
                vips.owner.insert(vip, key.clone());
            }
        }
        vips
    }

    /// The VIPs of services other than `key`, as far as `addr` is concerned.
    fn others_at(&self, addr: Ipv4Addr, key: &(String, String)) -> BTreeSet<Ipv4Addr> {
        match self.owner.get(&addr) {
            Some(owner) if owner != key => BTreeSet::from([addr]),
            _ => BTreeSet::new(),
        }
    }

    fn assign(&mut self, key: &(String, String), old: Option<Ipv4Addr>, new: Ipv4Addr) {
        if let Some(old) = old
            && old != new
            && self.owner.get(&old) == Some(key)
        {
            self.owner.remove(&old);
            self.taken.remove(&old);
        }
        self.taken.insert(new);
        self.owner.insert(new, key.clone());
    }
}

fn apply_one(
    draft: &mut Draft,
    caller: &Caller,
    grants: &[v1::Grant],
    pool: &crate::vip::VipPool,
    vips: &mut Vips,
    object: sluice_model::Object,
    sent_version: u64,
) -> Result<v1::ApplyResult, ApiError> {
    let object_ref = object.object_ref();
    let ns = object.namespace().to_string();
    let name = object.name().to_string();
    let key = (ns.clone(), name.clone());
    let conflict = |expected: u64, actual: Option<u64>| ApiError::Conflict {
        kind: object_ref.kind.as_str(),
        name: format!("{ns}/{name}"),
        expected,
        actual: actual.map_or_else(|| "absent".to_string(), |v| v.to_string()),
    };
    let check_version = |current: Option<u64>| -> Result<Expect, ApiError> {
        if sent_version != 0 && Some(sent_version) != current {
            return Err(conflict(sent_version, current));
        }
        Ok(current.map_or(Expect::Absent, Expect::Version))
    };
    let (kind, outcome, stored) = match &object {
        sluice_model::Object::Service(s) => {
            let existing = draft.state.services.get(&key).cloned();
            let current = existing.as_ref().map(|e| version_of(e.meta.as_ref()));
            let verb = if existing.is_some() {
                Verb::Update
            } else {
                Verb::Create
            };
            rbac::check(caller, verb, Resource::Services, Some(&ns), grants)?;
            let expect = check_version(current)?;
            let mut proto = v1::Service::from(s);
            let had = existing.as_ref().and_then(|e| e.vip.parse().ok());
            let vip = match s.vip {
                Some(requested) => {
                    pool.check_requested(requested, &vips.others_at(requested, &key))?;
                    requested
                }
                // Keep the VIP the service has; allocate only for new ones.
                None => match had {
                    Some(kept) => kept,
                    None => pool.allocate(&vips.taken)?,
                },
            };
            vips.assign(&key, had, vip);
            proto.vip = vip.to_string();
            if let Some(m) = proto.meta.as_mut() {
                m.resource_version = current.unwrap_or(0);
            }
            let outcome = outcome_of(existing.as_ref(), &proto, |s: &mut v1::Service| {
                strip_meta(&mut s.meta)
            });
            if outcome != v1::ApplyOutcome::Unchanged {
                draft.put_service(proto.clone(), expect);
            }
            (v1::Kind::Service, outcome, v1::object::Kind::Service(proto))
        }
        sluice_model::Object::Endpoint(e) => {
            let existing = draft.state.endpoints.get(&key).cloned();
            let current = existing.as_ref().map(|e| version_of(e.meta.as_ref()));
            let verb = if existing.is_some() {
                Verb::Update
            } else {
                Verb::Create
            };
            rbac::check(caller, verb, Resource::Endpoints, Some(&ns), grants)?;
            let expect = check_version(current)?;
            let mut proto = v1::Endpoint::from(e);
            if let Some(m) = proto.meta.as_mut() {
                m.resource_version = current.unwrap_or(0);
            }
            let outcome = outcome_of(existing.as_ref(), &proto, |e: &mut v1::Endpoint| {
                strip_meta(&mut e.meta)
            });
            if outcome != v1::ApplyOutcome::Unchanged {
                draft.put_endpoint(proto.clone(), expect);
            }
            (
                v1::Kind::Endpoint,
                outcome,
                v1::object::Kind::Endpoint(proto),
            )
        }
        sluice_model::Object::Grant(g) => {
            let existing = draft.state.grants.get(&key).cloned();
            let current = existing.as_ref().map(|g| version_of(g.meta.as_ref()));
            let verb = if existing.is_some() {
                Verb::Update
            } else {
                Verb::Create
            };
            rbac::check(caller, verb, Resource::Grants, Some(&ns), grants)?;
            let expect = check_version(current)?;
            let mut proto = v1::Grant::from(g);
            if let Some(m) = proto.meta.as_mut() {
                m.resource_version = current.unwrap_or(0);
            }
            let outcome = outcome_of(existing.as_ref(), &proto, |g: &mut v1::Grant| {
                strip_meta(&mut g.meta)
            });
            if outcome != v1::ApplyOutcome::Unchanged {
                draft.put_grant(proto.clone(), expect);
            }
            (v1::Kind::Grant, outcome, v1::object::Kind::Grant(proto))
        }
        sluice_model::Object::NetworkPolicy(p) => {
            let existing = draft.state.policies.get(&key).cloned();
            let current = existing.as_ref().map(|p| version_of(p.meta.as_ref()));
            let verb = if existing.is_some() {
                Verb::Update
            } else {
                Verb::Create
            };
            rbac::check(caller, verb, Resource::NetworkPolicies, Some(&ns), grants)?;
            let expect = check_version(current)?;
            let mut proto = v1::NetworkPolicy::from(p);
            if let Some(m) = proto.meta.as_mut() {
                m.resource_version = current.unwrap_or(0);
            }
            let outcome = outcome_of(existing.as_ref(), &proto, |p: &mut v1::NetworkPolicy| {
                strip_meta(&mut p.meta)
            });
            if outcome != v1::ApplyOutcome::Unchanged {
                draft.put_policy(proto.clone(), expect);
            }
            (
                v1::Kind::NetworkPolicy,
                outcome,
                v1::object::Kind::NetworkPolicy(proto),
            )
        }
    };
    Ok(v1::ApplyResult {
        kind: kind as i32,
        namespace: ns,
        name,
        outcome: outcome as i32,
        object: Some(v1::Object { kind: Some(stored) }),
    })
}

fn outcome_of<T: Clone + PartialEq>(
    existing: Option<&T>,
    new: &T,
    strip: impl Fn(&mut T),
) -> v1::ApplyOutcome {
    match existing {
        None => v1::ApplyOutcome::Created,
        Some(old) if same(old, new, strip) => v1::ApplyOutcome::Unchanged,
        Some(_) => v1::ApplyOutcome::Configured,
    }
}

#[tonic::async_trait]
impl v1::resources_server::Resources for ResourcesApi {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        let req = request.into_inner();
        let results = self.0.apply(&caller, req.objects, req.dry_run).await?;
        Ok(Response::new(v1::ApplyResponse { results }))
    }

    async fn get(&self, request: Request<v1::GetRequest>) -> Result<Response<v1::Object>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(self.0.get(&caller, request.get_ref())?))
    }

    async fn list(
        &self,
        request: Request<v1::ListRequest>,
    ) -> Result<Response<v1::ListResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(self.0.list(&caller, request.get_ref())?))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        self.0.delete(&caller, request.into_inner()).await?;
        Ok(Response::new(v1::DeleteResponse {}))
    }

    async fn describe(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(self.0.describe(&caller, request.get_ref())?))
    }
}
