//! Network policy end to end: `kind: NetworkPolicy` applied with `sluicectl`,
//! compiled by the control service, enforced by the agents' kernel programs,
//! with real clients and servers in namespaces (see `sluice_tests::cluster`).
//!
//! Requires root. Run with `cargo xtask test`, or after
//! `cargo build --workspace --exclude sluice-ebpf --bins` with
//! `cargo test -p sluice-tests --test policy_e2e`.

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use sluice_tests::{
    cluster::{Cluster, TIMEOUT, assert_near, backend_addr, web_by_selector},
    control::sluicectl_bin,
    http_get,
};

/// Short: a denied connection is dropped, so the client only times out.
const DENIED_WAIT: Duration = Duration::from_millis(700);
/// An address of node-1's client inside the policy's `except`.
const EXCEPTED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);

const POLICY: &str = "kind: NetworkPolicy
name: web-ingress
selector: { app: web }
ingress:
  - from:
      - cidr: 198.18.1.0/24
        except: [198.18.1.128/25]
    ports: [{ port: 8080, protocol: TCP }]
";

/// One request from `source` (an address of the calling namespace).
fn get_from(source: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> std::io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())?;
    socket.connect_timeout(&SocketAddr::V4(to).into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    use std::io::{Read, Write};
    let mut stream = stream;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    if reply.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not a 200 answer"))
    }
}

fn denied(cluster: &Cluster, k: usize, to: SocketAddrV4) -> bool {
    cluster
        .topology
        .node(k)
        .client
        .enter(|| http_get(to, DENIED_WAIT))
        .is_err_and(|e| e.is_timeout())
}

#[test]
fn allowed_sources_reach_the_service_denied_ones_are_dropped_and_counted() {
    let cluster = Cluster::start(2, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let to = SocketAddrV4::new(vip, 80);
    // node-1's client also holds an address inside the except.
    cluster.topology.node(1).client.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{EXCEPTED}/24"),
        "dev",
        "c0",
    ]);
    for k in 1..=2 {
        assert_near(
            &cluster.spread(k, vip, 30),
            &[(1, 10), (2, 10), (3, 10)],
            &format!("node-{k}, no policy"),
        );
    }

    // A bad policy is refused whole; nothing is applied.
    let bad = cluster.control.apply(
        "bad.yaml",
        &POLICY.replace("198.18.1.0/24", "198.18.1.1/24"),
    );
    assert!(!bad.status.success());
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(
        message.contains("host bits") && message.contains("198.18.1.0/24"),
        "{message}"
    );
    let listed = cluster.control.sluicectl_json(&["get", "networkpolicies"]);
    assert_eq!(listed, serde_json::json!([]), "{listed}");

    // The policy arrives while node-1's client sends: allowed traffic never
    // fails on the way.
    let sending = AtomicBool::new(true);
    let failures = thread::scope(|scope| {
        let client = scope.spawn(|| {
            cluster.topology.node(1).client.enter(|| {
                let mut failures = Vec::new();
                for i in 0..2_000 {
                    if !sending.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Err(e) = http_get(to, TIMEOUT) {
                        failures.push(format!("request {i}: {e}"));
                    }
                }
                failures
            })
        });
        thread::sleep(Duration::from_millis(200));
        cluster.apply(POLICY);
        cluster.wait_programmed();
        thread::sleep(Duration::from_millis(200));
        sending.store(false, Ordering::SeqCst);
        client.join().expect("client thread")
    });
    assert!(failures.is_empty(), "allowed requests failed: {failures:?}");

    assert_near(
        &cluster.spread(1, vip, 30),
        &[(1, 10), (2, 10), (3, 10)],
        "node-1's client, allowed",
    );
    assert!(
        denied(&cluster, 2, to),
        "node-2's client is outside the CIDR"
    );
    let excepted = cluster
        .topology
        .node(1)
        .client
        .enter(|| get_from(EXCEPTED, to, DENIED_WAIT));
    assert!(
        excepted.is_err(),
        "{EXCEPTED} is in the except, yet it got through"
    );
    // Reported as an event: `sluicectl flows` shows who was refused where.
    let flows = cluster
        .control
        .sluicectl_ok(&["flows", "--verdict", "denied", "-o", "json"]);
    assert!(
        flows.lines().any(|l| l.contains("\"node\":\"node-2\"")
            && l.contains("198.18.2.2:")
            && l.contains("drop_policy")
            && l.contains("denied to default:{app=web}")),
        "{flows}"
    );
    // Counted per policy and per protected destination, as the nodes report
    // them (every few seconds).
    let counted = |node: &str, counts: &str, field: &str| -> u64 {
        let nodes = cluster.control.sluicectl_json(&["get", "nodes"]);
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["name"] == node)
            .flat_map(|n| n["policy"].as_array().cloned().unwrap_or_default())
            .filter(|c| c["counts"] == counts)
            .filter_map(|c| c[field].as_u64())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while (counted("node-2", "denied to default:{app=web}", "denied") == 0
        || counted("node-1", "allowed by default/web-ingress", "allowed") == 0)
        && std::time::Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(250));
    }
    assert!(counted("node-2", "denied to default:{app=web}", "denied") >= 1);
    assert!(counted("node-1", "allowed by default/web-ingress", "allowed") >= 30);
    // Counted where it was dropped.
    let status = cluster.agents[1].status_json();
    let dropped = status["outcomes"]["drop_policy"].as_u64().unwrap_or(0);
    assert!(dropped >= 1, "node-2 counted no policy drop: {status}");
    let listed = cluster.control.sluicectl_ok(&["get", "networkpolicies"]);
    assert!(
        listed.contains("web-ingress") && listed.contains("198.18.1.0/24 except 198.18.1.128/25"),
        "{listed}"
    );

    // Deleting the policy restores access.
    cluster
        .control
        .sluicectl_ok(&["delete", "networkpolicy", "web-ingress"]);
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(2, vip, 30),
        &[(1, 10), (2, 10), (3, 10)],
        "node-2's client, policy deleted",
    );
    cluster
        .topology
        .node(1)
        .client
        .enter(|| get_from(EXCEPTED, to, TIMEOUT))
        .expect("the excepted address after the policy is deleted");
}

