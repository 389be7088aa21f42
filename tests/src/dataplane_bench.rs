//! Parts 1 and 2 of `cargo xtask bench`: what one packet costs in Sluice's
//! XDP program, and whether that cost stays flat as services and backends
//! grow.
//!
//! Every row is `BPF_PROG_TEST_RUN` with `repeat` runs on one crafted frame,
//! in a lab namespace whose routes and neighbours are real, so the figure
//! includes the FIB lookup and the redirect decision. Beside them, in the same
//! run: the hook's floor (parse Ethernet/IPv4, swap MACs, `XDP_TX`).
//!
//! A test run with `repeat` reuses one buffer: a program that rewrites the
//! packet (DNAT) would see its own output from the second run on and measure
//! its pass-through path. So the rewriting rows run through a harness that
//! copies the original frame back before tail-calling the data plane (and,
//! for new flows, gives every run a new 5-tuple). The harness alone is
//! measured too and subtracted. Each row then proves, by the data plane's own
//! counters, that every run took the path the row names.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use serde::Serialize;
use sluice_agent::{policy::PolicyWriter, reconcile::Step};
use sluice_common::{
    layout::{MAX_BACKENDS, MAX_FRONTENDS, SLOT_CAPACITY, map},
    types::IPPROTO_TCP,
};
use sluice_model::policy::compiled::{CompiledPolicy, IdentityEntry, RuleEntry};
use sluice_model::service::MAX_BACKENDS_PER_SERVICE;

use crate::{
    lab::{CLIENT, Lab, backend, with_edited_lab, with_lab},
    packet::{Spec, TCP_ACK, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const FRAME: usize = 64;
/// A client no rule admits (no identity: "world"), for the denied rows.
const DENIED_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 2);

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

/// How long each row runs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub repeat: u32,
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    /// Median over rounds, on the scale of the XDP_PASS row: a harnessed row
    /// is measured − harness + XDP_PASS, i.e. the hook's own cost plus the
    /// program's (the tail call's few ns stay in, to our disadvantage).
    pub ns_per_packet: f64,
    /// Per-round figures as measured (before subtraction).
    pub rounds_ns: Vec<f64>,
    pub via_harness: bool,
    /// The counter that proves the path, and by how much it moved per round.
    pub path_counter: &'static str,
    pub path_counter_delta: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub repeat: u32,
    pub rounds: usize,
    pub harness_ns: f64,
    pub rows: Vec<Row>,
}

/// One size of the scaling part: its rows, or why it could not be built.
#[derive(Debug, Serialize)]
pub struct ScaleCase {
    pub label: String,
    pub services: usize,
    pub backends: usize,
    pub harness_ns: f64,
    pub rows: Vec<Row>,
    /// Set when a capacity of the data plane prevents this size.
    pub skipped: Option<String>,
    /// How the size was programmed, when not by a plain manifest.
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ScalingReport {
    pub repeat: u32,
    pub rounds: usize,
    pub cases: Vec<ScaleCase>,
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

/// A frame padded to the harness's restore size.
fn padded(spec: Spec) -> [u8; FRAME] {
    let mut spec = spec;
    let bare = spec.build().len();
    spec.payload = vec![0; FRAME.saturating_sub(bare)];
    spec.build().try_into().expect("a 64-byte frame")
}

struct Bench {
    ebpf: Ebpf,
}

impl Bench {
    fn load(lab: &mut Lab) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(sluice_agent::objects::BENCH).context("loading bench object")?;
        for name in [
            "bench_pass",
            "bench_floor",
            "bench_restore",
            "bench_restore_only",
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let mut target =
            ProgramArray::try_from(ebpf.map_mut("BENCH_TARGET").context("BENCH_TARGET")?)?;
        let under_test = lab.dataplane.xdp_program().fd()?;
        target.set(0, under_test, 0)?;
        Ok(Self { ebpf })
    }

    fn set_frame(&mut self, frame: [u8; FRAME], new_flow_each_run: bool) -> anyhow::Result<()> {
        let mut frames: Array<_, [u8; FRAME]> =
            Array::try_from(self.ebpf.map_mut("BENCH_FRAME").context("BENCH_FRAME")?)?;
        frames.set(0, frame, 0)?;
        let mut config: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("BENCH_CONFIG").context("BENCH_CONFIG")?)?;
        config.set(0, u32::from(new_flow_each_run), 0)?;
        Ok(())
    }

    /// Runs `program` `repeat` times on `frame` arriving on `ingress`; ns per run.
    fn run(
        &mut self,
        program: &str,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
    ) -> anyhow::Result<f64> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(program)
            .context("program")?
            .try_into()?;
        xdp_test_run(prog, frame, ingress, repeat)
    }

