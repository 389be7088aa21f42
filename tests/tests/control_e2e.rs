//! End to end through the control service: a real `sluice-control`, agents
//! that joined it on two nodes, `sluicectl` driving it, real servers and
//! clients, all in network namespaces (see `sluice_tests::cluster`).
//!
//! Requires root. Run with `cargo xtask test`, or after
//! `cargo build --workspace --exclude sluice-ebpf --bins` with
//! `cargo test -p sluice-tests --test control_e2e`.

use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use sluice_tests::{
    Agent, ClusterTopology, ControlService, HttpConn,
    agent::agent_bin,
    cluster::{
        CONTROL_ADDR, Cluster, PROPAGATION, TIMEOUT, VIP_CIDR, assert_near, backend_addr, count,
    },
    control::sluicectl_bin,
};

/// `sluicectl` exit statuses (see `sluicectl --help`).
const EXIT_DENIED: i32 = 4;
const EXIT_CONFLICT: i32 = 5;
const EXIT_UNREACHABLE: i32 = 6;

/// A service selecting its endpoints by label, and two of them.
fn web(algorithm: &str) -> String {
    format!(
        "kind: Service
name: web
ports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]
algorithm: {algorithm}
selector: {{ app: web }}
---
{}---
{}",
        endpoint(1, 1),
        endpoint(2, 1)
    )
}

