//! Self-healing and zero-downtime change, end to end: health probes against
//! real servers that are killed and restarted, draining, and rollouts between
//! versions, through a real control service and joined agents in network
//! namespaces (see `sluice_tests::cluster`).
//!
//! Requires root. Run with `cargo xtask test`, or after
//! `cargo build --workspace --exclude sluice-ebpf --bins` with
//! `cargo test -p sluice-tests --test traffic_e2e`.

use std::{net::SocketAddrV4, thread, time::Duration};

use sluice_tests::{
    HttpConn,
    cluster::{Cluster, TIMEOUT, assert_near, backend_addr, count},
};

/// Health probing in these tests: every 200 ms, out after 2 failures, back
/// after 2 successes.
const HEALTH_CHECK: &str = "healthCheck: { http: { path: /healthz }, intervalMs: 200, timeoutMs: 100, unhealthyThreshold: 2, healthyThreshold: 2 }";
/// The detection bound those settings promise: threshold × interval +
/// timeout (700 ms), plus applying the change; generous for a loaded VM.
const HEALTH_BOUND: Duration = Duration::from_secs(3);

/// Service `web` on :80 → :8080, selecting `app: web`, with `extra` fields.
fn web(algorithm: &str, extra: &str) -> String {
    format!(
        "kind: Service
name: web
ports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]
algorithm: {algorithm}
selector: {{ app: web }}
{extra}
"
    )
}

/// Endpoint `web-<i>` for backend `i`, with extra `labels` and fields.
fn endpoint(i: usize, labels: &str, extra: &str) -> String {
    format!(
        "kind: Endpoint
name: web-{i}
labels: {{ app: web{labels} }}
address: {}
{extra}
",
        backend_addr(i)
    )
}

fn documents(docs: &[String]) -> String {
    docs.join("---\n")
}

#[test]
fn a_canary_gets_its_exact_share_and_undo_sends_every_new_flow_back() {
    let cluster = Cluster::start(1, 4, &[]);
    let mut docs = vec![web("round-robin", "")];
    for (i, version) in [(1, "v1"), (2, "v1"), (3, "v1"), (4, "v2")] {
        docs.push(endpoint(i, &format!(", version: {version}"), ""));
    }
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();

    // A version nobody carries, or a share out of range, is refused and
    // changes nothing.
    let unknown = cluster
        .control
        .sluicectl(&["rollout", "web", "--to", "v9", "--percent", "5"]);
    let message = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success());
    assert!(
        message.contains("service/default/web")
            && message.contains("\"v9\"")
            && message.contains("v1, v2"),
        "{message}"
    );
    let too_much = cluster
        .control
        .sluicectl(&["rollout", "web", "--to", "v2", "--percent", "101"]);
    assert_eq!(too_much.status.code(), Some(2), "a usage error");
    let nothing_yet = cluster.control.sluicectl(&["rollout", "web", "--undo"]);
    assert!(
        String::from_utf8_lossy(&nothing_yet.stderr).contains("no rollout to undo"),
        "{nothing_yet:?}"
    );
    let service = cluster.control.sluicectl_json(&["get", "service", "web"]);
    assert!(service.get("rollout").is_none(), "{service}");

    // 1%: over 10,000 new flows, 100 ± 10 land on v2.
    let out = cluster
        .control
        .sluicectl_ok(&["rollout", "web", "--to", "v2", "--percent", "1"]);
    assert!(out.contains("1% of new flows to version v2"), "{out}");
    cluster.wait_programmed();
    let spread = cluster.spread(1, vip, 10_000);
    let canary = count(&spread, 4);
    assert!(
        canary.abs_diff(100) <= 10,
        "v2 got {canary} of 10000 new flows: {spread:?}"
    );
    assert_near(
        &spread,
        &[(1, 3300), (2, 3300), (3, 3300), (4, 100)],
        "1% canary",
    );

    // 100%: the blue-green switch. A connection opened now stays on v2.
    cluster
        .control
        .sluicectl_ok(&["rollout", "web", "--to", "v2", "--percent", "100"]);
    cluster.wait_programmed();
    assert_near(&cluster.spread(1, vip, 30), &[(4, 30)], "100% to v2");
    let mut held = cluster.hold(1, vip, 1);
    let (on_v2, first) = &mut held[0];
    assert_eq!(first, "backend-4");

    // Undo: every new flow back on v1 at once; the established one stays.
    let out = cluster.control.sluicectl_ok(&["rollout", "web", "--undo"]);
    assert!(out.contains("rolled back"), "{out}");
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(1, vip, 300),
        &[(1, 100), (2, 100), (3, 100)],
        "after undo",
    );
    assert_eq!(
        on_v2.get().expect("established flow after undo"),
        "backend-4"
    );
    let service = cluster.control.sluicectl_json(&["get", "service", "web"]);
    assert_eq!(service["rollout"]["percent"], 0, "{service}");
}

