//! The `packet-rate` part of `cargo xtask bench`: 64-byte UDP frames made in
//! the kernel ([`crate::packet_rate`]) out of the client's veth, through the
//! node, counted and dropped at the backend. One generator CPU runs the
//! generator, the node's receive path and the sink inline, so a rate is what
//! one CPU sustains for all three; the floor (generator straight into a
//! sink) is measured in every round, and the node path's own cost is the
//! difference of the inverses (ns/packet over the floor).
//!
//! Cases: the floor; plain routing (no balancer, frames to the backend's
//! address); Sluice's XDP and TC hooks (`--mode`, frames to a VIP). Shapes:
//! one established flow, a new flow every packet, 100,000 flows cycled.
//! Rounds interleave every case. A rate is frames delivered to the sink per
//! second of the kernel's loop: what the node cannot keep up with, the
//! veth queues in front of it drop. Each case is checked by the sink seeing
//! the frames at the backend's address (a balancer that did not rewrite
//! would show the VIP).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    Agent, Netns, Offloads, ScratchDir, Topology, TopologySpec,
    packet::Spec,
    packet_rate::{Generator, Shape},
    topology::{CLIENT_ADDR, CLIENT_IF, NODE_CLIENT_IF, vip},
};

/// Frames per measured call: long enough that the call's ~30 ms teardown
/// does not matter (rates come from the kernel's loop time anyway).
const FRAMES: u32 = 2_000_000;
const PORT: u16 = 5353;
const WORKING_SET: u32 = 100_000;

#[derive(Debug, Serialize)]
pub struct Row {
    pub case: String,
    pub shape: String,
    /// Million packets per second, median of the rounds.
    pub mpps: f64,
    pub mpps_min: f64,
    pub mpps_max: f64,
    /// Nanoseconds per packet over the floor's (median).
    pub ns_over_floor: f64,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Case {
    Floor,
    Routing,
    SluiceXdp,
    SluiceTc,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Floor => "floor (generator → sink)",
            Case::Routing => "plain routing",
            Case::SluiceXdp => "Sluice XDP",
            Case::SluiceTc => "Sluice TC",
        }
    }
}

