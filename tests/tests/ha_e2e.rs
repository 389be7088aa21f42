//! The replicated control plane with real binaries: three `sluice-control`
//! replicas on a 3-member etcd, two joined agents, traffic through both.
//! A health check whose probers report to different replicas takes a dead
//! backend out on both nodes.
//! Kill -9 of the replicas the agents watch: each resumes on the third (the
//! time is printed), forwarding and long-lived connections never stop, the
//! view continues without a full resend, and an update through the
//! surviving replica reaches both. Then etcd loses its quorum: writes fail
//! with sluicectl's "unavailable" exit status while the agents forward, and
//! all resumes when the quorum is back.
//!
//! Needs root; the harness skips nothing: a failure to set up is a failure.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use sluice_tests::{
    HttpConn,
    cluster::TIMEOUT,
    ha::{HaCluster, RESUME_BOUND, web},
    http_get,
};

const WATCHING: &str = "watching the node's view";
const WHOLE_VIEW: &str = "took the whole view";

/// Polls `check` for at most 20 s.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn count(log: &str, line: &str) -> usize {
    log.matches(line).count()
}

#[test]
fn replicas_on_etcd_fail_over_under_traffic_and_survive_a_lost_quorum() {
    let mut ha = HaCluster::start(2, 2);
    ha.apply_through(0, &web(2));
    ha.wait_programmed_on(2);
    let vip = ha.vip(1, "web");
    for k in 1..=2 {
        let answered = ha.topology.spread(k, vip, 20);
        assert_eq!(
            answered.len(),
            2,
            "node-{k}: both backends answer: {answered:?}"
        );
    }
    // Every replica shows both nodes connected, whichever each watches.
    for i in 0..3 {
        let nodes = ha.replica(i).sluicectl_json(&["get", "nodes"]);
        let connected: Vec<bool> = nodes
            .as_array()
            .map(|n| n.iter().map(|n| n["connected"] == true).collect())
            .unwrap_or_default();
        assert_eq!(connected, [true, true], "replica {i}: {nodes}");
    }

    // Both nodes probe each backend, each reporting to its own replica: a
    // dead backend is out only if both votes count, on both replicas.
    ha.servers[1].stop();
    let stopped = Instant::now();
    for k in 1..=2 {
        wait_until(&format!("node-{k} takes backend-2 out"), || {
            let answered = ha.topology.try_spread(k, vip, 6);
            answered.keys().collect::<Vec<_>>() == ["backend-1"]
        });
    }
    println!(
        "a dead backend out on both nodes after {:?} (probers on two replicas)",
        stopped.elapsed()
    );
    ha.restart_backend(2);
    for k in 1..=2 {
        wait_until(&format!("node-{k} takes backend-2 back"), || {
            let answered = ha.topology.try_spread(k, vip, 10);
            answered.len() == 2 && !answered.contains_key("failed")
        });
    }

    let mut held: Vec<(HttpConn, String)> =
        (1..=2).flat_map(|k| ha.topology.hold(k, vip, 1)).collect();
    let before: Vec<(usize, usize)> = ha
        .agents
        .iter()
        .map(|a| (count(&a.log(), WATCHING), count(&a.log(), WHOLE_VIEW)))
        .collect();
    assert!(
        before.iter().all(|&(watches, _)| watches == 1),
        "one watch each: {before:?}"
    );

    // The replicas the two nodes watch die at once.
    ha.replicas[0].kill9();
    ha.replicas[1].kill9();
    let killed = Instant::now();
    let mut resumed = [None, None];
    while resumed.iter().any(Option::is_none) {
        assert!(
            killed.elapsed() < RESUME_BOUND,
            "not every node resumed within {RESUME_BOUND:?}: {resumed:?}"
        );
        for (i, agent) in ha.agents.iter().enumerate() {
            if resumed[i].is_none() && count(&agent.log(), WATCHING) > before[i].0 {
                resumed[i] = Some(killed.elapsed());
            }
        }
        // Forwarding never stops: the held connections answer throughout.
        for (k, (conn, first)) in held.iter_mut().enumerate() {
            let answer = conn
                .get()
                .unwrap_or_else(|e| panic!("node-{}: held connection: {e}", k + 1));
            assert_eq!(&answer, first, "a held connection keeps its backend");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("resumed on the surviving replica after a kill -9: {resumed:?} (goal: 3 s)");

    // An update through the survivor reaches both nodes.
    ha.apply_through(
        2,
        "kind: Service\nname: one\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\n\
         backends: [{ address: 198.19.0.11 }]\n",
    );
    ha.wait_programmed_on(2);
    let one = ha.vip(2, "one");
    for k in 1..=2 {
        let answered = ha.topology.spread(k, one, 5);
        assert_eq!(
            answered.keys().collect::<Vec<_>>(),
            ["backend-1"],
            "node-{k}"
        );
    }
    for (i, agent) in ha.agents.iter().enumerate() {
        assert_eq!(
            count(&agent.log(), WHOLE_VIEW),
            before[i].1,
            "node-{}: resumed from its version, no whole view again",
            i + 1
        );
    }

    // etcd loses its quorum: writes fail as unavailable, traffic flows.
    ha.etcd.kill(0).expect("kill etcd member");
    ha.apply_through(2, &web(1));
    ha.etcd.kill(1).expect("kill etcd member");
    const NEW: &str = "kind: Service\nname: later\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\n\
                       backends: [{ address: 198.19.0.12 }]\n";
    let refused = ha.replica(2).apply("down.yaml", NEW);
    assert_eq!(
        refused.status.code(),
        Some(6),
        "unavailable without a quorum: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for k in 1..=2 {
        assert!(!ha.topology.spread(k, vip, 5).is_empty());
        let (conn, first) = &mut held[k - 1];
        assert_eq!(&conn.get().expect("held connection"), first);
    }
    ha.etcd.revive().expect("quorum back");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = ha.replica(2).apply("up.yaml", NEW);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume with the quorum: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    ha.wait_programmed_on(2);
    let later = ha.vip(2, "later");
    for k in 1..=2 {
        assert_eq!(
            ha.topology.spread(k, vip, 20).len(),
            2,
            "node-{k}: both backends"
        );
        let answered = ha.topology.spread(k, later, 3);
        assert_eq!(
            answered.keys().collect::<Vec<_>>(),
            ["backend-2"],
            "node-{k}"
        );
    }
}

/// Apply `i` of the series: two endpoints, so that half of one would show.
fn numbered(i: usize) -> String {
    format!(
        "kind: Endpoint\nname: e{i}-a\nlabels: {{ series: s{i} }}\naddress: 198.19.1.1\n---\n\
         kind: Endpoint\nname: e{i}-b\nlabels: {{ series: s{i} }}\naddress: 198.19.1.2\n"
    )
}

/// The names `kind` lists through replica `i`.
fn names(ha: &HaCluster, i: usize, kind: &str) -> std::collections::BTreeSet<String> {
    let listed = ha.replica(i).sluicectl_json(&["get", kind]);
    listed
        .as_array()
        .map(|objects| {
            objects
                .iter()
                .filter_map(|o| o["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_acknowledged_write_survives_replica_and_member_kills_and_no_vip_is_given_twice() {
    const SERIES: usize = 500;
    let mut ha = HaCluster::start(1, 1);
    let mut acknowledged = Vec::new();
    let mut down: Option<usize> = None;
    for i in 0..SERIES {
        // Through the replicas in turn, skipping one that is down.
        let mut through = i % 3;
        if down == Some(through) {
            through = (through + 1) % 3;
        }
        let mut apply = ha
            .replica(through)
            .apply_command("series.yaml", &numbered(i));
        let child = apply.spawn().expect("sluicectl");
        match i % 100 {
            // kill -9 of the replica while its apply may be in flight.
            30 => {
                std::thread::sleep(Duration::from_millis((i % 7) as u64 * 3));
                ha.replicas[through].kill9();
                down = Some(through);
            }
            60 => {
                if let Some(r) = down.take() {
                    ha.replicas[r].restart();
                }
            }
            _ => {}
        }
        match i {
            250 => ha.etcd.kill(1).expect("kill etcd member"),
            350 => ha.etcd.restart(1).expect("restart etcd member"),
            _ => {}
        }
        let out = child.wait_with_output().expect("sluicectl");
        if out.status.success() {
            acknowledged.push(i);
        }
    }
    if let Some(r) = down {
        ha.replicas[r].restart();
    }
    println!(
        "{} of {SERIES} applies acknowledged through replica and etcd member kills",
        acknowledged.len()
    );
    assert!(acknowledged.len() >= SERIES - 20, "{}", acknowledged.len());

    // Every acknowledged write is there, on every replica; nothing is half there.
    let deadline = Instant::now() + Duration::from_secs(20);
    let endpoints = loop {
        let all: Vec<_> = (0..3).map(|i| names(&ha, i, "endpoints")).collect();
        if all.iter().all(|n| *n == all[0]) {
            break all[0].clone();
        }
        assert!(Instant::now() < deadline, "replicas disagree");
        std::thread::sleep(Duration::from_millis(200));
    };
    for &i in &acknowledged {
        assert!(
            endpoints.contains(&format!("e{i}-a")),
            "apply {i} was acknowledged"
        );
    }
    for i in 0..SERIES {
        assert_eq!(
            endpoints.contains(&format!("e{i}-a")),
            endpoints.contains(&format!("e{i}-b")),
            "apply {i} is half there"
        );
    }

    // Creations without a VIP, many at once through all three replicas.
    const CREATES: usize = 200;
    let mut children = Vec::new();
    for i in 0..CREATES {
        let text = format!(
            "kind: Service\nname: c{i}\nports: [{{ port: 80, protocol: TCP }}]\nselector: {{ app: c{i} }}\n"
        );
        let mut apply = ha.replica(i).apply_command(&format!("c{i}.yaml"), &text);
        children.push(apply.spawn().expect("sluicectl"));
        // A wave of 40 at a time: concurrent, within the machine's process limits.
        if children.len() == 40 {
            for child in children.drain(..) {
                let out = child.wait_with_output().expect("sluicectl");
                assert!(
                    out.status.success(),
                    "a concurrent create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    for child in children {
        let out = child.wait_with_output().expect("sluicectl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listed = ha.replica(0).sluicectl_json(&["get", "services"]);
    let vips: std::collections::BTreeSet<String> = listed
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|s| s["vip"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        vips.len(),
        CREATES,
        "{CREATES} services, no VIP given twice"
    );
}

#[test]
fn an_embedded_cluster_migrated_to_etcd_keeps_its_vips_and_its_joined_agents() {
    use sluice_control::testing::EtcdCluster;
    use sluice_tests::{
        Agent, ClusterTopology, ControlService, HttpServer,
        agent::agent_bin,
        cluster::{CONTROL_ADDR, VIP_CIDR},
        control::control_bin,
    };

    let topology = ClusterTopology::build(1, 1);
    let backend = &topology.backends[0];
    let _server = HttpServer::start(&backend.ns, backend.addr, 8080, "backend-1");
    let mut embedded = ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, &[]);
    let (token, ca_hash) = embedded.join_token("10m");
    let node = topology.node(1);
    let agent = Agent::try_launch(
        &agent_bin(),
        &node.ns,
        node.join_args(&embedded.url(), &token, &ca_hash),
    )
    .unwrap_or_else(|f| panic!("node-1: {f}"));
    let out = embedded.apply("web.yaml", &web(1));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = embedded.sluicectl_json(&["get", "service", "web"]);
    let vip: Ipv4Addr = listed["vip"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a VIP");
    embedded
        .wait_programmed(&["node-1"], 1, Duration::from_secs(20))
        .expect("programmed");

    // Stop the single machine, move its store into etcd as it is.
    embedded.kill9();
    let data = embedded.scratch().join("data");
    let etcd = EtcdCluster::start_in_netns(3, topology.control.name()).expect("etcd");
    let migrated = topology.control.exec(&[
        &control_bin().display().to_string(),
        "migrate",
        "--from",
        &data.display().to_string(),
        "--to",
        &etcd.url(),
    ]);
    assert!(
        migrated.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    // A replica on etcd where the single machine was, with the key it sealed with.
    let key = data.join(sluice_control::sealing::GENERATED_KEY_FILE);
    let replica = ControlService::start(
        &topology.control,
        CONTROL_ADDR,
        VIP_CIDR,
        &[
            "--store",
            &etcd.url(),
            "--encryption-key-file",
            &key.display().to_string(),
        ],
    );
    let listed = replica.sluicectl_json(&["get", "service", "web"]);
    assert_eq!(
        listed["vip"].as_str(),
        Some(vip.to_string().as_str()),
        "same VIP"
    );
    // The node joined before comes back with its certificate, and follows.
    let out = replica.apply(
        "later.yaml",
        "kind: Service\nname: later\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\n\
         backends: [{ address: 198.19.0.11 }]\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let desired = replica.view_version();
    replica
        .wait_programmed(&["node-1"], desired, Duration::from_secs(30))
        .unwrap_or_else(|last| panic!("node-1 did not follow the migrated cluster: {last}"));
    let later: Ipv4Addr = replica.sluicectl_json(&["get", "service", "later"])["vip"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a VIP");
    for to in [vip, later] {
        let answered = node
            .client
            .enter(|| http_get(SocketAddrV4::new(to, 80), TIMEOUT))
            .unwrap_or_else(|e| panic!("{to}: {e}"));
        assert_eq!(answered, "backend-1");
    }
    drop((agent, replica, etcd));
}
