//! `cargo xtask demo`: a cluster balancing a service VIP in the kernel,
//! driven through the control service.
//!
//! Builds a control namespace, two nodes (each serving its own client) and
//! three backends on a shared fabric (real HTTP and UDP servers in the
//! backends), all in network namespaces (see `sluice_tests::cluster`). Starts
//! `sluice-control`, joins a `sluice-agent` on each node with a one-time
//! token, applies control/manifests/web.yaml with `sluicectl`, sends real
//! traffic through both nodes to the VIP the control service allocated and
//! shows where it went; then adds a backend and changes the algorithm live
//! through the control service, kills the control service under an open
//! connection to show that forwarding does not depend on it, adds a health
//! check and kills a backend's server (both nodes take it out of rotation, no
//! request fails; restarted, it returns), rolls out version v2 as a 10%
//! canary, a blue-green switch and an undo, and applies a network policy that
//! admits one node's clients only (the other's are dropped in the kernel and
//! listed by `sluicectl flows`). Every namespace,
//! process and pin is removed at the end, also on failure.
//!
//! `--standalone` runs the agent alone instead: one node with
//! agent/manifests/web.yaml, no control service (a live manifest change, UDP
//! stickiness, `kill -9` of the agent, `sluice-agent status`). `--nic-like`
//! (which implies `--standalone`) sets its client and backend ends to
//! `tx off, gro on` (as real NICs), where the agent picks native XDP instead
//! of TC.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sluice_tests::{
    Agent, ClusterTopology, ControlService, HttpConn, HttpServer, Netns, Offloads, ScratchDir,
    Topology, TopologySpec, UdpServer,
    agent::{APPLIED_LINE, agent_bin},
    cluster::{CONTROL_ADDR, NODE_INTERFACES, VIP_CIDR},
    http_get, scrape_metrics, tally,
    topology::{backend_addr, vip},
    udp_exchange,
};

const EXAMPLE: &str = include_str!("../../../agent/manifests/web.yaml");
/// What `sluicectl apply -f control/manifests/web.yaml` applies.
const CLUSTER_EXAMPLE: &str = include_str!("../../../control/manifests/web.yaml");
const TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on an applied change reaching every node, and on an agent
/// reconnecting to a restarted control service.
const PROPAGATION: Duration = Duration::from_secs(20);
/// Comfortably past the demo's health-check bound (2 × 200 ms + 100 ms).
const HEALTH_WAIT: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: sluice-demo [--standalone] [--nic-like]
  (no option)   two nodes joined to sluice-control, driven with sluicectl
  --standalone  one sluice-agent with a manifest file, no control service
  --nic-like    the standalone demo with NIC-like veth ends (native XDP)";

fn main() -> anyhow::Result<()> {
    let mut standalone_flow = false;
    let mut nic_like = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--standalone" => standalone_flow = true,
            "--nic-like" => nic_like = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if standalone_flow || nic_like {
        standalone(nic_like)
    } else {
        cluster()
    }
}