    fn harness_ns(&mut self, frame: [u8; FRAME], ingress: u32, s: Settings) -> anyhow::Result<f64> {
        let mut harness = Vec::new();
        self.set_frame(frame, false)?;
        for _ in 0..s.rounds {
            harness.push(self.run("bench_restore_only", &frame, ingress, s.repeat)?);
        }
        Ok(median(&harness))
    }
}

fn xdp_test_run(prog: &Xdp, frame: &[u8], ingress: u32, repeat: u32) -> anyhow::Result<f64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ingress, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let result = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&ctx),
        repeat,
        ..TestRunOptions::default()
    })?;
    // The kernel reports the mean duration of one run.
    Ok(duration_ns(result.duration))
}

/// The benchmark's admitted clients: [`CLIENT`] and the new-flow rows'
/// sources, not [`DENIED_CLIENT`], whose identity is then "world" (see
/// `admit` in `ebpf/programs/src/policy.rs`).
const CLIENTS: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 22);

/// Every backend enforced (one identity), the benchmark's clients admitted by
/// one rule, and `rules - 1` more rules for other sources, ports and
/// protocols that never match.
fn policy_with(rules: u32) -> CompiledPolicy {
    let backends = (1..=3).map(|i| (backend(i), 32)).collect();
    policy(backends, CLIENTS, rules)
}

fn policy(backends: Vec<(Ipv4Addr, u8)>, clients: (Ipv4Addr, u8), rules: u32) -> CompiledPolicy {
    let mut identities: Vec<IdentityEntry> = backends
        .into_iter()
        .map(|(prefix, len)| IdentityEntry {
            prefix: ipnet::Ipv4Net::new(prefix, len).expect("a prefix length"),
            identity: 100,
            enforced: true,
            stats_slot: 1,
            egress_enforced: false,
            egress_slot: 0,
        })
        .collect();
    identities.push(IdentityEntry {
        prefix: ipnet::Ipv4Net::new(clients.0, clients.1).expect("a prefix length"),
        identity: 200,
        enforced: false,
        stats_slot: 2,
        egress_enforced: false,
        egress_slot: 0,
    });
    let mut list = vec![RuleEntry {
        dst: 100,
        src: 200,
        port: 8080,
        protocol: IPPROTO_TCP,
        stats_slot: 3,
        egress: false,
    }];
    list.extend((1..rules).map(|i| RuleEntry {
        dst: 100,
        src: 1_000 + i,
        port: 8080,
        protocol: IPPROTO_TCP,
        stats_slot: 3,
        egress: false,
    }));
    CompiledPolicy {
        identities,
        rules: list,
        slots: Vec::new(),
    }
}

/// Keeps this thread (and the test runs it starts) on CPU 0.
fn pin_to_one_cpu() -> anyhow::Result<()> {
    pin_to_cpu(0)
}

/// Keeps the calling thread on CPU `cpu`.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only read and write the set we own, for thread 0
    // (the caller).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "pinning a benchmark thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Reads the flow-log ring on CPU 1 while `run` runs on this one, as the
