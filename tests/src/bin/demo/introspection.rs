//! Step 11 of the cluster flow: what an operator sees while traffic flows
//! (flow log, `sluicectl top`, metrics, the dashboard's live feed). Apart
//! from the rest because it only reads.

use anyhow::Context as _;
use sluice_tests::{ClusterTopology, ControlService, http_get, scrape_metrics};
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use crate::{
    output::indent_by,
    sluicectl::{checked, ctl},
};

/// Step 11: what an operator sees while traffic flows.
pub(crate) fn introspection(
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
