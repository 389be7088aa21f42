//! The `packet-rate` part of `cargo xtask bench`: 64-byte UDP frames made in
//! the kernel ([`crate::packet_rate`]) out of the client's veth, through the
//! node, counted and dropped at the backend. One generator CPU runs the
//! generator, the node's receive path and the sink inline, so a rate is what
//! one CPU sustains for all three; the floor (generator straight into a
//! sink) is measured in every round, and the node path's own cost is the
//! difference of the inverses (ns/packet over the floor).
//!
//! Cases: the floor; plain routing (no balancer, frames to the backend's
//! address); iptables and nftables in kube-proxy's forms (the rules of the
//! throughput part, [`crate::throughput`]; conntrack flushed before each
//! run, its table being shared by all namespaces); Sluice's XDP and TC hooks
//! (`--mode`). Each balancer gets `services` services (the frames go to the
//! last one's UDP port), each case its own topology, kept for the whole run,
//! so that rounds interleave every case without setting anything up again.
//! Shapes: one established flow, a new flow every packet, 100,000 flows
//! cycled. A rate is frames delivered to the sink per second of the kernel's
//! loop: what the node cannot keep up with, the veth queue in front of it
//! drops. Each case is checked by the sink seeing the frames at the backend's
//! address and target port (a balancer that did not rewrite would show the
//! VIP), and by the balancer's own account: Sluice's forwarding outcome
//! counter covers every frame the sink saw; for netfilter, the node's
//! conntrack entries after the run are reported.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    Agent, Netns, Offloads, ScratchDir, Topology, TopologySpec,
    packet::{Spec, TCP_SYN},
    packet_rate::{Generator, Shape},
    throughput::{
        TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET, iptables_restore, iptables_rules,
        nftables_batches, services, sluice_manifest,
    },
    topology::{CLIENT_ADDR, CLIENT_IF, NODE_CLIENT_IF},
};

/// Frames per measured call, at most: long enough that the call's ~30 ms
/// teardown does not matter (rates come from the kernel's loop time anyway).
const FRAMES: u32 = 2_000_000;
/// And at least; in between, what a calibration run says takes
/// [`LOOP_TARGET`] of the kernel's loop: a slow case (a full conntrack
/// table) does not take minutes.
const MIN_FRAMES: u32 = 20_000;
const LOOP_TARGET: Duration = Duration::from_millis(400);
const WORKING_SET: u32 = 100_000;
/// Services per `nft -f` transaction.
const NFT_BATCH: usize = 500;

#[derive(Debug, Serialize)]
pub struct Row {
    pub case: String,
    pub services: usize,
    pub shape: String,
    /// Million packets per second delivered, median of the rounds.
    pub mpps: f64,
    pub mpps_min: f64,
    pub mpps_max: f64,
    /// Nanoseconds per packet over the floor's (median).
    pub ns_over_floor: f64,
    /// What the balancer itself counted in the last round: Sluice's
    /// forwarding outcome, or the node's conntrack entries.
    pub balancer_counted: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rounds: usize,
    pub rows: Vec<Row>,
}

const SHAPES: [(&str, Shape); 3] = [
    ("one flow", Shape::OneFlow),
    ("new flow every packet", Shape::NewFlows),
    ("100,000 flows cycled", Shape::WorkingSet(WORKING_SET)),
];

/// A measurement's case, protocol and shape (an index into [`SHAPES`]).
type Key = (Case, &'static str, usize);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Floor,
    Routing,
    Iptables,
    Nftables,
    SluiceXdp,
    SluiceTc,
}

const CASES: [Case; 6] = [
    Case::Floor,
    Case::Routing,
    Case::Iptables,
    Case::Nftables,
    Case::SluiceXdp,
    Case::SluiceTc,
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Floor => "floor (generator → sink)",
            Case::Routing => "plain routing",
            Case::Iptables => "iptables (kube-proxy)",
            Case::Nftables => "nftables (kube-proxy)",
            Case::SluiceXdp => "Sluice XDP",
            Case::SluiceTc => "Sluice TC",
        }
    }
}

/// One case's namespaces, set up once.
struct Bed {
    case: Case,
    /// Drops before the topology.
    agent: Option<(Agent, ScratchDir)>,
    topology: Topology,
    /// UDP, then TCP SYN.
    probes: Vec<Probe>,
}

/// One protocol's frames through a bed.
struct Probe {
    protocol: &'static str,
    /// Where the frames go, and where they must arrive.
    to: Ipv4Addr,
    arrive_at: (Ipv4Addr, u16),
    frame: [u8; 64],
}