/// agent does beside the data plane. Returns what `run` returned and the
/// records read.
fn with_flow_log_reader<T>(
    lab: &mut Lab,
    run: impl FnOnce(&mut Lab) -> anyhow::Result<T>,
) -> anyhow::Result<(T, u64)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut ring = lab
        .dataplane
        .maps
        .flow_events
        .take()
        .context("the flow-log ring")?;
    let done = AtomicBool::new(false);
    let (out, read, ring) = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            // Best effort: on one CPU the reader competes with the runs.
            let _ = pin_to_cpu(1);
            let mut read = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                while ring.next().is_some() {
                    read += 1;
                }
                if finished {
                    return (read, ring);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let out = run(lab);
        done.store(true, Ordering::Release);
        let (read, ring) = reader.join().expect("the flow-log reader");
        (out, read, ring)
    });
    lab.dataplane.maps.flow_events = Some(ring);
    Ok((out?, read))
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Outcome counters, plus `frontend_new_flows`: new flows of `frontends`.
fn counters(lab: &Lab, frontends: &[u32]) -> BTreeMap<&'static str, u64> {
    let mut c = lab.dataplane.maps.outcomes().expect("outcomes");
    let new_flows = frontends
        .iter()
        .map(|&id| {
            sluice_agent::maps::Maps::traffic(
                &lab.dataplane.maps.frontend_stats,
                id,
                map::FRONTEND_STATS,
            )
            .expect("frontend stats")
            .new_flows
        })
        .sum();
    c.insert("frontend_new_flows", new_flows);
    c
}

struct Case {
    name: String,
    program: &'static str,
    frame: [u8; FRAME],
    ingress: u32,
    new_flows: bool,
    counter: &'static str,
    /// Network policy installed before the row.
    policy: Option<CompiledPolicy>,
    /// Every flow logged, the ring read concurrently.
    flow_log: bool,
}

impl Case {
    fn new(name: &str, program: &'static str, frame: [u8; FRAME], ingress: u32) -> Self {
        Self {
            name: name.to_owned(),
            program,
            frame,
            ingress,
            new_flows: false,
            counter: "",
            policy: None,
            flow_log: false,
        }
    }

    fn with_flow_log(self) -> Self {
        Self {
            flow_log: true,
            ..self
        }
    }

    fn proven_by(self, counter: &'static str) -> Self {
        Self { counter, ..self }
    }

    fn new_flow_each_run(self) -> Self {
        Self {
            new_flows: true,
            ..self
        }
    }

    fn with_policy(self, policy: CompiledPolicy) -> Self {
        Self {
            policy: Some(policy),
            ..self
        }
    }
}

/// The frames of the flow-path rows for a service at `vip`:80.
struct Frames {
    established: [u8; FRAME],
    reply: [u8; FRAME],
    reply_ingress: u32,
    not_vip: [u8; FRAME],
    /// From its own client address: the harness walks every source port, and
    /// one of them would be the established flow's.
    new_flow: [u8; FRAME],
    denied: [u8; FRAME],
}

