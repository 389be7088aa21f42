//! The reconciler's unit tests: desired state read from views and manifests,
//! and plans checked step by step, each re-planned from the state it leads to
//! (an applied plan must leave nothing to do). Beside the module, not inside
//! it: they are longer than the code they test.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE;
use sluice_common::types::{
    BACKEND_DRAINING, BACKEND_RETIRED, Frontend, FrontendKeyV4, IPPROTO_TCP, IPPROTO_UDP,
    algorithm, name_str,
};
use sluice_model::Algorithm;
use sluice_model::view::{Frontends, ServiceRef};

use super::*;

fn addr(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn key(vip: &str, port: u16, proto: u8) -> FrontendKeyV4 {
    FrontendKeyV4 {
        vip: u32::from_ne_bytes(addr(vip).octets()),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

fn frontend(service: &str, algorithm: Algorithm, backends: &[(&str, u32)]) -> DesiredFrontend {
    DesiredFrontend {
        service: ServiceRef {
            namespace: "default".into(),
            name: service.into(),
        },
        name: service.to_string(),
        target_port: 8080,
        algorithm,
        backends: backends
            .iter()
            .map(|&(a, w)| DesiredBackend::new(addr(a), w))
            .collect(),
        maglev_table_size: MAGLEV_DEFAULT_TABLE_SIZE,
        health_check: None,
        drain_timeout: None,
        session_affinity: Default::default(),
        fallback_weights: Default::default(),
    }
}

/// What a standalone agent programs for `manifest`.
fn from_manifest(manifest: &str) -> Desired {
    let manifest = sluice_model::manifest::parse("test.yaml", manifest).expect("valid manifest");
    let view = sluice_model::view::View::of_manifest(&manifest);
    desired(&view.frontends, &Node::standalone())
}

/// Plans, checks the plan's `next` is what re-planning from it agrees
/// with (idempotence), and returns the plan.
fn plan_ok(desired: &Desired, current: &State) -> Plan {
    let alloc = Allocator::for_state(current);
    let plan = plan(desired, current, &alloc).expect("plan");
    let again = super::plan(desired, &plan.next, &plan.alloc).expect("replan");
    assert!(again.is_empty(), "not idempotent: {:?}", again.steps);
    plan
}

fn step_names(steps: &[Step]) -> Vec<&'static str> {
    steps
        .iter()
        .map(|s| match s {
            Step::PutBackend { .. } => "put_backend",
            Step::PutSlots { .. } => "put_slots",
            Step::PutFrontendMeta { .. } => "put_meta",
            Step::PutVip { .. } => "put_vip",
            Step::PutFrontend { .. } => "put_frontend",
            Step::DeleteFrontend { .. } => "delete_frontend",
            Step::DeleteVip { .. } => "delete_vip",
            Step::RetireBackend { .. } => "retire",
            Step::PurgeUdpFlows { .. } => "purge_udp",
            Step::PurgeFrontendFlows { .. } => "purge_frontend",
            Step::ClearFrontendMeta { .. } => "clear_meta",
        })
        .collect()
}

#[test]
fn maglev_tables_have_the_size_asked_for_and_change_only_with_the_backends() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    let backends = [("198.19.1.2", 1), ("198.19.2.2", 1), ("198.19.3.2", 1)];
    let default = Desired::from([(k, frontend("web", Algorithm::Maglev, &backends))]);
    let plan = plan_ok(&default, &State::default());
    let table = &plan.next.frontends[&k];
    assert_eq!(table.frontend.slot_count, MAGLEV_DEFAULT_TABLE_SIZE);
    assert_eq!(table.frontend.algorithm, algorithm::MAGLEV);
    let mut small = frontend("web", Algorithm::Maglev, &backends);
    small.maglev_table_size = 251;
    let resized = plan_ok(&Desired::from([(k, small)]), &plan.next);
    assert_eq!(resized.next.frontends[&k].frontend.slot_count, 251);
    // Every backend owns about a third of the slots.
    let ids: BTreeSet<u32> = resized.next.frontends[&k].slots.iter().copied().collect();
    assert_eq!(ids.len(), 3);
    for id in ids {
        let owned = resized.next.frontends[&k]
            .slots
            .iter()
            .filter(|&&s| s == id)
            .count();
        assert!((82..=86).contains(&owned), "{owned}");
    }
}

#[test]
fn new_service_writes_backends_then_table_then_switches() {
    let desired = Desired::from([(
        key("198.18.0.10", 80, IPPROTO_TCP),
        frontend(
            "web",
            Algorithm::RoundRobin,
            &[("198.19.1.2", 1), ("198.19.2.2", 3)],
        ),
    )]);
    let plan = plan_ok(&desired, &State::default());
    assert_eq!(
        step_names(&plan.steps),
        [
            "put_backend",
            "put_backend",
            "put_slots",
            "put_meta",
            "put_vip",
            "put_frontend"
        ]
    );
    let f = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)];
    assert_eq!(f.slots.len(), 2, "round-robin ignores weights");
    assert_eq!(name_str(&f.meta.name), "web");
    assert_eq!(plan.next.backends.len(), 2);
    assert!(
        plan.next
            .backends
            .values()
            .all(|b| b.port == 8080u16.to_be())
    );
}