fn bed(case: Case, size: usize, generator: &mut Generator) -> anyhow::Result<Bed> {
    let topology = Topology::build(TopologySpec {
        backends: 1,
        offloads: Offloads::NicLike,
    });
    let backend = topology.backend(1).addr;
    // The node's client side receives through NAPI in every case (GRO on:
    // only Sluice's XDP hook would provide it otherwise).
    topology
        .node
        .exec_ok(&["ethtool", "-K", NODE_CLIENT_IF, "gro", "on"]);
    let services = services(size, &[backend]);
    let vip = services.last().context("no services")?.vip;
    let mut agent = None;
    match case {
        Case::Floor => {
            // The sink on the node's side: generator → veth → sink.
            generator.attach_sink(&topology.node, NODE_CLIENT_IF)?;
        }
        Case::Routing => {}
        Case::Iptables => crate::throughput::exec_with_input(
            &topology.node,
            &[iptables_restore(), "--noflush"],
            &iptables_rules(&services),
        )?,
        Case::Nftables => {
            for batch in nftables_batches(&services, NFT_BATCH) {
                crate::throughput::exec_with_input(&topology.node, &["nft", "-f", "-"], &batch)?;
            }
        }
        Case::SluiceXdp | Case::SluiceTc => {
            let scratch = ScratchDir::new();
            let manifest = scratch.write("services.yaml", sluice_manifest(&services));
            let mode = if case == Case::SluiceXdp { "xdp" } else { "tc" };
            let started = Agent::try_start(
                &topology.node,
                &manifest,
                &topology.node_interfaces(),
                &["--mode", mode],
            )
            .map_err(|f| anyhow::anyhow!("{f}"))?;
            agent = Some((started, scratch));
        }
    }
    if case != Case::Floor {
        generator.attach_sink(&topology.backend(1).ns, "b0")?;
    }
    let (src_mac, dst_mac) = (
        mac(&topology.client, CLIENT_IF)?,
        mac(&topology.node, NODE_CLIENT_IF)?,
    );
    let mut probes = Vec::new();
    for (protocol, port, target) in [
        ("UDP", UDP_PORT, UDP_TARGET),
        ("TCP SYN", TCP_PORT, TCP_TARGET),
    ] {
        let (to, arrive_at) = match case {
            Case::Floor | Case::Routing => (backend, (backend, port)),
            _ => (vip, (backend, target)),
        };
        let mut spec = if protocol == "UDP" {
            Spec::udp((CLIENT_ADDR, 40_000), (to, port), &[7; 22])
        } else {
            Spec {
                payload: vec![0; 10],
                ..Spec::tcp((CLIENT_ADDR, 40_000), (to, port), TCP_SYN)
            }
        };
        spec.src_mac = src_mac;
        spec.dst_mac = dst_mac;
        let frame = spec
            .build()
            .try_into()
            .map_err(|_| anyhow::anyhow!("not a 64-byte frame"))?;
        probes.push(Probe {
            protocol,
            to,
            arrive_at,
            frame,
        });
    }
    Ok(Bed {
        case,
        agent,
        topology,
        probes,
    })
}

pub fn run(rounds: usize, sizes: &[usize]) -> anyhow::Result<Report> {
    let mut generator = Generator::load()?;
    let mut rows = Vec::new();
    for &size in sizes {
        let beds: Vec<Bed> = CASES
            .iter()
            .map(|&case| bed(case, size, &mut generator))
            .collect::<anyhow::Result<_>>()?;
        let mut samples: BTreeMap<Key, Vec<f64>> = BTreeMap::new();
        let mut counted: BTreeMap<Key, u64> = BTreeMap::new();
        let tracked: Vec<&Netns> = beds
            .iter()
            .filter(|b| matches!(b.case, Case::Iptables | Case::Nftables))
            .map(|b| &b.topology.node)
            .collect();
        for _ in 0..rounds.max(1) {
            for bed in &beds {
                measure(&mut generator, bed, &tracked, &mut samples, &mut counted)?;
            }
        }
        rows.extend(summarize(&samples, &counted, size));
    }
    Ok(Report {
        rounds: rounds.max(1),
        rows,
    })
}

/// Every shape through `bed` once.
fn measure(
    generator: &mut Generator,
    bed: &Bed,
    tracked: &[&Netns],
    samples: &mut BTreeMap<Key, Vec<f64>>,
    counted: &mut BTreeMap<Key, u64>,
) -> anyhow::Result<()> {
    let (ns, iface) = (&bed.topology.client, CLIENT_IF);
    for probe in &bed.probes {
        generator.set_frame(&probe.frame)?;
        // Warm up: neighbours resolved, the flow known.
        generator.set_shape(Shape::OneFlow)?;
        generator.run(ns, iface, 1_000)?;
        std::thread::sleep(Duration::from_millis(100));
        for (i, (name, shape)) in SHAPES.iter().enumerate() {
            measure_one(generator, bed, probe, tracked, *shape, name).map(
                |(ns_per_delivered, own)| {
                    let key = (bed.case, probe.protocol, i);
                    samples.entry(key).or_default().push(ns_per_delivered);
                    if let Some(own) = own {
                        counted.insert(key, own);
                    }
                },
            )?;
        }
    }
    Ok(())
}