impl Frames {
    /// Opens the established flow (one real run) and builds the reply from
    /// the backend it went to.
    fn open(lab: &mut Lab, vip: Ipv4Addr) -> anyhow::Result<Self> {
        let established = padded(Spec::tcp((CLIENT, 40000), (vip, 80), TCP_ACK));
        let opening = padded(Spec::tcp((CLIENT, 40000), (vip, 80), TCP_SYN));
        let run = lab.xdp("n0", &opening);
        if run.action != 4 {
            bail!(
                "opening the benchmark flow was not redirected: {:?}",
                lab.outcomes()
            );
        }
        let to_backend = crate::packet::read(&run.frame).dst;
        let reply_if = lab.interface_towards(to_backend);
        Ok(Self {
            established,
            reply: padded(Spec::tcp((to_backend, 8080), (CLIENT, 40000), TCP_ACK)),
            reply_ingress: lab.ifindex(&reply_if),
            not_vip: padded(Spec::tcp((CLIENT, 40000), (backend(1), 8080), TCP_ACK)),
            new_flow: padded(Spec::tcp(
                (Ipv4Addr::new(198, 18, 2, 2), 1024),
                (vip, 80),
                TCP_SYN,
            )),
            denied: padded(Spec::tcp((DENIED_CLIENT, 1024), (vip, 80), TCP_SYN)),
        })
    }
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

/// Runs every case for `s.rounds` rounds and checks its counter. `hook_ns`
/// is the XDP_PASS figure; if `None`, the first case must be XDP_PASS.
fn run_cases(
    lab: &mut Lab,
    bench: &mut Bench,
    cases: Vec<Case>,
    frontends: &[u32],
    harness_ns: f64,
    hook_ns: Option<f64>,
    s: Settings,
) -> anyhow::Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    let mut hook_ns = hook_ns;
    for case in cases {
        if let Some(policy) = &case.policy {
            PolicyWriter.install(&mut lab.dataplane.maps, policy)?;
        }
        bench.set_frame(case.frame, case.new_flows)?;
        let mut rounds_ns = Vec::new();
        let mut deltas = Vec::new();
        for _ in 0..s.rounds {
            let before = counters(lab, frontends);
            let mut test_run = |lab: &mut Lab| -> anyhow::Result<f64> {
                Ok(if case.program == "sluice_xdp" {
                    xdp_test_run(
                        lab.dataplane.xdp_program(),
                        &case.frame,
                        case.ingress,
                        s.repeat,
                    )?
                } else {
                    bench.run(case.program, &case.frame, case.ingress, s.repeat)?
                })
            };
            let ns = if case.flow_log {
                lab.set_flow_log_sample(1);
                let lost_before = lab.dataplane.flow_events_lost();
                let (ns, read) = with_flow_log_reader(lab, test_run)?;
                lab.set_flow_log_sample(0);
                let lost = lab.dataplane.flow_events_lost() - lost_before;
                if read + lost != u64::from(s.repeat) {
                    bail!(
                        "{}: {read} flow-log records read and {lost} lost for {} runs",
                        case.name,
                        s.repeat
                    );
                }
                eprintln!(
                    "   {}: {read} flow-log records read, {lost} lost to a full ring",
                    case.name
                );
                ns
            } else {
                test_run(lab)?
            };
            let after = counters(lab, frontends);
            rounds_ns.push(ns);
            if !case.counter.is_empty() {
                let delta = after[case.counter] - before[case.counter];
                if delta != u64::from(s.repeat) {
                    let moved: BTreeMap<&str, u64> = after
                        .iter()
                        .map(|(k, v)| (*k, v - before.get(k).copied().unwrap_or(0)))
                        .filter(|(_, v)| *v > 0)
                        .collect();
                    bail!(
                        "{}: {} moved by {delta}, not {}: the runs did not all take this \
                         path; counters moved: {moved:?}",
                        case.name,
                        case.counter,
                        s.repeat
                    );
                }
                // The established and reply rows must not have opened flows.
                if !case.new_flows && after["frontend_new_flows"] != before["frontend_new_flows"] {
                    bail!("{}: new flows were opened", case.name);
                }
                deltas.push(delta);
            }
        }
        let via_harness = case.program == "bench_restore";
        let raw = median(&rounds_ns);
        let hook = *hook_ns.get_or_insert(raw);
        rows.push(Row {
            name: case.name,
            ns_per_packet: if via_harness {
                raw - harness_ns + hook
            } else {
                raw
            },
            rounds_ns,
            via_harness,
            path_counter: case.counter,
            path_counter_delta: deltas.first().copied().unwrap_or(0),
        });
    }
    Ok(rows)
}

/// Backend address number `i` of the scaling pool: 198.18.64.0/18, then
/// 198.18.128.0/17, then 198.19.8.0 up to 198.19.255.255 (112,640 in all;
/// the lab's own /24s, 198.19.1-4.0, stay out). All routed via one
/// neighbour, `backend(1)` on `nb1`.
pub fn pool_addr(i: u32) -> Ipv4Addr {
    const FIRST: u32 = 16_384;
    const SECOND: u32 = FIRST + 32_768;
    let base = |a: [u8; 4]| u32::from(Ipv4Addr::from(a));
    let raw = match i {
        0..FIRST => base([198, 18, 64, 0]) + i,
        FIRST..SECOND => base([198, 18, 128, 0]) + (i - FIRST),
        _ => base([198, 19, 8, 0]) + (i - SECOND),
    };
    assert!(
        i < SECOND + 63_488,
        "the scaling pool has 112,640 addresses"
    );
    Ipv4Addr::from(raw)
}