/// The default flow: a control service, two joined nodes, `sluicectl`.
fn cluster() -> anyhow::Result<()> {
    step(
        "1",
        "a control service, two nodes with a client each, and three backends, in namespaces",
    );
    // Declared first, dropped last: every namespace goes with it.
    let topology = ClusterTopology::build(2, 3);
    let mut http = Vec::new();
    let mut udp = Vec::new();
    println!("   control    {CONTROL_ADDR}  sluice-control, on the fabric");
    for node in &topology.nodes {
        println!(
            "   {:<10} {:<17} sluice-agent, serving {} with client {} behind it",
            node.name,
            node.fabric_addr(),
            NODE_INTERFACES.join(" and "),
            node.client_addr()
        );
    }
    for b in &topology.backends {
        let name = format!("backend-{}", b.index);
        http.push(HttpServer::start(&b.ns, b.addr, 8080, &name));
        udp.push(UdpServer::start(&b.ns, b.addr, 5353, &name));
        println!("   {name:<10} {:<17} HTTP :8080, UDP :5353", b.addr);
    }
    println!(
        "   service VIPs come from {VIP_CIDR}; they are on no interface: each client \
         reaches them through its own node"
    );

    step(
        "2",
        "sluice-control: embedded store, cluster CA and first admin made on first start",
    );
    let started = Instant::now();
    let mut control = ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, &[]);
    let admin_conf = control.admin_conf();
    println!(
        "   serving {} (ready in {} ms)",
        control.url(),
        started.elapsed().as_millis()
    );
    println!(
        "   data dir   {}",
        admin_conf
            .parent()
            .map_or_else(|| "?".to_owned(), |d| d.display().to_string())
    );
    println!(
        "   admin.conf {}  (sluicectl --config)",
        admin_conf.display()
    );
    println!("   $ sluicectl whoami");
    print!("{}", indent_by(&ctl(&control, &["whoami"])?, "     "));

    step("3", "both nodes join with a one-time token each");
    let mut agents: Vec<Agent> = Vec::new();
    for node in &topology.nodes {
        let token = ctl_json(&control, &["token", "create", "--ttl", "10m"])?;
        let field = |name: &str| {
            token[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("`sluicectl token create`: no {name} in {token}"))
        };
        let (secret, ca_hash) = (field("token")?, field("caHash")?);
        println!(
            "   $ sluicectl token create --ttl 10m   # for {}",
            node.name
        );
        let args = node.join_args(&control.url(), &secret, &ca_hash);
        print_join_command(&node.name, &args, &secret);
        let started = Instant::now();
        let agent = Agent::try_launch(&agent_bin(), &node.ns, args)
            .with_context(|| format!("{} could not join", node.name))?;
        if !agent.wait_for_log("watching the node's view", 1, PROPAGATION) {
            bail!(
                "{} joined but does not watch its view:\n{}",
                node.name,
                agent.log()
            );
        }
        println!(
            "   {} joined, data plane ready in {} ms:",
            node.name,
            started.elapsed().as_millis()
        );
        for needle in [
            "joined the cluster",
            "hook chosen",
            "watching the node's view",
        ] {
            print_log_lines_of(&agent, needle, &node.name);
        }
        agents.push(agent);
    }
    let names: Vec<&str> = topology.nodes.iter().map(|n| n.name.as_str()).collect();

    step("4", "sluicectl apply -f control/manifests/web.yaml");
    let out = control.apply("web.yaml", CLUSTER_EXAMPLE);
    let applied = checked("apply -f control/manifests/web.yaml", &out)?;
    print!("{}", indent(&applied));
    for kind in ["services", "endpoints"] {
        println!("   $ sluicectl get {kind}");
        print!("{}", indent_by(&ctl(&control, &["get", kind])?, "     "));
    }
    let vip = web_vip(&control)?;
    wait_programmed(&control, &names)?;

    step(
        "5",
        "100 HTTP connections through each node to the allocated VIP, round-robin",
    );
    for node in &topology.nodes {
        let spread = spread(&node.client, vip, 100)?;
        println!("   from {} via {}:", node.client_addr(), node.name);
        show_indented(&spread, "     ");
        check_spread(&spread, &[(1, 1), (2, 1)], &node.name)?;
    }
    if let Some(curl) = which("curl") {
        println!("   and with curl from the client namespaces:");
        for node in &topology.nodes {
            for _ in 0..2 {
                let url = format!("http://{vip}/");
                let out = node.client.exec(&[&curl, "-s", "-m", "3", &url]);
                if !out.status.success() {
                    bail!(
                        "curl {url} from {}'s client failed: {}",
                        node.name,
                        out.status
                    );
                }
                println!(
                    "     {}  curl {url}  ->  {}",
                    node.client_addr(),
                    String::from_utf8_lossy(&out.stdout).trim()
                );
            }
        }
    }
    println!(
        "   UDP to {vip}:53; each client socket sticks to a backend, replies come from the VIP:"
    );
    let to = SocketAddrV4::new(vip, 53);
    for node in &topology.nodes {
        let answers = node.client.enter(|| -> anyhow::Result<Vec<_>> {
            let mut out = Vec::new();
            for _ in 0..2 {
                let socket = UdpSocket::bind((node.client_addr(), 0))?;
                for _ in 0..2 {
                    let (body, from) = udp_exchange(&socket, to, TIMEOUT)
                        .with_context(|| format!("UDP to {to} via {}", node.name))?;
                    out.push((socket.local_addr()?, body, from));
                }
            }
            Ok(out)
        })?;
        for (local, body, from) in &answers {
            println!("     {local:<18} -> {body:<10} reply from {from}");
            if from.ip() != vip {
                bail!("a UDP reply came from {from}, not from the VIP {vip}");
            }
        }
    }

    step(
        "6",
        "live update: endpoint web-3 (weight 2) added, algorithm weighted-round-robin",
    );
    let update = format!(
        "{}---\n{}",
        CLUSTER_EXAMPLE.replace(
            "algorithm: round-robin ",
            "algorithm: weighted-round-robin "
        ),
        "kind: Endpoint\nname: web-3\nlabels: { app: web }\naddress: 198.19.0.13\nweight: 2\n"
    );
    if !update.contains("algorithm: weighted-round-robin ") {
        bail!("control/manifests/web.yaml has no `algorithm: round-robin ` line to change");
    }
    println!("   $ sluicectl apply -f web.yaml   # + web-3, algorithm: weighted-round-robin");
    let out = control.apply("web-update.yaml", &update);
    print!("{}", indent(&checked("apply -f web-update.yaml", &out)?));
    wait_programmed(&control, &names)?;
    for node in &topology.nodes {
        let spread = spread(&node.client, vip, 100)?;
        println!("   from {} via {}:", node.client_addr(), node.name);
        show_indented(&spread, "     ");
        check_spread(&spread, &[(1, 1), (2, 1), (3, 2)], &node.name)?;
    }

    step(
        "7",
        "kill -9 the control service while a connection through node-1 is open",
    );
    let node1 = topology.node(1);
    let mut long = node1
        .client
        .enter(|| HttpConn::connect(SocketAddrV4::new(vip, 80), TIMEOUT))?;
    let home = long.get()?;
    println!("   long-lived connection via node-1 answered by {home}");
    control.kill9();
    println!("   sluice-control killed; the nodes forward with the last view they got:");
    let same = long.get()?;
    println!("     same connection  -> {same}");
    if same != home {
        bail!("the long-lived connection moved from {home} to {same}");
    }
    for node in &topology.nodes {
        let spread = spread(&node.client, vip, 40)?;
        println!("     40 new connections via {}:", node.name);
        show_indented(&spread, "       ");
        check_spread(&spread, &[(1, 1), (2, 1), (3, 2)], &node.name)?;
    }
    for (node, agent) in topology.nodes.iter().zip(&agents) {
        if !agent.wait_for_log("lost the control service", 1, PROPAGATION) {
            bail!(
                "{} did not notice the control service went away:\n{}",
                node.name,
                agent.log()
            );
        }
        print_log_lines_of(agent, "lost the control service", &node.name);
    }
    println!("   $ sluicectl get services");
    let down = control.sluicectl(&["get", "services"]);
    if down.status.success() {
        bail!(
            "sluicectl get services succeeded with the control service down:\n{}",
            String::from_utf8_lossy(&down.stdout)
        );
    }
    print!(
        "{}",
        indent_by(&String::from_utf8_lossy(&down.stderr), "     ")
    );
    println!("     (exit status {})", exit_code(&down));

    let started = Instant::now();
    control.restart();
    println!(
        "   sluice-control restarted on the same data dir, serving again in {} ms",
        started.elapsed().as_millis()
    );
    for (node, agent) in topology.nodes.iter().zip(&agents) {
        if !agent.wait_for_log("watching the node's view", 2, PROPAGATION) {
            bail!(
                "{} did not come back to the control service:\n{}",
                node.name,
                agent.log()
            );
        }
        print_last_log_line(agent, "watching the node's view", &node.name);
    }
    let again = long.get()?;
    println!("   the long-lived connection -> {again}");
    if again != home {
        bail!("the long-lived connection moved from {home} to {again}");
    }
    long.close();
    wait_programmed(&control, &names)?;
    println!("   $ sluicectl get nodes");
    print!("{}", indent_by(&ctl(&control, &["get", "nodes"])?, "     "));
    println!("   what the nodes reported with it (sluicectl get nodes -o json, traffic):");
    print_node_traffic(&control)?;
    println!("   $ sluicectl describe service web");
    print!(
        "{}",
        indent_by(&ctl(&control, &["describe", "service", "web"])?, "     ")
    );

    step(
        "8",
        "self-healing: a health check on web, then backend-2's server is killed",
    );
    // The service as applied in step 6, with a health check and versions.
    let healthy = update
        .replace(
            "selector: { app: web } ",
            "healthCheck: { http: { path: /healthz }, intervalMs: 200, timeoutMs: 100, unhealthyThreshold: 2, healthyThreshold: 2 }\nselector: { app: web } ",
        )
        .replace("labels: { app: web }\naddress: 198.19.0.13", "labels: { app: web, version: v2 }\naddress: 198.19.0.13");
    if !healthy.contains("healthCheck") || !healthy.contains("version: v2") {
        bail!("control/manifests/web.yaml changed shape: cannot add the health check");
    }
    println!(
        "   $ sluicectl apply -f web.yaml   # + healthCheck (http /healthz every 200 ms, out after 2 failures); web-3 labelled version: v2"
    );
    let out = control.apply("web-health.yaml", &healthy);
    print!("{}", indent(&checked("apply -f web-health.yaml", &out)?));
    wait_programmed(&control, &names)?;
    println!(
        "   each backend is probed by the nodes the view names (all of them here: at most 3 per backend)"
    );
    http[1].stop();
    println!(
        "   backend-2's HTTP server stopped; the bound is 2 x 200 ms + 100 ms, plus one report and one broadcast"
    );
    std::thread::sleep(HEALTH_WAIT);
    for node in &topology.nodes {
        let spread = spread(&node.client, vip, 60)?;
        println!(
            "   60 new connections via {}: none fails, none reaches backend-2:",
            node.name
        );
        show_indented(&spread, "     ");
        check_spread(&spread, &[(1, 1), (3, 2)], &node.name)?;
    }
    print_last_log_line(&agents[0], "backend unhealthy", "node-1");
    http[1] = HttpServer::start(
        &topology.backends[1].ns,
        topology.backends[1].addr,
        8080,
        "backend-2",
    );
    std::thread::sleep(HEALTH_WAIT);
    println!("   backend-2 restarted; after 2 good probes it is back:");
    for node in &topology.nodes {
        let spread = spread(&node.client, vip, 40)?;
        println!("     40 new connections via {}:", node.name);
        show_indented(&spread, "       ");
        check_spread(&spread, &[(1, 1), (2, 1), (3, 2)], &node.name)?;
    }

    step(
        "9",
        "zero-downtime change: a 10% canary of version v2, then blue-green, then undo",
    );
    for (args, weights, what) in [
        (
            &["rollout", "web", "--to", "v2", "--percent", "10"][..],
            &[(1, 45), (2, 45), (3, 10)][..],
            "10% to v2 (backend-3), the rest shared by v1",
        ),
        (
            &["rollout", "web", "--to", "v2", "--percent", "100"][..],
            &[(3, 1)][..],
            "blue-green: every new flow to v2",
        ),
        (
            &["rollout", "web", "--undo"][..],
            &[(1, 1), (2, 1)][..],
            "undo: every new flow back on v1",
        ),
    ] {
        println!("   $ sluicectl {}", args.join(" "));
        print!("{}", indent_by(&ctl(&control, args)?, "     "));
        wait_programmed(&control, &names)?;
        let spread = spread(&topology.node(1).client, vip, 100)?;
        println!("   100 new connections via node-1 ({what}):");
        show_indented(&spread, "     ");
        check_spread(&spread, weights, "node-1")?;
    }

    step(
        "10",
        "network policy: only node-1's client network may reach web; refusals are events",
    );
    let policy = "kind: NetworkPolicy\nname: web-ingress\nselector: { app: web }\ningress:\n  - from: [{ cidr: 198.18.1.0/24 }]\n    ports: [{ port: 8080, protocol: TCP }]\n";
    println!("   $ sluicectl apply -f policy.yaml   # web accepts 198.18.1.0/24 on 8080/TCP only");
    let out = control.apply("policy.yaml", policy);
    print!("{}", indent(&checked("apply -f policy.yaml", &out)?));
    wait_programmed(&control, &names)?;
    let allowed = spread(&topology.node(1).client, vip, 20)?;
    println!("   20 new connections from node-1's client (198.18.1.2), allowed:");
    show_indented(&allowed, "     ");
    let to = SocketAddrV4::new(vip, 80);
    let refused = topology
        .node(2)
        .client
        .enter(|| http_get(to, Duration::from_millis(700)));
    match refused {
        Err(e) if e.is_timeout() => println!(
            "   from node-2's client (198.18.2.2): no answer, the SYN was dropped in node-2's kernel"
        ),
        other => bail!("node-2's client was not refused: {other:?}"),
    }
    println!("   $ sluicectl flows --verdict denied");
    let flows = ctl(&control, &["flows", "--verdict", "denied"])?;
    if !flows.contains("198.18.2.2") {
        bail!("the refusal is not among the flow events:\n{flows}");
    }
    print!("{}", indent_by(&flows, "     "));
    println!("   $ sluicectl delete networkpolicy web-ingress");
    ctl(&control, &["delete", "networkpolicy", "web-ingress"])?;
    wait_programmed(&control, &names)?;
    let back = spread(&topology.node(2).client, vip, 20)?;
    println!("   20 new connections from node-2's client again:");
    show_indented(&back, "     ");

    step(
        "11",
        "introspection: the flow log, sluicectl top, Prometheus metrics, the dashboard",
    );
    introspection(&control, &topology, vip)?;

    step(
        "12",
        "clean-up: agents down, servers stopped, control service stopped, namespaces deleted",
    );
    drop(agents);
    drop(http);
    drop(udp);
    drop(control);
    drop(topology);
    println!("   done");
    Ok(())
}

