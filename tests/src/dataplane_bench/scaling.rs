//! Part 2: whether the cost per packet stays flat as services and backends
//! grow, up to the data plane's capacities: the flow-path rows at every size
//! of [`SCALES`], each in a lab of its own, the last service measured so that
//! a linear walk would show.

use std::{fmt::Write as _, net::Ipv4Addr};

use serde::Serialize;
use sluice_agent::reconcile::Step;
use sluice_common::{
    layout::{MAX_BACKENDS, MAX_FRONTENDS, SLOT_CAPACITY},
    types::IPPROTO_TCP,
};
use sluice_model::service::MAX_BACKENDS_PER_SERVICE;

use super::{
    Row, Settings, VIP,
    harness::{Bench, CLIENTS, Case, Frames, median, pin_to_one_cpu, policy, run_cases},
};
use crate::lab::{Lab, backend, with_edited_lab};

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
/// `VIP` (198.18.0.10, as in part 1).
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
