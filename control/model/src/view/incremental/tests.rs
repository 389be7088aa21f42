//! The incremental refresh against the full computation, on random states
//! and random changes.

use std::net::Ipv4Addr;

use proptest::prelude::*;

use super::*;
use crate::service::{Algorithm, BackendSpec, Protocol, ServicePort};
use crate::traffic::{HealthCheck, Probe, Traffic};
use crate::view::View;

const NAMESPACES: [&str; 2] = ["shop", "blog"];
const APPS: [&str; 4] = ["web", "api", "db", "cache"];

#[derive(Clone, Debug)]
struct ServiceCase {
    index: u8,
    namespace: usize,
    two_ports: bool,
    /// `None`: two static backends.
    selector: Option<(usize, Option<&'static str>)>,
    health_checked: bool,
}

#[derive(Clone, Debug)]
struct EndpointCase {
    index: u8,
    namespace: usize,
    app: usize,
    tier: Option<&'static str>,
    ready: bool,
    zone: Option<&'static str>,
}

fn service_case() -> impl Strategy<Value = ServiceCase> {
    (
        0u8..12,
        0..NAMESPACES.len(),
        any::<bool>(),
        prop::option::weighted(
            0.8,
            (
                0..APPS.len(),
                prop::option::of(prop::sample::select(vec!["front", "back"])),
            ),
        ),
        any::<bool>(),
    )
        .prop_map(
            |(index, namespace, two_ports, selector, health_checked)| ServiceCase {
                index,
                namespace,
                two_ports,
                selector,
                health_checked,
            },
        )
}

fn endpoint_case() -> impl Strategy<Value = EndpointCase> {
    (
        0u8..40,
        0..NAMESPACES.len(),
        0..APPS.len(),
        prop::option::of(prop::sample::select(vec!["front", "back"])),
        prop::bool::weighted(0.8),
        prop::option::of(prop::sample::select(vec!["a", "b"])),
    )
        .prop_map(|(index, namespace, app, tier, ready, zone)| EndpointCase {
            index,
            namespace,
            app,
            tier,
            ready,
            zone,
        })
}

fn service(c: &ServiceCase) -> Service {
    let mut ports = vec![ServicePort {
        port: 80,
        protocol: Protocol::Tcp,
        target_port: 8080,
    }];
    if c.two_ports {
        ports.push(ServicePort {
            port: 53,
            protocol: Protocol::Udp,
            target_port: 53,
        });
    }
    let (backends, selector) = match c.selector {
        None => (
            (1..=2)
                .map(|h| BackendSpec {
                    address: Ipv4Addr::new(198, 19, 200, h),
                    weight: 1,
                    version: None,
                    draining: false,
                })
                .collect(),
            Labels::new(),
        ),
        Some((app, tier)) => {
            let mut selector = Labels::from([("app".to_owned(), APPS[app].to_owned())]);
            if let Some(tier) = tier {
                selector.insert("tier".into(), tier.into());
            }
            (Vec::new(), selector)
        }
    };
    Service {
        namespace: NAMESPACES[c.namespace].into(),
        name: format!("svc-{}", c.index),
        labels: Labels::new(),
        // Unique per (namespace, name): a VIP belongs to one service.
        vip: Ipv4Addr::new(198, 18, c.namespace as u8, c.index),
        ports,
        algorithm: Algorithm::RoundRobin,
        backends,
        selector,
        maglev_table_size: None,
        traffic: Traffic {
            health_check: c.health_checked.then_some(HealthCheck {
                probe: Probe::Tcp { port: None },
                interval_ms: 1000,
                timeout_ms: 500,
                unhealthy_threshold: 3,
                healthy_threshold: 2,
                fail_open: true,
            }),
            topology_aware: c.index.is_multiple_of(3),
            ..Traffic::default()
        },
    }
}

fn endpoint(c: &EndpointCase) -> Endpoint {
    let mut labels = Labels::from([("app".to_owned(), APPS[c.app].to_owned())]);
    if let Some(tier) = c.tier {
        labels.insert("tier".into(), tier.into());
    }
    Endpoint {
        namespace: NAMESPACES[c.namespace].into(),
        name: format!("ep-{}", c.index),
        labels,
        address: Ipv4Addr::new(198, 19, c.namespace as u8, c.index),
        node: None,
        zone: c.zone.map(str::to_owned),
        weight: 1 + u32::from(c.index % 3),
        ready: c.ready,
        draining: false,
    }
}

#[derive(Clone, Debug)]
enum Change {
    PutService(ServiceCase),
    DeleteService(u8, usize),
    PutEndpoint(EndpointCase),
    DeleteEndpoint(u8, usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        service_case().prop_map(Change::PutService),
        (0u8..12, 0..NAMESPACES.len()).prop_map(|(i, n)| Change::DeleteService(i, n)),
        endpoint_case().prop_map(Change::PutEndpoint),
        (0u8..40, 0..NAMESPACES.len()).prop_map(|(i, n)| Change::DeleteEndpoint(i, n)),
    ]
}

fn full(objects: &Objects, nodes: &[&str]) -> Frontends {
    frontends(nodes, objects.all::<Service>(), objects.all::<Endpoint>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn refreshing_what_a_change_touched_equals_computing_everything(
        initial_services in prop::collection::vec(service_case(), 0..10),
        initial_endpoints in prop::collection::vec(endpoint_case(), 0..30),
        changes in prop::collection::vec(change(), 1..6),
    ) {
        let nodes = ["n1", "n2", "n3", "n4"];
        let mut objects = Objects::default();
        for c in &initial_services { objects.insert(service(c), 1); }
        for c in &initial_endpoints { objects.insert(endpoint(c), 1); }
        let before_services = objects.table::<Service>().clone();
        let before = View { version: 1, frontends: full(&objects, &nodes), ..View::default() };

        // One change of several edits, recorded as the control service's draft does.
        let mut touched = Touched::default();
        for change in &changes {
            match change {
                Change::PutService(c) => {
                    let s = service(c);
                    touched.services.insert((s.namespace.clone(), s.name.clone()));
                    objects.insert(s, 2);
                }
                Change::DeleteService(i, n) => {
                    let (namespace, name) = (NAMESPACES[*n], format!("svc-{i}"));
                    objects.remove::<Service>(namespace, &name);
                    touched.services.insert((namespace.to_owned(), name));
                }
                Change::PutEndpoint(c) => {
                    let e = endpoint(c);
                    if let Some(old) = objects.get::<Endpoint>(&e.namespace, &e.name) {
                        touched.endpoint_labels.push((old.object.namespace.clone(), old.object.labels.clone()));
                    }
                    touched.endpoint_labels.push((e.namespace.clone(), e.labels.clone()));
                    objects.insert(e, 2);
                }
                Change::DeleteEndpoint(i, n) => {
                    if let Some(old) = objects.remove::<Endpoint>(NAMESPACES[*n], &format!("ep-{i}")) {
                        touched.endpoint_labels.push((old.object.namespace, old.object.labels));
                    }
                }
            }
        }
        let refreshed = refresh(&before.frontends, &before_services, &objects, &nodes, &touched);
        let expected = full(&objects, &nodes);
        prop_assert_eq!(&refreshed.frontends, &expected);

        let after = View { version: 2, frontends: refreshed.frontends, ..View::default() };
        let among = before.diff_among(&after, 2, refreshed.candidates.as_ref());
        let whole = before.diff(&after, 2);
        prop_assert_eq!(among, whole);
    }
}

#[test]
fn node_changes_and_large_changes_recompute_everything() {
    let mut objects = Objects::default();
    for i in 0..8 {
        objects.insert(
            service(&ServiceCase {
                index: i,
                namespace: 0,
                two_ports: false,
                selector: None,
                health_checked: true,
            }),
            1,
        );
    }
    let services = objects.table::<Service>().clone();
    let previous = full(&objects, &["n1"]);
    let touched = Touched {
        nodes: true,
        ..Touched::default()
    };
    let refreshed = refresh(&previous, &services, &objects, &["n1", "n2"], &touched);
    assert!(refreshed.candidates.is_none());
    assert_eq!(refreshed.frontends, full(&objects, &["n1", "n2"]));

    let one = Touched {
        services: BTreeSet::from([("shop".to_owned(), "svc-1".to_owned())]),
        ..Touched::default()
    };
    let refreshed = refresh(&previous, &services, &objects, &["n1"], &one);
    assert_eq!(refreshed.candidates.map(|c| c.len()), Some(1));
}