/// Step 11: what an operator sees while traffic flows.
fn introspection(
    control: &ControlService,
    topology: &ClusterTopology,
    vip: Ipv4Addr,
) -> anyhow::Result<()> {
    println!("   $ sluicectl flows --service web --kind close   # the last few");
    let flows = ctl(control, &["flows", "--service", "web", "--kind", "close"])?;
    let lines: Vec<&str> = flows.lines().collect();
    let shown = lines.len().saturating_sub(4).max(1);
    println!("     {}", lines.first().copied().unwrap_or_default());
    for line in &lines[shown.min(lines.len())..] {
        println!("     {line}");
    }
    // Bounded steady traffic through node-1 while `top` watches.
    let to = SocketAddrV4::new(vip, 80);
    let client = &topology.node(1).client;
    let top = std::thread::scope(|scope| -> anyhow::Result<String> {
        let load = scope.spawn(|| {
            client.enter(|| {
                let until = Instant::now() + Duration::from_secs(12);
                let mut sent = 0u32;
                while Instant::now() < until && sent < 2_000 {
                    if http_get(to, Duration::from_secs(2)).is_ok() {
                        sent += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                sent
            })
        });
        let top = ctl(control, &["top", "--interval", "2", "--count", "6"]);
        let sent = load
            .join()
            .map_err(|_| anyhow::anyhow!("the load thread panicked"))?;
        println!("   {sent} requests through node-1 over 12 s (about 40/s)");
        top
    })?;
    println!("   $ sluicectl top   # the last refresh");
    let last = top.rsplit("node(s);").next().unwrap_or_default();
    print!(
        "{}",
        indent_by(&format!("{} node(s);{last}", topology.nodes.len()), "     ")
    );

    let metrics_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464);
    let page = topology
        .node(1)
        .ns
        .enter(|| scrape_metrics(metrics_addr, Duration::from_secs(5)))
        .context("scraping node-1's agent metrics")?;
    println!("   $ curl http://127.0.0.1:9464/metrics   # on node-1, a few of its lines");
    for line in page.lines().filter(|l| {
        l.starts_with("sluice_service_new_flows_total")
            || l.starts_with("sluice_dropped_packets_total{reason=\"policy\"}")
            || l.starts_with("sluice_program_attached")
            || l.starts_with("sluice_reconcile_duration_seconds_count")
    }) {
        println!("     {line}");
    }
    let control_metrics = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9465);
    let page = topology
        .control
        .enter(|| scrape_metrics(control_metrics, Duration::from_secs(5)))
        .context("scraping the control service's metrics")?;
    println!("   $ curl http://127.0.0.1:9465/metrics   # the control service");
    for line in page.lines().filter(|l| {
        l.starts_with("sluice_node_version_lag")
            || l.starts_with(
                "sluice_api_requests_total{service=\"sluice.v1.Resources\",method=\"Apply\"",
            )
            || l.starts_with("sluice_store_commit_duration_seconds_count")
    }) {
        println!("     {line}");
    }

    println!("   $ sluicectl dashboard --ttl 10m");
    let url = ctl(control, &["dashboard", "--ttl", "10m"])?;
    print!("{}", indent_by(&url, "     "));
    // What the page's live stream carries, fetched as the page does (the
    // token as a bearer header, the cluster CA trusted, nothing else).
    let link = url
        .split_whitespace()
        .find(|w| w.starts_with("https://"))
        .context("no URL in sluicectl dashboard's output")?;
    let (origin, token) = link
        .split_once("/#token=")
        .context("no token in the dashboard URL")?;
    let out = topology
        .control
        .command(&["curl", "-sS", "--max-time", "5", "--cacert"])
        .arg(control.ca_pem_file())
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{origin}/api/snapshot"))
        .output()
        .context("running curl")?;
    let snapshot: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the dashboard's snapshot: {}",
            checked("curl", &out).unwrap_or_default()
        )
    })?;
    let o = &snapshot["overview"];
    println!(
        "   its live feed (HTTPS, {origin}): nodes connected {}/{}, services {}, backends serving {}/{}, policies {}",
        o["nodesConnected"],
        o["nodes"],
        o["services"],
        o["backendsServing"],
        o["backends"],
        o["policies"]
    );
    println!("   (open the URL in a browser that trusts the cluster CA; it updates every second)");
    Ok(())
}

