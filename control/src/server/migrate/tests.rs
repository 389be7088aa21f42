#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, SystemTime};

use sluice_model::{Node, Service};

use super::*;
use crate::sealing;
use crate::server::testkit::apply;
use crate::server::{Control, Options, StoreConfig};
use crate::store::{EtcdStore, RedbStore};
use crate::testing::EtcdCluster;

fn options(dir: &std::path::Path, store: StoreConfig) -> Options {
    Options {
        listen: "127.0.0.1:7443".parse().unwrap(),
        data_dir: dir.join("data"),
        vip_cidr: "198.18.0.0/24".into(),
        advertise: vec![],
        node_cert_ttl: Duration::from_secs(3600),
        user_cert_ttl: Duration::from_secs(3600),
        admin_config: dir.join("admin.conf"),
        encryption_key_file: Some(dir.join("kek")),
        store,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_machine_cluster_moves_into_etcd_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    std::fs::write(&kek, sealing::new_key_line().unwrap()).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A cluster on the embedded store: services (VIPs allocated, one
    // updated), endpoints, a node, view history.
    let embedded = Control::open(options(dir.path(), StoreConfig::Embedded)).unwrap();
    let mut text = String::new();
    for i in 0..150 {
        text.push_str(&format!(
            "---\nkind: Service\nname: svc-{i}\nports: [{{ port: 80, protocol: TCP }}]\nselector: {{ app: a{i} }}\n---\nkind: Endpoint\nname: ep-{i}\nlabels: {{ app: a{i} }}\naddress: 198.19.0.{}\n",
            i + 1
        ));
    }
    apply(&embedded, &text).await;
    apply(
        &embedded,
        "kind: Endpoint\nname: ep-7\nlabels: { app: a7 }\naddress: 198.19.1.7\n",
    )
    .await;
    let node = Node {
        name: "node-1".into(),
        zone: Some("z1".into()),
        serials: vec!["0abc".into()],
        certificate_expires: SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        joined_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
    };
    embedded
        .mutate(false, move |draft| {
            draft.put_node(node.clone(), crate::store::Expect::Absent);
            Ok(())
        })
        .await
        .unwrap();
    let before = embedded.state();
    let pin = embedded.ca().pin();
    drop(embedded);

    let cluster = EtcdCluster::start(3).unwrap();
    let etcd = StoreConfig::Etcd {
        endpoints: cluster.endpoints(),
        tls: None,
        prefix: "/migrated/".into(),
    };
    let from = RedbStore::open(dir.path().join("data/state.redb")).unwrap();
    let to = EtcdStore::connect(&cluster.endpoints(), None, "/migrated/").unwrap();
    let copied = migrate(&from, &to).unwrap();
    assert!(copied > 300, "{copied}");
    // Once there, never twice.
    let again = migrate(&from, &to).unwrap_err();
    assert!(matches!(again, MigrateError::NotEmpty { .. }), "{again}");
    drop((from, to));

    let replica = Control::open(options(dir.path(), etcd)).unwrap();
    let after = replica.state();
    assert_eq!(
        replica.ca().pin(),
        pin,
        "the same CA: every certificate stays valid"
    );
    let vips = |state: &crate::server::state::State| -> Vec<_> {
        state
            .objects
            .all::<Service>()
            .map(|s| (s.name.clone(), s.vip))
            .collect()
    };
    assert_eq!(vips(&after), vips(&before));
    assert_eq!(after.nodes["node-1"].object, before.nodes["node-1"].object);
    assert_eq!(after.view.version, before.view.version);
    assert_eq!(after.view.frontends, before.view.frontends);
    assert_eq!(
        after.history.since(1, after.view.version).map(|u| u.len()),
        before
            .history
            .since(1, before.view.version)
            .map(|u| u.len()),
        "agents resume from the same history"
    );
    // Resource versions keep their order: taken in the order of the old
    // versions (ties by name, as they were loaded and copied), the new ones
    // never go down, and the endpoint written last is still the newest.
    let versions = |state: &crate::server::state::State| -> std::collections::BTreeMap<_, _> {
        state
            .objects
            .table::<sluice_model::Endpoint>()
            .iter()
            .map(|(k, v)| (k.clone(), v.version))
            .collect()
    };
    let (old, new) = (versions(&before), versions(&after));
    let mut order: Vec<_> = old.iter().map(|(k, v)| (*v, k.clone())).collect();
    order.sort();
    let migrated: Vec<u64> = order.iter().map(|(_, k)| new[k]).collect();
    assert!(migrated.windows(2).all(|w| w[0] <= w[1]), "{migrated:?}");
    let last = |v: &std::collections::BTreeMap<(String, String), u64>| {
        v.iter().max_by_key(|(_, v)| **v).map(|(k, _)| k.clone())
    };
    assert_eq!(last(&old), last(&new));
    assert_eq!(last(&new).map(|k| k.1), Some("ep-7".to_owned()));
}

#[test]
fn batches_stay_under_the_limit_and_cut_between_versions() {
    let entries: Vec<(Key, Versioned)> = (0..350u64)
        .map(|i| {
            (
                Key::cluster("t", format!("k{i:03}")),
                Versioned {
                    // Versions in runs of 30.
                    version: 2 + i / 30,
                    value: Vec::new(),
                },
            )
        })
        .collect();
    let batches = batches(&entries);
    assert_eq!(batches.iter().map(|b| b.len()).sum::<usize>(), 350);
    for b in &batches {
        assert!(b.len() <= BATCH);
    }
    // Every cut but the last falls between two versions.
    let mut seen = 0;
    for b in &batches[..batches.len() - 1] {
        seen += b.len();
        assert_ne!(entries[seen - 1].1.version, entries[seen].1.version);
    }
    // One version larger than a batch still goes, in several.
    let one: Vec<(Key, Versioned)> = (0..250u64)
        .map(|i| {
            (
                Key::cluster("t", format!("k{i:03}")),
                Versioned {
                    version: 2,
                    value: Vec::new(),
                },
            )
        })
        .collect();
    assert_eq!(batches_of(&one), [100, 100, 50]);
}

fn batches_of(entries: &[(Key, Versioned)]) -> Vec<usize> {
    batches(entries).iter().map(|b| b.len()).collect()
}
