//! `Resources`: the objects admins declare, every kind through the same
//! generic code (a kind is its [`Kind`] impl; see `sluice_model::kind`).
//!
//! Apply converts every object at the boundary (message → validated domain
//! object), checks RBAC, admits it (a Service's VIP is allocated or checked),
//! compares with what is stored (created / configured / unchanged), and
//! commits all of it in one transaction, or nothing. An object that carries a
//! resource version must still be at that version (optimistic concurrency):
//! two admins who read the same version and both update it cannot both win.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use sluice_api::v1;
use sluice_model::kind::{KindVisitor, Resolve, SpecVisitor, kind_from_proto};
use sluice_model::{Grant, Kind, Meta as _, Object, ObjectKind, Service, ServiceSpec, Versioned};
use tonic::{Request, Response, Status};

use super::{Control, state::Draft};
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
    store::Expect,
    vip::{VipError, VipPool},
};

pub struct ResourcesApi(pub Arc<Control>);

/// The kind a request names: an object kind, or Node.
enum Requested {
    Object(ObjectKind),
    Node,
}

fn requested(kind: i32) -> Result<Requested, ApiError> {
    let kind = v1::Kind::try_from(kind).unwrap_or(v1::Kind::Unspecified);
    if kind == v1::Kind::Node {
        return Ok(Requested::Node);
    }
    kind_from_proto(kind)
        .map(Requested::Object)
        .ok_or_else(|| ApiError::Invalid {
            message: "kind: must be one of service, endpoint, grant, networkpolicy, node"
                .to_string(),
        })
}

fn namespace_or_default(ns: &str) -> String {
    if ns.is_empty() {
        sluice_model::DEFAULT_NAMESPACE.to_string()
    } else {
        ns.to_string()
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
            match object.kind {
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
                Some(_) => {}
            }
            let sent = Versioned::<Object>::from_wire(object).map_err(|e| ApiError::Invalid {
                message: e.to_string(),
            })?;
            if !seen.insert(sent.object.object_ref()) {
                return Err(ApiError::Invalid {
                    message: format!("{} appears twice in one apply", sent.object.object_ref()),
                });
            }
            parsed.push(sent);
        }
        let caller = caller.clone();
        let pool = self.pool;
        let applied = self
            .mutate(dry_run, move |draft| {
                let grants: Vec<Grant> = draft.state.grants().into_iter().cloned().collect();
                let grants: Vec<&Grant> = grants.iter().collect();
                let mut vips = Vips::of(draft, pool);
                let mut applied = Vec::with_capacity(parsed.len());
                for Versioned { object, version } in parsed.iter().cloned() {
                    applied.push(object.visit(ApplyOne {
                        draft,
                        caller: &caller,
                        grants: &grants,
                        vips: &mut vips,
                        sent_version: version,
                    })?);
                }
                Ok(applied)
            })
            .await?;
        // Report the objects as stored: with the version the commit gave them.
        let state = self.state();
        Ok(applied
            .into_iter()
            .map(|(kind, namespace, name, outcome, object)| {
                let object = if dry_run {
                    object
                } else {
                    kind.visit(Served {
                        state: &state,
                        namespace: &namespace,
                        name: &name,
                    })
                    .unwrap_or(object)
                };
                v1::ApplyResult {
                    kind: v1::Kind::from(kind) as i32,
                    namespace,
                    name,
                    outcome: outcome as i32,
                    object: Some(object),
                }
            })
            .collect())
    }

    pub async fn delete(&self, caller: &Caller, req: v1::DeleteRequest) -> Result<(), ApiError> {
        let Requested::Object(kind) = requested(req.kind)? else {
            return Err(ApiError::Invalid {
                message: "nodes are removed with `sluicectl node remove` (RemoveNode), which also revokes their certificate".into(),
            });
        };
        let namespace = namespace_or_default(&req.namespace);
        rbac::check(
            caller,
            Verb::Delete,
            kind.visit(ResourceOf),
            Some(&namespace),
            &self.state().grants(),
        )?;
        self.mutate(false, move |draft| {
            kind.visit(DeleteOne {
                draft,
                namespace: &namespace,
                name: &req.name,
                expected: req.resource_version,
            })
        })
        .await
    }

    pub fn get(&self, caller: &Caller, req: &v1::GetRequest) -> Result<v1::Object, ApiError> {
        let state = self.state();
        let grants = state.grants();
        let kind = match requested(req.kind)? {
            Requested::Node => {
                rbac::check(caller, Verb::Get, Resource::Nodes, None, &grants)?;
                return self
                    .node_object(&state, &req.name)
                    .map(|n| v1::Object {
                        kind: Some(v1::object::Kind::Node(n)),
                    })
                    .ok_or(ApiError::NotFound {
                        kind: "Node",
                        name: req.name.clone(),
                    });
            }
            Requested::Object(kind) => kind,
        };
        let namespace = namespace_or_default(&req.namespace);
        rbac::check(
            caller,
            Verb::Get,
            kind.visit(ResourceOf),
            Some(&namespace),
            &grants,
        )?;
        kind.visit(Served {
            state: &state,
            namespace: &namespace,
            name: &req.name,
        })
        .ok_or(ApiError::NotFound {
            kind: kind.as_str(),
            name: format!("{namespace}/{}", req.name),
        })
    }

    pub fn list(
        &self,
        caller: &Caller,
        req: &v1::ListRequest,
    ) -> Result<v1::ListResponse, ApiError> {
        let state = self.state();
        let grants = state.grants();
        let kind = match requested(req.kind)? {
            Requested::Node => {
                rbac::check(caller, Verb::List, Resource::Nodes, None, &grants)?;
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
            Requested::Object(kind) => kind,
        };
        let resource = kind.visit(ResourceOf);
        // One namespace: the caller needs list there. All namespaces: those
        // the caller may list (an empty answer, not an error, if none).
        let allowed: Option<BTreeSet<String>> = if req.namespace.is_empty() {
            rbac::namespaces_allowed(caller, Verb::List, resource, &grants)
                .map(|v| v.into_iter().collect())
        } else {
            rbac::check(caller, Verb::List, resource, Some(&req.namespace), &grants)?;
            Some(BTreeSet::from([req.namespace.clone()]))
        };
        let objects = kind.visit(ListAll {
            state: &state,
            visible: &|namespace: &str| allowed.as_ref().is_none_or(|a| a.contains(namespace)),
        });
        Ok(v1::ListResponse {
            objects,
            revision: state.revision,
        })
    }
}

