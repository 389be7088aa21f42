//! `cargo xtask bench`: what one packet costs in Sluice's XDP program, and
//! how fast the control plane programs a cluster (see
//! `sluice_tests::control_bench`; `--only control|dataplane` runs one part).
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

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use serde::Serialize;
use sluice_agent::policy::{CompiledPolicy, IdentityEntry, PolicyWriter, RuleEntry};
use sluice_common::{layout::map, types::IPPROTO_TCP};
use sluice_tests::{
    control_bench,
    lab::{CLIENT, Lab, backend, with_lab},
    packet::{Spec, TCP_ACK, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const FRAME: usize = 64;

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

struct Args {
    repeat: u32,
    rounds: usize,
    json: PathBuf,
    only: Option<String>,
    services: usize,
    per_service: usize,
    control_json: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        repeat: 1_000_000,
        rounds: 5,
        json: PathBuf::from("target/bench/dataplane.json"),
        only: None,
        services: 10_000,
        per_service: 10,
        control_json: PathBuf::from("target/bench/control.json"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--repeat" => args.repeat = value()?.parse().context("--repeat")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--json" => args.json = PathBuf::from(value()?),
            "--control-json" => args.control_json = PathBuf::from(value()?),
            "--services" => args.services = value()?.parse().context("--services")?,
            "--per-service" => args.per_service = value()?.parse().context("--per-service")?,
            "--only" => {
                let part = value()?;
                if part != "dataplane" && part != "control" {
                    bail!("--only takes dataplane or control, not {part:?}");
                }
                args.only = Some(part);
            }
            "-h" | "--help" => {
                println!(
                    "sluice-bench [--only dataplane|control] [--repeat N (1000000)] [--rounds R (5)] \
                     [--json PATH] [--services N (10000)] [--per-service M (10)] [--control-json PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.repeat < 1_000_000 {
        eprintln!("note: --repeat below 1,000,000 gives noisy figures");
    }
    Ok(args)
}

#[derive(Serialize)]
struct Row {
    name: &'static str,
    /// Median over rounds, on the scale of the XDP_PASS row: a harnessed row
    /// is measured − harness + XDP_PASS, i.e. the hook's own cost plus the
    /// program's (the tail call's few ns stay in, to our disadvantage).
    ns_per_packet: f64,
    /// Per-round figures as measured (before subtraction).
    rounds_ns: Vec<f64>,
    via_harness: bool,
    /// The counter that proves the path, and by how much it moved per round.
    path_counter: &'static str,
    path_counter_delta: u64,
}

#[derive(Serialize)]
struct Report {
    what: &'static str,
    kernel: String,
    cpu: String,
    cpus: usize,
    repeat: u32,
    rounds: usize,
    harness_ns: f64,
    rows: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    if args.only.as_deref() != Some("control") {
        let report = with_lab(MANIFEST, |lab| measure(lab, &args))?;
        print_table(&report);
        write_json(&args.json, &report)?;
    }
    if args.only.as_deref() != Some("dataplane") {
        println!(
            "\ncontrol plane: apply → every agent programmed (2 joined agents; 1 service, then {} services × {} endpoints)",
            args.services, args.per_service
        );
        let report = control_bench::run(args.services, args.per_service, args.rounds.max(3))?;
        print!("{}", control_bench::render(&report));
        write_json(&args.control_json, &report)?;
    }
    Ok(())
}

fn write_json(path: &std::path::Path, report: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nwritten: {}", path.display());
    Ok(())
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

/// Every backend enforced (one identity), the benchmark's clients (all of
/// 198.18.0.0/16) admitted by one rule, and `rules - 1` more rules for other
/// sources, ports and protocols that never match.
fn policy_with(rules: u32) -> CompiledPolicy {
    let mut identities: Vec<IdentityEntry> = (1..=3)
        .map(|i| IdentityEntry {
            prefix: backend(i),
            len: 32,
            identity: 100,
            enforced: true,
            stats_slot: 1,
            egress_enforced: false,
            egress_slot: 0,
        })
        .collect();
    identities.push(IdentityEntry {
        prefix: Ipv4Addr::new(198, 18, 0, 0),
        len: 16,
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
    }
}

/// Keeps this thread (and the test runs it starts) on CPU 0.
fn pin_to_one_cpu() -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only read and write the set we own, for thread 0
    // (the caller).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "pinning the benchmark to CPU 0: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn counters(lab: &Lab) -> BTreeMap<&'static str, u64> {
    let mut c = lab.dataplane.maps.outcomes().expect("outcomes");
    // Frontends 0 and 1: the manifest's two services.
    let new_flows = (0..2)
        .map(|id| {
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

fn measure(lab: &mut Lab, args: &Args) -> anyhow::Result<Report> {
    // The harness numbers runs with a per-CPU counter: on one CPU, no two runs
    // share a 5-tuple; a thread moved between CPUs would replay one CPU's
    // sequence on the other, and some "new" flows would be established ones.
    pin_to_one_cpu()?;
    for i in ["n0", "nb1", "nb2", "nb3"] {
        lab.allow_xdp_egress(i);
    }
    let n0 = lab.ifindex("n0");
    let nb1 = lab.ifindex("nb1");
    let mut bench = Bench::load(lab)?;

    // Flows for the established and reply rows.
    let established = padded(Spec::tcp((CLIENT, 40000), (VIP, 80), TCP_ACK));
    let opening = padded(Spec::tcp((CLIENT, 40000), (VIP, 80), TCP_SYN));
    if lab.xdp("n0", &opening).action != 4 {
        bail!(
            "opening the benchmark flow was not redirected: {:?}",
            lab.outcomes()
        );
    }
    let to_backend = sluice_tests::packet::read(&lab.xdp("n0", &opening).frame).dst;
    let reply = padded(Spec::tcp((to_backend, 8080), (CLIENT, 40000), TCP_ACK));
    // Its own client address: the harness walks every source port, and one of
    // them would be the established flow's.
    let new_flow = padded(Spec::tcp(
        (Ipv4Addr::new(198, 18, 2, 2), 1024),
        (VIP, 80),
        TCP_SYN,
    ));
    let sticky_flow = padded(Spec::tcp(
        (Ipv4Addr::new(198, 18, 2, 3), 1024),
        (STICKY_VIP, 80),
        TCP_SYN,
    ));
    let not_vip = padded(Spec::tcp((CLIENT, 40000), (backend(1), 8080), TCP_ACK));

    let mut harness = Vec::new();
    bench.set_frame(established, false)?;
    for _ in 0..args.rounds {
        harness.push(bench.run("bench_restore_only", &established, n0, args.repeat)?);
    }
    let harness_ns = median(&harness);

    struct Case {
        name: &'static str,
        program: &'static str,
        frame: [u8; FRAME],
        ingress: u32,
        new_flows: bool,
        counter: &'static str,
        /// Network policy in force for the row: this many rules.
        policy_rules: Option<u32>,
    }
    let cases = [
        Case {
            name: "XDP_PASS (the hook alone)",
            program: "bench_pass",
            frame: established,
            ingress: n0,
            new_flows: false,
            counter: "",
            policy_rules: None,
        },
        Case {
            name: "floor: parse + swap MAC + XDP_TX",
            program: "bench_floor",
            frame: established,
            ingress: n0,
            new_flows: false,
            counter: "",
            policy_rules: None,
        },
        Case {
            name: "established flow (DNAT, cached next hop)",
            program: "bench_restore",
            frame: established,
            ingress: n0,
            new_flows: false,
            counter: "fwd_xdp",
            policy_rules: None,
        },
        Case {
            name: "reply (reverse NAT to the VIP)",
            program: "bench_restore",
            frame: reply,
            ingress: nb1,
            new_flows: false,
            counter: "fwd_xdp",
            policy_rules: None,
        },
        Case {
            name: "non-VIP pass-through",
            program: "sluice_xdp",
            frame: not_vip,
            ingress: n0,
            new_flows: false,
            counter: "pass_not_service",
            policy_rules: None,
        },
        // Last: a million new flows evict the ones the rows above use.
        Case {
            name: "new flow every packet (SYN, round-robin)",
            program: "bench_restore",
            frame: new_flow,
            ingress: n0,
            new_flows: true,
            counter: "frontend_new_flows",
            policy_rules: None,
        },
        // One client, a new source port every packet: each new flow follows
        // (and refreshes) the client's affinity entry.
        Case {
            name: "new flow every packet (SYN, client-IP affinity)",
            program: "bench_restore",
            frame: sticky_flow,
            ingress: n0,
            new_flows: true,
            counter: "frontend_new_flows",
            policy_rules: None,
        },
        // Every backend protected by network policy, the client admitted by
        // one rule among many: the verdict's cost must not grow with them.
        Case {
            name: "new flow every packet, policy with 100 rules",
            program: "bench_restore",
            frame: new_flow,
            ingress: n0,
            new_flows: true,
            counter: "frontend_new_flows",
            policy_rules: Some(100),
        },
        Case {
            name: "new flow every packet, policy with 10,000 rules",
            program: "bench_restore",
            frame: new_flow,
            ingress: n0,
            new_flows: true,
            counter: "frontend_new_flows",
            policy_rules: Some(10_000),
        },
    ];

    let mut rows: Vec<Row> = Vec::new();
    for case in cases {
        if let Some(rules) = case.policy_rules {
            PolicyWriter.install(&mut lab.dataplane.maps, &policy_with(rules))?;
        }
        bench.set_frame(case.frame, case.new_flows)?;
        let mut rounds_ns = Vec::new();
        let mut deltas = Vec::new();
        for _ in 0..args.rounds {
            let before = counters(lab);
            let ns = if case.program == "sluice_xdp" {
                xdp_test_run(
                    lab.dataplane.xdp_program(),
                    &case.frame,
                    case.ingress,
                    args.repeat,
                )?
            } else {
                bench.run(case.program, &case.frame, case.ingress, args.repeat)?
            };
            let after = counters(lab);
            rounds_ns.push(ns);
            if !case.counter.is_empty() {
                let delta = after[case.counter] - before[case.counter];
                if delta != u64::from(args.repeat) {
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
                        args.repeat
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
        // The first row is XDP_PASS: the hook alone.
        let hook_ns = rows.first().map_or(raw, |r| r.ns_per_packet);
        rows.push(Row {
            name: case.name,
            ns_per_packet: if via_harness {
                raw - harness_ns + hook_ns
            } else {
                raw
            },
            rounds_ns,
            via_harness,
            path_counter: case.counter,
            path_counter_delta: deltas.first().copied().unwrap_or(0),
        });
    }

    Ok(Report {
        what: "Sluice XDP data plane, ns per packet, BPF_PROG_TEST_RUN",
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpu: std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into()),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        repeat: args.repeat,
        rounds: args.rounds,
        harness_ns,
        rows,
    })
}

fn print_table(report: &Report) {
    println!("{}", report.what);
    println!(
        "kernel {}, {} ({} CPUs); {} runs per round, median of {} rounds",
        report.kernel, report.cpu, report.cpus, report.repeat, report.rounds
    );
    println!(
        "rows marked * run behind a frame-restoring harness ({:.1} ns/packet alone), \
         reported as measured - harness + XDP_PASS\n",
        report.harness_ns
    );
    println!(
        "| {:<48} | {:>9} | {:<36} |",
        "row", "ns/packet", "path proven by (per round)"
    );
    println!("|{:-<50}|{:->11}|{:-<38}|", "", "", "");
    for row in &report.rows {
        let proof = if row.path_counter.is_empty() {
            "-".to_string()
        } else {
            format!("{} +{}", row.path_counter, row.path_counter_delta)
        };
        let name = if row.via_harness {
            format!("{} *", row.name)
        } else {
            row.name.to_string()
        };
        println!(
            "| {:<48} | {:>9.1} | {:<36} |",
            name, row.ns_per_packet, proof
        );
    }
}
