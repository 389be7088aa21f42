//! The standalone flow (`--standalone`): one agent with a manifest file, no
//! control service.

use anyhow::{Context as _, bail};
use sluice_tests::{
    Agent, HttpConn, HttpServer, Offloads, ScratchDir, Topology, TopologySpec, UdpServer,
    agent::APPLIED_LINE,
    topology::{backend_addr, vip},
    udp_exchange,
};
use std::{
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use crate::{
    EXAMPLE, TIMEOUT,
    output::{indent, print_log_lines, step},
    traffic::{show, spread, which},
};

/// The standalone flow (`--standalone`): one agent run with
/// agent/manifests/web.yaml, no control service.
pub(crate) fn standalone(nic_like: bool) -> anyhow::Result<()> {
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