#[test]
fn an_unhealthy_backend_leaves_rotation_on_every_node_and_comes_back() {
    // Four nodes: each backend is probed by three of them (rendezvous hashing),
    // so one node learns every verdict about its backend from the others.
    const NODES: u8 = 4;
    let mut cluster = Cluster::start(NODES, 3, &[]);
    let mut docs = vec![web("round-robin", HEALTH_CHECK)];
    docs.extend((1..=3).map(|i| endpoint(i, "", "")));
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    for k in 1..=NODES as usize {
        assert_near(
            &cluster.spread(k, vip, 30),
            &[(1, 10), (2, 10), (3, 10)],
            &format!("node-{k}, all healthy"),
        );
    }
    // Probes come from the nodes' fabric addresses; clients use others.
    thread::sleep(HEALTH_BOUND);
    for (i, server) in cluster.servers.iter().enumerate() {
        let probers: std::collections::BTreeSet<_> = server
            .peers()
            .into_iter()
            .map(|p| p.ip())
            .filter(|ip| {
                (1..=NODES).any(|k| {
                    *ip == std::net::IpAddr::from(cluster.topology.node(k.into()).fabric_addr())
                })
            })
            .collect();
        assert_eq!(
            probers.len(),
            3,
            "backend-{} was probed by {probers:?}, not by 3 of the {NODES} nodes",
            i + 1
        );
    }
    // Established connections on the backends that stay healthy.
    let mut held: Vec<(HttpConn, String)> = cluster
        .hold(1, vip, 3)
        .into_iter()
        .filter(|(_, backend)| backend != "backend-3")
        .collect();
    assert_eq!(held.len(), 2);

    // backend-3's server dies. After the bound no request fails, on any
    // node, and none reaches it.
    cluster.servers[2].stop();
    thread::sleep(HEALTH_BOUND);
    for k in 1..=NODES as usize {
        assert_near(
            &cluster.spread(k, vip, 40),
            &[(1, 20), (2, 20)],
            &format!("node-{k}, backend-3 down"),
        );
    }
    for (conn, backend) in &mut held {
        assert_eq!(&conn.get().expect("established flow"), backend);
    }
    let status = cluster.agents[0].status_json();
    assert!(
        status.to_string().contains("\"draining\""),
        "node-1 status shows no draining backend: {status}"
    );
    assert!(
        cluster
            .control
            .log()
            .contains("backend unhealthy by its probers"),
        "{}",
        cluster.control.log()
    );

    // It comes back: so does its share.
    cluster.restart_backend(3);
    thread::sleep(HEALTH_BOUND);
    for k in 1..=NODES as usize {
        assert_near(
            &cluster.spread(k, vip, 30),
            &[(1, 10), (2, 10), (3, 10)],
            &format!("node-{k}, backend-3 back"),
        );
    }
}

#[test]
fn a_draining_backend_keeps_its_connections_until_the_drain_timeout() {
    let cluster = Cluster::start(1, 3, &[]);
    let service = web("round-robin", "drainTimeoutSeconds: 3");
    let endpoints = |draining: bool| -> Vec<String> {
        (1..=3)
            .map(|i| {
                let extra = if draining && i == 2 {
                    "draining: true"
                } else {
                    ""
                };
                endpoint(i, "", extra)
            })
            .collect()
    };
    let mut docs = vec![service.clone()];
    docs.extend(endpoints(false));
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let mut held = cluster.hold(1, vip, 3);
    held.sort_by(|a, b| a.1.cmp(&b.1));
    let names: Vec<&str> = held.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(names, ["backend-1", "backend-2", "backend-3"]);

    // Drained: new flows go elsewhere, the established one goes on.
    cluster.apply(&documents(&endpoints(true)));
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(1, vip, 40),
        &[(1, 20), (3, 20)],
        "backend-2 draining",
    );
    for (conn, backend) in &mut held {
        assert_eq!(
            &conn.get().expect("established flow while draining"),
            backend
        );
    }
    let listed = cluster.control.sluicectl_ok(&["get", "endpoints"]);
    assert!(listed.contains("draining"), "{listed}");

    // The drain timeout (3 s) ends it; the others are untouched.
    thread::sleep(Duration::from_secs(5));
    let (drained, _) = &mut held[1];
    assert!(
        drained.get().is_err(),
        "the draining backend's connection outlived the drain timeout"
    );
    for i in [0, 2] {
        let (conn, backend) = &mut held[i];
        assert_eq!(
            &conn.get().expect("connection on a serving backend"),
            backend
        );
    }
    assert!(
        cluster.agents[0].log().contains("drain timeout"),
        "{}",
        cluster.agents[0].log()
    );
    // New connections still all succeed.
    let to = SocketAddrV4::new(vip, 80);
    cluster.topology.node(1).client.enter(|| {
        for i in 0..10 {
            sluice_tests::http_get(to, TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i} after the drain: {e}"));
        }
    });
}