#[test]
fn sluicectl_flows_follow_streams_refusals_as_they_happen() {
    let cluster = Cluster::start(1, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.apply("kind: NetworkPolicy\nname: deny-all\nselector: {}\n");
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let mut follower = Command::new("ip")
        .args(["netns", "exec", cluster.topology.control.name()])
        .arg(sluicectl_bin())
        .arg("--config")
        .arg(cluster.control.admin_conf())
        .args(["flows", "--verdict", "denied", "--follow", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sluicectl flows --follow");
    let stdout = follower.stdout.take().expect("piped stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // Give the stream a moment to open, then get refused.
    thread::sleep(Duration::from_millis(500));
    assert!(denied(&cluster, 1, SocketAddrV4::new(vip, 80)));
    let line = lines_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("an event on the followed stream");
    let _ = follower.kill();
    let _ = follower.wait();
    let _ = reader.join();
    assert!(
        line.contains("\"verdict\":\"denied\"") && line.contains(&format!("{vip}:80")),
        "{line}"
    );
}

#[test]
fn a_namespace_wide_default_deny_blocks_everyone_and_revokes_open_connections() {
    let cluster = Cluster::start(1, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let to = SocketAddrV4::new(vip, 80);
    let mut held = cluster.hold(1, vip, 1);
    cluster.apply("kind: NetworkPolicy\nname: deny-all\nselector: {}\n");
    cluster.wait_programmed();
    assert!(denied(&cluster, 1, to), "a new connection got through");
    // The established connection was revoked with the change: its next
    // packet is a new flow, and denied.
    let (conn, _) = &mut held[0];
    assert!(
        conn.get().is_err(),
        "an established connection survived deny-all"
    );
    cluster
        .control
        .sluicectl_ok(&["delete", "networkpolicy", "deny-all"]);
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(1, vip, 30),
        &[(1, 10), (2, 10), (3, 10)],
        "deny-all deleted",
    );
}

#[test]
fn a_policy_on_a_service_vip_admits_outside_clients_by_cidr() {
    let cluster = Cluster::start(2, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.apply(
        "kind: NetworkPolicy
name: web-vip
service: web
ingress:
  - from: [{ cidr: 198.18.1.0/24 }]
    ports: [{ port: 80, protocol: TCP }]
",
    );
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let to = SocketAddrV4::new(vip, 80);
    assert_near(
        &cluster.spread(1, vip, 30),
        &[(1, 10), (2, 10), (3, 10)],
        "node-1's client, inside the CIDR",
    );
    assert!(
        denied(&cluster, 2, to),
        "node-2's client is outside the CIDR"
    );
    let flows = cluster
        .control
        .sluicectl_ok(&["flows", "--verdict", "denied", "-o", "json"]);
    assert!(flows.contains("denied to service default/web"), "{flows}");
    let listed = cluster.control.sluicectl_ok(&["get", "netpol"]);
    assert!(listed.contains("service web"), "{listed}");
}

#[test]
fn an_egress_policy_limits_where_an_endpoint_may_open_flows() {
    let cluster = Cluster::start(1, 3, &[]);
    // web on backends 1 and 2, db on backend 3; node-1's client is itself a
    // registered endpoint (app: client).
    let mut docs = vec![
        "kind: Service\nname: web\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\nselector: { app: web }\n"
            .to_owned(),
        "kind: Service\nname: db\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\nselector: { app: db }\n"
            .to_owned(),
        format!(
            "kind: Endpoint\nname: client\nlabels: {{ app: client }}\naddress: {}\n",
            cluster.topology.node(1).client_addr()
        ),
    ];
    for (i, app) in [(1, "web"), (2, "web"), (3, "db")] {
        docs.push(format!(
            "kind: Endpoint\nname: {app}-{i}\nlabels: {{ app: {app} }}\naddress: {}\n",
            backend_addr(i)
        ));
    }
    cluster.apply(&docs.join("---\n"));
    cluster.wait_programmed();
    let vip_of = |name: &str| -> Ipv4Addr {
        let service = cluster.control.sluicectl_json(&["get", "service", name]);
        service["vip"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VIP in {service}"))
    };
    let (web, db) = (vip_of("web"), vip_of("db"));
    assert_near(&cluster.spread(1, db, 10), &[(3, 10)], "db, no policy");

    cluster.apply(
        "kind: NetworkPolicy
name: client-out
selector: { app: client }
policyTypes: [Egress]
egress:
  - to: [{ selector: { app: web } }]
    ports: [{ port: 8080, protocol: TCP }]
",
    );
    cluster.wait_programmed();
    assert_near(
        &cluster.spread(1, web, 20),
        &[(1, 10), (2, 10)],
        "web, allowed",
    );
    assert!(
        denied(&cluster, 1, SocketAddrV4::new(db, 80)),
        "db is not in the egress rules"
    );
    let flows = cluster
        .control
        .sluicectl_ok(&["flows", "--verdict", "denied", "-o", "json"]);
    assert!(
        flows.contains("egress denied from default:{app=client}"),
        "{flows}"
    );
    cluster
        .control
        .sluicectl_ok(&["delete", "networkpolicy", "client-out"]);
    cluster.wait_programmed();
    assert_near(&cluster.spread(1, db, 10), &[(3, 10)], "db, policy deleted");
}
