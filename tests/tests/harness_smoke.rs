//! The harness itself works: topologies build and route, servers answer,
//! clients count, and everything is deleted afterwards. No Sluice involved:
//! the client reaches each backend directly, routed by the node's kernel.

use std::{
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    process::Command,
    time::Duration,
};

use sluice_tests::{
    HttpConn, HttpServer, Netns, Offloads, Topology, TopologySpec, UdpServer, cleanup_stale,
    http_get, tally, udp_exchange,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn offload_state(ns: &Netns, dev: &str) -> String {
    String::from_utf8_lossy(&ns.exec_ok(&["ethtool", "-k", dev]).stdout).into_owned()
}

fn reaches_every_backend_directly(offloads: Offloads) {
    let topology = Topology::build(TopologySpec {
        backends: 3,
        offloads,
    });
    assert_eq!(topology.node_interfaces(), ["n0", "nb1", "nb2", "nb3"]);
    assert_eq!(topology.backend(2).addr.to_string(), "198.19.2.2");
    assert_eq!(topology.backend(3).node_if, "nb3");

    let nic_like = offloads == Offloads::NicLike;
    let client_offloads = offload_state(&topology.client, "c0");
    assert_eq!(
        client_offloads.contains("tx-checksumming: off"),
        nic_like,
        "{client_offloads}"
    );
    assert_eq!(
        offload_state(&topology.backend(1).ns, "b0").contains("generic-receive-offload: on"),
        nic_like
    );

    let mut http: Vec<HttpServer> = Vec::new();
    let mut udp: Vec<UdpServer> = Vec::new();
    for b in &topology.backends {
        let name = format!("backend{}", b.index);
        http.push(HttpServer::start(&b.ns, b.addr, HTTP_PORT, &name));
        udp.push(UdpServer::start(&b.ns, b.addr, UDP_PORT, &name));
    }

    let backends: Vec<_> = topology.backends.iter().map(|b| b.addr).collect();
    let bodies = topology.client.enter(|| {
        let mut bodies = Vec::new();
        let socket = UdpSocket::bind("198.18.1.2:0").expect("bind UDP in the client ns");
        for &addr in &backends {
            let http_addr = SocketAddrV4::new(addr, HTTP_PORT);
            bodies.push(http_get(http_addr, TIMEOUT).expect("http_get"));

            let mut conn = HttpConn::connect(http_addr, TIMEOUT).expect("connect");
            for _ in 0..3 {
                bodies.push(conn.get().expect("get on a kept-alive connection"));
            }
            conn.close();

            let udp_addr = SocketAddrV4::new(addr, UDP_PORT);
            let (body, from) = udp_exchange(&socket, udp_addr, TIMEOUT).expect("udp_exchange");
            assert_eq!(from, SocketAddr::V4(udp_addr), "reply source");
            bodies.push(body);
        }
        bodies
    });

    let counts = tally(bodies);
    assert_eq!(
        counts,
        (1..=3).map(|i| (format!("backend{i}"), 5)).collect(),
        "4 HTTP answers and 1 UDP answer from each backend"
    );
    for (server, udp) in http.iter().zip(&udp) {
        assert_eq!(server.accepted(), 2, "{}", server.name());
        assert_eq!(server.requests(), 4, "{}", server.name());
        assert!(
            server.wait_open_connections(0, TIMEOUT),
            "{} still has {} open connections",
            server.name(),
            server.open_connections()
        );
        let client = SocketAddr::from((topology.client_addr(), 0));
        assert!(server.peers().iter().all(|p| p.ip() == client.ip()));
        assert_eq!(udp.received(), 1, "{}", udp.name());
        assert_eq!(udp.sources()[0].ip(), client.ip());
    }

    // A connection held open is closed by stop(), within bounded time.
    let held = topology
        .client
        .enter(|| HttpConn::connect(http[0].addr(), TIMEOUT))
        .expect("connect");
    assert!(http[0].wait_open_connections(1, TIMEOUT));
    let mut first = http.remove(0);
    first.stop();
    assert_eq!(first.open_connections(), 0);
    let mut held = held;
    assert!(held.get().is_err(), "a stopped server does not answer");

    let names: Vec<String> = std::iter::once(&topology.client)
        .chain([&topology.node])
        .chain(topology.backends.iter().map(|b| &b.ns))
        .map(|ns| ns.name().to_owned())
        .collect();
    let listed = netns_list();
    for name in &names {
        assert!(
            listed.contains(name.as_str()),
            "{name} missing from\n{listed}"
        );
    }
    drop((http, udp, first, held));
    drop(topology);
    let listed = netns_list();
    for name in &names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} survived its topology:\n{listed}"
        );
    }
}

