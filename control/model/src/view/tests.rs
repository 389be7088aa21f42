use std::net::Ipv4Addr;

use super::*;
use crate::endpoint::Endpoint;
use crate::kind::Labels;
use crate::policy::compiled::Slot;
use crate::service::{BackendSpec, Service, ServicePort};
use crate::traffic::Rollout;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn service(name: &str, vip: &str, backends: &[&str], selector: &[(&str, &str)]) -> Service {
    Service {
        namespace: "shop".into(),
        name: name.into(),
        labels: Labels::new(),
        vip: ip(vip),
        ports: vec![
            ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
            },
            ServicePort {
                port: 53,
                protocol: Protocol::Udp,
                target_port: 53,
            },
        ],
        algorithm: Algorithm::RoundRobin,
        backends: backends
            .iter()
            .map(|a| BackendSpec {
                address: ip(a),
                weight: 1,
                version: None,
                draining: false,
            })
            .collect(),
        selector: labels(selector),
        maglev_table_size: None,
        traffic: Default::default(),
    }
}

fn endpoint(ns: &str, name: &str, address: &str, pairs: &[(&str, &str)], ready: bool) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(pairs),
        address: ip(address),
        node: None,
        zone: None,
        weight: 2,
        ready,
        draining: false,
    }
}

fn key(vip: &str, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        vip: ip(vip),
        port,
        protocol,
    }
}

fn view(frontends: Frontends) -> View {
    View {
        version: 0,
        frontends,
        policy: CompiledPolicy::default(),
    }
}

#[test]
fn static_backends_become_frontends_per_port() {
    let s = service("web", "198.18.0.10", &["198.19.2.2", "198.19.1.2"], &[]);
    let view = frontends(&["n1"], [&s], []);
    assert_eq!(view.len(), 2);
    let tcp = &view[&key("198.18.0.10", 80, Protocol::Tcp)];
    assert_eq!(tcp.service.to_string(), "shop/web");
    assert_eq!(tcp.target_port, 8080);
    let addrs: Vec<Ipv4Addr> = tcp.backends.iter().map(|b| b.address).collect();
    assert_eq!(addrs, [ip("198.19.1.2"), ip("198.19.2.2")], "sorted");
    assert!(tcp.backends.iter().all(|b| b.weight == 1));
    assert_eq!(tcp.maglev_table_size, 0, "not maglev");
    let udp = &view[&key("198.18.0.10", 53, Protocol::Udp)];
    assert_eq!(udp.target_port, 53);
}

#[test]
fn selectors_take_ready_matching_endpoints_of_the_namespace() {
    let s = service("web", "198.18.0.10", &[], &[("app", "web")]);
    let endpoints = [
        endpoint(
            "shop",
            "a",
            "198.19.1.2",
            &[("app", "web"), ("v", "1")],
            true,
        ),
        endpoint("shop", "b", "198.19.2.2", &[("app", "web")], false),
        endpoint("blog", "c", "198.19.3.2", &[("app", "web")], true),
        endpoint("shop", "d", "198.19.4.2", &[("app", "db")], true),
    ];
    let view = frontends(&["n1"], [&s], &endpoints);
    let tcp = &view[&key("198.18.0.10", 80, Protocol::Tcp)];
    assert_eq!(
        tcp.backends,
        [ViewBackend {
            address: ip("198.19.1.2"),
            weight: 2,
            draining: false,
            probers: Vec::new(),
        }]
    );
}

#[test]
fn rollouts_draining_and_zones_shape_the_weights() {
    let mut s = service("web", "198.18.0.10", &[], &[("app", "web")]);
    s.traffic.rollout = Some(Rollout {
        to: "v2".into(),
        percent: 10,
    });
    s.traffic.topology_aware = true;
    let mut endpoints = Vec::new();
    for (i, version, zone, draining) in [
        (1, "v1", "a", false),
        (2, "v1", "b", false),
        (3, "v2", "a", false),
        (4, "v2", "b", true),
    ] {
        let mut e = endpoint(
            "shop",
            &format!("e{i}"),
            &format!("198.19.1.{i}"),
            &[("app", "web"), ("version", version)],
            true,
        );
        e.zone = Some(zone.into());
        e.draining = draining;
        endpoints.push(e);
    }
    let view = frontends(&["n1"], [&s], &endpoints);
    let tcp = &view[&key("198.18.0.10", 80, Protocol::Tcp)];
    let shares: Vec<(u32, bool)> = tcp
        .backends
        .iter()
        .map(|b| (b.weight, b.draining))
        .collect();
    // v1 (weights 2 + 2) gets 90%, v2 (the one serving, weight 2) 10%.
    assert_eq!(shares, [(9, false), (9, false), (2, false), (2, true)]);
    let zones: Vec<(&str, &[u32])> = tcp
        .zones
        .iter()
        .map(|z| (z.zone.as_str(), z.weights.as_slice()))
        .collect();
    assert_eq!(zones, [("a", &[9, 0, 2, 0][..]), ("b", &[0, 9, 0, 0][..])]);
    // A round-robin service under a rollout is balanced by weight.
    assert!(
        view.values()
            .all(|f| f.algorithm == Algorithm::WeightedRoundRobin)
    );
    s.traffic.topology_aware = false;
    assert!(
        frontends(&["n1"], [&s], &endpoints)
            .values()
            .all(|f| f.zones.is_empty())
    );
}

