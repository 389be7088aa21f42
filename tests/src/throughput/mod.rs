//! Part 3 of `cargo xtask bench`: traffic through the namespace topology
//! (client → node → 2 backends, see [`Topology`]) with the node balancing
//! by one of three means, on the same topology built afresh for each:
//!
//! - Sluice: the release `sluice-agent` in standalone manifest mode, XDP on
//!   the node's interfaces (the client and backend ends are NIC-like);
//! - Sluice with its TC programs only (`--mode tc`), the hook it falls back
//!   to where XDP cannot forward: on veth, XDP redirects go through the
//!   peer's NAPI, a cost a real NIC does not add in the same way;
//! - iptables: DNAT rules in the form kube-proxy's iptables mode writes them
//!   (`KUBE-SERVICES` → `KUBE-SVC-*` with `statistic --mode random` →
//!   `KUBE-SEP-*` with `DNAT`; `KUBE-MARK-MASQ`, `KUBE-POSTROUTING`), loaded
//!   with `iptables-restore` in the node namespace; conntrack does the
//!   reverse NAT;
//! - nftables: kube-proxy's nftables mode (a verdict map of
//!   address . protocol . port → service chain, `numgen random` over
//!   endpoint chains that `dnat`).
//!
//! With 1, 1,000 and 10,000 services the measured one is the last, so a
//! linear walk shows. Each service has two endpoints (both backends); the
//! client subnet stands for the pod network (kube-proxy's cluster CIDR), so
//! nothing is masqueraded: backends see the client's address with every
//! mode, as with Sluice. What each balancer is given for those services (a
//! manifest, iptables or nftables rules) is generated in `configs`; this
//! module sets each up and measures it.
//!
//! Safety: every namespace is the bench's own and is deleted on drop (panics
//! included); iptables and nft run only inside the node namespace
//! (`ip netns exec`); every address is in 198.18.0.0/15; every loop is
//! bounded by a deadline and a count (see [`crate::loadgen`]).

mod configs;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

pub use configs::{
    Service, iptables_restore, iptables_rules, nftables_batches, nftables_rules, services,
    sluice_manifest,
};

use crate::{
    Agent, Offloads, ScratchDir, Topology, TopologySpec,
    loadgen::{self, TcpBackend, TcpStats, UdpSent, UdpSink},
    netns::Netns,
};

/// Service port and the backends' target port, TCP.
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET: u16 = 8080;
/// Service port and target port of the last service's UDP port.
pub const UDP_PORT: u16 = 5353;
pub const UDP_TARGET: u16 = 9090;
/// The client subnet, standing for the cluster CIDR (see the module docs).
const CLUSTER_CIDR: &str = "198.18.1.0/24";
/// Threads of each TCP backend: more than the concurrent connections.
const BACKEND_THREADS: usize = 8;
/// Upper bounds on the count of every loop, whatever the duration.
const MAX_CONNS_PER_WORKER: usize = 200_000;
const MAX_REQUESTS_PER_CONN: usize = 1_000_000;
const MAX_DATAGRAMS_PER_WORKER: u64 = 5_000_000;

#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub sizes: Vec<usize>,
    /// Seconds of each measurement (connections, requests, UDP).
    pub seconds: f64,
    /// Concurrent connection workers; also kept-alive connections and UDP senders.
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sizes: vec![1, 1_000, 10_000],
            seconds: 2.0,
            workers: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Sluice,
    /// The same agent with its TC programs only (`--mode tc`).
    SluiceTc,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Sluice, Mode::SluiceTc, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Sluice => "Sluice (XDP)",
            Mode::SluiceTc => "Sluice (TC only)",
            Mode::Iptables => "iptables (kube-proxy)",
            Mode::Nftables => "nftables (kube-proxy)",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub mode: Mode,
    pub services: usize,
    /// Seconds to load the rules (or start the agent until its data plane is ready).
    pub setup_s: f64,
    pub conns_per_s: f64,
    pub conns: TcpStats,
    pub rr_per_s: f64,
    pub rr_p50_us: u32,
    pub rr_p90_us: u32,
    pub rr_p99_us: u32,
    pub requests: TcpStats,
    pub udp: UdpSent,
    pub udp_received: u64,
    pub udp_received_pps: f64,
    /// Datagrams the backends' kernels dropped for want of room in a
    /// socket's receive buffer (`RcvbufErrors`): loss after the balancer.
    pub udp_rcvbuf_errors: u64,
    /// Sluice only: its data plane's non-zero outcome counters (`fwd_xdp`...).
    pub outcomes: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub settings: Settings,
    /// The `iptables-restore` that loaded the iptables rules.
    pub iptables_restore: &'static str,
    pub rows: Vec<Measurement>,
}

