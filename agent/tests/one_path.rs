//! One desired-state path: for random valid manifests, a standalone agent
//! and a node of a cluster compute the identical view and the identical map
//! plan.
//!
//! The standalone side reads the manifest as `sluice-agent --manifest` does
//! (`manifest::parse` → `View::of_manifest`). The cluster side takes the
//! way `sluicectl apply` and the control service take: the control-mode
//! parser, the API message, a real control service (in-process, its redb
//! store in a temporary directory) applying and deleting, the view it
//! computes, the watch stream's encoding (a snapshot, then the changes from
//! its history, through protobuf bytes) and the agent's decoding. After the
//! control service restarts from its store, its view is still the same.
//! Both sides then run `reconcile::desired` and `reconcile::plan` for the
//! same node, from the same map state: first from empty maps, then from the
//! maps the first manifest left to a second manifest that changes, adds and
//! removes services.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::{fmt::Write as _, sync::Arc, time::Duration};

use proptest::{prelude::*, sample::subsequence};
use prost::Message as _;
use sluice_agent::reconcile::{self, Allocator, Naming, Node, State};
use sluice_api::v1;
use sluice_control::{
    rbac::{ADMIN_GROUP, Caller},
    server::{Control, Options},
};
use sluice_model::{
    manifest::{self, Manifest},
    service::Service,
    view::{View, ViewUpdate},
};

/// Services are named `svc-<i>`; the same index keeps its VIP, so that a
/// second manifest changes a service rather than moving addresses around.
const SERVICES: usize = 5;

#[derive(Clone, Debug)]
struct Port {
    port: u16,
    udp: bool,
    target: Option<u16>,
}

#[derive(Clone, Debug)]
struct Backend {
    host: u8,
    weight: Option<u32>,
    draining: bool,
    version: Option<&'static str>,
}

#[derive(Clone, Debug)]
enum Probe {
    Tcp,
    Http,
}

#[derive(Clone, Debug)]
struct HealthCheck {
    probe: Probe,
    interval_ms: Option<u32>,
    thresholds: Option<(u32, u32)>,
    fail_open: Option<bool>,
}

#[derive(Clone, Debug)]
struct ServiceCase {
    index: usize,
    namespace: Option<&'static str>,
    ports: Vec<Port>,
    algorithm: Option<&'static str>,
    maglev_table_size: Option<u32>,
    backends: Vec<Backend>,
    health_check: Option<HealthCheck>,
    affinity_seconds: Option<u32>,
    rollout: Option<(&'static str, u32)>,
    drain_seconds: Option<u32>,
}

fn port() -> impl Strategy<Value = Port> {
    (
        prop::sample::select(vec![53u16, 80, 443, 8080]),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![80u16, 8080, 9000])),
    )
        .prop_map(|(port, udp, target)| Port { port, udp, target })
}

fn backend(host: u8) -> impl Strategy<Value = Backend> {
    (
        prop::option::of(1u32..=100),
        prop::bool::weighted(0.2),
        prop::option::of(prop::sample::select(vec!["v1", "v2"])),
    )
        .prop_map(move |(weight, draining, version)| Backend {
            host,
            weight,
            draining,
            version,
        })
}

fn health_check() -> impl Strategy<Value = HealthCheck> {
    (
        prop_oneof![Just(Probe::Tcp), Just(Probe::Http)],
        prop::option::of(100u32..=5_000),
        prop::option::of((1u32..=5, 1u32..=5)),
        prop::option::of(any::<bool>()),
    )
        .prop_map(|(probe, interval_ms, thresholds, fail_open)| HealthCheck {
            probe,
            interval_ms,
            thresholds,
            fail_open,
        })
}

