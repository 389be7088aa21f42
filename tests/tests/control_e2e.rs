//! End to end through the control service: a real `sluice-control`, agents
//! that joined it on two nodes, `sluicectl` driving it, real servers and
//! clients, all in network namespaces (see `sluice_tests::cluster`).
//!
//! Requires root. Run with `cargo xtask test`, or after
//! `cargo build --workspace --exclude sluice-ebpf --bins` with
//! `cargo test -p sluice-tests --test control_e2e`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use sluice_tests::{
    Agent, ClusterTopology, ControlService, HttpConn, HttpServer, StartFailure,
    agent::agent_bin,
    cluster::{CONTROL_ADDR, VIP_CIDR, backend_addr},
    control::sluicectl_bin,
    http_get, tally,
};

const TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on an applied change reaching every agent.
const PROPAGATION: Duration = Duration::from_secs(20);
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

/// The cluster: control service, joined agents, backends with servers.
/// Fields drop in order: agents (their `down` needs the namespaces), servers,
/// the control service, then the namespaces.
struct Cluster {
    agents: Vec<Agent>,
    /// (token, CA pin) each agent joined with.
    tokens: Vec<(String, String)>,
    /// Kept serving until the cluster drops.
    _servers: Vec<HttpServer>,
    control: ControlService,
    topology: ClusterTopology,
}

impl Cluster {
    /// `nodes` nodes, each joined with its own token; `backends` backends,
    /// each serving its name (`backend-<i>`) on :8080.
    fn start(nodes: u8, backends: usize, control_args: &[&str]) -> Self {
        Self::start_joined(nodes, nodes, backends, control_args)
    }

    /// Like [`Cluster::start`], with only the first `joined` nodes joined.
    fn start_joined(nodes: u8, joined: u8, backends: usize, control_args: &[&str]) -> Self {
        let topology = ClusterTopology::build(nodes, backends);
        let servers = topology
            .backends
            .iter()
            .map(|b| HttpServer::start(&b.ns, b.addr, 8080, &format!("backend-{}", b.index)))
            .collect();
        let control =
            ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, control_args);
        let mut cluster = Cluster {
            agents: Vec::new(),
            tokens: Vec::new(),
            _servers: servers,
            control,
            topology,
        };
        for k in 1..=joined as usize {
            let (token, ca_hash) = cluster.control.join_token("10m");
            let agent = cluster
                .join_with(k, &token, &ca_hash)
                .unwrap_or_else(|f| panic!("node-{k}: {f}"));
            cluster.agents.push(agent);
            cluster.tokens.push((token, ca_hash));
        }
        cluster
    }

    fn join_with(&self, k: usize, token: &str, ca_hash: &str) -> Result<Agent, StartFailure> {
        let node = self.topology.node(k);
        Agent::try_launch(
            &agent_bin(),
            &node.ns,
            node.join_args(&self.control.url(), token, ca_hash),
        )
    }

    /// The nodes that joined.
    fn node_names(&self) -> Vec<String> {
        self.topology.nodes[..self.agents.len()]
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// Applies `manifest`, expecting success; returns sluicectl's output.
    fn apply(&self, manifest: &str) -> String {
        let out = self.control.apply("apply.yaml", manifest);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The view version now, then waits until every node applied it.
    fn wait_programmed(&self) {
        let names = self.node_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let desired = self.control.view_version();
        if let Err(last) = self.control.wait_programmed(&names, desired, PROPAGATION) {
            panic!("nodes did not apply view version {desired} within {PROPAGATION:?}: {last}");
        }
    }

    /// The VIP the control service allocated to `default/web`.
    fn web_vip(&self) -> Ipv4Addr {
        let service = self.control.sluicectl_json(&["get", "service", "web"]);
        service["vip"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VIP in {service}"))
    }

    /// `n` new connections from node `k`'s client to `vip:80`; who answered.
    fn spread(&self, k: usize, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
        let to = SocketAddrV4::new(vip, 80);
        let bodies = self.topology.node(k).client.enter(|| {
            (0..n)
                .map(|i| {
                    http_get(to, TIMEOUT)
                        .unwrap_or_else(|e| panic!("node-{k}: request {i} to {to}: {e}"))
                })
                .collect::<Vec<_>>()
        });
        tally(bodies)
    }
}

fn count(spread: &BTreeMap<String, usize>, backend: usize) -> usize {
    spread
        .get(&format!("backend-{backend}"))
        .copied()
        .unwrap_or(0)
}

fn assert_near(spread: &BTreeMap<String, usize>, expected: &[(usize, usize)], what: &str) {
    let total: usize = spread.values().sum();
    let listed: usize = expected.iter().map(|(b, _)| count(spread, *b)).sum();
    assert_eq!(total, listed, "{what}: unexpected backends in {spread:?}");
    for &(backend, want) in expected {
        let got = count(spread, backend);
        assert!(
            got.abs_diff(want) <= 1,
            "{what}: backend-{backend} got {got}, expected {want} ±1: {spread:?}"
        );
    }
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
    // one with this cluster's CA trusted: refused in the TLS handshake.
    let mut foreign = ControlService::start(
        &cluster.topology.control,
        SocketAddrV4::new(*CONTROL_ADDR.ip(), 7444),
        VIP_CIDR,
        &[],
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
