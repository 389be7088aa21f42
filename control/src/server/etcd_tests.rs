//! The control service on a 3-member etcd cluster (`--store etcd://…`):
//! what it applies survives its restart, a second replica opening the same
//! store shares the CA and the state, the CA's key is sealed in etcd, and
//! without a key file it refuses to start.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::sync::Arc;
use std::time::Duration;

use sluice_api::v1;
use sluice_model::{Endpoint, Service, manifest};

use super::testkit::{apply, eventually, key_file};
use super::{Control, Options, StartError, StoreConfig};
use crate::rbac::{ADMIN_GROUP, Caller};
use crate::sealing::{self, Keyring};
use crate::store::{EtcdStore, Key, StoreExt as _};
use crate::testing::EtcdCluster;

fn options(dir: &std::path::Path, cluster: &EtcdCluster, replica: &str) -> Options {
    Options {
        listen: "127.0.0.1:7443".parse().unwrap(),
        data_dir: dir.join(replica),
        vip_cidr: "198.18.0.0/24".into(),
        advertise: vec![],
        node_cert_ttl: Duration::from_secs(3600),
        user_cert_ttl: Duration::from_secs(3600),
        admin_config: dir.join(format!("{replica}-admin.conf")),
        encryption_key_file: Some(dir.join("kek")),
        store: StoreConfig::Etcd {
            endpoints: cluster.endpoints(),
            tls: None,
            prefix: "/sluice-test/".into(),
        },
    }
}