/// What one object of an apply became: its kind and name, the outcome, and
/// the object as it will be stored.
type Applied = (ObjectKind, String, String, v1::ApplyOutcome, v1::Object);

/// Validates, authorizes and drafts one object.
struct ApplyOne<'a> {
    draft: &'a mut Draft,
    caller: &'a Caller,
    grants: &'a [&'a Grant],
    vips: &'a mut Vips,
    sent_version: u64,
}

impl SpecVisitor for ApplyOne<'_> {
    type Output = Result<Applied, ApiError>;

    fn visit<K: Kind>(self, spec: K::Spec) -> Result<Applied, ApiError> {
        let namespace = spec.namespace().to_owned();
        let name = spec.name().to_owned();
        let existing = self
            .draft
            .state
            .objects
            .get::<K>(&namespace, &name)
            .cloned();
        let verb = match existing {
            Some(_) => Verb::Update,
            None => Verb::Create,
        };
        rbac::check(
            self.caller,
            verb,
            K::RESOURCE,
            Some(&namespace),
            self.grants,
        )?;
        let current = existing.as_ref().map(|e| e.version);
        if self.sent_version != 0 && Some(self.sent_version) != current {
            return Err(ApiError::Conflict {
                kind: K::KIND.as_str(),
                name: format!("{namespace}/{name}"),
                expected: self.sent_version,
                actual: current.map_or_else(|| "absent".to_string(), |v| v.to_string()),
            });
        }
        self.vips.admitting = existing
            .as_ref()
            .and_then(|e| (&e.object as &dyn std::any::Any).downcast_ref::<Service>())
            .map(|s| s.vip);
        let object = K::from_spec(spec, self.vips)?;
        let outcome = match &existing {
            None => v1::ApplyOutcome::Created,
            Some(old) if old.object == object => v1::ApplyOutcome::Unchanged,
            Some(_) => v1::ApplyOutcome::Configured,
        };
        let served = Versioned {
            object: object.clone(),
            version: current.unwrap_or(0),
        }
        .to_wire();
        if outcome != v1::ApplyOutcome::Unchanged {
            self.draft
                .put(object, current.map_or(Expect::Absent, Expect::Version));
        }
        Ok((K::KIND, namespace, name, outcome, served))
    }
}

/// The VIPs services hold, kept up to date through one apply (rebuilding
/// them for each service of a large batch would cost services²), and built
/// only once a service is admitted: an apply of endpoints alone does not
/// pay for reading every service.
struct Vips {
    pool: VipPool,
    /// The services to read the VIPs from, until they are read.
    unread: Option<sluice_model::kind::Table<Service>>,
    taken: BTreeSet<Ipv4Addr>,
    owner: HashMap<Ipv4Addr, (String, String)>,
    /// The VIP the service being admitted has now, if it exists.
    admitting: Option<Ipv4Addr>,
}

