//! The default flow, steps 1 to 12: a control service, two joined nodes,
//! `sluicectl` driving them. One function, in the order the demo prints, so
//! that it reads as the script it is.

use anyhow::{Context as _, bail};
use sluice_tests::{
    Agent, ClusterTopology, ControlService, HttpConn, HttpServer, UdpServer,
    agent::agent_bin,
    cluster::{CONTROL_ADDR, NODE_INTERFACES, VIP_CIDR},
    http_get, udp_exchange,
};
use std::{
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use crate::{
    CLUSTER_EXAMPLE, HEALTH_WAIT, PROPAGATION, TIMEOUT,
    introspection::introspection,
    output::{indent, indent_by, print_last_log_line, print_log_lines_of, step},
    sluicectl::{checked, ctl, ctl_json, exit_code, print_node_traffic, wait_programmed, web_vip},
    traffic::{check_spread, show_indented, spread, which},
};

/// The default flow: a control service, two joined nodes, `sluicectl`.
pub(crate) fn cluster() -> anyhow::Result<()> {
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
