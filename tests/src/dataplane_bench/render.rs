//! The text tables `sluice-bench` prints for parts 1 and 2 (the README
//! quotes them). Formatting only, apart from the measuring: nothing here
//! needs a lab or root.

use std::fmt::Write as _;

use super::{Report, SCALE_ROWS, ScalingReport};

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