/// The scaling pool's prefixes (see [`pool_addr`]).
const POOL_PREFIXES: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(198, 18, 64, 0), 18),
    (Ipv4Addr::new(198, 18, 128, 0), 17),
    (Ipv4Addr::new(198, 19, 0, 0), 16),
];

/// The VIP of service `i` (0-based) when there are many: from 198.18.16.0.
pub fn scale_vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 16, 0)) + i)
}

/// A manifest of `services` round-robin services (port 80/TCP → 8080),
/// `per_service` backends each from the pool; with one service, its VIP is
/// [`VIP`].
pub fn scale_manifest(services: u32, per_service: u32) -> String {
    let mut out = String::new();
    for s in 0..services {
        let vip = if services == 1 { VIP } else { scale_vip(s) };
        let _ = write!(
            out,
            "---\nkind: Service\nname: svc-{s}\nvip: {vip}\n\
             ports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]\n\
             algorithm: round-robin\nbackends:\n"
        );
        for b in 0..per_service {
            let _ = writeln!(out, "  - {{ address: {} }}", pool_addr(s * per_service + b));
        }
    }
    out
}

/// Why the data plane cannot hold this size, if a capacity prevents it.
pub fn capacity_check(services: u32, per_service: u32) -> Option<String> {
    let backends = services * per_service;
    if services > MAX_FRONTENDS {
        return Some(format!(
            "{services} services exceed MAX_FRONTENDS ({MAX_FRONTENDS})"
        ));
    }
    if backends > MAX_BACKENDS {
        return Some(format!(
            "{backends} backends exceed MAX_BACKENDS ({MAX_BACKENDS})"
        ));
    }
    // Round-robin lists each backend once in the shared slot array.
    if backends > SLOT_CAPACITY {
        return Some(format!(
            "{backends} slots exceed SLOT_CAPACITY ({SLOT_CAPACITY})"
        ));
    }
    None
}

/// The sizes of part 2: (label, services, backends per service).
pub const SCALES: [(&str, u32, u32); 4] = [
    ("1 service, 1 backend", 1, 1),
    ("1 service, 1,000 backends", 1, 1_000),
    ("1 service, 100,000 backends", 1, 100_000),
    ("10,000 services × 10 backends", 10_000, 10),
];

/// Part 2: the flow-path rows at every size of [`SCALES`], each in a lab of
/// its own.
pub fn scaling(s: Settings) -> anyhow::Result<ScalingReport> {
    let mut cases = Vec::new();
    for (label, services, per_service) in SCALES {
        eprintln!("scaling: {label}");
        let mut case = ScaleCase {
            label: label.to_owned(),
            services: services as usize,
            backends: (services * per_service) as usize,
            harness_ns: 0.0,
            rows: Vec::new(),
            skipped: capacity_check(services, per_service),
            note: None,
        };
        if case.skipped.is_none() {
            // Manifests cap a service's backends (and the agent's plan is
            // quadratic in one service's backend count: minutes for
            // 100,000); the kernel's capacity is what this part measures, so
            // a larger set is written by widening the plan of a one-backend
            // service to the same map entries the agent would write.
            let cap = u32::try_from(MAX_BACKENDS_PER_SERVICE).unwrap_or(u32::MAX);
            let wide = per_service > cap;
            let manifest = scale_manifest(services, if wide { 1 } else { per_service });
            if wide {
                case.note = Some(format!(
                    "manifests allow {cap} backends per service (MAX_BACKENDS_PER_SERVICE), \
                     and the agent's plan is quadratic in one service's backends; the \
                     {per_service} backends' map entries were written by widening the plan \
                     of a one-backend service"
                ));
            }
            let edit = |steps: &mut Vec<Step>| {
                if wide {
                    widen(steps, per_service);
                }
            };
            let (harness_ns, rows) =
                with_edited_lab(&manifest, edit, |lab| measure_scale(lab, services, s))?;
            case.harness_ns = harness_ns;
            case.rows = rows;
        }
        cases.push(case);
    }
    Ok(ScalingReport {
        repeat: s.repeat,
        rounds: s.rounds,
        cases,
    })
}

