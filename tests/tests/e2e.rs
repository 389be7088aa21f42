//! End to end: the real `sluice-agent` in a node namespace, real HTTP and UDP
//! servers in three backend namespaces, a client namespace sending real
//! traffic to the VIP (see the topology in `sluice_tests`).
//!
//! Every scenario runs twice: with the kernel's default offloads on every veth
//! (the agent must pick TC: partial checksums, no NAPI on the peers) and with
//! the client and backend ends set to `tx off, gro on`, standing for real NICs
//! (the agent must pick native XDP).
//!
//! Needs root. `cargo xtask test` builds the agent binary first.

use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use serde_json::Value;
use sluice_tests::{
    Agent, HttpConn, HttpServer, Offloads, ScratchDir, Topology, TopologySpec, UdpServer,
    agent::{APPLIED_LINE, REJECTED_LINE},
    http_get, tally,
    topology::{backend_addr, vip},
    udp_exchange,
};

const TIMEOUT: Duration = Duration::from_secs(3);
const PROFILES: [Offloads; 2] = [Offloads::KernelDefault, Offloads::NicLike];

fn expected_hook(offloads: Offloads) -> &'static str {
    match offloads {
        Offloads::KernelDefault => "tc",
        Offloads::NicLike => "xdp",
    }
}

/// A manifest for the topology's VIP: TCP 80 → 8080 and UDP 53 → 5353 on the
/// given backends (index, weight).
fn manifest(algorithm: &str, backends: &[(usize, u32)]) -> String {
    let mut out = format!(
        "kind: Service\nname: web\nvip: {}\nports:\n  - {{ port: 80, protocol: TCP, targetPort: 8080 }}\n  - {{ port: 53, protocol: UDP, targetPort: 5353 }}\nalgorithm: {algorithm}\nbackends:\n",
        vip()
    );
    for (i, weight) in backends {
        out.push_str(&format!(
            "  - {{ address: {}, weight: {weight} }}\n",
            backend_addr(*i)
        ));
    }
    out
}

fn all_three(algorithm: &str) -> String {
    manifest(algorithm, &[(1, 1), (2, 1), (3, 1)])
}

struct Cluster {
    // Dropped first: the agent (and its pins), then servers, then namespaces.
    agent: Agent,
    http: Vec<HttpServer>,
    _udp: Vec<UdpServer>,
    topology: Topology,
    scratch: ScratchDir,
    applied: usize,
}

impl Cluster {
    fn start(offloads: Offloads, manifest_text: &str, extra_args: &[&str]) -> Self {
        let topology = Topology::build(TopologySpec {
            backends: 3,
            offloads,
        });
        let mut http = Vec::new();
        let mut udp = Vec::new();
        for i in 1..=3 {
            let b = topology.backend(i);
            http.push(HttpServer::start(
                &b.ns,
                b.addr,
                8080,
                &format!("backend-{i}"),
            ));
            udp.push(UdpServer::start(
                &b.ns,
                b.addr,
                5353,
                &format!("backend-{i}"),
            ));
        }
        let scratch = ScratchDir::new();
        let manifest = scratch.write("services.yaml", manifest_text);
        let agent = Agent::start(
            &topology.node,
            &manifest,
            &topology.node_interfaces(),
            extra_args,
        );
        let cluster = Self {
            agent,
            http,
            _udp: udp,
            topology,
            scratch,
            applied: 1,
        };
        if !extra_args.contains(&"--mode") {
            cluster.assert_hooks(expected_hook(offloads));
        }
        cluster
    }

    fn assert_hooks(&self, hook: &str) {
        let status = self.agent.status_json();
        let interfaces = status["interfaces"].as_array().expect("interfaces");
        assert_eq!(interfaces.len(), 4, "{status:#}");
        for i in interfaces {
            assert_eq!(i["hook"], hook, "{status:#}");
            assert_eq!(i["attached"], true, "{status:#}");
        }
    }

    fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topology.client.enter(f)
    }

    /// `n` new connections, one request each; the answering backends.
    fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let bodies = self.client(|| {
            (0..n)
                .map(|_| {
                    http_get(SocketAddrV4::new(vip(), 80), TIMEOUT).expect("request to the VIP")
                })
                .collect::<Vec<_>>()
        });
        tally(bodies)
    }

    fn connect(&self) -> HttpConn {
        self.client(|| HttpConn::connect(SocketAddrV4::new(vip(), 80), TIMEOUT).expect("connect"))
    }

    /// Replaces the manifest and waits until the agent applied it.
    fn change_manifest(&mut self, text: &str) {
        self.scratch.write("services.yaml", text);
        self.applied += 1;
        assert!(
            self.agent
                .wait_for_log(APPLIED_LINE, self.applied, Duration::from_secs(10)),
            "manifest change not applied:\n{}",
            self.agent.log()
        );
    }

    fn status(&self) -> Value {
        self.agent.status_json()
    }
}

/// The agents' directories under a bpffs root (a fresh bpffs also holds the
/// kernel's preloaded `maps.debug` and `progs.debug`).
fn pin_dirs(root: &std::path::Path) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(root)
        .expect("bpffs root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("ns-"))
        .collect();
    dirs.sort();
    dirs
}

fn count(spread: &BTreeMap<String, usize>, backend: usize) -> usize {
    spread
        .get(&format!("backend-{backend}"))
        .copied()
        .unwrap_or(0)
}

fn near(actual: usize, expected: usize, slack: usize) -> bool {
    actual.abs_diff(expected) <= slack
}

#[test]
fn round_robin_spreads_300_connections_evenly() {
    for offloads in PROFILES {
        let cluster = Cluster::start(offloads, &all_three("round-robin"), &[]);
        let spread = cluster.spread(300);
        for b in 1..=3 {
            assert!(near(count(&spread, b), 100, 1), "{offloads:?}: {spread:?}");
        }
        // The kernel's own counters agree, and every connection closed cleanly.
        let status = cluster.status();
        let web = &status["services"][1];
        assert_eq!(
            (&web["port"], &web["protocol"]),
            (&Value::from(80), &Value::from("TCP"))
        );
        for backend in web["backends"].as_array().expect("backends") {
            let flows = backend["stats"]["new_flows"].as_u64().expect("new_flows");
            assert!(near(flows as usize, 100, 1), "{offloads:?}: {status:#}");
            assert_eq!(
                backend["active_connections"], 0,
                "{offloads:?}: FIN returned counts"
            );
        }
        let fwd = match offloads {
            Offloads::KernelDefault => "fwd_tc",
            Offloads::NicLike => "fwd_xdp",
        };
        assert!(
            status["outcomes"][fwd].as_u64().unwrap_or(0) >= 300 * 2,
            "{status:#}"
        );
    }
}

#[test]
fn weighted_round_robin_follows_1_1_2() {
    for offloads in PROFILES {
        let text = manifest("weighted-round-robin", &[(1, 1), (2, 1), (3, 2)]);
        let cluster = Cluster::start(offloads, &text, &[]);
        let spread = cluster.spread(200);
        assert!(near(count(&spread, 1), 50, 1), "{offloads:?}: {spread:?}");
        assert!(near(count(&spread, 2), 50, 1), "{offloads:?}: {spread:?}");
        assert!(near(count(&spread, 3), 100, 1), "{offloads:?}: {spread:?}");
    }
}

