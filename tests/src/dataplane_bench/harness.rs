//! The machinery every row runs on: the bench object (a harness that
//! restores the frame before tail-calling the data plane), crafted frames,
//! network policies, and `run_cases`, which measures each row and proves by
//! the data plane's counters that every run took the path the row names.
//! Both parts share it, so their figures are comparable.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, ProgramArray},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use sluice_agent::policy::PolicyWriter;
use sluice_common::{layout::map, types::IPPROTO_TCP};
use sluice_model::policy::compiled::{CompiledPolicy, IdentityEntry, RuleEntry};

use super::{DENIED_CLIENT, FRAME, Row, Settings};
use crate::{
    lab::{CLIENT, Lab, backend},
    packet::{Spec, TCP_ACK, TCP_SYN},
};

/// A frame padded to the harness's restore size.
pub(super) fn padded(spec: Spec) -> [u8; FRAME] {
    let mut spec = spec;
    let bare = spec.build().len();
    spec.payload = vec![0; FRAME.saturating_sub(bare)];
    spec.build().try_into().expect("a 64-byte frame")
}

pub(super) struct Bench {
    ebpf: Ebpf,
}

impl Bench {
    pub(super) fn load(lab: &mut Lab) -> anyhow::Result<Self> {
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

    pub(super) fn set_frame(
        &mut self,
        frame: [u8; FRAME],
        new_flow_each_run: bool,
    ) -> anyhow::Result<()> {
        let mut frames: Array<_, [u8; FRAME]> =
            Array::try_from(self.ebpf.map_mut("BENCH_FRAME").context("BENCH_FRAME")?)?;
        frames.set(0, frame, 0)?;
        let mut config: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("BENCH_CONFIG").context("BENCH_CONFIG")?)?;
        config.set(0, u32::from(new_flow_each_run), 0)?;
        Ok(())
    }

    /// Runs `program` `repeat` times on `frame` arriving on `ingress`; ns per run.
    pub(super) fn run(
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

    pub(super) fn harness_ns(
        &mut self,
        frame: [u8; FRAME],
        ingress: u32,
        s: Settings,
    ) -> anyhow::Result<f64> {
        let mut harness = Vec::new();
        self.set_frame(frame, false)?;
        for _ in 0..s.rounds {
            harness.push(self.run("bench_restore_only", &frame, ingress, s.repeat)?);
        }
        Ok(median(&harness))
    }
}

pub(super) fn xdp_test_run(
    prog: &Xdp,
    frame: &[u8],
    ingress: u32,
    repeat: u32,
) -> anyhow::Result<f64> {
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
pub(super) const CLIENTS: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 22);

/// Every backend enforced (one identity), the benchmark's clients admitted by
/// one rule, and `rules - 1` more rules for other sources, ports and
/// protocols that never match.
pub(super) fn policy_with(rules: u32) -> CompiledPolicy {
    let backends = (1..=3).map(|i| (backend(i), 32)).collect();
    policy(backends, CLIENTS, rules)
}

pub(super) fn policy(
    backends: Vec<(Ipv4Addr, u8)>,
    clients: (Ipv4Addr, u8),
    rules: u32,
) -> CompiledPolicy {
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
pub(super) fn pin_to_one_cpu() -> anyhow::Result<()> {
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

pub(super) fn median(values: &[f64]) -> f64 {
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

pub(super) struct Case {
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
    pub(super) fn new(name: &str, program: &'static str, frame: [u8; FRAME], ingress: u32) -> Self {
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

    pub(super) fn with_flow_log(self) -> Self {
        Self {
            flow_log: true,
            ..self
        }
    }

    pub(super) fn proven_by(self, counter: &'static str) -> Self {
        Self { counter, ..self }
    }

    pub(super) fn new_flow_each_run(self) -> Self {
        Self {
            new_flows: true,
            ..self
        }
    }

    pub(super) fn with_policy(self, policy: CompiledPolicy) -> Self {
        Self {
            policy: Some(policy),
            ..self
        }
    }
}

/// The frames of the flow-path rows for a service at `vip`:80.
pub(super) struct Frames {
    pub(super) established: [u8; FRAME],
    pub(super) reply: [u8; FRAME],
    pub(super) reply_ingress: u32,
    pub(super) not_vip: [u8; FRAME],
    /// From its own client address: the harness walks every source port, and
    /// one of them would be the established flow's.
    pub(super) new_flow: [u8; FRAME],
    pub(super) denied: [u8; FRAME],
}

impl Frames {
    /// Opens the established flow (one real run) and builds the reply from
    /// the backend it went to.
    pub(super) fn open(lab: &mut Lab, vip: Ipv4Addr) -> anyhow::Result<Self> {
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

/// Runs every case for `s.rounds` rounds and checks its counter. `hook_ns`
/// is the XDP_PASS figure; if `None`, the first case must be XDP_PASS.
pub(super) fn run_cases(
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