fn endpoint(i: usize, weight: u32) -> String {
    format!(
        "kind: Endpoint
name: web-{i}
labels: {{ app: web }}
address: {}
weight: {weight}
",
        backend_addr(i)
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn one_apply_programs_every_node_and_updates_follow_through_a_control_restart() {
    let mut cluster = Cluster::start(2, 3, &[]);

    // Declared once, with no VIP: allocated from the pool.
    let applied = cluster.apply(&web("weighted-round-robin"));
    assert!(applied.contains("service/default/web created"), "{applied}");
    assert!(
        applied.contains("endpoint/default/web-1 created"),
        "{applied}"
    );
    let vip = cluster.web_vip();
    assert!(
        vip.octets().starts_with(&[198, 18, 100]),
        "{vip} from {VIP_CIDR}"
    );
    cluster.wait_programmed();
    for k in 1..=2 {
        let spread = cluster.spread(k, vip, 40);
        assert_near(&spread, &[(1, 20), (2, 20)], &format!("node-{k}, 1:1"));
    }
    // Idempotent.
    let again = cluster.apply(&web("weighted-round-robin"));
    assert!(again.contains("service/default/web unchanged"), "{again}");

    // New weights, and a third endpoint that only has to carry the label.
    cluster.apply(&format!(
        "{}---\n{}---\n{}",
        endpoint(1, 1),
        endpoint(2, 3),
        endpoint(3, 2)
    ));
    cluster.wait_programmed();
    for k in 1..=2 {
        let spread = cluster.spread(k, vip, 60);
        assert_near(
            &spread,
            &[(1, 10), (2, 30), (3, 20)],
            &format!("node-{k}, 1:3:2"),
        );
    }
    let described = cluster
        .control
        .sluicectl_ok(&["describe", "service", "web"]);
    for name in ["node-1", "node-2", "198.19.0.13"] {
        assert!(
            described.contains(name),
            "describe lacks {name}:\n{described}"
        );
    }

    // The control service dies while both agents watch. Forwarding goes
    // on: a long-lived connection and new ones, on the last view.
    let mut long_lived = cluster
        .topology
        .node(1)
        .client
        .enter(|| HttpConn::connect(SocketAddrV4::new(vip, 80), TIMEOUT).expect("connect"));
    let first = long_lived.get().expect("long-lived request");
    let before = cluster
        .control
        .sluicectl_ok(&["get", "services", "-o", "yaml"]);
    cluster.control.kill9();
    for k in 1..=2 {
        let spread = cluster.spread(k, vip, 60);
        assert_near(
            &spread,
            &[(1, 10), (2, 30), (3, 20)],
            &format!("node-{k}, control down"),
        );
    }
    let down = cluster.control.sluicectl(&["get", "services"]);
    assert_eq!(
        down.status.code(),
        Some(EXIT_UNREACHABLE),
        "{}",
        stderr(&down)
    );
    assert!(
        stderr(&down).contains(&CONTROL_ADDR.to_string()),
        "{}",
        stderr(&down)
    );
    for agent in &cluster.agents {
        assert!(
            agent.wait_for_log(
                "lost the control service, forwarding with the last view",
                1,
                TIMEOUT
            ),
            "{}",
            agent.log()
        );
    }

    // Back with the same state; the agents resume where they were.
    cluster.control.restart();
    let after = cluster
        .control
        .sluicectl_ok(&["get", "services", "-o", "yaml"]);
    assert_eq!(after, before, "the state survives kill -9");
    for agent in &cluster.agents {
        assert!(
            agent.wait_for_log("watching the node's view", 2, PROPAGATION),
            "{}",
            agent.log()
        );
    }
    assert_eq!(long_lived.get().expect("still served"), first);
    let log = cluster.control.log();
    let since_restart = log.rsplit("=== sluice-tests").next().unwrap_or_default();
    let watches: Vec<&str> = since_restart
        .lines()
        .filter(|l| l.contains("watching its view"))
        .collect();
    assert_eq!(watches.len(), 2, "{since_restart}");
    assert!(
        watches.iter().all(|l| !l.contains("since=0")),
        "agents resume from their applied version, not from scratch:\n{since_restart}"
    );

    // A change after the restart reaches both nodes.
    let deleted = cluster
        .control
        .sluicectl_ok(&["delete", "endpoint", "web-2"]);
    assert!(deleted.contains("web-2"), "{deleted}");
    cluster.wait_programmed();
    for k in 1..=2 {
        let spread = cluster.spread(k, vip, 30);
        assert_near(
            &spread,
            &[(1, 10), (3, 20)],
            &format!("node-{k}, web-2 gone"),
        );
    }
    // They report their counters too (every 5 s): the new flows they balanced.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let nodes = cluster.control.sluicectl_json(&["get", "nodes"]);
        let flows = |node: &serde_json::Value| -> u64 {
            node["traffic"]
                .as_array()
                .map_or(0, |t| t.iter().filter_map(|f| f["newFlows"].as_u64()).sum())
        };
        let listed = nodes.as_array().expect("a list");
        if listed.len() == 2
            && listed
                .iter()
                .all(|n| n["connected"] == true && flows(n) >= 100)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no counters reported: {nodes}"
        );
        thread::sleep(Duration::from_millis(200));
    }

    // A clean stop right after an update leaves that view saved for the
    // next start.
    cluster.apply(&endpoint(2, 1));
    cluster.wait_programmed();
    let version = cluster.control.view_version();
    let agent = &mut cluster.agents[1];
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit(TIMEOUT).expect("stops on SIGTERM");
    assert!(status.success(), "{status}");
    let saved =
        std::fs::read_to_string(Path::new(&cluster.topology.node(2).state_dir()).join("view.json"))
            .expect("a saved view");
    let saved: serde_json::Value = serde_json::from_str(&saved).expect("JSON");
    assert_eq!(saved["version"], version, "{saved}");
}