const WEB: &str = "\
kind: Service
name: web
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
selector: { app: web }
---
kind: Endpoint
name: web-1
labels: { app: web }
address: 198.19.0.1
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_ca_live_in_etcd_shared_by_replicas_and_sealed() {
    let cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path());

    let first = Control::open(options(dir.path(), &cluster, "a")).unwrap();
    apply(&first, WEB).await;
    let pin = first.ca().pin();
    let key_pem = first.ca().key_pem();
    let vip = first
        .state()
        .objects
        .get::<Service>("default", "web")
        .unwrap()
        .object
        .vip;
    let view_version = first.state().view.version;
    assert_eq!(first.state().view.frontends.len(), 1);
    drop(first);

    // Another replica (or the same one restarted) on the same etcd.
    let second = Control::open(options(dir.path(), &cluster, "b")).unwrap();
    assert_eq!(second.ca().pin(), pin, "one CA for all replicas");
    let state = second.state();
    assert_eq!(
        state
            .objects
            .get::<Service>("default", "web")
            .unwrap()
            .object
            .vip,
        vip
    );
    assert!(state.objects.get::<Endpoint>("default", "web-1").is_some());
    assert_eq!(state.view.version, view_version);
    assert_eq!(state.view.frontends.len(), 1);
    // Each replica writes its own admin credentials, outside any data dir.
    assert!(dir.path().join("b-admin.conf").exists());
    // The embedded store is not used: no data directory was made.
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());

    // In etcd the CA's key is sealed, and opens with the key file.
    let raw = EtcdStore::connect(&cluster.endpoints(), None, "/sluice-test/").unwrap();
    let (record, _) = raw.read(|tx| tx.get(&Key::cluster("pki", "ca"))).unwrap();
    let value = record.unwrap().value;
    assert!(sealing::is_sealed(&value));
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let leaked = value
        .windows(24)
        .any(|w| body.as_bytes().windows(24).any(|b| b == w));
    assert!(!leaked && !value.windows(11).any(|w| w == b"PRIVATE KEY"));
    let keyring = Keyring::load(&dir.path().join("kek")).unwrap();
    assert!(keyring.open("pki/ca", &value).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_file_an_etcd_replica_refuses_to_start() {
    let cluster = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), &cluster, "a");
    opts.encryption_key_file = None;
    let error = Control::open(opts).err().unwrap();
    assert!(matches!(error, StartError::KeyFileRequired), "{error}");
    assert!(
        error.to_string().contains("--encryption-key-file"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_each_others_writes_and_concurrent_creates_get_distinct_vips() {
    let cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path());
    let a = Control::open(options(dir.path(), &cluster, "a")).unwrap();
    let b = Control::open(options(dir.path(), &cluster, "b")).unwrap();
    a.follow_store();
    b.follow_store();
    let mut watching_b = b.updates.subscribe();

    // A write through A reaches B's state, view and watchers, same version.
    apply(
        &a,
        "kind: Service\nname: first\nports: [{ port: 80, protocol: TCP }]\nbackends: [{ address: 198.19.9.9 }]\n",
    )
    .await;
    eventually("B has A's first view", || b.state().view == a.state().view).await;
    let _ = watching_b.recv().await;
    let before = b.state().view.version;
    assert!(before > 0);
    apply(&a, WEB).await;
    eventually("B has A's service", || {
        b.state().objects.get::<Service>("default", "web").is_some()
    })
    .await;
    eventually("B's view is A's", || b.state().view == a.state().view).await;
    let update = tokio::time::timeout(Duration::from_secs(5), watching_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(update.version, a.state().view.version);
    // An agent that watched A and resumes on B from the version it had
    // gets only what it missed, not the whole view again.
    let missed = b.state().history.since(before, b.state().view.version);
    assert_eq!(missed.map(|m| m.len()), Some(1));

    // Both replicas create services at once, without VIPs: every create
    // succeeds (a replica that raced drafts again on fresh state) and no
    // VIP is given twice.
    let create = |control: Arc<Control>, side: &'static str| async move {
        for i in 0..10 {
            let text = format!(
                "kind: Service\nname: {side}-{i}\nports: [{{ port: 80, protocol: TCP }}]\nselector: {{ app: {side} }}\n"
            );
            apply(&control, &text).await;
        }
    };
    let (x, y) = tokio::join!(
        tokio::spawn(create(a.clone(), "left")),
        tokio::spawn(create(b.clone(), "right"))
    );
    x.unwrap();
    y.unwrap();
    eventually("both replicas have all 22 services", || {
        a.state().objects.count(sluice_model::ObjectKind::Service) == 22
            && b.state().objects.count(sluice_model::ObjectKind::Service) == 22
    })
    .await;
    let vips: std::collections::BTreeSet<_> =
        a.state().objects.all::<Service>().map(|s| s.vip).collect();
    assert_eq!(vips.len(), 22, "no VIP given twice");
    eventually("one view on both", || b.state().view == a.state().view).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_with_one_member_down_and_fail_unavailable_without_a_quorum() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path());
    let control = Control::open(options(dir.path(), &cluster, "a")).unwrap();
    let admin = Caller {
        name: "admin".into(),
        groups: vec![ADMIN_GROUP.into()],
    };
    let service = |name: &str| -> Vec<v1::Object> {
        let text = format!(
            "kind: Service\nname: {name}\nports: [{{ port: 80, protocol: TCP }}]\nbackends: [{{ address: 198.19.0.1 }}]\n"
        );
        manifest::parse_objects("t.yaml", &text)
            .unwrap()
            .iter()
            .map(v1::Object::from)
            .collect()
    };

    cluster.kill(0).unwrap();
    control
        .apply(&admin, service("one-down"), false)
        .await
        .expect("a majority is enough");

    cluster.kill(1).unwrap();
    let error = control
        .apply(&admin, service("no-quorum"), false)
        .await
        .expect_err("no majority, no write");
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("etcd"), "{}", status.message());
    assert!(
        control
            .state()
            .objects
            .get::<Service>("default", "no-quorum")
            .is_none(),
        "nothing half-applied"
    );

    // The quorum back, everything resumes.
    cluster.revive().unwrap();
    let mut done = false;
    for _ in 0..50 {
        if control.apply(&admin, service("after"), false).await.is_ok() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(done, "writes resume once the quorum is back");
    assert!(
        control
            .state()
            .objects
            .get::<Service>("default", "one-down")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_larger_than_an_etcd_transaction_is_refused_saying_why() {
    let cluster = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path());
    let mut opts = options(dir.path(), &cluster, "a");
    opts.vip_cidr = "198.18.0.0/16".into();
    let control = Control::open(opts).unwrap();
    let admin = Caller {
        name: "admin".into(),
        groups: vec![ADMIN_GROUP.into()],
    };
    // More objects than the test clusters' --max-txn-ops (1024).
    let mut text = String::new();
    for i in 0..1100 {
        text.push_str(&format!(
            "---\nkind: Service\nname: s{i}\nports: [{{ port: 80, protocol: TCP }}]\nbackends: [{{ address: 198.19.0.1 }}]\n"
        ));
    }
    let objects = manifest::parse_objects("big.yaml", &text)
        .unwrap()
        .iter()
        .map(v1::Object::from)
        .collect();
    let error = control
        .apply(&admin, objects, false)
        .await
        .expect_err("too large");
    let status = tonic::Status::from(error);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-txn-ops"),
        "{}",
        status.message()
    );
    assert_eq!(
        control
            .state()
            .objects
            .count(sluice_model::ObjectKind::Service),
        0
    );
}