#[test]
fn least_connections_sends_new_connections_to_the_least_loaded() {
    for offloads in PROFILES {
        let cluster = Cluster::start(offloads, &all_three("least-connections"), &[]);
        // Six long-lived connections: ties rotate, two each.
        let mut held: Vec<(String, HttpConn)> = (0..6)
            .map(|_| {
                let mut c = cluster.connect();
                (c.get().expect("request"), c)
            })
            .collect();
        let spread = tally(held.iter().map(|(b, _)| b.clone()));
        assert_eq!(
            spread.values().copied().collect::<Vec<_>>(),
            [2, 2, 2],
            "{offloads:?}"
        );
        // Close both on backend-2: it now holds the fewest.
        held.retain(|(b, _)| b != "backend-2");
        assert!(
            cluster.http[1].wait_open_connections(0, TIMEOUT),
            "{offloads:?}"
        );
        // New long-lived connections go there until it catches up.
        for _ in 0..2 {
            let mut c = cluster.connect();
            assert_eq!(c.get().expect("request"), "backend-2", "{offloads:?}");
            held.push(("backend-2".into(), c));
        }
        // The data plane's view matches the servers'.
        let status = cluster.status();
        for (i, backend) in status["services"][1]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .enumerate()
        {
            assert_eq!(
                backend["active_connections"], 2,
                "{offloads:?}: backend {i}: {status:#}"
            );
            assert_eq!(cluster.http[i].open_connections(), 2);
        }
        // And those still hold: each answers on its own backend.
        for (backend, conn) in &mut held {
            assert_eq!(&conn.get().expect("request"), backend);
        }
    }
}

#[test]
fn a_long_lived_connection_survives_a_manifest_change_and_an_agent_kill() {
    for offloads in PROFILES {
        let mut cluster = Cluster::start(offloads, &all_three("round-robin"), &[]);
        let mut long = cluster.connect();
        let home = long.get().expect("request");

        // The manifest changes: another algorithm, weights, one backend less
        // (not the one holding the connection).
        let leaving = if home == "backend-3" { 2 } else { 3 };
        let others: Vec<(usize, u32)> = (1..=3).filter(|&i| i != leaving).map(|i| (i, 2)).collect();
        cluster.change_manifest(&manifest("weighted-round-robin", &others));
        assert_eq!(long.get().expect("after the change"), home, "{offloads:?}");

        // The agent dies: the pinned data plane keeps forwarding.
        cluster.agent.kill9();
        assert_eq!(
            long.get().expect("while the agent is down"),
            home,
            "{offloads:?}"
        );
        let fresh = cluster.spread(10);
        assert_eq!(count(&fresh, leaving), 0, "{offloads:?}: {fresh:?}");
        assert_eq!(
            fresh.values().sum::<usize>(),
            10,
            "{offloads:?}: new connections too"
        );

        // It comes back, reusing the pins, and balancing goes on.
        cluster.agent.restart();
        assert!(
            cluster.agent.log().contains("state=Reuse"),
            "{}",
            cluster.agent.log()
        );
        assert_eq!(long.get().expect("after the restart"), home, "{offloads:?}");
        let after = cluster.spread(20);
        assert_eq!(count(&after, leaving), 0, "{offloads:?}: {after:?}");
        for (b, n) in &after {
            assert!(near(*n, 10, 1), "{offloads:?}: {b} got {n}: {after:?}");
        }
        cluster.assert_hooks(expected_hook(offloads));
    }
}

#[test]
fn udp_flows_stick_and_replies_come_from_the_vip() {
    for offloads in PROFILES {
        let cluster = Cluster::start(offloads, &all_three("round-robin"), &[]);
        let to = SocketAddrV4::new(vip(), 53);
        let answers = cluster.client(|| {
            let mut out = Vec::new();
            for _ in 0..2 {
                let socket = UdpSocket::bind("198.18.1.2:0").expect("bind");
                for _ in 0..5 {
                    out.push(udp_exchange(&socket, to, TIMEOUT).expect("UDP answer"));
                }
            }
            out
        });
        for (body, from) in &answers {
            assert_eq!(
                from.to_string(),
                to.to_string(),
                "{offloads:?}: replies come from the VIP"
            );
            assert!(body.starts_with("backend-"));
        }
        // One socket, one backend; the second socket, the next one.
        assert!(
            answers[..5].iter().all(|(b, _)| *b == answers[0].0),
            "{offloads:?}: {answers:?}"
        );
        assert!(
            answers[5..].iter().all(|(b, _)| *b == answers[5].0),
            "{offloads:?}: {answers:?}"
        );
        assert_ne!(answers[0].0, answers[5].0, "{offloads:?}");
    }
}