#[test]
fn reused_and_expired_tokens_forged_certificates_and_removed_nodes_are_refused() {
    // node-1 joins; node-2 is wired up but has not joined.
    let mut cluster = Cluster::start_joined(2, 1, 1, &[]);
    cluster.apply(&format!(
        "kind: Service
name: web
ports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]
selector: {{ app: web }}
---
{}",
        endpoint(1, 1)
    ));
    let vip = cluster.web_vip();
    let node1 = ["node-1"];
    cluster
        .control
        .wait_programmed(&node1, 1, PROPAGATION)
        .expect("node-1 programmed");

    // A token joins one node only; a refused join keeps nothing.
    let (used, ca_hash) = cluster.tokens[0].clone();
    let reused = cluster
        .join_with(2, &used, &ca_hash)
        .expect_err("a used token");
    assert!(!reused.status.success());
    assert!(reused.log.contains("already used"), "{}", reused.log);
    let state2 = Path::new(&cluster.topology.node(2).state_dir()).to_owned();
    assert!(
        !state2.join("node.key").exists(),
        "nothing kept from a refused join"
    );

    let (short, _) = cluster.control.join_token("1s");
    thread::sleep(Duration::from_millis(2100));
    let expired = cluster
        .join_with(2, &short, &ca_hash)
        .expect_err("an expired token");
    assert!(expired.log.contains("expired"), "{}", expired.log);

    let (fresh, _) = cluster.control.join_token("10m");
    let pin = format!("sha256:{}", "0".repeat(64));
    let wrong_pin = cluster
        .join_with(2, &fresh, &pin)
        .expect_err("a wrong CA pin");
    assert!(wrong_pin.log.contains("pin"), "{}", wrong_pin.log);

    // A certificate from another CA (a second cluster's), presented to this
    // one with this cluster's CA trusted: refused in the TLS handshake. (Its
    // port is not 7444, where the first one serves its dashboard, and it
    // serves none; its metrics go to another port than the first's.)
    let mut foreign = ControlService::start(
        &cluster.topology.control,
        SocketAddrV4::new(*CONTROL_ADDR.ip(), 7445),
        VIP_CIDR,
        &[
            "--dashboard-listen",
            "off",
            "--metrics-listen",
            "127.0.0.1:9466",
        ],
    );
    let (foreign_token, foreign_hash) = foreign.join_token("10m");
    let node2 = cluster.topology.node(2);
    let mut joined_elsewhere = Agent::try_launch(
        &agent_bin(),
        &node2.ns,
        node2.join_args(&foreign.url(), &foreign_token, &foreign_hash),
    )
    .expect("joins the other cluster");
    joined_elsewhere.kill9();
    foreign.kill9();
    let state1 = Path::new(&cluster.topology.node(1).state_dir()).to_owned();
    std::fs::copy(state1.join("ca.crt"), state2.join("ca.crt")).expect("copy the CA");
    std::fs::write(
        state2.join("control"),
        format!("{}\n", cluster.control.url()),
    )
    .expect("point at this cluster");
    drop(joined_elsewhere);
    let forged = Agent::try_launch(&agent_bin(), &node2.ns, node2.run_args())
        .expect("starts with the node's saved identity");
    assert!(
        forged.wait_for_log("rejected this node's certificate", 1, PROPAGATION),
        "{}",
        forged.log()
    );
    assert!(
        forged.log().contains("this cluster's CA"),
        "{}",
        forged.log()
    );
    drop(forged);

    // A removed node is cut off, and keeps forwarding with its last view.
    let removed = cluster.control.sluicectl_ok(&["node", "remove", "node-1"]);
    assert!(removed.contains("node-1"), "{removed}");
    let refused = "the control service refused this node";
    assert!(
        cluster.agents[0].wait_for_log(refused, 1, PROPAGATION),
        "{}",
        cluster.agents[0].log()
    );
    assert!(
        cluster.agents[0].log().contains("was removed"),
        "{}",
        cluster.agents[0].log()
    );
    assert_eq!(count(&cluster.spread(1, vip, 10), 1), 10);
    // Restarted, it is refused again (its certificate is revoked) and
    // programs the view it saved.
    cluster.agents[0].restart();
    assert!(
        cluster.agents[0].wait_for_log(refused, 2, PROPAGATION),
        "{}",
        cluster.agents[0].log()
    );
    assert_eq!(count(&cluster.spread(1, vip, 10), 1), 10);
}

#[test]
fn certificates_rotate_under_an_open_watch_and_an_expired_one_is_refused() {
    // Node certificates live 6 s: renewed every 4 s.
    let mut cluster = Cluster::start(1, 2, &["--node-cert-ttl", "6"]);
    let agent = &cluster.agents[0];
    assert!(
        agent.wait_for_log("renewed the node certificate", 2, Duration::from_secs(15)),
        "{}",
        agent.log()
    );
    // Still the first watch, and it still delivers.
    cluster.apply(&web("round-robin"));
    cluster.wait_programmed();
    let agent = &cluster.agents[0];
    assert_eq!(
        agent.log().matches("watching the node's view").count(),
        1,
        "the watch survived rotation:\n{}",
        agent.log()
    );
    let vip = cluster.web_vip();
    assert_near(
        &cluster.spread(1, vip, 20),
        &[(1, 10), (2, 10)],
        "after rotation",
    );

    // Stopped past its certificate's end, the agent comes back refused,
    // with the reason, and forwards with the view it saved.
    cluster.agents[0].kill9();
    thread::sleep(Duration::from_secs(7));
    cluster.agents[0].restart();
    let agent = &cluster.agents[0];
    assert!(
        agent.wait_for_log("it has expired", 1, PROPAGATION),
        "{}",
        agent.log()
    );
    assert_near(
        &cluster.spread(1, vip, 20),
        &[(1, 10), (2, 10)],
        "expired, saved view",
    );
}

