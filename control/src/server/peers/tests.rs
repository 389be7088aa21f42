//! Three replicas on one etcd, each serving its API on loopback: what a node
//! reports to one replica counts on all of them.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sluice_api::v1;
use sluice_model::Node;

use super::super::testkit::{apply, eventually, key_file};
use super::super::{Control, Options, StoreConfig};
use crate::testing::EtcdCluster;

struct Replica {
    control: Arc<Control>,
    serving: tokio::task::JoinHandle<()>,
}

async fn replica(dir: &std::path::Path, cluster: &EtcdCluster, name: &str) -> Replica {
    let control = Control::open(Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join(name),
        vip_cidr: "198.18.0.0/24".into(),
        advertise: vec![],
        node_cert_ttl: Duration::from_secs(3600),
        user_cert_ttl: Duration::from_secs(3600),
        admin_config: dir.join(format!("{name}-admin.conf")),
        encryption_key_file: Some(dir.join("kek")),
        store: StoreConfig::Etcd {
            endpoints: cluster.endpoints(),
            tls: None,
            prefix: "/peers-test/".into(),
        },
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = control.clone();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, std::future::pending::<()>())
            .await
            .unwrap();
    });
    Replica { control, serving }
}

const CHECKED: &str = "\
kind: Service
name: web
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
healthCheck: { tcp: {}, intervalMs: 200, timeoutMs: 100 }
backends: [{ address: 198.19.0.1 }, { address: 198.19.0.2 }]
";

fn says_down(address: [u8; 4]) -> v1::ReportStatusRequest {
    v1::ReportStatusRequest {
        applied_version: 1,
        unhealthy: vec![v1::BackendRef {
            service: Some(v1::ObjectName {
                namespace: "default".into(),
                name: "web".into(),
            }),
            address: address.to_vec(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probers_on_different_replicas_decide_together_and_every_replica_shows_every_node() {
    let cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path());
    let replicas = [
        replica(dir.path(), &cluster, "a").await,
        replica(dir.path(), &cluster, "b").await,
        replica(dir.path(), &cluster, "c").await,
    ];
    let [a, b, c] = [0, 1, 2].map(|i| replicas[i].control.clone());

    let nodes = ["n1", "n2", "n3"];
    a.mutate(false, move |draft| {
        for name in nodes {
            draft.put_node(
                Node {
                    name: name.into(),
                    zone: None,
                    serials: vec!["01".into()],
                    certificate_expires: SystemTime::now() + Duration::from_secs(3600),
                    joined_at: SystemTime::now(),
                },
                crate::store::Expect::Absent,
            );
        }
        Ok(())
    })
    .await
    .unwrap();
    // A certificate renews at any replica (once it has the node, as a
    // joined node's replicas all do); the others see the new serial.
    eventually("C has the nodes", || c.state().nodes.contains_key("n1")).await;
    let keys = sluice_pki::new_key_and_csr("n1").unwrap();
    c.renew("n1".into(), &keys.csr_pem).await.unwrap();
    eventually("A has n1's renewed certificate", || {
        a.state()
            .nodes
            .get("n1")
            .is_some_and(|n| n.object.serials.len() == 2)
    })
    .await;

    apply(&a, CHECKED).await;
    for r in [&b, &c] {
        eventually("every replica has the view", || {
            r.state().view == a.state().view
        })
        .await;
    }
    let probers = a.state().view.frontends.values().next().unwrap().backends[0]
        .probers
        .clone();
    assert_eq!(probers.len(), 3, "all three nodes probe: {probers:?}");

    // Each node connected to another replica.
    let _n1 = a.watch("n1".into(), 0);
    let _n2 = b.watch("n2".into(), 0);
    let _n3 = c.watch("n3".into(), 0);
    for r in [&a, &b, &c] {
        eventually("every replica sees every node connected", || {
            nodes.iter().all(|n| r.node_live(n).watchers > 0)
        })
        .await;
    }

    // One prober of three finds .1 down: no majority, anywhere.
    a.report("n1", says_down([198, 19, 0, 1]));
    eventually("A has n1's vote", || {
        !a.votes()["n1"].unhealthy.is_empty() && !c.votes()["n1"].unhealthy.is_empty()
    })
    .await;
    for r in [&a, &b, &c] {
        assert!(
            r.unhealthy().is_empty(),
            "one vote of three decides nothing"
        );
    }
    // A second one, on another replica: the majority holds on all three.
    b.report("n2", says_down([198, 19, 0, 1]));
    for r in [&a, &b, &c] {
        eventually("every replica takes .1 out", || {
            r.unhealthy()
                .iter()
                .map(|b| b.address.to_string())
                .eq(["198.19.0.1"])
        })
        .await;
    }

    // The flow log and node status are the cluster's, from any replica.
    let flow = v1::FlowEvent {
        kind: v1::FlowKind::New as i32,
        verdict: v1::FlowVerdict::Forwarded as i32,
        protocol: v1::Protocol::Tcp as i32,
        client: Some(v1::SocketAddress {
            address: vec![198, 18, 1, 7],
            port: 40000,
        }),
        vip: Some(v1::SocketAddress {
            address: vec![198, 18, 0, 1],
            port: 80,
        }),
        ..Default::default()
    };
    c.report(
        "n3",
        v1::ReportStatusRequest {
            applied_version: 7,
            flows: vec![flow],
            ..Default::default()
        },
    );
    eventually("A's flow log has n3's flow", || {
        a.flows
            .recent(&Default::default(), 10)
            .iter()
            .any(|e| e.node == "n3" && e.client.port() == 40000)
    })
    .await;
    assert_eq!(a.node_live("n3").applied_version, 7);

    // n2 leaves B (it would reconnect to another replica): it has no vote
    // any more, anywhere, so one vote of two is no majority.
    drop(_n2);
    eventually("A sees n2 gone", || a.node_live("n2").watchers == 0).await;
    for r in [&a, &b, &c] {
        eventually("every replica puts .1 back", || r.unhealthy().is_empty()).await;
    }
    for r in replicas {
        r.serving.abort();
    }
}
