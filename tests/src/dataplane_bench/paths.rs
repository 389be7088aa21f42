//! Part 1: what one packet costs on each path (established, reply, non-VIP,
//! new flows with and without affinity, flow log and policy), in one lab with
//! two small services, beside the hook's own floor.

use std::net::Ipv4Addr;

use serde::Serialize;

use super::{
    Row, Settings, VIP,
    harness::{Bench, Case, Frames, padded, pin_to_one_cpu, policy_with, run_cases},
};
use crate::{
    lab::{Lab, with_lab},
    packet::{Spec, TCP_SYN},
};

const MANIFEST: &str = r#"
kind: Service
name: web
vip: 198.18.0.10
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
algorithm: round-robin
backends:
  - { address: 198.19.1.2 }
  - { address: 198.19.2.2 }
  - { address: 198.19.3.2 }
---
kind: Service
name: sticky
vip: 198.18.0.11
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
algorithm: round-robin
sessionAffinity: { clientIP: { timeoutSeconds: 300 } }
backends:
  - { address: 198.19.1.2 }
  - { address: 198.19.2.2 }
  - { address: 198.19.3.2 }
"#;
/// The `sticky` service's VIP: client-IP affinity on.
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);

#[derive(Debug, Serialize)]
pub struct Report {
    pub repeat: u32,
    pub rounds: usize,
    pub harness_ns: f64,
    pub rows: Vec<Row>,
}

/// Part 1: the rows of one lab with two small services.
pub fn dataplane(settings: Settings) -> anyhow::Result<Report> {
    with_lab(MANIFEST, |lab| {
        let (harness_ns, rows) = measure_dataplane(lab, settings)?;
        Ok(Report {
            repeat: settings.repeat,
            rounds: settings.rounds,
            harness_ns,
            rows,
        })
    })
}

fn measure_dataplane(lab: &mut Lab, s: Settings) -> anyhow::Result<(f64, Vec<Row>)> {
    // The harness numbers runs with a per-CPU counter: on one CPU, no two runs
    // share a 5-tuple; a thread moved between CPUs would replay one CPU's
    // sequence on the other, and some "new" flows would be established ones.
    pin_to_one_cpu()?;
    for i in ["n0", "nb1", "nb2", "nb3"] {
        lab.allow_xdp_egress(i);
    }
    let n0 = lab.ifindex("n0");
    let mut bench = Bench::load(lab)?;
    let f = Frames::open(lab, VIP)?;
    let sticky_flow = padded(Spec::tcp(
        (Ipv4Addr::new(198, 18, 2, 3), 1024),
        (STICKY_VIP, 80),
        TCP_SYN,
    ));
    let harness_ns = bench.harness_ns(f.established, n0, s)?;

    let cases = vec![
        Case::new("XDP_PASS (the hook alone)", "bench_pass", f.established, n0),
        Case::new(
            "floor: parse + swap MAC + XDP_TX",
            "bench_floor",
            f.established,
            n0,
        ),
        Case::new(
            "established flow (DNAT, cached next hop)",
            "bench_restore",
            f.established,
            n0,
        )
        .proven_by("fwd_xdp"),
        Case::new(
            "reply (reverse NAT to the VIP)",
            "bench_restore",
            f.reply,
            f.reply_ingress,
        )
        .proven_by("fwd_xdp"),
        Case::new("non-VIP pass-through", "sluice_xdp", f.not_vip, n0)
            .proven_by("pass_not_service"),
        // Last: a million new flows evict the ones the rows above use.
        Case::new(
            "new flow every packet (SYN, round-robin)",
            "bench_restore",
            f.new_flow,
            n0,
        )
        .proven_by("frontend_new_flows")
        .new_flow_each_run(),
        // The agent's default: every flow logged. A reader drains the ring
        // on the other CPU; every run must produce a record, read or lost.
        Case::new(
            "new flow every packet, flow log on (every flow)",
            "bench_restore",
            f.new_flow,
            n0,
        )
        .proven_by("frontend_new_flows")
        .new_flow_each_run()
        .with_flow_log(),
        // One client, a new source port every packet: each new flow follows
        // (and refreshes) the client's affinity entry.
        Case::new(
            "new flow every packet (SYN, client-IP affinity)",
            "bench_restore",
            sticky_flow,
            n0,
        )
        .proven_by("frontend_new_flows")
        .new_flow_each_run(),
        // Every backend protected by network policy, the client admitted by
        // one rule among many: the verdict's cost must not grow with them.
        Case::new(
            "new flow every packet, policy with 100 rules",
            "bench_restore",
            f.new_flow,
            n0,
        )
        .proven_by("frontend_new_flows")
        .new_flow_each_run()
        .with_policy(policy_with(100)),
        Case::new(
            "new flow every packet, policy with 10,000 rules",
            "bench_restore",
            f.new_flow,
            n0,
        )
        .proven_by("frontend_new_flows")
        .new_flow_each_run()
        .with_policy(policy_with(10_000)),
        // The same policy, a client no rule admits: every lookup is made and
        // every packet dropped.
        Case::new(
            "new flow every packet, denied by policy (10,000 rules)",
            "bench_restore",
            f.denied,
            n0,
        )
        .proven_by("drop_policy")
        .new_flow_each_run(),
    ];
    // Frontends 0 and 1: the manifest's two services.
    let rows = run_cases(lab, &mut bench, cases, &[0, 1], harness_ns, None, s)?;
    Ok((harness_ns, rows))
}