/// Runs `argv` in `ns` with `input` on its stdin; fails with its stderr.
pub(crate) fn exec_with_input(ns: &Netns, argv: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = ns
        .command(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {argv:?} in {}", ns.name()))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin
        .write_all(input.as_bytes())
        .with_context(|| format!("writing to {argv:?}"))?;
    drop(stdin);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{argv:?} in {} failed ({}): {}",
            ns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The balancer of one measurement; dropping it stops the agent (the rules
/// vanish with the namespace).
enum Balancer {
    // The agent drops before the directory holding its manifest.
    Sluice {
        agent: Box<Agent>,
        _manifest: ScratchDir,
    },
    Rules,
}

fn set_up(mode: Mode, topology: &Topology, services: &[Service]) -> anyhow::Result<Balancer> {
    match mode {
        Mode::Sluice | Mode::SluiceTc => {
            let scratch = ScratchDir::new();
            let manifest = scratch.write("services.yaml", sluice_manifest(services));
            let agent = Agent::try_start(
                &topology.node,
                &manifest,
                &topology.node_interfaces(),
                &["--mode", if mode == Mode::Sluice { "xdp" } else { "tc" }],
            )
            .map_err(|f| anyhow::anyhow!("{f}"))?;
            Ok(Balancer::Sluice {
                agent: Box::new(agent),
                _manifest: scratch,
            })
        }
        Mode::Iptables => {
            exec_with_input(
                &topology.node,
                &[iptables_restore(), "--noflush"],
                &iptables_rules(services),
            )?;
            Ok(Balancer::Rules)
        }
        Mode::Nftables => {
            exec_with_input(
                &topology.node,
                &["nft", "-f", "-"],
                &nftables_rules(services),
            )?;
            Ok(Balancer::Rules)
        }
    }
}

/// `Udp: RcvbufErrors` of `ns` (/proc/net/snmp is the reading thread's
/// namespace's); 0 if unreadable.
fn udp_rcvbuf_errors(ns: &Netns) -> u64 {
    let text = ns.enter(|| std::fs::read_to_string("/proc/net/snmp").unwrap_or_default());
    snmp_field(&text, "Udp:", "RcvbufErrors").unwrap_or(0)
}

/// The value of `field` in the `prefix` lines of /proc/net/snmp (a header
/// line of names, then a line of values).
pub fn snmp_field(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let at = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Part 3: every mode at every size.
pub fn run(settings: &Settings) -> anyhow::Result<Report> {
    let mut rows = Vec::new();
    for &size in &settings.sizes {
        for mode in Mode::ALL {
            eprintln!("throughput: {mode}, {size} services");
            let row = measure(mode, size, settings)
                .with_context(|| format!("throughput: {mode} with {size} services"))?;
            eprintln!(
                "  {:.0} conn/s, p50 {} µs p99 {} µs, {:.0} UDP pkt/s received {:?}",
                row.conns_per_s, row.rr_p50_us, row.rr_p99_us, row.udp_received_pps, row.outcomes
            );
            rows.push(row);
        }
    }
    Ok(Report {
        settings: settings.clone(),
        iptables_restore: iptables_restore(),
        rows,
    })
}

fn measure(mode: Mode, size: usize, settings: &Settings) -> anyhow::Result<Measurement> {
    let topology = Topology::build(TopologySpec {
        backends: 2,
        offloads: Offloads::NicLike,
    });
    // Many short connections: every port of the client is fair game.
    topology.client.enter(|| {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")
            .context("widening the client's port range")
    })?;
    let endpoints: Vec<Ipv4Addr> = topology.backends.iter().map(|b| b.addr).collect();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for b in &topology.backends {
        tcp.push(TcpBackend::start(
            &b.ns,
            b.addr,
            TCP_TARGET,
            BACKEND_THREADS,
        )?);
        udp.push(UdpSink::start(&b.ns, b.addr, UDP_TARGET)?);
    }
    let services = services(size, &endpoints);
    let measured = services.last().context("no service")?;
    let tcp_target = SocketAddrV4::new(measured.vip, TCP_PORT);
    let udp_target = SocketAddrV4::new(measured.vip, UDP_PORT);

    let rcvbuf_before: u64 = topology
        .backends
        .iter()
        .map(|b| udp_rcvbuf_errors(&b.ns))
        .sum();
    let started = Instant::now();
    let balancer = set_up(mode, &topology, &services)?;
    let setup_s = started.elapsed().as_secs_f64();

    let duration = Duration::from_secs_f64(settings.seconds);
    let workers = settings.workers;
    let (conns, requests, sent) = topology.client.enter(|| {
        // One exchange first: an error now is a broken set-up, not load.
        let warm = loadgen::connection_rate(tcp_target, 1, Duration::from_secs(2), 4);
        if warm.ok == 0 {
            bail!(
                "no connection through {tcp_target} ({} errors)",
                warm.errors
            );
        }
        let conns = loadgen::connection_rate(tcp_target, workers, duration, MAX_CONNS_PER_WORKER);
        let requests =
            loadgen::request_latency(tcp_target, workers, duration, MAX_REQUESTS_PER_CONN);
        let sent = loadgen::udp_flood(udp_target, workers, duration, MAX_DATAGRAMS_PER_WORKER)?;
        Ok((conns, requests, sent))
    })?;
    // Datagrams still queued arrive within moments.
    thread::sleep(Duration::from_millis(200));
    let udp_received: u64 = udp.iter().map(UdpSink::received).sum();
    let udp_rcvbuf_errors = topology
        .backends
        .iter()
        .map(|b| udp_rcvbuf_errors(&b.ns))
        .sum::<u64>()
        .saturating_sub(rcvbuf_before);
    let served: u64 = tcp.iter().map(TcpBackend::served).sum();
    // What Sluice's data plane did with the packets: the proof that XDP,
    // not the kernel's stack, forwarded them.
    let outcomes = match &balancer {
        Balancer::Sluice { agent, .. } => agent.status_json()["outcomes"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64().filter(|n| *n > 0)?)))
                    .collect()
            })
            .unwrap_or_default(),
        Balancer::Rules => BTreeMap::new(),
    };
    if served < conns.ok + requests.ok {
        bail!(
            "the backends answered {served} requests, the client counted {}",
            conns.ok + requests.ok
        );
    }
    drop(tcp);
    drop(udp);
    drop(balancer);
    drop(topology);
    Ok(Measurement {
        mode,
        services: size,
        setup_s,
        conns_per_s: conns.per_second(),
        rr_per_s: requests.per_second(),
        rr_p50_us: requests.p50_us,
        rr_p90_us: requests.p90_us,
        rr_p99_us: requests.p99_us,
        udp_received_pps: if sent.seconds > 0.0 {
            udp_received as f64 / sent.seconds
        } else {
            0.0
        },
        conns,
        requests,
        udp: sent,
        udp_received,
        udp_rcvbuf_errors,
        outcomes,
    })
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let s = &report.settings;
    let _ = writeln!(
        out,
        "Throughput through namespaces (client → node → 2 backends), the last service measured; \
         {} workers, {} s per measurement; iptables rules loaded by {}\n",
        s.workers, s.seconds, report.iptables_restore
    );
    let _ = writeln!(
        out,
        "| {:>8} | {:<22} | {:>8} | {:>9} | {:>17} | {:>17} | {:>9} | {:>12} | {:>12} | {:>12} |",
        "services",
        "mode",
        "setup s",
        "conn/s",
        "conn p50/p99 µs",
        "req p50/p90/p99",
        "req/s",
        "UDP sent/s",
        "UDP recv/s",
        "rcvbuf drops"
    );
    let _ = writeln!(
        out,
        "|{:->10}|{:-<24}|{:->10}|{:->11}|{:->19}|{:->19}|{:->11}|{:->14}|{:->14}|{:->14}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    for r in &report.rows {
        let _ = writeln!(
            out,
            "| {:>8} | {:<22} | {:>8.1} | {:>9.0} | {:>17} | {:>17} | {:>9.0} | {:>12.0} | {:>12.0} | {:>12} |",
            r.services,
            r.mode.name(),
            r.setup_s,
            r.conns_per_s,
            format!("{}/{}", r.conns.p50_us, r.conns.p99_us),
            format!("{}/{}/{}", r.rr_p50_us, r.rr_p90_us, r.rr_p99_us),
            r.rr_per_s,
            r.udp.sent as f64 / r.udp.seconds.max(1e-9),
            r.udp_received_pps,
            r.udp_rcvbuf_errors
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields_are_found_by_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 10 0 3 9 3\nUdpLite: InDatagrams RcvbufErrors\nUdpLite: 0 7\n";
        assert_eq!(snmp_field(text, "Udp:", "RcvbufErrors"), Some(3));
        assert_eq!(snmp_field(text, "Udp:", "InDatagrams"), Some(10));
        assert_eq!(snmp_field(text, "UdpLite:", "RcvbufErrors"), Some(7));
        assert_eq!(snmp_field(text, "Tcp:", "RcvbufErrors"), None);
    }
}