#[test]
fn weighted_round_robin_expands_weights() {
    let desired = Desired::from([(
        key("198.18.0.10", 80, IPPROTO_TCP),
        frontend(
            "web",
            Algorithm::WeightedRoundRobin,
            &[("198.19.1.2", 1), ("198.19.2.2", 1), ("198.19.3.2", 2)],
        ),
    )]);
    let plan = plan_ok(&desired, &State::default());
    let f = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)];
    let ids: Vec<u32> = plan.next.backends.keys().copied().collect();
    assert_eq!(f.slots, [ids[2], ids[0], ids[1], ids[2]]);
}

#[test]
fn weight_change_swaps_to_a_new_range_and_keeps_ids() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    let first = plan_ok(
        &Desired::from([(
            k,
            frontend(
                "web",
                Algorithm::WeightedRoundRobin,
                &[("198.19.1.2", 1), ("198.19.2.2", 1)],
            ),
        )]),
        &State::default(),
    );
    let desired = Desired::from([(
        k,
        frontend(
            "web",
            Algorithm::WeightedRoundRobin,
            &[("198.19.1.2", 1), ("198.19.2.2", 3)],
        ),
    )]);
    let second = plan(&desired, &first.next, &first.alloc).expect("plan");
    assert_eq!(
        step_names(&second.steps),
        ["put_backend", "put_slots", "put_frontend"]
    );
    let before = &first.next.frontends[&k].frontend;
    let after = &second.next.frontends[&k].frontend;
    assert_ne!(before.slot_base, after.slot_base, "old range is in use");
    assert_eq!(second.retired_ranges.len(), 1);
    assert_eq!(
        first.next.backends.keys().collect::<Vec<_>>(),
        second.next.backends.keys().collect::<Vec<_>>()
    );
}

#[test]
fn removed_backend_is_retired_and_only_udp_flows_are_purged() {
    let tcp = key("198.18.0.10", 80, IPPROTO_TCP);
    let udp = key("198.18.0.10", 53, IPPROTO_UDP);
    let both = |backends: &[(&str, u32)]| {
        Desired::from([
            (tcp, frontend("web", Algorithm::RoundRobin, backends)),
            (udp, frontend("web", Algorithm::RoundRobin, backends)),
        ])
    };
    let first = plan_ok(
        &both(&[("198.19.1.2", 1), ("198.19.2.2", 1)]),
        &State::default(),
    );
    let second = plan(&both(&[("198.19.1.2", 1)]), &first.next, &first.alloc).expect("plan");
    let retired: Vec<u32> = second
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::RetireBackend { id, backend } => {
                assert!(backend.flags & BACKEND_RETIRED != 0);
                Some(*id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(retired.len(), 2, "one per service port");
    let purged: Vec<&BTreeSet<u32>> = second
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::PurgeUdpFlows { backends } => Some(backends),
            _ => None,
        })
        .collect();
    assert_eq!(purged.len(), 1);
    let udp_id = second.next.frontends[&udp].frontend.id;
    let udp_retired: Vec<u32> = retired
        .iter()
        .copied()
        .filter(|id| second.next.backends[id].frontend_id == udp_id)
        .collect();
    assert_eq!(purged[0].iter().copied().collect::<Vec<_>>(), udp_retired);
    // Retired backends stay known (their TCP flows continue) but are in no table.
    for id in &retired {
        assert!(second.next.backends.contains_key(id));
        assert!(
            second
                .next
                .frontends
                .values()
                .all(|f| !f.slots.contains(id))
        );
    }
    // Coming back revives the same id.
    let third = plan(
        &both(&[("198.19.1.2", 1), ("198.19.2.2", 1)]),
        &second.next,
        &second.alloc,
    )
    .expect("plan");
    let revived: BTreeSet<u32> = third
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::PutBackend {
                id, fresh: false, ..
            } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(revived, retired.into_iter().collect());
}