/// One run of `shape`: ns per delivered frame, and the balancer's own count.
fn measure_one(
    generator: &mut Generator,
    bed: &Bed,
    probe: &Probe,
    tracked: &[&Netns],
    shape: Shape,
    name: &str,
) -> anyhow::Result<(f64, Option<u64>)> {
    let (ns, iface) = (&bed.topology.client, CLIENT_IF);
    let name = format!("{} {name}", probe.protocol);
    let flush = || {
        if matches!(bed.case, Case::Iptables | Case::Nftables) {
            // conntrack's table (and its limit) is shared by every
            // namespace: each run starts with it empty.
            for node in tracked {
                node.exec_ok(&["conntrack", "-F"]);
            }
        }
    };
    generator.set_shape(shape)?;
    flush();
    let calibration = generator.run(ns, iface, MIN_FRAMES)?;
    let frames = ((LOOP_TARGET.as_nanos() as f64 / calibration) as u32).clamp(MIN_FRAMES, FRAMES);
    flush();
    generator.clear_seen()?;
    let forwarded_before = forwarded(bed);
    let ns_per_frame = generator.run(ns, iface, frames)?;
    let seen = generator.seen()?;
    let arrived = seen.get(&probe.arrive_at).copied().unwrap_or(0);
    let elsewhere: u64 = seen
        .iter()
        .filter(|(to, _)| **to != probe.arrive_at)
        .map(|(_, n)| n)
        .sum();
    // What the node could not keep up with, its queues dropped; what it
    // rewrote wrongly would arrive elsewhere.
    if arrived < u64::from(frames) / 1000 || elsewhere > arrived / 100 {
        bail!(
            "{} / {name}: frames to {} — the sink saw {arrived} of {frames} at {:?} and \
                 {elsewhere} elsewhere",
            bed.case.name(),
            probe.to,
            probe.arrive_at
        );
    }
    // The balancer's own account: Sluice counted every frame the sink
    // saw as forwarded; conntrack holds the flows netfilter made.
    let own = match bed.case {
        Case::SluiceXdp | Case::SluiceTc => {
            let count = forwarded(bed).saturating_sub(forwarded_before);
            if count < arrived {
                bail!(
                    "{} / {name}: Sluice counted {count} forwarded, the sink {arrived}",
                    bed.case.name()
                );
            }
            Some(count)
        }
        Case::Iptables | Case::Nftables => {
            let out = bed.topology.node.exec_ok(&["conntrack", "-C"]);
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        }
        Case::Floor | Case::Routing => None,
    };
    // Delivered frames per nanosecond of the kernel's loop, which runs
    // the node's receive path and the sink inline.
    let ns_per_delivered = ns_per_frame * f64::from(frames) / arrived as f64;
    Ok((ns_per_delivered, own))
}

/// Sluice's forwarding outcome counter (`fwd_xdp` + `fwd_tc`) on `bed`'s
/// node; 0 without an agent.
fn forwarded(bed: &Bed) -> u64 {
    let Some((agent, _)) = &bed.agent else {
        return 0;
    };
    let status = agent.status_json();
    ["fwd_xdp", "fwd_tc"]
        .iter()
        .filter_map(|k| status["outcomes"][k].as_u64())
        .sum()
}

fn summarize(
    samples: &BTreeMap<Key, Vec<f64>>,
    counted: &BTreeMap<Key, u64>,
    size: usize,
) -> Vec<Row> {
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    samples
        .iter()
        .map(|((case, protocol, i), ns)| {
            let floor = median(&samples[&(Case::Floor, *protocol, *i)]);
            let mpps: Vec<f64> = ns.iter().map(|ns| 1e3 / ns).collect();
            Row {
                case: case.name().to_owned(),
                services: size,
                shape: format!("{protocol}, {}", SHAPES[*i].0),
                mpps: median(&mpps),
                mpps_min: mpps.iter().copied().fold(f64::INFINITY, f64::min),
                mpps_max: mpps.iter().copied().fold(0.0, f64::max),
                ns_over_floor: median(ns) - floor,
                balancer_counted: counted.get(&(*case, *protocol, *i)).copied(),
            }
        })
        .collect()
}

/// The MAC address of `iface` in `ns`.
fn mac(ns: &Netns, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.exec_ok(&["ip", "-o", "link", "show", "dev", iface]);
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC for {iface}: {text}"))?;
    let bytes: Vec<u8> = hex
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {hex}"))
}

pub fn render(report: &Report) -> String {
    let mut out = format!(
        "{:<26} {:>8} {:<24} {:>8} {:>17} {:>14} {:>18}\n",
        "case", "services", "shape", "Mpps", "spread", "ns over floor", "balancer counted"
    );
    for r in &report.rows {
        let counted = r
            .balancer_counted
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        out.push_str(&format!(
            "{:<26} {:>8} {:<24} {:>8.3} {:>8.3}–{:<8.3} {:>14.0} {:>18}\n",
            r.case, r.services, r.shape, r.mpps, r.mpps_min, r.mpps_max, r.ns_over_floor, counted
        ));
    }
    out
}
