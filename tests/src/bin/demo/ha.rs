//! `--ha`: the replicated control plane. Three `sluice-control` replicas on
//! a 3-member etcd (all in the control namespace), two nodes joined with
//! every replica's address, traffic through both; then `kill -9` of the
//! replica a node watches, under traffic and a held connection, and an
//! update through another replica; then an etcd member killed while writes
//! go on. One function, in the order the demo prints.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sluice_tests::{
    HttpConn,
    ha::{HaCluster, REPLICAS, replica_addr, web},
};

use crate::{
    PROPAGATION,
    output::{indent, step},
    traffic::{check_spread, show_indented, spread},
};

const WATCHING: &str = "watching the node's view";

pub(crate) fn ha() -> anyhow::Result<()> {
    step(
        "1",
        "three sluice-control replicas on a 3-member etcd, two nodes, three backends",
    );
    let started = Instant::now();
    let mut ha = HaCluster::start(2, 3);
    for i in 0..REPLICAS {
        println!(
            "   replica {i}  https://{}  (etcd on the control namespace's loopback)",
            replica_addr(i)
        );
    }
    for (k, node) in ha.topology.nodes.iter().enumerate() {
        println!(
            "   {}     joined with --control {}",
            node.name,
            ha.urls_from(k)
        );
    }
    println!(
        "   ready in {} ms; every replica serves the API, agents' watches and a dashboard",
        started.elapsed().as_millis()
    );

    step("2", "apply through replica 0, traffic through both nodes");
    ha.apply_through(0, &web(3));
    ha.wait_programmed_on(2);
    let vip = ha.vip(1, "web");
    println!("   default/web has VIP {vip} (allocated once, in an etcd transaction)");
    for k in 1..=2 {
        let answered = spread(&ha.topology.node(k).client, vip, 30)?;
        println!("   from node-{k}'s client:");
        show_indented(&answered, "     ");
        check_spread(&answered, &[(1, 1), (2, 1), (3, 1)], &format!("node-{k}"))?;
    }
    println!(
        "   $ sluicectl get nodes   (through replica 2: it sees nodes connected to the others)"
    );
    print!("{}", indent(&ha.replica(2).sluicectl_ok(&["get", "nodes"])));

    step(
        "3",
        "kill -9 of the replica node-1 watches, under traffic and a held connection",
    );
    let node = ha.topology.node(1);
    let mut held = node
        .client
        .enter(|| -> anyhow::Result<(HttpConn, String)> {
            let mut conn = HttpConn::connect(std::net::SocketAddrV4::new(vip, 80), crate::TIMEOUT)?;
            let first = conn.get()?;
            Ok((conn, first))
        })?;
    let watches = ha.agents[0].log().matches(WATCHING).count();
    ha.replicas[0].kill9();
    let killed = Instant::now();
    while ha.agents[0].log().matches(WATCHING).count() == watches {
        if killed.elapsed() > PROPAGATION {
            bail!("node-1 did not resume on another replica within {PROPAGATION:?}");
        }
        let answer = held.0.get().context("the held connection")?;
        if answer != held.1 {
            bail!("the held connection moved from {} to {answer}", held.1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "   node-1 watches another replica {} ms after the kill; the held connection kept \
         answering ({}), from the kernel",
        killed.elapsed().as_millis(),
        held.1
    );
    if let Some(line) = ha.agents[0]
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("connected to another control service replica"))
    {
        println!(
            "   node-1: {}",
            line.split_once(": ").map_or(line, |(_, l)| l)
        );
    }

    step("4", "a change through replica 2 reaches both nodes");
    let two_backends = web(2);
    ha.apply_through(2, &two_backends);
    ha.apply_through(
        2,
        "kind: Endpoint\nname: web-3\nlabels: { app: other }\naddress: 198.19.0.13\n",
    );
    ha.wait_programmed_on(2);
    for k in 1..=2 {
        let answered = spread(&ha.topology.node(k).client, vip, 20)?;
        println!("   from node-{k}'s client:");
        show_indented(&answered, "     ");
        check_spread(&answered, &[(1, 1), (2, 1)], &format!("node-{k}"))?;
    }
    ha.replicas[0].restart();
    println!("   replica 0 restarted: it loads the state from etcd and rejoins its peers");

    step(
        "5",
        "kill -9 of an etcd member: writes go on with the other two",
    );
    ha.etcd.kill(0).context("killing an etcd member")?;
    let began = Instant::now();
    ha.apply_through(1, &web(3));
    ha.wait_programmed_on(0);
    println!(
        "   applied through replica 1 and programmed on both nodes in {} ms with 2 of 3 members",
        began.elapsed().as_millis()
    );
    ha.etcd.restart(0).context("restarting the etcd member")?;
    println!(
        "\n   done: every namespace, replica, etcd member and its data dir is removed on exit"
    );
    Ok(())
}