#[test]
fn removed_service_goes_after_its_vip_users() {
    let a = key("198.18.0.10", 80, IPPROTO_TCP);
    let b = key("198.18.0.10", 443, IPPROTO_TCP);
    let first = plan_ok(
        &Desired::from([
            (
                a,
                frontend("web", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
            ),
            (
                b,
                frontend("tls", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
            ),
        ]),
        &State::default(),
    );
    assert_eq!(first.next.vips.values().copied().collect::<Vec<_>>(), [2]);
    let desired = Desired::from([(
        a,
        frontend("web", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
    )]);
    let second = plan(&desired, &first.next, &first.alloc).expect("plan");
    assert_eq!(
        step_names(&second.steps),
        [
            "delete_frontend",
            "put_vip",
            "retire",
            "purge_frontend",
            "clear_meta"
        ]
    );
    let third = plan(&Desired::new(), &second.next, &second.alloc).expect("plan");
    assert_eq!(
        step_names(&third.steps),
        [
            "delete_frontend",
            "delete_vip",
            "retire",
            "purge_frontend",
            "clear_meta"
        ]
    );
    assert!(third.next.frontends.is_empty() && third.next.vips.is_empty());
}

#[test]
fn service_without_backends_has_an_empty_table() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    let plan = plan_ok(
        &Desired::from([(k, frontend("web", Algorithm::LeastConnections, &[]))]),
        &State::default(),
    );
    assert_eq!(plan.next.frontends[&k].frontend.slot_count, 0);
    assert!(!step_names(&plan.steps).contains(&"put_slots"));
}

#[test]
fn capacity_errors_change_nothing() {
    let k1 = key("198.18.0.10", 80, IPPROTO_TCP);
    let k2 = key("198.18.0.11", 80, IPPROTO_TCP);
    let desired = Desired::from([
        (
            k1,
            frontend("a", Algorithm::RoundRobin, &[("198.19.1.2", 1)]),
        ),
        (
            k2,
            frontend("b", Algorithm::RoundRobin, &[("198.19.1.3", 1)]),
        ),
    ]);
    let state = State::default();
    let tight = Allocator::with_capacity(&state, 1, 8, 8);
    assert!(matches!(
        plan(&desired, &state, &tight),
        Err(PlanError::FrontendCapacity { .. })
    ));
    let tight = Allocator::with_capacity(&state, 8, 1, 8);
    assert!(matches!(
        plan(&desired, &state, &tight),
        Err(PlanError::BackendCapacity { .. })
    ));
    let tight = Allocator::with_capacity(&state, 8, 8, 1);
    let err = plan(&desired, &state, &tight).expect_err("no room");
    assert!(
        err.to_string().contains("slot table space exhausted"),
        "{err}"
    );
}

#[test]
fn desired_from_a_view_matches_the_manifest_form() {
    use sluice_api::v1;
    let view = v1::FrontendView {
        maglev_table_size: 0,
        service: "shop/web".into(),
        vip: "198.18.0.10".into(),
        port: 80,
        protocol: v1::Protocol::Tcp as i32,
        target_port: 8080,
        algorithm: v1::Algorithm::WeightedRoundRobin as i32,
        backends: vec![v1::ViewBackend {
            address: "198.19.1.2".into(),
            weight: 3,
            draining: Default::default(),
            probers: Default::default(),
        }],
        drain_timeout_seconds: Default::default(),
        health_check: Default::default(),
        session_affinity_seconds: Default::default(),
        zones: Default::default(),
    };
    let frontend = sluice_model::view::Frontend::try_from(view.clone()).expect("readable");
    let frontends = Frontends::from_iter([(frontend.key, frontend)]);
    let node = Node {
        name: "n1".into(),
        zone: None,
        naming: Naming::Cluster,
    };
    let d = desired(&frontends, &node);
    let f = &d[&key("198.18.0.10", 80, IPPROTO_TCP)];
    assert_eq!(f.name, "shop/web");
    assert_eq!(f.target_port, 8080);
    assert_eq!(f.algorithm, Algorithm::WeightedRoundRobin);
    assert_eq!(f.backends, [DesiredBackend::new(addr("198.19.1.2"), 3)]);
    // A standalone agent names the service as its manifest does.
    assert_eq!(
        desired(&frontends, &Node::standalone())[&key("198.18.0.10", 80, IPPROTO_TCP)].name,
        "web"
    );
    let bad = v1::FrontendView {
        vip: "not-an-ip".into(),
        ..view
    };
    assert!(sluice_model::view::Frontend::try_from(bad).is_err());
}

#[test]
fn draining_and_zero_share_backends_keep_their_id_but_leave_the_table() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    let all = frontend(
        "web",
        Algorithm::WeightedRoundRobin,
        &[("198.19.1.2", 1), ("198.19.1.3", 1), ("198.19.1.4", 2)],
    );
    let first = plan_ok(&Desired::from([(k, all.clone())]), &State::default());
    let ids: Vec<u32> = first.next.backends.keys().copied().collect();
    assert_eq!(first.next.frontends[&k].slots.len(), 4);

    let mut drained = all.clone();
    drained.backends[0].draining = true;
    drained.backends[2].weight = 0;
    let second = plan_ok(&Desired::from([(k, drained)]), &first.next);
    // Same ids, nothing retired or purged: established flows keep going.
    assert_eq!(
        second.next.backends.keys().copied().collect::<Vec<_>>(),
        ids
    );
    assert!(
        !step_names(&second.steps)
            .iter()
            .any(|s| matches!(*s, "retire" | "purge_udp"))
    );
    assert_eq!(second.next.frontends[&k].slots, [ids[1]]);
    assert_eq!(second.next.backends[&ids[0]].flags, BACKEND_DRAINING);
    assert_eq!(second.next.backends[&ids[2]].flags, 0);

    // Back in rotation: the same ids again.
    let third = plan_ok(&Desired::from([(k, all)]), &second.next);
    assert_eq!(third.next.frontends[&k].slots.len(), 4);
    assert_eq!(third.next.backends[&ids[0]].flags, 0);
}

#[test]
fn a_manifest_rollout_becomes_exact_weights_and_a_weighted_algorithm() {
    let d = from_manifest(
        "kind: Service\nname: web\nvip: 198.18.0.10\nports: [{ port: 80, protocol: TCP }]\n\
         rollout: { to: v2, percent: 1 }\ndrainTimeoutSeconds: 30\nbackends:\n\
         - { address: 198.19.1.2, version: v1 }\n- { address: 198.19.1.3, version: v1 }\n\
         - { address: 198.19.1.4, version: v1 }\n- { address: 198.19.1.5, version: v2 }\n\
         - { address: 198.19.1.6, version: v2, draining: true }\n",
    );
    let web = &d[&key("198.18.0.10", 80, IPPROTO_TCP)];
    assert_eq!(web.algorithm, Algorithm::WeightedRoundRobin);
    assert_eq!(web.drain_timeout, Some(Duration::from_secs(30)));
    let weights: Vec<(u32, bool)> = web
        .backends
        .iter()
        .map(|b| (b.weight, b.draining))
        .collect();
    assert_eq!(
        weights,
        [(33, false), (33, false), (33, false), (1, false), (1, true)]
    );
    let plan = plan_ok(&d, &State::default());
    let table = &plan.next.frontends[&key("198.18.0.10", 80, IPPROTO_TCP)].slots;
    assert_eq!(table.len(), 100);
}

#[test]
fn desired_from_manifest_splits_ports() {
    let d = from_manifest(
        "kind: Service\nname: web\nvip: 198.18.0.10\nports:\n  - { port: 80, protocol: TCP, targetPort: 8080 }\n  - { port: 53, protocol: UDP, targetPort: 5353 }\nbackends:\n  - { address: 198.19.1.2, weight: 2 }\n",
    );
    assert_eq!(d.len(), 2);
    let udp = &d[&key("198.18.0.10", 53, IPPROTO_UDP)];
    assert_eq!(udp.target_port, 5353);
    assert_eq!(udp.backends, [DesiredBackend::new(addr("198.19.1.2"), 2)]);
}

#[test]
fn an_affinity_change_rewrites_the_frontend_value_alone() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    let plain = frontend(
        "web",
        Algorithm::RoundRobin,
        &[("198.19.1.2", 1), ("198.19.2.2", 1)],
    );
    let affine = DesiredFrontend {
        session_affinity: Some(Duration::from_secs(300)),
        ..plain.clone()
    };
    let first = plan_ok(&Desired::from([(k, plain.clone())]), &State::default());
    let before = first.next.frontends[&k].frontend;
    assert_eq!(before.affinity_timeout_s, 0);

    let on = plan(
        &Desired::from([(k, affine.clone())]),
        &first.next,
        &first.alloc,
    )
    .expect("plan");
    let after = Frontend {
        affinity_timeout_s: 300,
        ..before
    };
    // Same id, same slot range: nothing else to write, nothing to free.
    assert_eq!(
        on.steps,
        [Step::PutFrontend {
            key: k,
            frontend: after
        }]
    );
    assert!(on.retired_ranges.is_empty());
    assert!(
        plan(&Desired::from([(k, affine)]), &on.next, &on.alloc)
            .expect("replan")
            .is_empty()
    );

    let off = plan(&Desired::from([(k, plain)]), &on.next, &on.alloc).expect("plan");
    assert_eq!(
        off.steps,
        [Step::PutFrontend {
            key: k,
            frontend: before
        }]
    );
}