#[test]
fn a_viewer_cannot_apply_and_concurrent_updates_conflict() {
    let topology = ClusterTopology::build(1, 0);
    let control = ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, &[]);
    let conf = control.scratch().join("viewer.conf");
    let created = control.sluicectl_ok(&[
        "user",
        "create",
        "vera",
        "--group",
        "auditors",
        "--out",
        &conf.display().to_string(),
    ]);
    assert!(created.contains("vera"), "{created}");
    let grant = "kind: Grant
name: auditors-view
subject: { group: auditors }
role: viewer
scope: default
";
    let out = control.apply("grant.yaml", &format!("{grant}---\n{}", web("round-robin")));
    assert!(out.status.success(), "{}", stderr(&out));

    let seen = control.sluicectl_as(&conf, &["get", "services"]);
    assert!(seen.status.success(), "{}", stderr(&seen));
    assert!(String::from_utf8_lossy(&seen.stdout).contains("web"));
    let path = control
        .scratch()
        .write("change.yaml", web("least-connections"));
    let denied = control.sluicectl_as(&conf, &["apply", "-f", &path.display().to_string()]);
    assert_eq!(
        denied.status.code(),
        Some(EXIT_DENIED),
        "{}",
        stderr(&denied)
    );
    assert!(
        stderr(&denied).contains("lacks the permission `update services`"),
        "{}",
        stderr(&denied)
    );
    let unchanged = control.sluicectl_json(&["get", "service", "web"]);
    assert_eq!(unchanged["algorithm"], "round-robin", "nothing applied");

    // Two admins change the same service at once. Each reads, then writes
    // with the version it read: one wins, the other gets a conflict. Many
    // unchanged filler objects stretch the read phase so both reads come
    // before either write.
    let filler: String = (1..=150)
        .map(|i| {
            format!(
                "---\nkind: Endpoint\nname: filler-{i}\naddress: 198.19.9.{}\n",
                i % 250 + 1
            )
        })
        .collect();
    let out = control.apply("filler.yaml", &filler[4..]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut conflicts = 0;
    for round in 0..5 {
        let edits: Vec<_> = ["least-connections", "weighted-round-robin"]
            .iter()
            .map(|algorithm| {
                let text = format!(
                    "kind: Service\nname: web\nports: [{{ port: 80, protocol: TCP, targetPort: {} }}]\nalgorithm: {algorithm}\nselector: {{ app: web }}\n{filler}",
                    8000 + round
                );
                control.scratch().write(&format!("edit-{algorithm}.yaml"), text)
            })
            .collect();
        let children: Vec<_> = edits
            .iter()
            .map(|path| {
                Command::new("ip")
                    .args(["netns", "exec", topology.control.name()])
                    .arg(sluicectl_bin())
                    .arg("--config")
                    .arg(control.admin_conf())
                    .args(["apply", "-f"])
                    .arg(path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("sluicectl")
            })
            .collect();
        let outputs: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().expect("sluicectl"))
            .collect();
        let won: Vec<_> = outputs.iter().filter(|o| o.status.success()).collect();
        assert!(
            !won.is_empty(),
            "one of two concurrent applies wins: {outputs:?}"
        );
        for lost in outputs.iter().filter(|o| !o.status.success()) {
            assert_eq!(lost.status.code(), Some(EXIT_CONFLICT), "{}", stderr(lost));
            assert!(stderr(lost).contains("conflict"), "{}", stderr(lost));
            conflicts += 1;
        }
        let stored = control.sluicectl_json(&["get", "service", "web"]);
        assert_eq!(stored["ports"][0]["targetPort"], 8000 + round, "{stored}");
    }
    assert!(conflicts > 0, "no two applies overlapped in 5 rounds");
}
