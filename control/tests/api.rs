//! The control service over real TLS on loopback: admins applying objects,
//! RBAC, optimistic concurrency, nodes joining and watching their view,
//! certificates refused, and the state surviving a restart.

use std::time::Duration;

use sluice_api::v1::{
    self, cluster_client::ClusterClient, node_agent_client::NodeAgentClient,
    resources_client::ResourcesClient,
};
use sluice_control::{
    client_config::ClientConfig,
    server::{Control, Options},
};
use sluice_model::manifest;
use sluice_pki::{ClusterCa, mtls_channel, new_key_and_csr, pinned_join_channel};
use tonic::{Code, transport::Channel};

const T: Duration = Duration::from_secs(10);

/// A control service on 127.0.0.1 with its data in a temporary directory.
struct Running {
    data: tempfile::TempDir,
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn start() -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir")).await
    }

    async fn start_in(data: tempfile::TempDir) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let listen = listener.local_addr().expect("addr");
        let options = Options {
            listen,
            data_dir: data.path().join("state"),
            vip_cidr: "198.18.0.0/28".into(),
            advertise: vec!["127.0.0.1".into()],
            node_cert_ttl: Duration::from_secs(3600),
            user_cert_ttl: Duration::from_secs(3600),
            admin_config: data.path().join("admin.conf"),
            encryption_key_file: None,
            store: Default::default(),
        };
        // After a simulated crash, connection tasks of the previous instance
        // may hold its database for a moment.
        let deadline = tokio::time::Instant::now() + T;
        let control = loop {
            match Control::open(options.clone()) {
                Ok(control) => break control,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("open control: {e}"),
            }
        };
        let url = control.server_url();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            control
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Self {
            data,
            url,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving (as a crash would: no goodbye to clients).
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.stop.take();
        // Let the store's file handle go.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Running { data, .. } = self;
        data
    }

    fn admin(&self) -> ClientConfig {
        ClientConfig::load(&self.data.path().join("admin.conf")).expect("admin.conf")
    }

    /// An mTLS channel with `config`'s credentials to this instance (whose
    /// port changes across restarts in these tests).
    async fn channel(&self, config: &ClientConfig) -> Channel {
        mtls_channel(&self.url, &config.ca, &config.certificate, &config.key)
            .await
            .expect("mTLS channel")
    }

    async fn resources(&self) -> ResourcesClient<Channel> {
        ResourcesClient::new(self.channel(&self.admin()).await)
    }

    async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(&self.admin()).await)
    }

    /// A user with `groups`, signed through the API like `sluicectl user create`.
    async fn user(&self, name: &str, groups: &[&str]) -> ClientConfig {
        let key = new_key_and_csr(name).expect("csr");
        let resp = self
            .cluster()
            .await
            .create_user(v1::CreateUserRequest {
                name: name.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                csr_pem: key.csr_pem,
                ttl_seconds: 0,
            })
            .await
            .expect("create user")
            .into_inner();
        ClientConfig {
            server: self.url.clone(),
            ca: resp.ca_pem,
            certificate: resp.certificate_pem,
            key: key.key_pem,
        }
    }

    /// A node joined with a fresh token: (name, its mTLS config).
    async fn join(&self, node: &str) -> ClientConfig {
        let token = self
            .cluster()
            .await
            .create_join_token(v1::CreateJoinTokenRequest { ttl_seconds: 0 })
            .await
            .expect("token")
            .into_inner();
        self.join_with(node, &token.token, &token.ca_hash)
            .await
            .expect("join")
    }

    async fn join_with(
        &self,
        node: &str,
        token: &str,
        ca_hash: &str,
    ) -> Result<ClientConfig, tonic::Status> {
        let (channel, ca_pem) = pinned_join_channel(&self.url, ca_hash)
            .await
            .expect("pinned channel");
        let key = new_key_and_csr(node).expect("csr");
        let resp = NodeAgentClient::new(channel)
            .join(v1::JoinRequest {
                token: token.into(),
                node_name: node.into(),
                zone: "z1".into(),
                csr_pem: key.csr_pem,
            })
            .await?
            .into_inner();
        assert_eq!(resp.ca_pem, ca_pem);
        Ok(ClientConfig {
            server: self.url.clone(),
            ca: resp.ca_pem,
            certificate: resp.certificate_pem,
            key: key.key_pem,
        })
    }
}

fn objects(yaml: &str) -> Vec<v1::Object> {
    manifest::parse_objects("test.yaml", yaml)
        .expect("manifest")
        .iter()
        .map(v1::Object::from)
        .collect()
}