#[test]
fn affinity_timeouts_round_up_to_seconds_and_saturate() {
    let k = key("198.18.0.10", 80, IPPROTO_TCP);
    for (asked, kernel) in [
        (Duration::from_millis(1), 1),
        (Duration::from_millis(1500), 2),
        (Duration::from_secs(10_800), 10_800),
        (Duration::from_secs(u64::MAX), u32::MAX),
    ] {
        let want = DesiredFrontend {
            session_affinity: Some(asked),
            ..frontend("web", Algorithm::Maglev, &[("198.19.1.2", 1)])
        };
        let plan = plan_ok(&Desired::from([(k, want)]), &State::default());
        assert_eq!(
            plan.next.frontends[&k].frontend.affinity_timeout_s, kernel,
            "{asked:?}"
        );
    }
}

#[test]
fn a_plan_of_what_changed_is_the_whole_plan() {
    let services = |weights: &[u32]| -> Desired {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let vip = format!("198.18.0.{}", i + 1);
                let a = format!("198.19.{i}.1");
                let b = format!("198.19.{i}.2");
                (
                    key(&vip, 80, IPPROTO_TCP),
                    frontend(&format!("s{i}"), Algorithm::RoundRobin, &[(&a, 1), (&b, w)]),
                )
            })
            .collect()
    };
    let before = services(&[1, 1, 1, 1, 1]);
    let first = plan_ok(&before, &State::default());
    // A weight changes, a service goes, two come, one changes algorithm.
    let mut after = services(&[1, 3, 1, 1, 1, 1, 1]);
    after.remove(&key("198.18.0.3", 80, IPPROTO_TCP));
    if let Some(f) = after.get_mut(&key("198.18.0.5", 80, IPPROTO_TCP)) {
        f.algorithm = Algorithm::WeightedRoundRobin;
    }
    let changed = changed_frontends(&before, &after);
    assert_eq!(changed.len(), 5, "{changed:?}");
    let whole = plan(&after, &first.next, &first.alloc).expect("plan");
    let scoped =
        plan_scoped(&after, &first.next, &first.alloc, Scope::Only(&changed)).expect("scoped plan");
    assert_eq!(scoped.steps, whole.steps);
    assert_eq!(scoped.next, whole.next);
    assert_eq!(scoped.retired_ranges, whole.retired_ranges);
    // Nothing changed: nothing to look at, nothing to do.
    let none = plan_scoped(
        &after,
        &whole.next,
        &whole.alloc,
        Scope::Only(&changed_frontends(&after, &after)),
    )
    .expect("empty plan");
    assert!(none.is_empty());
}