#[test]
fn kernel_default_topology_reaches_every_backend() {
    reaches_every_backend_directly(Offloads::KernelDefault);
}

#[test]
fn nic_like_topology_reaches_every_backend() {
    reaches_every_backend_directly(Offloads::NicLike);
}

#[test]
fn sockets_stay_in_the_namespace_they_were_created_in() {
    let ns = Netns::new("enter");
    let devices = ns.enter(|| {
        // The calling thread's namespace, not the process's.
        std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev")
    });
    let devices: Vec<&str> = devices
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(devices, ["lo"], "a new namespace has only lo");
    let out = ns.exec_ok(&["ip", "-o", "link"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lo: <LOOPBACK,UP"), "lo is up:\n{text}");
    let panicked = std::panic::catch_unwind(|| ns.enter(|| panic!("inside")));
    assert!(panicked.is_err(), "a panic in enter() reaches the caller");
}

#[test]
fn cleanup_stale_deletes_namespaces_of_dead_processes_only() {
    // pid_max is at most 2^22, so this pid can never be alive; our pid in
    // the counter's place keeps parallel runs of this test apart.
    let dead = format!("slt-{}-{}-gc", 1u32 << 23, std::process::id());
    let status = Command::new("ip")
        .args(["netns", "add", &dead])
        .status()
        .expect("ip netns add");
    assert!(status.success(), "ip netns add {dead}");
    let ours = Netns::new("alive");

    let report = cleanup_stale();
    // Another run's cleanup may have deleted it first: then it is not in
    // our report, but gone all the same.
    assert!(
        !report.namespaces.iter().any(|n| n == ours.name()),
        "{report:?}"
    );
    let listed = netns_list();
    assert!(!listed.contains(&dead), "{listed}");
    assert!(
        listed.contains(ours.name()),
        "a live run's namespace survives"
    );
}

/// A stand-in for `sluice-agent` keeping its CLI contract, to check the
/// handle without the real binary: `run` fails on a manifest containing
/// "bad", else reports the filesystem type of its bpffs root and sleeps.
const FAKE_AGENT: &str = r#"#!/bin/sh
cmd=$1; shift
root=; manifest=
while [ $# -gt 0 ]; do
  case $1 in
    --bpffs-root) root=$2; shift ;;
    --manifest) manifest=$2; shift ;;
  esac
  shift
done
case $cmd in
  run)
    if grep -q bad "$manifest"; then echo "ERROR manifest rejected" >&2; exit 3; fi
    echo "INFO applied manifest"
    echo "INFO data plane ready root_fs=$(stat -f -c %T "$root")" >&2
    exec sleep 30 ;;
  status) printf '{"root": "%s"}\n' "$root" ;;
  down) echo "down $root" >> "$0.calls" ;;
  *) exit 64 ;;
esac
"#;

#[test]
fn agent_handle_drives_a_fake_agent() {
    use sluice_tests::{Agent, ScratchDir};
    use std::os::unix::fs::PermissionsExt;

    let dir = ScratchDir::new();
    let bin = dir.write("fake-agent", FAKE_AGENT);
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let good = dir.write("good.yaml", "services: []\n");
    let bad = dir.write("bad.yaml", "bad\n");
    let node = Netns::new("fake-node");
    let interfaces = ["lo".to_owned()];

    let failure = Agent::try_start_with_bin(&bin, &node, &bad, &interfaces, &[])
        .expect_err("a bad manifest stops the agent");
    assert_eq!(failure.status.code(), Some(3));
    assert!(failure.log.contains("manifest rejected"), "{}", failure.log);

    let mut agent = Agent::try_start_with_bin(&bin, &node, &good, &interfaces, &["--mode", "tc"])
        .expect("the fake agent starts");
    let root = agent.bpffs_root().to_owned();
    assert!(agent.log().contains("root_fs=bpf_fs"), "{}", agent.log());
    assert!(agent.wait_for_log("applied manifest", 1, TIMEOUT));
    assert_eq!(agent.status_json()["root"], root.display().to_string());
    let first_pid = agent.pid();
    agent.kill9();
    assert!(!agent.is_running());
    agent.restart();
    assert_ne!(agent.pid(), first_pid);
    assert_eq!(agent.log().matches("data plane ready").count(), 2);
    assert!(agent.is_running());

    drop(agent);
    let calls = std::fs::read_to_string(dir.join("fake-agent.calls")).expect("down was run");
    assert_eq!(
        calls.matches("down ").count(),
        2,
        "down after each handle: {calls}"
    );
    assert!(calls.ends_with(&format!("down {}\n", root.display())));
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert!(
        !mounts.contains(&root.display().to_string()),
        "bpffs unmounted"
    );
    assert!(!root.exists() || std::env::var_os("SLUICE_KEEP_LOGS").is_some());
}