#[test]
fn a_removed_backend_gets_no_new_flows_and_its_udp_flows_move() {
    for offloads in PROFILES {
        let mut cluster = Cluster::start(offloads, &all_three("round-robin"), &[]);
        let to = SocketAddrV4::new(vip(), 53);
        let socket = cluster.client(|| UdpSocket::bind("198.18.1.2:0").expect("bind"));
        let (first, _) = udp_exchange(&socket, to, TIMEOUT).expect("UDP answer");
        let gone: usize = first
            .trim_start_matches("backend-")
            .parse()
            .expect("backend number");

        let remaining: Vec<(usize, u32)> = (1..=3).filter(|&i| i != gone).map(|i| (i, 1)).collect();
        cluster.change_manifest(&manifest("round-robin", &remaining));
        assert!(
            cluster.agent.log().contains("udp_flows_purged=1"),
            "{offloads:?}: {}",
            cluster.agent.log()
        );

        let spread = cluster.spread(30);
        assert_eq!(count(&spread, gone), 0, "{offloads:?}: {spread:?}");
        // The same UDP socket is balanced again instead of blackholed.
        let (again, from) = udp_exchange(&socket, to, TIMEOUT).expect("UDP answer after removal");
        assert_ne!(again, first, "{offloads:?}");
        assert_eq!(from.to_string(), to.to_string());

        let status = cluster.status();
        let states: Vec<&str> = status["services"][1]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["state"].as_str().expect("state"))
            .collect();
        assert!(
            states.contains(&"retired") || states.len() == 2,
            "{status:#}"
        );
    }
}