fn service(index: usize) -> impl Strategy<Value = ServiceCase> {
    let algorithms = vec![
        "round-robin",
        "weighted-round-robin",
        "least-connections",
        "weighted-least-connections",
        "maglev",
    ];
    (
        prop::option::of(Just("shop")),
        // Distinct (port, protocol) pairs: distinct port numbers suffice.
        prop::collection::vec(port(), 1..=3).prop_map(|mut ports| {
            ports.sort_by_key(|p| p.port);
            ports.dedup_by_key(|p| p.port);
            ports
        }),
        prop::option::of(prop::sample::select(algorithms)),
        prop::option::of(prop::sample::select(vec![251u32, 1021, 4093])),
        subsequence((1u8..=8).collect::<Vec<_>>(), 1..=4)
            .prop_flat_map(|hosts| hosts.into_iter().map(backend).collect::<Vec<_>>()),
        prop::option::of(health_check()),
        prop::option::of(1u32..=3_600),
        prop::option::of((prop::sample::select(vec!["v1", "v2"]), 0u32..=100)),
        prop::option::of(1u32..=60),
    )
        .prop_map(
            move |(
                namespace,
                ports,
                algorithm,
                maglev_table_size,
                backends,
                health_check,
                affinity_seconds,
                rollout,
                drain_seconds,
            )| ServiceCase {
                index,
                namespace,
                ports,
                // A table size is only allowed with Maglev.
                maglev_table_size: maglev_table_size.filter(|_| algorithm == Some("maglev")),
                algorithm,
                backends,
                health_check,
                affinity_seconds,
                rollout,
                drain_seconds,
            },
        )
}

/// Some of the services `svc-0` … `svc-4`, each at most once.
fn manifest() -> impl Strategy<Value = Vec<ServiceCase>> {
    subsequence((0..SERVICES).collect::<Vec<_>>(), 1..=SERVICES)
        .prop_flat_map(|indexes| indexes.into_iter().map(service).collect::<Vec<_>>())
}

/// The manifest's text, as an admin would write it: optional fields left
/// out when the case has no value for them, so that defaults apply.
fn render(services: &[ServiceCase]) -> String {
    let mut text = String::new();
    for s in services {
        text.push_str("---\nkind: Service\n");
        writeln!(text, "name: svc-{}", s.index).unwrap();
        if let Some(namespace) = s.namespace {
            writeln!(text, "namespace: {namespace}").unwrap();
        }
        writeln!(text, "vip: 198.18.0.{}", 10 + s.index).unwrap();
        text.push_str("ports:\n");
        for p in &s.ports {
            let protocol = if p.udp { "UDP" } else { "TCP" };
            write!(text, "  - {{ port: {}, protocol: {protocol}", p.port).unwrap();
            if let Some(target) = p.target {
                write!(text, ", targetPort: {target}").unwrap();
            }
            text.push_str(" }\n");
        }
        if let Some(algorithm) = s.algorithm {
            writeln!(text, "algorithm: {algorithm}").unwrap();
        }
        if let Some(size) = s.maglev_table_size {
            writeln!(text, "maglevTableSize: {size}").unwrap();
        }
        text.push_str("backends:\n");
        for b in &s.backends {
            write!(text, "  - {{ address: 198.19.0.{}", b.host).unwrap();
            if let Some(weight) = b.weight {
                write!(text, ", weight: {weight}").unwrap();
            }
            if b.draining {
                text.push_str(", draining: true");
            }
            if let Some(version) = b.version {
                write!(text, ", version: {version}").unwrap();
            }
            text.push_str(" }\n");
        }
        if let Some(check) = &s.health_check {
            text.push_str("healthCheck:\n");
            match check.probe {
                Probe::Tcp => text.push_str("  tcp: { port: 9000 }\n"),
                Probe::Http => text.push_str("  http: { path: /healthz, port: 8080 }\n"),
            }
            if let Some(interval) = check.interval_ms {
                writeln!(text, "  intervalMs: {interval}").unwrap();
                writeln!(text, "  timeoutMs: {}", interval / 2).unwrap();
            }
            if let Some((unhealthy, healthy)) = check.thresholds {
                writeln!(text, "  unhealthyThreshold: {unhealthy}").unwrap();
                writeln!(text, "  healthyThreshold: {healthy}").unwrap();
            }
            if let Some(fail_open) = check.fail_open {
                writeln!(text, "  failOpen: {fail_open}").unwrap();
            }
        }
        if let Some(seconds) = s.affinity_seconds {
            writeln!(
                text,
                "sessionAffinity: {{ clientIP: {{ timeoutSeconds: {seconds} }} }}"
            )
            .unwrap();
        }
        if let Some((to, percent)) = s.rollout {
            writeln!(text, "rollout: {{ to: {to}, percent: {percent} }}").unwrap();
        }
        if let Some(seconds) = s.drain_seconds {
            writeln!(text, "drainTimeoutSeconds: {seconds}").unwrap();
        }
    }
    text
}