impl Vips {
    fn of(draft: &Draft, pool: VipPool) -> Self {
        Vips {
            pool,
            // A persistent map: this copy costs nothing.
            unread: Some(draft.state.objects.table::<Service>().clone()),
            taken: BTreeSet::new(),
            owner: HashMap::new(),
            admitting: None,
        }
    }

    fn read(&mut self) {
        if let Some(services) = self.unread.take() {
            for (key, service) in &services {
                self.taken.insert(service.object.vip);
                self.owner.insert(service.object.vip, key.clone());
            }
        }
    }
}

impl Resolve for Vips {
    type Error = ApiError;

    /// A requested VIP must be in the pool and free; without one a service
    /// keeps the VIP it has, and a new one gets the lowest free address.
    fn vip(&mut self, service: &ServiceSpec) -> Result<Ipv4Addr, ApiError> {
        self.read();
        let key = (service.namespace.clone(), service.name.clone());
        let had = self.admitting.take();
        let vip = match service.vip {
            Some(requested) => {
                let others = match self.owner.get(&requested) {
                    Some(owner) if *owner != key => BTreeSet::from([requested]),
                    _ => BTreeSet::new(),
                };
                self.pool
                    .check_requested(requested, &others)
                    .map(|()| requested)
            }
            None => match had {
                Some(kept) => Ok(kept),
                None => self.pool.allocate(&self.taken),
            },
        }
        // Name the object and the field, as manifest errors do.
        .map_err(|e| match e {
            VipError::Exhausted { .. } => ApiError::Vip(e),
            other => ApiError::Invalid {
                message: format!(
                    "{}: vip: {other}",
                    sluice_model::ObjectRef {
                        kind: ObjectKind::Service,
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                    }
                ),
            },
        })?;
        if let Some(old) = had
            && old != vip
            && self.owner.get(&old) == Some(&key)
        {
            self.owner.remove(&old);
            self.taken.remove(&old);
        }
        self.taken.insert(vip);
        self.owner.insert(vip, key);
        Ok(vip)
    }
}

struct DeleteOne<'a> {
    draft: &'a mut Draft,
    namespace: &'a str,
    name: &'a str,
    /// Non-zero: the version the caller expects to delete.
    expected: u64,
}

impl KindVisitor for DeleteOne<'_> {
    type Output = Result<(), ApiError>;

    fn visit<K: Kind>(self) -> Result<(), ApiError> {
        let qualified = || format!("{}/{}", self.namespace, self.name);
        let Some(current) = self
            .draft
            .state
            .objects
            .get::<K>(self.namespace, self.name)
            .map(|o| o.version)
        else {
            return Err(ApiError::NotFound {
                kind: K::KIND.as_str(),
                name: qualified(),
            });
        };
        if self.expected != 0 && self.expected != current {
            return Err(ApiError::Conflict {
                kind: K::KIND.as_str(),
                name: qualified(),
                expected: self.expected,
                actual: current.to_string(),
            });
        }
        self.draft
            .delete::<K>(self.namespace, self.name, Expect::Version(current));
        Ok(())
    }
}

/// One stored object as the API serves it.
struct Served<'a> {
    state: &'a super::state::State,
    namespace: &'a str,
    name: &'a str,
}

impl KindVisitor for Served<'_> {
    type Output = Option<v1::Object>;

    fn visit<K: Kind>(self) -> Option<v1::Object> {
        self.state
            .objects
            .get::<K>(self.namespace, self.name)
            .map(Versioned::to_wire)
    }
}

/// Every stored object of a kind in the namespaces `visible` admits.
struct ListAll<'a> {
    state: &'a super::state::State,
    visible: &'a dyn Fn(&str) -> bool,
}

impl KindVisitor for ListAll<'_> {
    type Output = Vec<v1::Object>;

    fn visit<K: Kind>(self) -> Vec<v1::Object> {
        self.state
            .objects
            .table::<K>()
            .iter()
            .filter(|((namespace, _), _)| (self.visible)(namespace))
            .map(|(_, stored)| stored.to_wire())
            .collect()
    }
}

/// What RBAC calls a kind.
struct ResourceOf;

impl KindVisitor for ResourceOf {
    type Output = Resource;
    fn visit<K: Kind>(self) -> Resource {
        K::RESOURCE
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