#[test]
fn health_checks_take_a_dead_backend_out_and_fail_closed_when_all_are_dead() {
    let checked = all_three("round-robin").replace(
        "algorithm: round-robin\n",
        "algorithm: round-robin\nhealthCheck: { tcp: {}, intervalMs: 200, timeoutMs: 100, \
         unhealthyThreshold: 2, healthyThreshold: 1, failOpen: false }\n",
    );
    // Comfortably past 2 × 200 ms + 100 ms.
    let bound = Duration::from_secs(2);
    let mut cluster = Cluster::start(Offloads::KernelDefault, &checked, &[]);
    let spread = cluster.spread(30);
    assert_eq!(spread.values().copied().collect::<Vec<_>>(), [10, 10, 10]);

    cluster.http[1].stop();
    std::thread::sleep(bound);
    let spread = cluster.spread(30);
    assert_eq!(
        (count(&spread, 1), count(&spread, 3)),
        (15, 15),
        "{spread:?}"
    );
    let status = cluster.status();
    let state = |backend: &str| -> String {
        status["services"][1]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["address"] == backend)
            .map(|b| b["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        state(&backend_addr(2).to_string()),
        "draining",
        "{status:#}"
    );

    // Every backend dead, and the service fails closed: dropped, not refused.
    cluster.http[0].stop();
    cluster.http[2].stop();
    std::thread::sleep(bound);
    let refused =
        cluster.client(|| http_get(SocketAddrV4::new(vip(), 80), Duration::from_millis(500)));
    assert!(
        refused.as_ref().is_err_and(|e| e.is_timeout()),
        "{refused:?}"
    );
    // One comes back: all new connections go to it.
    let b1 = cluster.topology.backend(1);
    cluster.http[0] = HttpServer::start(&b1.ns, b1.addr, 8080, "backend-1");
    std::thread::sleep(bound);
    let spread = cluster.spread(10);
    assert_eq!(count(&spread, 1), 10, "{spread:?}");
}

#[test]
fn client_ip_affinity_holds_a_clients_connections_until_the_manifest_drops_it() {
    for offloads in PROFILES {
        let plain = all_three("round-robin");
        let affine = plain.replace(
            "algorithm: round-robin\n",
            "algorithm: round-robin\nsessionAffinity: { clientIP: { timeoutSeconds: 300 } }\n",
        );
        let mut cluster = Cluster::start(offloads, &affine, &[]);
        let status = cluster.status();
        assert_eq!(
            status["services"][1]["session_affinity_seconds"], 300,
            "{status:#}"
        );
        // One client: every new connection goes where its first one went.
        let sticky = cluster.spread(30);
        assert_eq!(
            sticky.values().copied().collect::<Vec<_>>(),
            [30],
            "{offloads:?}: {sticky:?}"
        );

        cluster.change_manifest(&plain);
        let status = cluster.status();
        assert!(
            status["services"][1]
                .get("session_affinity_seconds")
                .is_none(),
            "{status:#}"
        );
        let spread = cluster.spread(30);
        for b in 1..=3 {
            assert_eq!(count(&spread, b), 10, "{offloads:?}: {spread:?}");
        }
    }
}

#[test]
fn a_malformed_manifest_changes_nothing() {
    for offloads in PROFILES {
        let mut cluster = Cluster::start(offloads, &all_three("round-robin"), &[]);
        let before = cluster.status();
        cluster
            .scratch
            .write("services.yaml", manifest("round-robin", &[(1, 1), (2, 0)]));
        assert!(
            cluster
                .agent
                .wait_for_log(REJECTED_LINE, 1, Duration::from_secs(10)),
            "{}",
            cluster.agent.log()
        );
        let log = cluster.agent.log();
        assert!(
            log.contains("backends[1].weight") && log.contains("got 0"),
            "{log}"
        );
        assert_eq!(cluster.status()["manifest_hash"], before["manifest_hash"]);
        let spread = cluster.spread(30);
        for b in 1..=3 {
            assert_eq!(
                count(&spread, b),
                10,
                "{offloads:?}: still all three: {spread:?}"
            );
        }
        // An empty file (an editor between truncating and writing) is not
        // "no services".
        cluster.scratch.write("services.yaml", "");
        assert!(
            cluster
                .agent
                .wait_for_log("the manifest is empty", 1, Duration::from_secs(10)),
            "{}",
            cluster.agent.log()
        );
        let spread = cluster.spread(30);
        for b in 1..=3 {
            assert_eq!(
                count(&spread, b),
                10,
                "{offloads:?}: empty file: {spread:?}"
            );
        }
        // Fixed again: applied.
        cluster.change_manifest(&manifest("round-robin", &[(1, 1), (2, 1)]));
        assert_eq!(count(&cluster.spread(10), 3), 0);
    }
}

#[test]
fn a_bad_manifest_or_interface_at_start_exits_nonzero_and_touches_nothing() {
    let topology = Topology::build(TopologySpec {
        backends: 1,
        offloads: Offloads::KernelDefault,
    });
    let scratch = ScratchDir::new();
    let cases: [(&str, Vec<String>, &str); 3] = [
        (
            "kind: Service\nname: web\nvip: 198.18.0.10\nports: [{ port: 80, protocol: TCP }]\nbackends: [{ address: 198.19.1.2, weigth: 1 }]\n",
            topology.node_interfaces(),
            "weigth",
        ),
        (
            "kind: Service\nname: web\nvip: 198.18.0.10\nports: [{ port: 80, protocol: SCTP }]\n",
            topology.node_interfaces(),
            "ports[0].protocol",
        ),
        (
            &all_three("round-robin"),
            vec!["n0".into(), "nope0".into()],
            "nope0",
        ),
    ];
    for (text, interfaces, needle) in cases {
        let path = scratch.write("bad.yaml", text);
        let failure = match Agent::try_start(&topology.node, &path, &interfaces, &[]) {
            Ok(_) => panic!("the agent accepted {needle:?}"),
            Err(f) => f,
        };
        assert!(!failure.status.success());
        assert!(failure.log.contains(needle), "{needle}: {}", failure.log);
    }
    // Nothing was attached to the node's interfaces.
    let links = topology.node.exec_ok(&["bpftool", "net", "show"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("sluice"),
        "{links:?}"
    );
}

#[test]
fn forced_xdp_on_default_veths_defers_partial_checksums_to_tc() {
    let cluster = Cluster::start(
        Offloads::KernelDefault,
        &all_three("round-robin"),
        &["--mode", "xdp"],
    );
    cluster.assert_hooks("xdp");
    let spread = cluster.spread(30);
    for b in 1..=3 {
        assert_eq!(count(&spread, b), 10, "{spread:?}");
    }
    let status = cluster.status();
    assert!(
        status["outcomes"]["xdp_defer_partial_csum"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{status:#}"
    );
    assert!(
        status["outcomes"]["fwd_tc"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
}

#[test]
fn down_detaches_and_unpins_everything() {
    let cluster = Cluster::start(Offloads::KernelDefault, &all_three("round-robin"), &[]);
    assert_eq!(cluster.spread(3).values().sum::<usize>(), 3);
    let Cluster {
        mut agent,
        topology,
        ..
    } = cluster;
    agent.kill9();
    let out = agent.run_cli(&["down"]);
    assert!(out.status.success(), "{out:?}");
    let pins = pin_dirs(agent.bpffs_root());
    assert!(pins.is_empty(), "left behind: {pins:?}");
    let shown = topology.node.exec_ok(&["bpftool", "net", "show"]);
    assert!(
        !String::from_utf8_lossy(&shown.stdout).contains("sluice"),
        "{shown:?}"
    );
    // With nothing balancing it, the VIP no longer answers.
    let reached = topology
        .client
        .enter(|| http_get(SocketAddrV4::new(vip(), 80), Duration::from_millis(500)));
    assert!(reached.is_err());
    let status = agent.run_cli(&["status"]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("no Sluice data plane"));
}

#[test]
fn a_pinned_data_plane_of_another_layout_is_refused_not_misread() {
    use aya::maps::{Array, Map, MapData};
    use sluice_common::{
        layout::{LAYOUT_VERSION, map},
        types::AgentMeta,
    };

    let mut cluster = Cluster::start(Offloads::KernelDefault, &all_three("round-robin"), &[]);
    cluster.agent.kill9();
    // The pins now stand for those of an agent one layout older.
    let root = cluster.agent.bpffs_root().to_path_buf();
    let dirs = pin_dirs(&root);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let pin = root.join(&dirs[0]).join("maps").join(map::AGENT_META);
    let data = MapData::from_pin(&pin).expect("AGENT_META pin");
    let mut meta: Array<MapData, AgentMeta> = Array::try_from(Map::Array(data)).expect("array");
    let old = AgentMeta {
        layout_version: LAYOUT_VERSION - 1,
        ..meta.get(&0, 0).expect("agent meta")
    };
    meta.set(0, old, 0).expect("writing agent meta");

    let older = format!("layout version {}", LAYOUT_VERSION - 1);
    assert!(
        cluster.agent.try_restart().is_err(),
        "{}",
        cluster.agent.log()
    );
    let log = cluster.agent.log();
    assert!(
        log.contains(&older) && log.contains("sluice-agent down"),
        "{log}"
    );
    let status = cluster.agent.run_cli(&["status"]);
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        !status.status.success() && stderr.contains(&older),
        "{status:?}"
    );

    // The way out the message gives.
    assert!(cluster.agent.run_cli(&["down"]).status.success());
    cluster.agent.restart();
    assert_eq!(cluster.spread(3).values().sum::<usize>(), 3);
}

#[test]
fn pins_of_interfaces_that_are_gone_are_cleaned_not_reused() {
    let mut cluster = Cluster::start(Offloads::KernelDefault, &all_three("round-robin"), &[]);
    cluster.agent.kill9();
    // nb3 is replaced by a new device with the same name and address: the
    // pinned link belonged to the old one.
    let node = &cluster.topology.node;
    let b3 = &cluster.topology.backend(3).ns;
    node.exec_ok(&["ip", "link", "del", "nb3"]);
    node.exec_ok(&[
        "ip",
        "link",
        "add",
        "nb3",
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "netns",
        b3.name(),
    ]);
    node.exec_ok(&["ip", "addr", "add", "198.19.3.1/24", "dev", "nb3"]);
    node.exec_ok(&["ip", "link", "set", "nb3", "up"]);
    b3.exec_ok(&["ip", "addr", "add", "198.19.3.2/24", "dev", "b0"]);
    b3.exec_ok(&["ip", "link", "set", "b0", "up"]);
    b3.exec_ok(&["ip", "route", "add", "default", "via", "198.19.3.1"]);
    cluster.agent.restart();
    let log = cluster.agent.log();
    assert!(
        log.contains("removing a pinned link whose interface is gone"),
        "{log}"
    );
    cluster.assert_hooks("tc");
    let spread = cluster.spread(30);
    for b in 1..=3 {
        assert_eq!(count(&spread, b), 10, "{spread:?}");
    }
}

#[test]
fn agents_in_two_namespaces_share_a_bpffs_without_colliding() {
    let mut shared = ScratchDir::new();
    let root = shared.mount_bpffs("bpffs");
    let root_arg = root.display().to_string();
    // The age threshold for collecting other namespaces' pins is lowered so
    // that B's restart below collects A's at once.
    let args = ["--bpffs-root", root_arg.as_str(), "--stale-pin-age", "0"];
    let a = Cluster::start(Offloads::KernelDefault, &all_three("round-robin"), &args);
    let mut b = Cluster::start(Offloads::NicLike, &all_three("round-robin"), &args);
    let dirs = || pin_dirs(&root);
    assert_eq!(dirs().len(), 2, "one directory per namespace: {:?}", dirs());
    assert_ne!(a.status()["pin_dir"], b.status()["pin_dir"]);
    assert_eq!(a.spread(6).values().sum::<usize>(), 6);
    assert_eq!(b.spread(6).values().sum::<usize>(), 6, "both serve at once");

    // A's agent dies and its namespace goes, leaving its pins behind (its
    // handle's `down` runs in a namespace that no longer exists).
    let Cluster {
        mut agent,
        http,
        topology,
        ..
    } = a;
    agent.kill9();
    drop(http);
    drop(topology);
    drop(agent);
    assert_eq!(dirs().len(), 2, "A's pins outlived its namespace");

    // B's next start finds them serving no live interface and removes them.
    // The kernel tears a deleted namespace's devices down asynchronously (a
    // workqueue), so A's links may still look attached for a moment: a start
    // that comes too early rightly keeps them, and the next one collects.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        b.agent.restart();
        if b.agent.log().contains("namespace that is gone") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A's pins were never collected:\n{}",
            b.agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(dirs().len(), 1, "{:?}", dirs());
    assert_eq!(b.spread(6).values().sum::<usize>(), 6);
}

#[test]
fn idle_udp_flows_are_reaped_and_return_their_connection_counts() {
    let cluster = Cluster::start(
        Offloads::KernelDefault,
        &all_three("least-connections"),
        &["--udp-idle-timeout", "1", "--sweep-interval", "1"],
    );
    let to = SocketAddrV4::new(vip(), 53);
    cluster.client(|| {
        for _ in 0..3 {
            let socket = UdpSocket::bind("198.18.1.2:0").expect("bind");
            udp_exchange(&socket, to, TIMEOUT).expect("UDP answer");
        }
    });
    let open = |status: &Value| -> Vec<u64> {
        status["services"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b["active_connections"].as_u64().expect("count"))
            .collect()
    };
    let status = cluster.status();
    assert_eq!(status["services"][0]["protocol"], "UDP", "{status:#}");
    assert_eq!(open(&status), [1, 1, 1], "one open flow each: {status:#}");
    // Silent for longer than the timeout: the agent expires them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.status();
        if open(&status) == [0, 0, 0] && status["flows"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not reaped: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        cluster.agent.log().contains("swept flows"),
        "{}",
        cluster.agent.log()
    );
}