#[test]
fn defaults_the_view_applies() {
    let mut s = service("web", "198.18.0.10", &["198.19.1.2"], &[]);
    s.algorithm = Algorithm::Maglev;
    s.traffic.health_check = Some(crate::traffic::HealthCheck {
        probe: crate::traffic::Probe::Tcp { port: None },
        interval_ms: 1000,
        timeout_ms: 500,
        unhealthy_threshold: 3,
        healthy_threshold: 2,
        fail_open: true,
    });
    let view = frontends(&["n1", "n2"], [&s], []);
    for f in view.values() {
        // Maglev without a size: the default table.
        assert_eq!(
            f.maglev_table_size,
            sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE
        );
        // The probe port: the first TCP target port, on every port.
        assert_eq!(
            f.health_check.as_ref().and_then(|c| c.probe.port()),
            Some(8080)
        );
        assert_eq!(f.backends[0].probers, ["n1", "n2"]);
    }
    // No nodes (a standalone agent): no probers, so the agent probes itself.
    assert!(
        frontends(&[], [&s], [])
            .values()
            .all(|f| f.backends[0].probers.is_empty())
    );
}

#[test]
fn diff_carries_only_changes_and_applies_back() {
    let a = service("web", "198.18.0.10", &["198.19.1.2"], &[]);
    let b = service("api", "198.18.0.11", &["198.19.1.2"], &[]);
    let old = view(frontends(&["n"], [&a, &b], []));
    let a2 = service("web", "198.18.0.10", &["198.19.1.2", "198.19.2.2"], &[]);
    let new = view(frontends(&["n"], [&a2], []));
    let update = old.diff(&new, 7).expect("changed");
    assert_eq!(update.upsert.len(), 2, "web's two ports changed");
    assert_eq!(update.remove.len(), 2, "api's two ports went");
    let mut replay = old.clone();
    replay.apply(update);
    assert_eq!(replay.frontends, new.frontends);
    assert_eq!(replay.version, 7);
    assert!(new.diff(&new, 8).is_none());
    let mut with_policy = new.clone();
    with_policy.policy.slots = vec![Slot::Unused];
    let policy_only = new.diff(&with_policy, 8).expect("the policy changed");
    assert!(policy_only.upsert.is_empty() && policy_only.policy == Some(with_policy.policy));
}

#[test]
fn snapshots_replace_and_changes_upsert_and_remove_by_key() {
    let a = service("web", "198.18.0.10", &["198.19.1.2"], &[]);
    let b = service("api", "198.18.0.11", &["198.19.1.2"], &[]);
    let mut state = View {
        version: 3,
        ..view(frontends(&["n"], [&a, &b], []))
    };
    let mut replica = View::default();
    replica.apply(state.snapshot());
    assert_eq!(replica, state);

    // A change on top: one removed, the other upserted; unknown keys are ignored.
    let a2 = service("web", "198.18.0.10", &["198.19.9.9"], &[]);
    let next = View {
        version: 4,
        ..view(frontends(&["n"], [&a2], []))
    };
    let mut update = state.diff(&next, 4).expect("changed");
    update.remove.push(key("198.18.0.77", 80, Protocol::Tcp));
    replica.apply(update);
    assert_eq!(replica, next);
    state = next;

    // A snapshot drops what it does not list, the policy included.
    let mut stale = state.clone();
    stale.policy.slots = vec![Slot::Unused];
    stale.apply(
        View {
            version: 9,
            ..view(Frontends::new())
        }
        .snapshot(),
    );
    assert_eq!(
        stale,
        View {
            version: 9,
            ..View::default()
        }
    );
}
