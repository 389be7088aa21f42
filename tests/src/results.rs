//! The benchmark suite's combined results: every part's rows and the machine
//! they were measured on, as `target/bench/results.json` and one table.

use std::{fmt::Write as _, process::Command};

use serde::Serialize;

use crate::{control_bench, dataplane_bench, throughput};

/// What the figures were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    /// UTC, when the run started.
    pub date: String,
}

impl Machine {
    pub fn detect() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: field(&meminfo, "MemTotal")
                .and_then(|v| v.trim_end_matches(" kB").trim().parse::<f64>().ok())
                .map_or(0.0, |kib| kib / (1024.0 * 1024.0)),
            date: Command::new("date")
                .args(["-u", "+%Y-%m-%d %H:%M UTC"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// The value of `key: value` lines as /proc writes them (`key\t: value`).
fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub machine: Machine,
    /// The command that produced these results.
    pub command: String,
    pub dataplane: Option<dataplane_bench::Report>,
    pub scaling: Option<dataplane_bench::ScalingReport>,
    pub throughput: Option<throughput::Report>,
    pub control: Option<control_bench::Report>,
    pub store: Option<crate::store_bench::Report>,
    pub hollow: Option<crate::hollow_bench::Report>,
    pub packet_rate: Option<crate::packet_rate_bench::Report>,
}

impl Results {
    pub fn new(machine: Machine, command: String) -> Self {
        Self {
            machine,
            command,
            dataplane: None,
            scaling: None,
            throughput: None,
            control: None,
            store: None,
            hollow: None,
            packet_rate: None,
        }
    }

    /// One table of every part's headline figures.
    pub fn render_combined(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "All parts: `{}` on {}, kernel {}, {} ({} CPUs, {:.0} GiB)\n",
            self.command, m.date, m.kernel, m.cpu, m.cpus, m.memory_gib
        );
        let _ = writeln!(out, "| {:<10} | {:<64} | {:>14} |", "part", "case", "value");
        let _ = writeln!(out, "|{:-<12}|{:-<66}|{:->16}|", "", "", "");
        let mut row = |part: &str, case: &str, value: String| {
            let _ = writeln!(out, "| {part:<10} | {case:<64} | {value:>14} |");
        };
        if let Some(d) = &self.dataplane {
            for r in &d.rows {
                row(
                    "dataplane",
                    &r.name,
                    format!("{:.0} ns/pkt", r.ns_per_packet),
                );
            }
        }
        if let Some(s) = &self.scaling {
            for c in &s.cases {
                match &c.skipped {
                    Some(why) => row("scaling", &c.label, format!("not run: {why}")),
                    None => {
                        for r in &c.rows {
                            row(
                                "scaling",
                                &format!("{}: {}", c.label, r.name),
                                format!("{:.0} ns/pkt", r.ns_per_packet),
                            );
                        }
                    }
                }
            }
        }
        if let Some(t) = &self.throughput {
            for r in &t.rows {
                let case = |what: &str| {
                    let plural = if r.services == 1 { "" } else { "s" };
                    format!("{} service{plural}, {}: {what}", r.services, r.mode)
                };
                row(
                    "throughput",
                    &case("connections/s"),
                    format!("{:.0}", r.conns_per_s),
                );
                row(
                    "throughput",
                    &case("request p50/p99 (µs)"),
                    format!("{:.0} / {:.0}", r.rr_p50_us, r.rr_p99_us),
                );
                row(
                    "throughput",
                    &case("UDP packets/s received"),
                    format!("{:.0}", r.udp_received_pps),
                );
            }
        }
        if let Some(c) = &self.control {
            for r in &c.rows {
                row(
                    "control",
                    &format!(
                        "{:?} {} ({} services): ack → programmed",
                        r.store, r.case, r.services
                    ),
                    format!("{:.0} ms", r.timing.ack_to_programmed_ms),
                );
            }
        }
        if let Some(s) = &self.store {
            for r in &s.rows {
                row(
                    "store",
                    &format!(
                        "{} ({} services): one change acknowledged",
                        r.store, r.services
                    ),
                    format!("{:.1} ms", r.one_change_ms),
                );
            }
        }
        if let Some(p) = &self.packet_rate {
            for r in &p.rows {
                row(
                    "packet rate",
                    &format!("{}, {} services, {}", r.case, r.services, r.shape),
                    format!("{:.3} Mpps", r.mpps),
                );
            }
        }
        if let Some(h) = &self.hollow {
            for r in &h.rows {
                row(
                    "hollow",
                    &format!(
                        "{} nodes, {} services: request → all nodes",
                        r.nodes, r.services
                    ),
                    format!("{:.1} ms", r.all_nodes_ms),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_read_with_tabs_and_units() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(
            field(cpuinfo, "model name").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(
            field("MemTotal:       24000 kB\n", "MemTotal").as_deref(),
            Some("24000 kB")
        );
        assert_eq!(field(cpuinfo, "flags"), None);
    }
}