#[test]
fn topology_aware_flows_stay_in_zone_and_fall_back_when_the_zone_is_down() {
    // node-1 is in zone-a, node-2 in zone-b; backends 1, 2 in zone-a, 3, 4 in zone-b.
    let mut cluster = Cluster::start(2, 4, &[]);
    let mut docs = vec![web(
        "round-robin",
        &format!("topologyAware: true\n{HEALTH_CHECK}"),
    )];
    for (i, zone) in [(1, "zone-a"), (2, "zone-a"), (3, "zone-b"), (4, "zone-b")] {
        docs.push(endpoint(i, "", &format!("zone: {zone}")));
    }
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    assert_near(
        &cluster.spread(1, vip, 40),
        &[(1, 20), (2, 20)],
        "node-1 in zone-a",
    );
    assert_near(
        &cluster.spread(2, vip, 40),
        &[(3, 20), (4, 20)],
        "node-2 in zone-b",
    );

    // One zone-a backend down: zone-a still has capacity, node-1 stays in zone.
    cluster.servers[0].stop();
    thread::sleep(HEALTH_BOUND);
    assert_near(
        &cluster.spread(1, vip, 20),
        &[(2, 20)],
        "zone-a on one backend",
    );
    // Both down: node-1 falls back to zone-b; node-2 never noticed.
    cluster.servers[1].stop();
    thread::sleep(HEALTH_BOUND);
    assert_near(
        &cluster.spread(1, vip, 40),
        &[(3, 20), (4, 20)],
        "zone-a down",
    );
    assert_near(
        &cluster.spread(2, vip, 40),
        &[(3, 20), (4, 20)],
        "node-2, zone-b",
    );
    // Back in zone as soon as a zone-a backend is.
    cluster.restart_backend(1);
    thread::sleep(HEALTH_BOUND);
    assert_near(&cluster.spread(1, vip, 20), &[(1, 20)], "zone-a back");
}

#[test]
fn maglev_moves_about_one_nth_of_the_flows_when_one_of_n_backends_goes() {
    const BACKENDS: usize = 5;
    const FLOWS: u16 = 1_000;
    let cluster = Cluster::start(1, BACKENDS, &[]);
    let mut docs = vec![web("maglev", "")];
    docs.extend((1..=BACKENDS).map(|i| endpoint(i, "", "")));
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let to = SocketAddrV4::new(vip, 80);
    // The same flows (client address and source port) before and after.
    let place = || -> Vec<String> {
        cluster.topology.node(1).client.enter(|| {
            (0..FLOWS)
                .map(|i| {
                    sluice_tests::http_get_from(to, 40_000 + i, TIMEOUT)
                        .unwrap_or_else(|e| panic!("flow from port {}: {e}", 40_000 + i))
                })
                .collect()
        })
    };
    let before = place();
    // Every backend got a share: the hash spreads flows.
    let spread = sluice_tests::tally(before.iter().cloned());
    assert_eq!(spread.len(), BACKENDS, "{spread:?}");

    // backend-5 leaves (its endpoint is deleted).
    cluster
        .control
        .sluicectl_ok(&["delete", "endpoint", &format!("web-{BACKENDS}")]);
    cluster.wait_programmed();
    let after = place();
    let gone = format!("backend-{BACKENDS}");
    assert!(
        after.iter().all(|b| *b != gone),
        "a flow still reached {gone}"
    );
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let had_to_move = before.iter().filter(|b| **b == gone).count();
    let disruption = moved as f64 / f64::from(FLOWS);
    let bound = 1.2 / BACKENDS as f64;
    eprintln!(
        "maglev: {moved} of {FLOWS} flows moved ({:.1}%; {had_to_move} were on {gone}; bound {:.0}%)",
        disruption * 100.0,
        bound * 100.0
    );
    assert!(
        disruption <= bound,
        "{moved} of {FLOWS} flows moved, more than 1.2/N"
    );
}

#[test]
fn session_affinity_through_the_control_service_keeps_a_client_on_one_backend() {
    let cluster = Cluster::start(2, 3, &[]);
    let mut docs = vec![web(
        "round-robin",
        "sessionAffinity: { clientIP: { timeoutSeconds: 300 } }",
    )];
    docs.extend((1..=3).map(|i| endpoint(i, "", "")));
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    // Each node's client sticks to one backend across new connections.
    for k in 1..=2 {
        let spread = cluster.spread(k, vip, 30);
        assert_eq!(spread.len(), 1, "node-{k}: {spread:?}");
    }
    // Without affinity the same clients are balanced again.
    let mut docs = vec![web("round-robin", "")];
    docs.extend((1..=3).map(|i| endpoint(i, "", "")));
    cluster.apply(&documents(&docs));
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(1, vip, 30),
        &[(1, 10), (2, 10), (3, 10)],
        "affinity removed",
    );
}
