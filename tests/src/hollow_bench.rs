//! The `hollow` part of `cargo xtask bench`: three `sluice-control` replicas
//! on a 3-member etcd, N hollow nodes ([`crate::hollow`]) joined to them
//! (spread evenly, reporting every second), and one endpoint change applied
//! through the API: the time until it is acknowledged and until all N nodes
//! have the new view version. Then, with the largest fleet still joined,
//! `services` services are loaded and the same change timed at that size,
//! and each replica's CPU (over 10 s of steady reports) and memory taken.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use sluice_api::v1;
use sluice_control::{cli::client::Client, client_config::ClientConfig, testing::EtcdCluster};

use crate::{
    ControlService, Netns, ScratchDir,
    control_bench::{ETCD_BATCH, endpoint, manifest_range, rss_mib},
    hollow::Fleet,
};

const VIP_CIDR: &str = "198.18.128.0/17";
const REPLICAS: u16 = 3;
const ALL_NODES_TIMEOUT: Duration = Duration::from_secs(300);
const CPU_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
pub struct Row {
    pub nodes: usize,
    pub services: usize,
    pub endpoints: usize,
    /// Request to acknowledgement (median of the rounds).
    pub apply_ms: f64,
    /// Request to every node holding the new version (median).
    pub all_nodes_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Replica {
    pub nodes: usize,
    pub services: usize,
    /// Of one CPU, over [`CPU_WINDOW`] of 1 s reports and no changes.
    pub cpu_percent: f64,
    pub rss_mib: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub replicas: Vec<Replica>,
}

/// Runs the part: `fleets` sizes (ascending), then `services` × `per` at
/// the largest.
pub fn run(fleets: &[usize], services: usize, per: usize, rounds: usize) -> anyhow::Result<Report> {
    let ns = Netns::new("hollow");
    let etcd = EtcdCluster::start_in_netns(3, ns.name())?;
    let keys = ScratchDir::new();
    let key_file = keys.write("kek", sluice_control::sealing::new_key_line()?);
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600))?;
    let (store, key_file) = (etcd.url(), key_file.display().to_string());
    let replicas: Vec<ControlService> = (0..REPLICAS)
        .map(|i| {
            let listen = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7443 + i);
            ControlService::start(
                &ns,
                listen,
                VIP_CIDR,
                &[
                    "--store",
                    &store,
                    "--encryption-key-file",
                    &key_file,
                    "--dashboard-listen",
                    "off",
                    "--metrics-listen",
                    "off",
                ],
            )
        })
        .collect();
    let urls: Vec<String> = replicas.iter().map(ControlService::url).collect();
    let pids: Vec<u32> = replicas.iter().filter_map(ControlService::pid).collect();
    let admin_conf = replicas[0].admin_conf();
    // The runtime's threads are made by this one, in the namespace.
    let report = ns.enter(move || -> anyhow::Result<Report> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let config = ClientConfig::load(&admin_conf)?;
            let admin = Client::connect(&admin_conf, &config).await?;
            let mut report = Report {
                rows: Vec::new(),
                replicas: Vec::new(),
            };
            let mut fleet = None;
            for &n in fleets {
                drop(fleet.take());
                let joined =
                    Fleet::join(&admin, &urls, &format!("h{n}"), n, Duration::from_secs(1))
                        .await
                        .map_err(|e| anyhow::anyhow!("joining {n} hollow nodes: {e:?}"))?;
                report
                    .rows
                    .push(time_change(&admin, &joined, n, 1, 3, rounds).await?);
                fleet = Some(joined);
            }
            let fleet = fleet.context("no fleet")?;
            let n = fleets.last().copied().unwrap_or(0);
            report.replicas.extend(sample(&pids, n, 1).await?);
            // The large state, in applies an etcd transaction holds.
            let batch = (ETCD_BATCH / (1 + per)).max(1);
            for first in (0..services).step_by(batch) {
                let text = manifest_range(first..(first + batch).min(services), per, 1);
                admin.apply(objects(&text)?, false).await?;
            }
            report
                .rows
                .push(time_change(&admin, &fleet, n, services, per, 3).await?);
            report.replicas.extend(sample(&pids, n, services).await?);
            Ok(report)
        })
    });
    drop((replicas, etcd, keys, ns));
    report
}

fn objects(text: &str) -> anyhow::Result<Vec<v1::Object>> {
    Ok(sluice_model::manifest::parse_objects("bench.yaml", text)?
        .iter()
        .map(v1::Object::from)
        .collect())
}

/// One endpoint of a service in the middle changes weight, `rounds` times.
async fn time_change(
    admin: &Client,
    fleet: &Fleet,
    nodes: usize,
    services: usize,
    per: usize,
    rounds: usize,
) -> anyhow::Result<Row> {
    if services == 1 {
        admin
            .apply(objects(&manifest_range(0..1, per, 1))?, false)
            .await?;
    }
    let (mut acks, mut alls) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        // Every node has what came before.
        let (_, high) = fleet.versions();
        fleet
            .wait_all_above(high.saturating_sub(1), ALL_NODES_TIMEOUT)
            .await?;
        let change = endpoint(services / 2, 0, 2 + round as u32);
        let sent = Instant::now();
        admin.apply(objects(&change)?, false).await?;
        acks.push(sent.elapsed());
        fleet.wait_all_above(high, ALL_NODES_TIMEOUT).await?;
        alls.push(sent.elapsed());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    Ok(Row {
        nodes,
        services,
        endpoints: services * per,
        apply_ms: median(acks),
        all_nodes_ms: median(alls),
    })
}

/// Each replica's CPU over [`CPU_WINDOW`] and its RSS at the end.
async fn sample(pids: &[u32], nodes: usize, services: usize) -> anyhow::Result<Vec<Replica>> {
    let before: Vec<u64> = pids
        .iter()
        .map(|&p| cpu_ticks(p))
        .collect::<Result<_, _>>()?;
    tokio::time::sleep(CPU_WINDOW).await;
    let ticks_per_second = 100.0;
    pids.iter()
        .zip(before)
        .map(|(&pid, before)| {
            let used = cpu_ticks(pid)?.saturating_sub(before) as f64 / ticks_per_second;
            Ok(Replica {
                nodes,
                services,
                cpu_percent: 100.0 * used / CPU_WINDOW.as_secs_f64(),
                rss_mib: rss_mib(pid)?,
            })
        })
        .collect()
}

/// utime + stime of `pid`, in clock ticks (`/proc/PID/stat` fields 14, 15).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from after its `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context("malformed /proc/PID/stat")
    };
    // After `)`: state is field 3, so utime (14) is index 11.
    Ok(field(11)? + field(12)?)
}

pub fn render(report: &Report) -> String {
    let mut out = format!(
        "{:>7} {:>9} {:>10} {:>10} {:>16}\n",
        "nodes", "services", "endpoints", "apply ms", "all nodes ms"
    );
    for r in &report.rows {
        out.push_str(&format!(
            "{:>7} {:>9} {:>10} {:>10.1} {:>16.1}\n",
            r.nodes, r.services, r.endpoints, r.apply_ms, r.all_nodes_ms
        ));
    }
    out.push_str(&format!(
        "\n{:>7} {:>9} {:>22} {:>12}\n",
        "nodes", "services", "replica CPU (1 core)", "replica RSS"
    ));
    for r in &report.replicas {
        out.push_str(&format!(
            "{:>7} {:>9} {:>21.1}% {:>8.1} MiB\n",
            r.nodes, r.services, r.cpu_percent, r.rss_mib
        ));
    }
    out
}