pub fn run(rounds: usize) -> anyhow::Result<Report> {
    // The floor: a veth pair, the sink at its far end.
    let floor_gen = Netns::new("pr-gen");
    let floor_sink = Netns::new("pr-sink");
    floor_gen.ip_ok(&[
        "link",
        "add",
        "g0",
        "type",
        "veth",
        "peer",
        "name",
        "s0",
        "netns",
        floor_sink.name(),
    ]);
    floor_gen.ip_ok(&["link", "set", "g0", "up"]);
    floor_sink.ip_ok(&["link", "set", "s0", "up"]);

    let topology = Topology::build(TopologySpec {
        backends: 1,
        offloads: Offloads::NicLike,
    });
    let backend = topology.backend(1);
    // The node's client side receives through NAPI in every case (GRO on:
    // with Sluice's TC hook no XDP program provides it).
    topology
        .node
        .exec_ok(&["ethtool", "-K", NODE_CLIENT_IF, "gro", "on"]);
    let scratch = ScratchDir::new();
    let manifest = scratch.write(
        "bench.yaml",
        format!(
            "kind: Service\nname: sink\nvip: {}\nports: [{{ port: {PORT}, protocol: UDP, targetPort: {PORT} }}]\n\
             backends: [{{ address: {} }}]\n",
            vip(),
            backend.addr
        ),
    );

    let mut generator = Generator::load()?;
    generator.attach_sink(&floor_sink, "s0")?;
    generator.attach_sink(&backend.ns, "b0")?;
    let client_mac = mac(&topology.client, CLIENT_IF)?;
    let node_mac = mac(&topology.node, NODE_CLIENT_IF)?;
    let frame = |to: Ipv4Addr| -> anyhow::Result<[u8; 64]> {
        let mut spec = Spec::udp((CLIENT_ADDR, 40_000), (to, PORT), &[7; 22]);
        spec.src_mac = client_mac;
        spec.dst_mac = node_mac;
        spec.build()
            .try_into()
            .map_err(|_| anyhow::anyhow!("not a 64-byte frame"))
    };

    let mut samples: BTreeMap<(Case, usize), Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds.max(1) {
        for case in [Case::Floor, Case::Routing, Case::SluiceXdp, Case::SluiceTc] {
            let agent = match case {
                Case::SluiceXdp | Case::SluiceTc => {
                    let mode = if case == Case::SluiceXdp { "xdp" } else { "tc" };
                    Some(Agent::start(
                        &topology.node,
                        &manifest,
                        &topology.node_interfaces(),
                        &["--mode", mode],
                    ))
                }
                _ => None,
            };
            let (ns, iface, to) = match case {
                Case::Floor => (&floor_gen, "g0", backend.addr),
                Case::Routing => (&topology.client, CLIENT_IF, backend.addr),
                Case::SluiceXdp | Case::SluiceTc => (&topology.client, CLIENT_IF, vip()),
            };
            generator.set_frame(&frame(to)?)?;
            // Warm up: neighbours resolved, the flow known.
            generator.set_shape(Shape::OneFlow)?;
            generator.run(ns, iface, 1_000)?;
            std::thread::sleep(Duration::from_millis(200));
            generator.run(ns, iface, 1_000)?;
            for (i, (name, shape)) in SHAPES.iter().enumerate() {
                generator.set_shape(*shape)?;
                generator.clear_seen()?;
                let ns_per_frame = generator.run(ns, iface, FRAMES)?;
                let seen = generator.seen()?;
                let arrived = seen.get(&(backend.addr, PORT)).copied().unwrap_or(0);
                let elsewhere: u64 = seen
                    .iter()
                    .filter(|(to, _)| **to != (backend.addr, PORT))
                    .map(|(_, n)| n)
                    .sum();
                // What the node could not keep up with, its queues dropped;
                // what it rewrote wrongly would arrive elsewhere.
                if arrived < u64::from(FRAMES) / 100 || elsewhere > arrived / 100 {
                    bail!(
                        "{} / {name}: the sink saw {arrived} of {FRAMES} frames at {}:{PORT} \
                         and {elsewhere} elsewhere",
                        case.name(),
                        backend.addr
                    );
                }
                // Delivered frames per nanosecond of the kernel's loop, which
                // runs the node's receive path and the sink inline.
                let ns_per_delivered = ns_per_frame * f64::from(FRAMES) / arrived as f64;
                samples.entry((case, i)).or_default().push(ns_per_delivered);
            }
            drop(agent);
        }
    }

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    for ((case, i), ns) in &samples {
        let floor = median(&samples[&(Case::Floor, *i)]);
        let mpps: Vec<f64> = ns.iter().map(|ns| 1e3 / ns).collect();
        rows.push(Row {
            case: case.name().to_owned(),
            shape: SHAPES[*i].0.to_owned(),
            mpps: median(&mpps),
            mpps_min: mpps.iter().copied().fold(f64::INFINITY, f64::min),
            mpps_max: mpps.iter().copied().fold(0.0, f64::max),
            ns_over_floor: median(ns) - floor,
        });
    }
    drop((generator, topology, floor_gen, floor_sink));
    Ok(Report {
        rounds: rounds.max(1),
        rows,
    })
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
        "{:<26} {:<24} {:>8} {:>17} {:>14}\n",
        "case", "shape", "Mpps", "spread", "ns over floor"
    );
    for r in &report.rows {
        out.push_str(&format!(
            "{:<26} {:<24} {:>8.2} {:>8.2}–{:<8.2} {:>14.0}\n",
            r.case, r.shape, r.mpps, r.mpps_min, r.mpps_max, r.ns_over_floor
        ));
    }
    out
}