/// `sluicectl <args>` as the admin; stdout, or an error with its output.
fn ctl(control: &ControlService, args: &[&str]) -> anyhow::Result<String> {
    checked(&args.join(" "), &control.sluicectl(args))
}

/// `sluicectl -o json <args>`, parsed.
fn ctl_json(control: &ControlService, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = ctl(control, &all)?;
    serde_json::from_str(&out).with_context(|| format!("sluicectl {args:?}: not JSON:\n{out}"))
}

/// sluicectl's stdout if it succeeded, else an error with what it said.
fn checked(what: &str, out: &Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "sluicectl {what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn exit_code(out: &Output) -> String {
    out.status
        .code()
        .map_or_else(|| out.status.to_string(), |c| c.to_string())
}

/// The VIP the control service allocated to `default/web`.
fn web_vip(control: &ControlService) -> anyhow::Result<Ipv4Addr> {
    let service = ctl_json(control, &["get", "service", "web"])?;
    service["vip"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VIP allocated to web: {service}"))
}

/// Waits until every node in `nodes` applied the view version current now.
fn wait_programmed(control: &ControlService, nodes: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    let desired = control.view_version();
    control
        .wait_programmed(nodes, desired, PROPAGATION)
        .map_err(|last| {
            anyhow::anyhow!(
                "the nodes did not apply view version {desired} within {PROPAGATION:?}: {last}"
            )
        })?;
    println!(
        "   {} report view version {desired} applied (waited {} ms)",
        nodes.join(" and "),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// Fails unless every connection went to a listed backend and the shares
/// follow the weights (`(backend index, weight)`), within 5% or 2 connections.
fn check_spread(
    spread: &BTreeMap<String, usize>,
    weights: &[(usize, usize)],
    via: &str,
) -> anyhow::Result<()> {
    let total: usize = spread.values().sum();
    let weight_sum: usize = weights.iter().map(|(_, w)| w).sum();
    let mut listed = 0;
    for &(backend, weight) in weights {
        let got = spread
            .get(&format!("backend-{backend}"))
            .copied()
            .unwrap_or(0);
        listed += got;
        let want = total * weight / weight_sum;
        if got.abs_diff(want) > (total / 20).max(2) {
            bail!(
                "via {via}: backend-{backend} got {got} of {total} connections, expected about {want}: {spread:?}"
            );
        }
    }
    if listed != total {
        bail!("via {via}: connections went to unexpected backends: {spread:?}");
    }
    Ok(())
}

/// Prints `sluice-agent join ...` one option per line, the token masked.
fn print_join_command(node: &str, args: &[String], token: &str) {
    let shown = format!("{}…", token.chars().take(6).collect::<String>());
    let mut lines = vec![format!("   $ sluice-agent {}", args[0])];
    for pair in args[1..].chunks(2) {
        let value = if pair[0] == "--token" {
            shown.as_str()
        } else {
            pair.get(1).map_or("", String::as_str)
        };
        lines.push(format!("         {} {value}", pair[0]));
    }
    println!("{}", lines.join(" \\\n"));
    println!("     (in {node}'s namespace; the demo adds --bpffs-root, a private bpffs)");
}

fn print_last_log_line(agent: &Agent, needle: &str, node: &str) {
    if let Some(line) = agent.log().lines().rev().find(|l| l.contains(needle)) {
        println!("   {node}: {}", agent_said(line));
    }
}

/// The traffic counters each node reported (`get nodes -o json`, `traffic`).
fn print_node_traffic(control: &ControlService) -> anyhow::Result<()> {
    let nodes = ctl_json(control, &["get", "nodes"])?;
    println!(
        "     {:<8} {:<22} {:>9} {:>10} {:>10} {:>7}",
        "NODE", "FRONTEND", "PACKETS", "BYTES", "NEW FLOWS", "ACTIVE"
    );
    for node in nodes
        .as_array()
        .context("`get nodes -o json`: not a list")?
    {
        let name = node["name"].as_str().unwrap_or("?");
        let traffic = node["traffic"].as_array().cloned().unwrap_or_default();
        if traffic.is_empty() {
            println!("     {name:<8} (no traffic reported)");
        }
        for t in &traffic {
            let frontend = format!(
                "{}:{}/{}",
                t["vip"].as_str().unwrap_or("?"),
                t["port"],
                t["protocol"].as_str().unwrap_or("?")
            );
            println!(
                "     {name:<8} {frontend:<22} {:>9} {:>10} {:>10} {:>7}",
                t["packets"].to_string(),
                t["bytes"].to_string(),
                t["newFlows"].to_string(),
                t["activeConnections"].to_string()
            );
        }
    }
    Ok(())
}

/// The standalone flow (`--standalone`): one agent run with
/// agent/manifests/web.yaml, no control service.
fn standalone(nic_like: bool) -> anyhow::Result<()> {
    let offloads = if nic_like {
        Offloads::NicLike
    } else {
        Offloads::KernelDefault
    };

    step(
        "1",
        "a client, a node and three backends, each in its own network namespace",
    );
    let topology = Topology::build(TopologySpec {
        backends: 3,
        offloads,
    });
    let mut http = Vec::new();
    let mut udp = Vec::new();
    for i in 1..=3 {
        let b = topology.backend(i);
        let name = format!("backend-{i}");
        http.push(HttpServer::start(&b.ns, b.addr, 8080, &name));
        udp.push(UdpServer::start(&b.ns, b.addr, 5353, &name));
        println!("   {name:<10} {}  HTTP :8080, UDP :5353", backend_addr(i));
    }
    println!(
        "   client     {}  (reaches the VIP {} through the node)",
        topology.client_addr(),
        vip()
    );
    println!(
        "   veth offloads: {}",
        match offloads {
            Offloads::KernelDefault => "kernel defaults (use --nic-like for NIC-like ends)",
            Offloads::NicLike => "client and backend ends tx off, gro on (NIC-like)",
        }
    );

    step(
        "2",
        "sluice-agent on the node, with agent/manifests/web.yaml",
    );
    let scratch = ScratchDir::new();
    let manifest = scratch.write("web.yaml", EXAMPLE);
    let mut agent = Agent::start(&topology.node, &manifest, &topology.node_interfaces(), &[]);
    let status = agent.status_json();
    for i in status["interfaces"].as_array().context("interfaces")? {
        println!(
            "   {:<4} hooked with {}",
            i["name"].as_str().unwrap_or("?"),
            i["hook"]
        );
    }
    print_log_lines(&agent, "hook chosen");

    step("3", "300 HTTP connections to the VIP, round-robin");
    show(&spread(&topology.client, vip(), 300)?);
    if let Some(curl) = which("curl") {
        println!("   and with curl from the client namespace:");
        for _ in 0..3 {
            let out =
                topology
                    .client
                    .exec(&[&curl, "-s", "-m", "3", &format!("http://{}/", vip())]);
            println!(
                "     curl http://{}/  ->  {}",
                vip(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
    }

    step(
        "4",
        "the manifest changes to weighted-round-robin (1:1:2), live",
    );
    // Written aside and renamed over it, as editors save: written in place,
    // the agent could read it truncated (an empty manifest is a valid one).
    let edited = scratch.write(
        "web.yaml.new",
        EXAMPLE.replace(
            "algorithm: round-robin ",
            "algorithm: weighted-round-robin ",
        ),
    );
    std::fs::rename(&edited, &manifest).context("replacing the manifest")?;
    if !agent.wait_for_log(APPLIED_LINE, 2, Duration::from_secs(10)) {
        bail!("the change was not applied:\n{}", agent.log());
    }
    print_log_lines(&agent, "applied manifest");
    show(&spread(&topology.client, vip(), 200)?);

    step(
        "5",
        "UDP: each client socket sticks to one backend; replies come from the VIP",
    );
    let to = SocketAddrV4::new(vip(), 53);
    let answers = topology.client.enter(|| -> anyhow::Result<Vec<_>> {
        let mut out = Vec::new();
        for socket_no in 1..=3 {
            let socket = UdpSocket::bind((topology.client_addr(), 0))?;
            for _ in 0..3 {
                let (body, from) = udp_exchange(&socket, to, TIMEOUT)?;
                out.push((socket_no, socket.local_addr()?, body, from));
            }
        }
        Ok(out)
    })?;
    for (n, local, body, from) in &answers {
        println!("   socket {n} ({local}) -> {body:<10} reply from {from}");
    }

    step("6", "kill -9 the agent while a connection is open");
    let mut long = topology
        .client
        .enter(|| HttpConn::connect(SocketAddrV4::new(vip(), 80), TIMEOUT))?;
    let home = long.get()?;
    println!("   long-lived connection answered by {home}");
    agent.kill9();
    println!("   agent killed; the pinned data plane keeps forwarding:");
    println!("     same connection  -> {}", long.get()?);
    let during = spread(&topology.client, vip(), 40)?;
    println!("     40 new connections while the agent is down:");
    show(&during);
    let started = Instant::now();
    agent.restart();
    println!(
        "   agent restarted in {} ms, reusing its pins; the connection -> {}",
        started.elapsed().as_millis(),
        long.get()?
    );
    long.close();

    step("7", "sluice-agent status (read from the pinned maps)");
    let out = agent.run_cli(&["status"]);
    print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));

    step(
        "8",
        "clean-up: agent down, servers stopped, namespaces deleted",
    );
    drop(agent);
    drop(http);
    drop(udp);
    drop(topology);
    println!("   done");
    Ok(())
}

fn step(n: &str, what: &str) {
    println!("\n== {n}. {what}");
}

/// `n` new connections from `client` to `vip:80`; who answered.
fn spread(client: &Netns, vip: Ipv4Addr, n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let to = SocketAddrV4::new(vip, 80);
    let bodies = client.enter(|| -> anyhow::Result<Vec<String>> {
        (0..n)
            .map(|i| http_get(to, TIMEOUT).with_context(|| format!("connection {} to {to}", i + 1)))
            .collect()
    })?;
    Ok(tally(bodies))
}

fn show(spread: &BTreeMap<String, usize>) {
    show_indented(spread, "   ");
}

fn show_indented(spread: &BTreeMap<String, usize>, prefix: &str) {
    let total: usize = spread.values().sum();
    for (backend, n) in spread {
        let share = 100.0 * *n as f64 / total as f64;
        println!(
            "{prefix}{backend:<10} {n:>4} connections {share:>5.1}%  {}",
            "#".repeat(share.round() as usize / 2)
        );
    }
}

fn print_log_lines(agent: &Agent, needle: &str) {
    print_log_lines_of(agent, needle, "agent");
}

/// The agent's log lines with `needle`, each labelled `who`.
fn print_log_lines_of(agent: &Agent, needle: &str, who: &str) {
    for line in agent.log().lines().filter(|l| l.contains(needle)) {
        println!("   {who}: {}", agent_said(line));
    }
}

/// A log line without its timestamp, level and target: what the agent said.
fn agent_said(line: &str) -> String {
    let text = strip_ansi(line);
    text.split_once(": ")
        .map_or(text.clone(), |(_, rest)| rest.to_owned())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn indent(text: &str) -> String {
    indent_by(text, "   ")
}

fn indent_by(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

fn which(program: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
