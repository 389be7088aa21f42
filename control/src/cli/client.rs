//! The control service's admin API (`Resources`, `Cluster`) over mutual TLS,
//! with answers converted by [`super::model`] and failures turned into
//! [`CliError`]. Every call goes through [`Client::call`].

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use sluice_api::MAX_MESSAGE_BYTES;
use sluice_api::v1::{self, cluster_client::ClusterClient, resources_client::ResourcesClient};
use sluice_model::ObjectKind;
use sluice_model::observe::{FlowEvent, FlowFilter};
use tonic::transport::Channel;

use super::error::CliError;
use super::model::{Applied, Described, Identity, NodeInfo, Stored, stored};
use crate::client_config::ClientConfig;

pub struct Client {
    server: String,
    resources: ResourcesClient<Channel>,
    cluster: ClusterClient<Channel>,
}

/// The two services' clients, for one call.
pub struct Api {
    pub resources: ResourcesClient<Channel>,
    pub cluster: ClusterClient<Channel>,
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
        // `server` may list the replicas, comma-separated: the first that
        // answers serves this command.
        let (index, channel) = sluice_pki::mtls_channel_any(server, 0, ca, certificate, key)
            .await
            .map_err(|source| CliError::Connect {
                config: path.to_owned(),
                source,
            })?;
        let server = sluice_pki::endpoint_list(server)[index].to_owned();
        Ok(Self {
            server,
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

    /// Makes one call; a refusal becomes a [`CliError`] naming the server.
    pub async fn call<T, F>(&self, rpc: impl FnOnce(Api) -> F) -> Result<T, CliError>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let api = Api {
            resources: self.resources.clone(),
            cluster: self.cluster.clone(),
        };
        rpc(api)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| CliError::api(&self.server, status))
    }

    pub async fn get(
        &self,
        kind: ObjectKind,
        namespace: &str,
        name: &str,
    ) -> Result<Stored, CliError> {
        let request = get_request(v1::Kind::from(kind), namespace, name);
        stored(
            self.call(|mut api| async move { api.resources.get(request).await })
                .await?,
        )
    }

    /// `namespace` `None`: every namespace the caller may list.
    pub async fn list(
        &self,
        kind: ObjectKind,
        namespace: Option<&str>,
    ) -> Result<Vec<Stored>, CliError> {
        let request = list_request(v1::Kind::from(kind), namespace);
        let response = self
            .call(|mut api| async move { api.resources.list(request).await })
            .await?;
        response.objects.into_iter().map(stored).collect()
    }

    pub async fn get_node(&self, name: &str) -> Result<NodeInfo, CliError> {
        let request = get_request(v1::Kind::Node, "", name);
        let object = self
            .call(|mut api| async move { api.resources.get(request).await })
            .await?;
        NodeInfo::try_from(object)
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeInfo>, CliError> {
        let request = list_request(v1::Kind::Node, None);
        let response = self
            .call(|mut api| async move { api.resources.list(request).await })
            .await?;
        response
            .objects
            .into_iter()
            .map(NodeInfo::try_from)
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
            .call(|mut api| async move { api.resources.apply(request).await })
            .await?;
        response
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
        self.call(|mut api| async move { api.resources.delete(request).await })
            .await?;
        Ok(())
    }

    pub async fn describe_service(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Described, CliError> {
        let request = get_request(v1::Kind::Service, namespace, name);
        let response = self
            .call(|mut api| async move { api.resources.describe(request).await })
            .await?;
        Described::try_from(response)
    }

    pub async fn create_join_token(
        &self,
        ttl: Duration,
    ) -> Result<v1::CreateJoinTokenResponse, CliError> {
        let request = v1::CreateJoinTokenRequest {
            ttl_seconds: ttl.as_secs(),
        };
        self.call(|mut api| async move { api.cluster.create_join_token(request).await })
            .await
    }

    pub async fn create_dashboard_token(
        &self,
        ttl: Duration,
    ) -> Result<v1::CreateDashboardTokenResponse, CliError> {
        let request = v1::CreateDashboardTokenRequest {
            ttl_seconds: ttl.as_secs(),
        };
        self.call(|mut api| async move { api.cluster.create_dashboard_token(request).await })
            .await
    }

    pub async fn create_user(
        &self,
        request: v1::CreateUserRequest,
    ) -> Result<v1::CreateUserResponse, CliError> {
        self.call(|mut api| async move { api.cluster.create_user(request).await })
            .await
    }

    pub async fn remove_node(&self, name: &str) -> Result<(), CliError> {
        let request = v1::RemoveNodeRequest {
            name: name.to_owned(),
        };
        self.call(|mut api| async move { api.cluster.remove_node(request).await })
            .await?;
        Ok(())
    }

    /// The flow log: the recent events, then (with `follow`) each new one.
    pub async fn watch_flows(
        &self,
        filter: &FlowFilter,
        follow: bool,
    ) -> Result<tonic::Streaming<v1::FlowEvent>, CliError> {
        let request = filter.to_request(follow);
        self.call(|mut api| async move { api.cluster.watch_flows(request).await })
            .await
    }

    /// The next event of a flow stream (`None` at its end).
    pub async fn next_flow(
        &self,
        stream: &mut tonic::Streaming<v1::FlowEvent>,
    ) -> Result<Option<FlowEvent>, CliError> {
        let Some(event) = stream
            .message()
            .await
            .map_err(|status| CliError::api(&self.server, status))?
        else {
            return Ok(None);
        };
        FlowEvent::try_from(event)
            .map(Some)
            .map_err(|source| CliError::BadResponse {
                what: "flow event",
                source: Box::new(source),
            })
    }

    pub async fn whoami(&self) -> Result<Identity, CliError> {
        let response = self
            .call(|mut api| async move { api.cluster.who_am_i(v1::WhoAmIRequest {}).await })
            .await?;
        Ok(response.into())
    }
}

fn get_request(kind: v1::Kind, namespace: &str, name: &str) -> v1::GetRequest {
    v1::GetRequest {
        kind: kind.into(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn list_request(kind: v1::Kind, namespace: Option<&str>) -> v1::ListRequest {
    v1::ListRequest {
        kind: kind.into(),
        namespace: namespace.unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::Control;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_config_listing_replicas_connects_to_the_one_that_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let serving = tokio::spawn(control.clone().serve(listener, std::future::pending()));
        let admin = ClientConfig::load(&dir.path().join("admin.conf")).expect("admin.conf");
        let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_port = dead.local_addr().expect("addr").port();
        drop(dead);
        let config = ClientConfig {
            server: format!("https://127.0.0.1:{dead_port},https://127.0.0.1:{port}"),
            ..admin
        };
        let client = Client::connect(Path::new("replicas.conf"), &config)
            .await
            .expect("the second replica answers");
        assert_eq!(client.server, format!("https://127.0.0.1:{port}"));
        let services = client.list(ObjectKind::Service, None).await.expect("list");
        assert!(services.is_empty());
        serving.abort();
    }
}