/// Turns the plan of one service with one backend (`pool_addr(0)`) into
/// that of `backends` backends (`pool_addr(0..backends)`): consecutive ids
/// after the first one's, one slot each (round-robin), in the slot range
/// after the first one's. Right for a fresh lab only, where nothing else
/// holds those ids and slots.
fn widen(steps: &mut Vec<Step>, backends: u32) {
    let Some((at, first, template)) = steps.iter().enumerate().find_map(|(i, s)| match s {
        Step::PutBackend { id, backend, .. } => Some((i, *id, *backend)),
        _ => None,
    }) else {
        panic!("the plan of a one-backend service has a PutBackend step")
    };
    for step in steps.iter_mut() {
        match step {
            Step::PutSlots { ids, .. } => *ids = (first..first + backends).collect(),
            Step::PutFrontend { frontend, .. } => frontend.slot_count = backends,
            _ => {}
        }
    }
    let more = (1..backends).map(|i| Step::PutBackend {
        id: first + i,
        backend: sluice_common::types::Backend {
            addr: [u32::from_ne_bytes(pool_addr(i).octets()), 0, 0, 0],
            ..template
        },
        fresh: true,
    });
    // Backends before the slot table that names them.
    steps.splice(at + 1..at + 1, more);
}

fn measure_scale(lab: &mut Lab, services: u32, s: Settings) -> anyhow::Result<(f64, Vec<Row>)> {
    pin_to_one_cpu()?;
    for i in ["n0", "nb1"] {
        lab.allow_xdp_egress(i);
    }
    let via = backend(1).to_string();
    for (prefix, len) in POOL_PREFIXES {
        lab.command(&[
            "ip",
            "route",
            "add",
            &format!("{prefix}/{len}"),
            "via",
            &via,
            "dev",
            "nb1",
        ]);
    }
    // The last service: in a linear walk it would be the most expensive.
    let vip = if services == 1 {
        VIP
    } else {
        scale_vip(services - 1)
    };
    let frontend = lab.frontend_id(vip, 80, IPPROTO_TCP);
    let n0 = lab.ifindex("n0");
    let mut bench = Bench::load(lab)?;
    let f = Frames::open(lab, vip)?;
    let harness_ns = bench.harness_ns(f.established, n0, s)?;
    let hook_ns = {
        let mut v = Vec::new();
        for _ in 0..s.rounds {
            v.push(bench.run("bench_pass", &f.established, n0, s.repeat)?);
        }
        median(&v)
    };
    let denied_policy = policy(POOL_PREFIXES.to_vec(), CLIENTS, 10_000);
    let cases = vec![
        Case::new(SCALE_ROWS[0], "bench_restore", f.established, n0).proven_by("fwd_xdp"),
        Case::new(SCALE_ROWS[1], "bench_restore", f.reply, f.reply_ingress).proven_by("fwd_xdp"),
        Case::new(SCALE_ROWS[2], "sluice_xdp", f.not_vip, n0).proven_by("pass_not_service"),
        Case::new(SCALE_ROWS[3], "bench_restore", f.new_flow, n0)
            .proven_by("frontend_new_flows")
            .new_flow_each_run(),
        Case::new(SCALE_ROWS[4], "bench_restore", f.denied, n0)
            .proven_by("drop_policy")
            .new_flow_each_run()
            .with_policy(denied_policy),
    ];
    let rows = run_cases(
        lab,
        &mut bench,
        cases,
        &[frontend],
        harness_ns,
        Some(hook_ns),
        s,
    )?;
    Ok((harness_ns, rows))
}

/// The rows of every scaling size, in order.
pub const SCALE_ROWS: [&str; 5] = [
    "established",
    "reply",
    "non-VIP",
    "new flow",
    "policy-denied",
];