const WEB: &str = "kind: Service\nnamespace: shop\nname: web\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\nselector: { app: web }\n";

fn endpoint(name: &str, address: &str) -> String {
    format!(
        "kind: Endpoint\nnamespace: shop\nname: {name}\naddress: {address}\nlabels: {{ app: web }}\n"
    )
}

fn service_of(object: &v1::Object) -> &v1::Service {
    match &object.kind {
        Some(v1::object::Kind::Service(s)) => s,
        other => panic!("not a service: {other:?}"),
    }
}

async fn apply(
    client: &mut ResourcesClient<Channel>,
    yaml: &str,
) -> Result<Vec<v1::ApplyResult>, tonic::Status> {
    client
        .apply(v1::ApplyRequest {
            objects: objects(yaml),
            dry_run: false,
        })
        .await
        .map(|r| r.into_inner().results)
}

fn outcomes(results: &[v1::ApplyResult]) -> Vec<v1::ApplyOutcome> {
    results
        .iter()
        .map(|r| v1::ApplyOutcome::try_from(r.outcome).expect("outcome"))
        .collect()
}

#[tokio::test]
async fn apply_allocates_a_vip_and_is_idempotent() {
    let control = Running::start().await;
    let mut admin = control.resources().await;
    let first = apply(&mut admin, WEB).await.expect("apply");
    assert_eq!(outcomes(&first), [v1::ApplyOutcome::Created]);
    let vip = service_of(first[0].object.as_ref().expect("object"))
        .vip
        .clone();
    assert!(
        vip.starts_with("198.18.0."),
        "allocated from the pool: {vip}"
    );
    let again = apply(&mut admin, WEB).await.expect("apply");
    assert_eq!(outcomes(&again), [v1::ApplyOutcome::Unchanged]);
    assert_eq!(
        service_of(again[0].object.as_ref().expect("object")).vip,
        vip,
        "kept"
    );
    let changed = apply(&mut admin, &WEB.replace("8080", "9090"))
        .await
        .expect("apply");
    assert_eq!(outcomes(&changed), [v1::ApplyOutcome::Configured]);
    // Dry runs change nothing.
    let dry = admin
        .apply(v1::ApplyRequest {
            objects: objects(&WEB.replace("name: web", "name: api")),
            dry_run: true,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(outcomes(&dry.results), [v1::ApplyOutcome::Created]);
    let listed = admin
        .list(v1::ListRequest {
            kind: v1::Kind::Service as i32,
            namespace: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.objects.len(), 1);
}

#[tokio::test]
async fn bad_objects_and_bad_vips_are_refused_whole() {
    let control = Running::start().await;
    let mut admin = control.resources().await;
    // One bad object in a batch: nothing of the batch is applied.
    let batch = format!("{WEB}---\n{}", endpoint("e1", "0.0.0.0"));
    let err = apply(
        &mut admin,
        &batch.replace("address: 0.0.0.0", "address: 10.0.0.1"),
    )
    .await
    .map(|_| ());
    assert!(err.is_ok(), "valid batch: {err:?}");
    let status = admin
        .apply(v1::ApplyRequest {
            objects: vec![v1::Object {
                kind: Some(v1::object::Kind::Endpoint(v1::Endpoint {
                    meta: Some(v1::ObjectMeta {
                        namespace: "shop".into(),
                        name: "bad".into(),
                        ..Default::default()
                    }),
                    address: "not-an-address".into(),
                    ..Default::default()
                })),
            }],
            dry_run: false,
        })
        .await
        .expect_err("invalid address");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("address"), "{}", status.message());
    // A VIP outside the pool, then one already taken.
    let outside = WEB
        .replace("ports:", "vip: 10.1.2.3\nports:")
        .replace("name: web", "name: far");
    let status = apply(&mut admin, &outside)
        .await
        .expect_err("outside the pool");
    assert!(
        status
            .message()
            .contains("Service \"shop/far\": vip: VIP 10.1.2.3 is outside the pool"),
        "{}",
        status.message()
    );
    let taken = service_of(
        &admin
            .get(v1::GetRequest {
                kind: v1::Kind::Service as i32,
                namespace: "shop".into(),
                name: "web".into(),
            })
            .await
            .expect("get")
            .into_inner(),
    )
    .vip
    .clone();
    let clash = WEB
        .replace("ports:", &format!("vip: {taken}\nports:"))
        .replace("name: web", "name: twin");
    let status = apply(&mut admin, &clash).await.expect_err("taken");
    assert!(status.message().contains(&taken), "{}", status.message());
}

#[tokio::test]
async fn concurrent_conflicting_updates_one_wins() {
    let control = Running::start().await;
    let mut admin = control.resources().await;
    let created = apply(&mut admin, WEB).await.expect("apply");
    let version = service_of(created[0].object.as_ref().expect("object"))
        .meta
        .as_ref()
        .expect("meta")
        .resource_version;
    assert!(version > 0);
    let update = |port: &str| {
        let mut objs = objects(&WEB.replace("8080", port));
        if let Some(v1::object::Kind::Service(s)) = objs[0].kind.as_mut() {
            s.meta.as_mut().expect("meta").resource_version = version;
        }
        objs
    };
    let mut a = control.resources().await;
    let mut b = control.resources().await;
    let (ra, rb) = tokio::join!(
        a.apply(v1::ApplyRequest {
            objects: update("1111"),
            dry_run: false
        }),
        b.apply(v1::ApplyRequest {
            objects: update("2222"),
            dry_run: false
        }),
    );
    let (won, lost) = match (ra, rb) {
        (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
        other => panic!("exactly one must win: {other:?}"),
    };
    assert_eq!(lost.code(), Code::Aborted);
    assert!(lost.message().contains("conflict"), "{}", lost.message());
    assert_eq!(
        outcomes(&won.into_inner().results),
        [v1::ApplyOutcome::Configured]
    );
}

#[tokio::test]
async fn rbac_denies_by_default_and_names_the_missing_permission() {
    let control = Running::start().await;
    let viewer = control.user("bob", &["readers"]).await;
    let mut admin = control.resources().await;
    apply(&mut admin, WEB).await.expect("apply");
    let mut bob = ResourcesClient::new(control.channel(&viewer).await);
    let denied = bob
        .list(v1::ListRequest {
            kind: v1::Kind::Service as i32,
            namespace: "shop".into(),
        })
        .await
        .expect_err("no grant yet");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("`list services`"),
        "{}",
        denied.message()
    );
    // A viewer grant for the group.
    apply(
        &mut admin,
        "kind: Grant\nnamespace: shop\nname: readers\nsubject: { group: readers }\nrole: viewer\nscope: shop\n",
    )
    .await
    .expect("grant");
    let listed = bob
        .list(v1::ListRequest {
            kind: v1::Kind::Service as i32,
            namespace: "shop".into(),
        })
        .await
        .expect("viewer lists");
    assert_eq!(listed.into_inner().objects.len(), 1);
    let status = apply(&mut bob, &WEB.replace("8080", "9999"))
        .await
        .expect_err("a viewer cannot apply");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("`update services`"),
        "{}",
        status.message()
    );
    let mut cluster = ClusterClient::new(control.channel(&viewer).await);
    let status = cluster
        .create_join_token(v1::CreateJoinTokenRequest { ttl_seconds: 0 })
        .await
        .expect_err("nor create tokens");
    assert!(
        status.message().contains("`create tokens`"),
        "{}",
        status.message()
    );
    let me = cluster
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!((me.kind.as_str(), me.name.as_str()), ("user", "bob"));
    assert_eq!(me.groups, ["readers"]);
}

#[tokio::test]
async fn a_namespace_viewer_may_follow_its_services_flows_not_the_clusters() {
    let control = Running::start().await;
    let viewer = control.user("bob", &["readers"]).await;
    let mut admin = control.resources().await;
    apply(
        &mut admin,
        "kind: Grant\nnamespace: shop\nname: readers\nsubject: { group: readers }\nrole: viewer\nscope: shop\n",
    )
    .await
    .expect("grant");
    let mut bob = ClusterClient::new(control.channel(&viewer).await);
    let request = |service: &str| v1::WatchFlowsRequest {
        follow: false,
        service: service
            .split_once('/')
            .map(|(namespace, name)| v1::ObjectName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
        ..Default::default()
    };
    let whole = bob
        .watch_flows(request(""))
        .await
        .expect_err("the whole log is cluster-wide");
    assert_eq!(whole.code(), Code::PermissionDenied);
    assert!(
        whole.message().contains("`list nodes`"),
        "{}",
        whole.message()
    );
    bob.watch_flows(request("shop/web"))
        .await
        .expect("its namespace's service");
    let other = bob
        .watch_flows(request("bank/ledger"))
        .await
        .expect_err("another namespace");
    assert!(
        other.message().contains("`get services`"),
        "{}",
        other.message()
    );
    let bad = bob
        .watch_flows(v1::WatchFlowsRequest {
            kind: 99,
            ..request("shop/web")
        })
        .await
        .expect_err("an unknown kind");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("kind: unknown value 99"),
        "{}",
        bad.message()
    );
}

#[tokio::test]
async fn nodes_join_once_and_watch_their_view() {
    let control = Running::start().await;
    let mut admin = control.resources().await;
    apply(
        &mut admin,
        &format!("{WEB}---\n{}", endpoint("e1", "198.19.1.2")),
    )
    .await
    .expect("apply");
    let node = control.join("node-a").await;
    let mut agent = NodeAgentClient::new(control.channel(&node).await);
    let mut stream = agent
        .watch_view(v1::WatchViewRequest { since_version: 0 })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(T, stream.message())
        .await
        .expect("in time")
        .expect("stream")
        .expect("update");
    let mut view = sluice_model::view::View::default();
    view.apply(first.clone().try_into().expect("a valid update"));
    // Catch-up may come as replayed deltas or a snapshot: either way the
    // view holds the service with its endpoint.
    let mut version = first.version;
    while view.frontends.values().all(|f| f.backends.is_empty()) {
        let u = tokio::time::timeout(T, stream.message())
            .await
            .expect("in time")
            .expect("stream")
            .expect("update");
        view.apply(u.clone().try_into().expect("a valid update"));
        version = u.version;
    }
    assert_eq!(view.frontends.len(), 1);
    let f = view.frontends.values().next().expect("frontend");
    assert_eq!(
        (f.service.to_string().as_str(), f.target_port),
        ("shop/web", 8080)
    );
    assert_eq!(f.backends.len(), 1);
    // A new endpoint matching the selector arrives as one delta.
    apply(&mut admin, &endpoint("e2", "198.19.2.2"))
        .await
        .expect("apply");
    let delta = tokio::time::timeout(T, stream.message())
        .await
        .expect("in time")
        .expect("stream")
        .expect("update");
    assert!(!delta.snapshot);
    assert_eq!(delta.version, version + 1);
    assert_eq!(delta.upsert[0].backends.len(), 2);
    // Reporting back shows up in describe.
    agent
        .report_status(v1::ReportStatusRequest {
            applied_version: delta.version,
            counters: vec![],
            unhealthy: Default::default(),
            flows: Default::default(),
            policy_counters: Default::default(),
            flows_only: false,
            counters_changed_only: false,
            counters_gone: Vec::new(),
        })
        .await
        .expect("report");
    let described = admin
        .describe(v1::GetRequest {
            kind: v1::Kind::Service as i32,
            namespace: "shop".into(),
            name: "web".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.backends.len(), 2);
    assert_eq!(described.nodes.len(), 1);
    assert!(described.nodes[0].connected);
    assert_eq!(described.nodes[0].applied_version, delta.version);
    // A reconnect from the current version gets nothing to resend.
    let mut resumed = agent
        .watch_view(v1::WatchViewRequest {
            since_version: delta.version,
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resumed.message())
            .await
            .is_err(),
        "no full resend"
    );
}

#[tokio::test]
async fn tokens_are_single_use_and_expire() {
    let control = Running::start().await;
    // Long enough to outlive a loaded machine: expiry is in whole seconds, so
    // a 1-second token may expire at once.
    let token = control
        .cluster()
        .await
        .create_join_token(v1::CreateJoinTokenRequest { ttl_seconds: 60 })
        .await
        .expect("token")
        .into_inner();
    control
        .join_with("n1", &token.token, &token.ca_hash)
        .await
        .expect("first use");
    let reused = control
        .join_with("n2", &token.token, &token.ca_hash)
        .await
        .expect_err("second use");
    assert_eq!(reused.code(), Code::Unauthenticated);
    assert!(
        reused.message().contains("already used"),
        "{}",
        reused.message()
    );
    let short = control
        .cluster()
        .await
        .create_join_token(v1::CreateJoinTokenRequest { ttl_seconds: 1 })
        .await
        .expect("token")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = control
        .join_with("n3", &short.token, &short.ca_hash)
        .await
        .expect_err("expired");
    assert!(
        expired.message().contains("expired"),
        "{}",
        expired.message()
    );
    let forged = control
        .join_with("n4", "abcdef.0123456789abcdef", &token.ca_hash)
        .await
        .expect_err("unknown");
    assert!(
        forged.message().contains("unknown token"),
        "{}",
        forged.message()
    );
    // A pin that is not this cluster's CA refuses the server before any token is sent.
    let wrong_pin = format!("sha256:{}", "0".repeat(64));
    assert!(pinned_join_channel(&control.url, &wrong_pin).await.is_err());
}

#[tokio::test]
async fn removed_nodes_and_foreign_certificates_are_refused() {
    let control = Running::start().await;
    let node = control.join("node-a").await;
    let mut agent = NodeAgentClient::new(control.channel(&node).await);
    let mut stream = agent
        .watch_view(v1::WatchViewRequest { since_version: 0 })
        .await
        .expect("watch")
        .into_inner();
    let _ = tokio::time::timeout(T, stream.message()).await;
    control
        .cluster()
        .await
        .remove_node(v1::RemoveNodeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("remove");
    // The open stream ends with the reason...
    let ended = loop {
        match tokio::time::timeout(T, stream.message())
            .await
            .expect("in time")
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without a reason"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied);
    // ...and the certificate no longer works.
    let status = agent
        .report_status(v1::ReportStatusRequest::default())
        .await
        .expect_err("removed");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("not a member"),
        "{}",
        status.message()
    );

    // A certificate from another CA (forged, same name) fails the handshake.
    let other = ClusterCa::generate().expect("ca");
    let key = new_key_and_csr("node-a").expect("csr");
    let forged = other
        .sign_node(&key.csr_pem, "node-a", Duration::from_secs(3600))
        .expect("sign");
    let admin = control.admin();
    let channel = mtls_channel(&control.url, &admin.ca, &forged.pem, &key.key_pem).await;
    let refused = match channel {
        Err(_) => true,
        Ok(ch) => NodeAgentClient::new(ch)
            .report_status(v1::ReportStatusRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a foreign certificate must not get through");
}

#[tokio::test]
async fn plain_text_is_refused() {
    let control = Running::start().await;
    let plain = control.url.replace("https://", "http://");
    let result = async {
        let channel = Channel::from_shared(plain)?
            .connect_timeout(T)
            .connect()
            .await?;
        let mut client = ClusterClient::new(channel);
        client.who_am_i(v1::WhoAmIRequest {}).await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    assert!(result.is_err(), "no plain-text gRPC");
}

#[tokio::test]
async fn state_survives_a_restart_and_agents_resume_without_a_full_resend() {
    let control = Running::start().await;
    let mut admin = control.resources().await;
    let created = apply(
        &mut admin,
        &format!("{WEB}---\n{}", endpoint("e1", "198.19.1.2")),
    )
    .await
    .expect("apply");
    let vip = service_of(created[0].object.as_ref().expect("object"))
        .vip
        .clone();
    let node = control.join("node-a").await;
    let mut agent = NodeAgentClient::new(control.channel(&node).await);
    let mut stream = agent
        .watch_view(v1::WatchViewRequest { since_version: 0 })
        .await
        .expect("watch")
        .into_inner();
    let mut version = 0;
    while let Ok(Ok(Some(u))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        version = u.version;
    }
    assert!(version > 0);

    // Restart (abruptly) on the same data; the agent's connection goes with it.
    drop((stream, agent, admin));
    let data = control.stop().await;
    let control = Running::start_in(data).await;
    let mut admin = control.resources().await;
    let svc = admin
        .get(v1::GetRequest {
            kind: v1::Kind::Service as i32,
            namespace: "shop".into(),
            name: "web".into(),
        })
        .await
        .expect("still there")
        .into_inner();
    assert_eq!(service_of(&svc).vip, vip);
    // The node's certificate is still valid, and resuming at its version
    // sends nothing...
    let node = ClientConfig {
        server: control.url.clone(),
        ..node
    };
    let mut agent = NodeAgentClient::new(control.channel(&node).await);
    let mut resumed = agent
        .watch_view(v1::WatchViewRequest {
            since_version: version,
        })
        .await
        .expect("watch after restart")
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resumed.message())
            .await
            .is_err(),
        "nothing missed, nothing resent"
    );
    // ...and the next change arrives as a delta from there.
    apply(&mut admin, &endpoint("e2", "198.19.2.2"))
        .await
        .expect("apply");
    let delta = tokio::time::timeout(T, resumed.message())
        .await
        .expect("in time")
        .expect("stream")
        .expect("update");
    assert!(!delta.snapshot);
    assert_eq!(delta.version, version + 1);
}