/// A control service in a temporary directory, opened (and reopened) in
/// this process; the tests call its API handlers directly.
struct Cluster {
    dir: tempfile::TempDir,
    control: Arc<Control>,
    admin: Caller,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let control = Self::open(&dir);
        let admin = Caller {
            name: "admin".into(),
            groups: vec![ADMIN_GROUP.into()],
        };
        Self {
            dir,
            control,
            admin,
            runtime,
        }
    }

    fn open(dir: &tempfile::TempDir) -> Arc<Control> {
        Control::open(Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("state"),
            vip_cidr: "198.18.0.0/24".into(),
            advertise: vec!["127.0.0.1".into()],
            node_cert_ttl: Duration::from_secs(3600),
            user_cert_ttl: Duration::from_secs(3600),
            admin_config: dir.path().join("admin.conf"),
            encryption_key_file: None,
            store: Default::default(),
        })
        .unwrap()
    }

    /// Deletes the services the manifest no longer has, then `sluicectl
    /// apply`s it: the objects reach the service as the API's messages, each with
    /// the version it updates.
    fn apply(&self, text: &str) {
        let objects = manifest::parse_objects("cluster.yaml", text).unwrap();
        let state = self.control.state();
        let stale: Vec<_> = state
            .objects
            .table::<Service>()
            .keys()
            .filter(|(namespace, name)| {
                !objects
                    .iter()
                    .any(|o| o.namespace() == namespace && o.name() == name)
            })
            .cloned()
            .collect();
        let messages = objects
            .iter()
            .map(|object| {
                let mut message = v1::Object::from(object);
                let Some(v1::object::Kind::Service(service)) = &mut message.kind else {
                    panic!("only services are generated, got {object:?}");
                };
                let version = state
                    .objects
                    .get::<Service>(object.namespace(), object.name())
                    .map_or(0, |stored| stored.version);
                service.meta.get_or_insert_default().resource_version = version;
                message
            })
            .collect();
        self.runtime.block_on(async {
            // Deletes first: a service that moved to another namespace is
            // another object, and its VIP must be free for it.
            for (namespace, name) in stale {
                let request = v1::DeleteRequest {
                    kind: v1::Kind::Service.into(),
                    namespace,
                    name,
                    resource_version: 0,
                };
                self.control.delete(&self.admin, request).await.unwrap();
            }
            self.control
                .apply(&self.admin, messages, false)
                .await
                .unwrap();
        });
    }

    /// What a node watching since `since` receives (a snapshot for 0, the
    /// changes otherwise), through the wire's bytes, as the agent reads it.
    fn watch(&self, since: u64) -> Vec<ViewUpdate> {
        let state = self.control.state();
        let messages: Vec<v1::ViewUpdate> = match since {
            0 => vec![v1::ViewUpdate::from(&state.view)],
            _ => state
                .history
                .since(since, state.view.version)
                .expect("the changes are still in the history")
                .iter()
                .map(|update| v1::ViewUpdate::from(&**update))
                .collect(),
        };
        messages
            .into_iter()
            .map(|message| {
                let bytes = message.encode_to_vec();
                ViewUpdate::try_from(v1::ViewUpdate::decode(bytes.as_slice()).unwrap()).unwrap()
            })
            .collect()
    }

    /// Stops the service and opens it again from its store.
    fn restarted(self) -> Self {
        let Self {
            dir,
            control,
            admin,
            runtime: old,
        } = self;
        // Whatever the service spawned ends with its runtime; then nothing
        // holds the store any more.
        drop(old);
        drop(control);
        Self {
            control: Self::open(&dir),
            dir,
            admin,
            runtime: runtime(),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One node's maps, as the agent's reconciler keeps them.
struct Maps {
    state: State,
    alloc: Allocator,
}

impl Maps {
    fn empty() -> Self {
        let state = State::default();
        let alloc = Allocator::for_state(&state);
        Self { state, alloc }
    }

    /// The plan that programs `view` on `node`; the maps then hold its result.
    fn program(&mut self, view: &View, node: &Node) -> reconcile::Plan {
        let desired = reconcile::desired(&view.frontends, node);
        let plan = reconcile::plan(&desired, &self.state, &self.alloc).unwrap();
        self.state = plan.next.clone();
        self.alloc = plan.alloc.clone();
        plan
    }
}

fn nodes() -> [Node; 2] {
    [
        Node::standalone(),
        Node {
            name: "node-1".into(),
            zone: Some("zone-a".into()),
            naming: Naming::Cluster,
        },
    ]
}

fn check(first: &[ServiceCase], second: &[ServiceCase]) -> Result<(), TestCaseError> {
    let texts = [render(first), render(second)];
    let cluster = Cluster::new();
    let mut watched = View::default();
    let nodes = nodes();
    let mut standalone_maps = nodes.clone().map(|_| Maps::empty());
    let mut cluster_maps = nodes.clone().map(|_| Maps::empty());
    for (step, text) in texts.iter().enumerate() {
        let manifest: Manifest = manifest::parse("standalone.yaml", text).unwrap();
        let standalone = View::of_manifest(&manifest);

        cluster.apply(text);
        for update in cluster.watch(watched.version) {
            watched.apply(update);
        }
        prop_assert_eq!(
            &watched.frontends,
            &standalone.frontends,
            "step {}: the views differ for\n{}",
            step,
            text
        );
        prop_assert_eq!(&watched.frontends, &cluster.control.state().view.frontends);

        for (i, node) in nodes.iter().enumerate() {
            let alone = standalone_maps[i].program(&standalone, node);
            let joined = cluster_maps[i].program(&watched, node);
            prop_assert_eq!(
                &alone.steps,
                &joined.steps,
                "step {}, node {:?}: the plans differ for\n{}",
                step,
                node.name,
                text
            );
            prop_assert_eq!(&alone.next, &joined.next);
            prop_assert_eq!(&alone.retired_ranges, &joined.retired_ranges);
        }
    }
    let before = cluster.control.state().view.frontends.clone();
    let cluster = cluster.restarted();
    prop_assert_eq!(&cluster.control.state().view.frontends, &before);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn standalone_and_cluster_compute_the_same_view_and_plan(
        first in manifest(),
        second in manifest(),
    ) {
        check(&first, &second)?;
    }
}

/// A service that gives only what has no default: one TCP port, one backend.
fn minimal(index: usize, port: u16) -> ServiceCase {
    ServiceCase {
        index,
        namespace: None,
        ports: vec![Port {
            port,
            udp: false,
            target: None,
        }],
        algorithm: None,
        maglev_table_size: None,
        backends: vec![Backend {
            host: 1,
            weight: None,
            draining: false,
            version: None,
        }],
        health_check: None,
        affinity_seconds: None,
        rollout: None,
        drain_seconds: None,
    }
}

/// The generator is not vacuous: the manifests it writes use every optional
/// field, and the property holds on one written out by hand.
#[test]
fn a_manifest_with_every_field_takes_one_path() {
    let every = ServiceCase {
        index: 0,
        namespace: Some("shop"),
        ports: vec![
            Port {
                port: 80,
                udp: false,
                target: Some(8080),
            },
            Port {
                port: 53,
                udp: true,
                target: None,
            },
        ],
        algorithm: Some("maglev"),
        maglev_table_size: Some(251),
        backends: vec![
            Backend {
                host: 1,
                weight: Some(3),
                draining: false,
                version: Some("v1"),
            },
            Backend {
                host: 2,
                weight: None,
                draining: true,
                version: Some("v2"),
            },
        ],
        health_check: Some(HealthCheck {
            probe: Probe::Http,
            interval_ms: Some(1000),
            thresholds: Some((2, 3)),
            fail_open: Some(true),
        }),
        affinity_seconds: Some(60),
        rollout: Some(("v2", 25)),
        drain_seconds: Some(5),
    };
    let plain = minimal(1, 443);
    let view = View::of_manifest(
        &manifest::parse("every.yaml", &render(std::slice::from_ref(&every))).unwrap(),
    );
    assert_eq!(view.frontends.len(), 2, "one frontend per port");
    check(&[every.clone(), plain.clone()], &[plain, every]).unwrap();
}

/// A service in one manifest and not the next is deleted on both paths.
#[test]
fn a_service_removed_from_the_manifest_is_removed_on_both_paths() {
    let one = |index| minimal(index, 80);
    check(&[one(0), one(1)], &[one(1)]).unwrap();
    let cluster = Cluster::new();
    cluster.apply(&render(&[one(0), one(1)]));
    cluster.apply(&render(&[one(1)]));
    let view = &cluster.control.state().view;
    assert_eq!(view.frontends.len(), 1);
    assert!(
        view.frontends.values().all(|f| f.service.name == "svc-1"),
        "{view:?}"
    );
}
