//! `Cluster`: join tokens, admin users, node removal, and `WhoAmI`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sluice_api::v1;
use sluice_pki as pki;
use tonic::{Request, Response, Status};

use super::{
    Control,
    state::{State, TokenRecord, rfc3339},
};
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
    store::Expect,
};

use crate::clock::unix_ms;

/// Join tokens live this long unless asked otherwise.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);
/// And never longer than this: they are bearer secrets.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct ClusterApi(pub Arc<Control>);

impl Control {
    /// The API's view of a node: its record plus what its agent reports.
    pub fn node_object(&self, state: &State, name: &str) -> Option<v1::Node> {
        let stored = state.nodes.get(name)?;
        let node = &stored.object;
        let live = self.node_live(name);
        Some(v1::Node {
            meta: Some(v1::ObjectMeta {
                namespace: String::new(),
                name: name.to_string(),
                resource_version: stored.version,
                labels: Default::default(),
            }),
            zone: node.zone.clone().unwrap_or_default(),
            certificate_serial: node.serials.first().cloned().unwrap_or_default(),
            certificate_expires_unix_ms: unix_ms(node.certificate_expires),
            joined_unix_ms: unix_ms(node.joined_at),
            status: Some(v1::NodeStatus {
                applied_version: live.applied_version,
                desired_version: state.view.version,
                last_report_unix_ms: live.last_report.map_or(0, unix_ms),
                connected: live.watchers > 0,
                counters: live
                    .counters
                    .iter()
                    .map(v1::FrontendCounters::from)
                    .collect(),
                policy_counters: live
                    .policy_counters
                    .iter()
                    .map(v1::PolicyCounter::from)
                    .collect(),
            }),
        })
    }

    pub async fn create_join_token(
        &self,
        caller: &Caller,
        ttl_seconds: u64,
    ) -> Result<v1::CreateJoinTokenResponse, ApiError> {
        rbac::check(
            caller,
            Verb::Create,
            Resource::Tokens,
            None,
            &self.state().grants(),
        )?;
        let ttl = if ttl_seconds == 0 {
            DEFAULT_TOKEN_TTL
        } else {
            Duration::from_secs(ttl_seconds)
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(ApiError::Invalid {
                message: format!(
                    "ttl_seconds: at most {} (24 h), got {ttl_seconds}",
                    MAX_TOKEN_TTL.as_secs()
                ),
            });
        }
        let token = pki::new_join_token()?;
        let expires = SystemTime::now() + ttl;
        let record = TokenRecord {
            secret_hash: token.secret_hash.clone(),
            expires: expires
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            used_by: None,
        };
        let id = token.id.clone();
        self.mutate(false, move |draft| {
            draft.put_token(&id, &record, Expect::Absent)
        })
        .await?;
        Ok(v1::CreateJoinTokenResponse {
            token: token.token,
            expires: rfc3339(expires),
            ca_hash: self.ca.pin(),
        })
    }

    pub fn create_user(
        &self,
        caller: &Caller,
        req: &v1::CreateUserRequest,
    ) -> Result<v1::CreateUserResponse, ApiError> {
        rbac::check(
            caller,
            Verb::Create,
            Resource::Users,
            None,
            &self.state().grants(),
        )?;
        sluice_pki::validate_name("user", &req.name)?;
        for group in &req.groups {
            sluice_pki::validate_group(group)?;
        }
        let ttl = if req.ttl_seconds == 0 {
            self.options.user_cert_ttl
        } else {
            Duration::from_secs(req.ttl_seconds)
        };
        let issued = self
            .ca
            .sign_user(&req.csr_pem, &req.name, &req.groups, ttl)?;
        tracing::info!(user = %req.name, groups = ?req.groups, serial = %issued.serial, by = %caller.name, "issued a user certificate");
        Ok(v1::CreateUserResponse {
            certificate_pem: issued.pem,
            ca_pem: self.ca.cert_pem(),
        })
    }

    pub async fn remove_node(&self, caller: &Caller, name: String) -> Result<(), ApiError> {
        rbac::check(
            caller,
            Verb::Delete,
            Resource::Nodes,
            None,
            &self.state().grants(),
        )?;
        let removed = name.clone();
        self.mutate(false, move |draft| {
            let Some(version) = draft.state.nodes.get(&name).map(|n| n.version) else {
                return Err(ApiError::NotFound {
                    kind: "Node",
                    name: name.clone(),
                });
            };
            draft.delete_node(&name, Expect::Version(version));
            Ok(())
        })
        .await?;
        self.forget_node(&removed);
        // Its open watch streams end; its certificates are refused from now
        // on (authentication requires a node record listing their serial).
        let _ = self.removed_nodes.send(removed.clone());
        tracing::info!(node = %removed, by = %caller.name, "removed a node");
        Ok(())
    }
}

#[tonic::async_trait]
impl v1::cluster_server::Cluster for ClusterApi {
    async fn create_join_token(
        &self,
        request: Request<v1::CreateJoinTokenRequest>,
    ) -> Result<Response<v1::CreateJoinTokenResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        let ttl = request.get_ref().ttl_seconds;
        Ok(Response::new(self.0.create_join_token(&caller, ttl).await?))
    }

    async fn create_user(
        &self,
        request: Request<v1::CreateUserRequest>,
    ) -> Result<Response<v1::CreateUserResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(
            self.0.create_user(&caller, request.get_ref())?,
        ))
    }

    async fn remove_node(
        &self,
        request: Request<v1::RemoveNodeRequest>,
    ) -> Result<Response<v1::RemoveNodeResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        let name = request.into_inner().name;
        self.0.remove_node(&caller, name).await?;
        Ok(Response::new(v1::RemoveNodeResponse {}))
    }

    type WatchFlowsStream = tokio_stream::wrappers::ReceiverStream<Result<v1::FlowEvent, Status>>;

    async fn watch_flows(
        &self,
        request: Request<v1::WatchFlowsRequest>,
    ) -> Result<Response<Self::WatchFlowsStream>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(
            self.0.watch_flows(&caller, request.into_inner())?,
        ))
    }

    async fn create_dashboard_token(
        &self,
        request: Request<v1::CreateDashboardTokenRequest>,
    ) -> Result<Response<v1::CreateDashboardTokenResponse>, Status> {
        let caller = self.0.authenticate_user(&request)?;
        Ok(Response::new(self.0.create_dashboard_token(
            &caller,
            request.get_ref().ttl_seconds,
        )?))
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let identity = self.0.authenticate_any(&request)?;
        let groups = match &identity {
            sluice_pki::Identity::User { groups, .. } => groups.clone(),
            sluice_pki::Identity::Node { .. } => Vec::new(),
        };
        Ok(Response::new(v1::WhoAmIResponse {
            kind: identity.kind().to_string(),
            name: identity.name().to_string(),
            groups,
        }))
    }
}