pub fn render_dataplane(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Sluice XDP data plane, ns per packet, BPF_PROG_TEST_RUN; {} runs per round, median of {} rounds",
        report.repeat, report.rounds
    );
    let _ = writeln!(
        out,
        "rows marked * run behind a frame-restoring harness ({:.1} ns/packet alone), \
         reported as measured - harness + XDP_PASS\n",
        report.harness_ns
    );
    let floor = report
        .rows
        .iter()
        .find(|r| r.name.starts_with("floor"))
        .map_or(1.0, |r| r.ns_per_packet);
    let _ = writeln!(
        out,
        "| {:<58} | {:>9} | {:>7} | {:<36} |",
        "row", "ns/packet", "× floor", "path proven by (per round)"
    );
    let _ = writeln!(out, "|{:-<60}|{:->11}|{:->9}|{:-<38}|", "", "", "", "");
    for row in &report.rows {
        let proof = if row.path_counter.is_empty() {
            "-".to_string()
        } else {
            format!("{} +{}", row.path_counter, row.path_counter_delta)
        };
        let name = if row.via_harness {
            format!("{} *", row.name)
        } else {
            row.name.clone()
        };
        let _ = writeln!(
            out,
            "| {:<58} | {:>9.1} | {:>7.1} | {:<36} |",
            name,
            row.ns_per_packet,
            row.ns_per_packet / floor,
            proof
        );
    }
    out
}

pub fn render_scaling(report: &ScalingReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Scaling: ns per packet by size (the last service measured); {} runs per round, median of {} rounds\n",
        report.repeat, report.rounds
    );
    let _ = write!(out, "| {:<32} |", "size");
    for r in SCALE_ROWS {
        let _ = write!(out, " {r:>13} |");
    }
    let _ = writeln!(out);
    let _ = write!(out, "|{:-<34}|", "");
    for _ in SCALE_ROWS {
        let _ = write!(out, "{:->15}|", "");
    }
    let _ = writeln!(out);
    for case in &report.cases {
        let _ = write!(out, "| {:<32} |", case.label);
        match &case.skipped {
            Some(why) => {
                let _ = write!(out, " not run: {why} |");
            }
            None => {
                for row in &case.rows {
                    let _ = write!(out, " {:>13.0} |", row.ns_per_packet);
                }
            }
        }
        let _ = writeln!(out);
    }
    for case in &report.cases {
        if let Some(note) = &case.note {
            let _ = writeln!(out, "{}: {note}", case.label);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_contiguous_per_prefix_and_avoids_the_lab() {
        assert_eq!(pool_addr(0), Ipv4Addr::new(198, 18, 64, 0));
        assert_eq!(pool_addr(16_383), Ipv4Addr::new(198, 18, 127, 255));
        assert_eq!(pool_addr(16_384), Ipv4Addr::new(198, 18, 128, 0));
        assert_eq!(pool_addr(49_152), Ipv4Addr::new(198, 19, 8, 0));
        assert_eq!(pool_addr(112_639), Ipv4Addr::new(198, 19, 255, 255));
        for i in [0, 20_000, 60_000, 99_999] {
            let a = pool_addr(i);
            assert!(
                POOL_PREFIXES
                    .iter()
                    .any(|(p, l)| u32::from(a) >> (32 - l) == u32::from(*p) >> (32 - l))
            );
            assert_ne!(a.octets()[..3], [198, 19, 1]);
        }
    }

    #[test]
    fn capacities_are_checked() {
        assert_eq!(capacity_check(1, 100_000), None);
        assert_eq!(capacity_check(10_000, 10), None);
        assert!(capacity_check(1, 200_000).is_some());
        assert!(capacity_check(20_000, 1).is_some());
    }

    #[test]
    fn the_manifest_parses_with_the_last_vip() {
        let text = scale_manifest(3, 2);
        let m = sluice_model::manifest::parse("t.yaml", &text).expect("parses");
        assert!(text.contains(&format!("vip: {}", scale_vip(2))));
        assert!(text.contains(&format!("address: {}", pool_addr(5))));
        drop(m);
    }
}
