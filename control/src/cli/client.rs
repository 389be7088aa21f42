//! The control service's admin API (`Resources`, `Cluster`) over mutual TLS, with
//! answers converted by [`super::model`] and failures turned into [`CliError`].

use std::path::Path;
use std::time::Duration;

use sluice_api::MAX_MESSAGE_BYTES;
use sluice_api::v1::{self, cluster_client::ClusterClient, resources_client::ResourcesClient};
use sluice_model::ObjectKind;
use tonic::transport::Channel;

use super::error::CliError;
use super::model::{Applied, Described, Identity, NodeInfo, Stored};
use crate::client_config::ClientConfig;

pub struct Client {
    server: String,
    resources: ResourcesClient<Channel>,
    cluster: ClusterClient<Channel>,
}

impl Client {
    /// Connects with the credentials of `config`, read from `path` (named in errors).
    pub async fn connect(path: &Path, config: &ClientConfig) -> Result<Self, CliError> {
        let ClientConfig {
            server,
            ca,
            certificate,
            key,
        } = config;
        let channel = sluice_pki::mtls_channel(server, ca, certificate, key)
            .await
            .map_err(|source| CliError::Connect {
                config: path.to_owned(),
                source,
            })?;
        Ok(Self {
            server: server.clone(),
            resources: ResourcesClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            cluster: ClusterClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// `https://HOST:PORT`, as the config file gives it.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn fail(&self) -> impl Fn(tonic::Status) -> CliError + '_ {
        |status| CliError::api(&self.server, status)
    }

    pub async fn get(
        &self,
        kind: ObjectKind,
        namespace: &str,
        name: &str,
    ) -> Result<Stored, CliError> {
        let request = v1::GetRequest {
            kind: v1::Kind::from(kind).into(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let object = self
            .resources
            .clone()
            .get(request)
            .await
            .map_err(self.fail())?;
        Stored::try_from(object.into_inner())
    }

    /// `namespace` `None`: every namespace the caller may list.
    pub async fn list(
        &self,
        kind: ObjectKind,
        namespace: Option<&str>,
    ) -> Result<Vec<Stored>, CliError> {
        let request = v1::ListRequest {
            kind: v1::Kind::from(kind).into(),
            namespace: namespace.unwrap_or_default().to_owned(),
        };
        let response = self
            .resources
            .clone()
            .list(request)
            .await
            .map_err(self.fail())?;
        response
            .into_inner()
            .objects
            .into_iter()
            .map(Stored::try_from)
            .collect()
    }

    pub async fn get_node(&self, name: &str) -> Result<NodeInfo, CliError> {
        let request = v1::GetRequest {
            kind: v1::Kind::Node.into(),
            namespace: String::new(),
            name: name.to_owned(),
        };
        let object = self
            .resources
            .clone()
            .get(request)
            .await
            .map_err(self.fail())?;
        NodeInfo::try_from(object.into_inner())
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, CliError> {
        Ok(self
            .list_node_objects()
            .await?
            .into_iter()
            .map(NodeInfo::from)
            .collect())
    }

    /// The nodes as the API carries them (with their raw counters).
    pub async fn list_node_objects(&self) -> Result<Vec<v1::Node>, CliError> {
        let request = v1::ListRequest {
            kind: v1::Kind::Node.into(),
            namespace: String::new(),
        };
        let response = self
            .resources
            .clone()
            .list(request)
            .await
            .map_err(self.fail())?;
        response
            .into_inner()
            .objects
            .into_iter()
            .map(|object| match object.kind {
                Some(v1::object::Kind::Node(node)) => Ok(node),
                _ => Err(CliError::IncompleteResponse { what: "node" }),
            })
            .collect()
    }

    /// One call: every object is applied, or none.
    pub async fn apply(
        &self,
        objects: Vec<v1::Object>,
        dry_run: bool,
    ) -> Result<Vec<Applied>, CliError> {
        let request = v1::ApplyRequest { objects, dry_run };
        let response = self
            .resources
            .clone()
            .apply(request)
            .await
            .map_err(self.fail())?;
        response
            .into_inner()
            .results
            .into_iter()
            .map(Applied::try_from)
            .collect()
    }

    pub async fn delete(
        &self,
        kind: ObjectKind,
        namespace: &str,
        name: &str,
    ) -> Result<(), CliError> {
        let request = v1::DeleteRequest {
            kind: v1::Kind::from(kind).into(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            resource_version: 0,
        };
        self.resources
            .clone()
            .delete(request)
            .await
            .map_err(self.fail())?;
        Ok(())
    }

    pub async fn describe_service(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Described, CliError> {
        let request = v1::GetRequest {
            kind: v1::Kind::Service.into(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let response = self
            .resources
            .clone()
            .describe(request)
            .await
            .map_err(self.fail())?;
        Described::try_from(response.into_inner())
    }

    pub async fn create_join_token(
        &self,
        ttl: Duration,
    ) -> Result<v1::CreateJoinTokenResponse, CliError> {
        let request = v1::CreateJoinTokenRequest {
            ttl_seconds: ttl.as_secs(),
        };
        let response = self
            .cluster
            .clone()
            .create_join_token(request)
            .await
            .map_err(self.fail())?;
        Ok(response.into_inner())
    }

    pub async fn create_dashboard_token(
        &self,
        ttl: Duration,
    ) -> Result<v1::CreateDashboardTokenResponse, CliError> {
        let request = v1::CreateDashboardTokenRequest {
            ttl_seconds: ttl.as_secs(),
        };
        let response = self
            .cluster
            .clone()
            .create_dashboard_token(request)
            .await
            .map_err(self.fail())?;
        Ok(response.into_inner())
    }

    pub async fn create_user(
        &self,
        request: v1::CreateUserRequest,
    ) -> Result<v1::CreateUserResponse, CliError> {
        let response = self
            .cluster
            .clone()
            .create_user(request)
            .await
            .map_err(self.fail())?;
        Ok(response.into_inner())
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), CliError> {
        let request = v1::RemoveNodeRequest {
            name: name.to_owned(),
        };
        self.cluster
            .clone()
            .remove_node(request)
            .await
            .map_err(self.fail())?;
        Ok(())
    }

    /// The flow log: the recent events, then (with `follow`) each new one.
    pub async fn watch_flows(
        &self,
        request: v1::WatchFlowsRequest,
    ) -> Result<tonic::Streaming<v1::FlowEvent>, CliError> {
        let response = self
            .cluster
            .clone()
            .watch_flows(request)
            .await
            .map_err(self.fail())?;
        Ok(response.into_inner())
    }

    /// The next event of a flow stream (`None` at its end).
    pub async fn next_flow(
        &self,
        stream: &mut tonic::Streaming<v1::FlowEvent>,
    ) -> Result<Option<v1::FlowEvent>, CliError> {
        stream.message().await.map_err(self.fail())
    }

    pub async fn whoami(&self) -> Result<Identity, CliError> {
        let response = self
            .cluster
            .clone()
            .who_am_i(v1::WhoAmIRequest {})
            .await
            .map_err(self.fail())?;
        Ok(response.into_inner().into())
    }
}
