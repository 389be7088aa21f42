//! `top`: live traffic rates per service and backend, summed over the nodes.
//!
//! Nodes report cumulative counters every few seconds. A rate is the change
//! between two reports of one node over the time between them (the nodes'
//! own report times, not when `top` happened to look), so a refresh that
//! falls between two reports shows the last known rate instead of a zero.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use super::{
    Context,
    args::TopArgs,
    error::CliError,
    model::{NodeInfo, Traffic},
    output::print,
};

/// What a rate is computed for: a service port, or one backend of it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Row {
    service: String,
    vip: String,
    /// Empty for the service port's own row.
    backend: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Rate {
    packets: f64,
    bytes: f64,
    new_flows: f64,
    /// Not a rate: open connections at the last report.
    active: u64,
}

/// One node's last report and the rates it gave.
#[derive(Default)]
struct NodeSeries {
    last_report: Option<time::OffsetDateTime>,
    counters: HashMap<Row, Traffic>,
    rates: HashMap<Row, Rate>,
}

/// Every node's series, fed one `get nodes` at a time.
#[derive(Default)]
struct Rates {
    nodes: BTreeMap<String, NodeSeries>,
}

impl Rates {
    fn observe(&mut self, nodes: &[NodeInfo]) {
        self.nodes
            .retain(|name, _| nodes.iter().any(|n| &n.name == name));
        for node in nodes {
            let reported = node.last_report.as_deref().and_then(|r| {
                time::OffsetDateTime::parse(r, &time::format_description::well_known::Rfc3339).ok()
            });
            let series = self.nodes.entry(node.name.clone()).or_default();
            if reported.is_none() || reported == series.last_report {
                continue;
            }
            let counters = counters_of(node);
            let elapsed = match (series.last_report, reported) {
                (Some(before), Some(now)) => (now - before).as_seconds_f64(),
                _ => 0.0,
            };
            let mut rates = HashMap::new();
            for (row, now) in &counters {
                let rate = match series.counters.get(row) {
                    // Counters restart from zero when an agent recreates its
                    // data plane: no rate until the next report.
                    Some(before) if elapsed > 0.0 && now.packets >= before.packets => Rate {
                        packets: (now.packets - before.packets) as f64 / elapsed,
                        bytes: now.bytes.saturating_sub(before.bytes) as f64 / elapsed,
                        new_flows: now.new_flows.saturating_sub(before.new_flows) as f64 / elapsed,
                        active: now.active_connections,
                    },
                    _ => Rate {
                        active: now.active_connections,
                        ..Rate::default()
                    },
                };
                rates.insert(row.clone(), rate);
            }
            *series = NodeSeries {
                last_report: reported,
                counters,
                rates,
            };
        }
    }

    /// The rates summed over the nodes, in row order.
    fn totals(&self) -> BTreeMap<Row, Rate> {
        let mut totals: BTreeMap<Row, Rate> = BTreeMap::new();
        for series in self.nodes.values() {
            for (row, rate) in &series.rates {
                let total = totals.entry(row.clone()).or_default();
                total.packets += rate.packets;
                total.bytes += rate.bytes;
                total.new_flows += rate.new_flows;
                total.active += rate.active;
            }
        }
        totals
    }
}

fn counters_of(node: &NodeInfo) -> HashMap<Row, Traffic> {
    let mut rows = HashMap::new();
    for frontend in &node.traffic {
        let vip = format!("{}:{}/{}", frontend.vip, frontend.port, frontend.protocol);
        for backend in &frontend.backends {
            let row = Row {
                service: frontend.service.clone(),
                vip: vip.clone(),
                backend: format!("{}:{}", backend.address, backend.port),
            };
            rows.insert(row, backend.traffic);
        }
        let row = Row {
            service: frontend.service.clone(),
            vip,
            backend: String::new(),
        };
        rows.insert(row, frontend.traffic);
    }
    rows
}

fn render(totals: &BTreeMap<Row, Rate>, namespace: Option<&str>, nodes: usize) -> String {
    let mut out = format!(
        "{nodes} node(s); rates over each node's last report interval\n\
         {:<32} {:<26} {:>10} {:>12} {:>11} {:>8}\n",
        "SERVICE / BACKEND", "VIP:PORT", "PACKETS/S", "BYTES/S", "NEW FLOWS/S", "ACTIVE"
    );
    let wanted = |row: &Row| namespace.is_none_or(|ns| row.service.split('/').next() == Some(ns));
    for (row, rate) in totals.iter().filter(|(row, _)| wanted(row)) {
        let (name, vip) = if row.backend.is_empty() {
            (row.service.clone(), row.vip.as_str())
        } else {
            (format!("  {}", row.backend), "")
        };
        out.push_str(&format!(
            "{name:<32} {vip:<26} {:>10.1} {:>12.0} {:>11.1} {:>8}\n",
            rate.packets, rate.bytes, rate.new_flows, rate.active
        ));
    }
    out
}

pub async fn top(cx: &Context, args: TopArgs) -> Result<(), CliError> {
    let client = cx.connect().await?;
    let mut rates = Rates::default();
    let mut refreshes = 0u32;
    loop {
        let nodes = client.list_nodes().await?;
        rates.observe(&nodes);
        let table = render(&rates.totals(), args.namespace.as_deref(), nodes.len());
        match args.count {
            // Bounded: one table after the other, for logs and scripts.
            Some(_) => print(&format!("{table}\n"))?,
            // Live: redraw in place.
            None => print(&format!("\x1b[H\x1b[2J{table}"))?,
        }
        refreshes += 1;
        if args.count.is_some_and(|count| refreshes >= count) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(args.interval)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::model::{BackendTraffic, FrontendTraffic};

    fn node(name: &str, report: &str, packets: u64, backend_packets: u64) -> NodeInfo {
        let traffic = |packets| Traffic {
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
            active_connections: 3,
        };
        NodeInfo {
            name: name.to_owned(),
            zone: String::new(),
            connected: true,
            applied_version: 1,
            desired_version: 1,
            last_report: Some(report.to_owned()),
            joined_at: String::new(),
            certificate_serial: String::new(),
            certificate_expires: String::new(),
            resource_version: 1,
            traffic: vec![FrontendTraffic {
                service: "shop/web".to_owned(),
                vip: "198.18.0.10".to_owned(),
                port: 80,
                protocol: "TCP".to_owned(),
                traffic: traffic(packets),
                backends: vec![BackendTraffic {
                    address: "198.19.0.2".to_owned(),
                    port: 8080,
                    traffic: traffic(backend_packets),
                }],
            }],
            policy: Vec::new(),
        }
    }

    fn service_row() -> Row {
        Row {
            service: "shop/web".to_owned(),
            vip: "198.18.0.10:80/TCP".to_owned(),
            backend: String::new(),
        }
    }

    #[test]
    fn rates_come_from_each_nodes_own_report_times_and_sum_over_nodes() {
        let mut rates = Rates::default();
        rates.observe(&[
            node("a", "2026-11-30T12:00:00Z", 1_000, 500),
            node("b", "2026-11-30T12:00:01Z", 0, 0),
        ]);
        assert_eq!(
            rates.totals()[&service_row()].packets,
            0.0,
            "one report: no rate"
        );
        // a reports 5 s later (+5,000 packets: 1,000/s), b 2 s later (+400: 200/s).
        rates.observe(&[
            node("a", "2026-11-30T12:00:05Z", 6_000, 3_000),
            node("b", "2026-11-30T12:00:03Z", 400, 0),
        ]);
        let total = rates.totals()[&service_row()];
        assert!((total.packets - 1_200.0).abs() < 1e-6, "{total:?}");
        assert!((total.bytes - 120_000.0).abs() < 1e-6, "{total:?}");
        assert!((total.new_flows - 120.0).abs() < 1e-6, "{total:?}");
        assert_eq!(total.active, 6);
        // Looked at again before anyone reported: the same rates, not zero.
        rates.observe(&[
            node("a", "2026-11-30T12:00:05Z", 6_000, 3_000),
            node("b", "2026-11-30T12:00:03Z", 400, 0),
        ]);
        assert_eq!(rates.totals()[&service_row()], total);
        let table = render(&rates.totals(), None, 2);
        assert!(table.contains("shop/web"), "{table}");
        assert!(table.contains("  198.19.0.2:8080"), "{table}");
        assert!(table.contains("1200.0"), "{table}");
        assert!(!render(&rates.totals(), Some("other"), 2).contains("shop/web"));
    }

    #[test]
    fn a_counter_reset_gives_no_rate_rather_than_a_huge_one() {
        let mut rates = Rates::default();
        rates.observe(&[node("a", "2026-11-30T12:00:00Z", 1_000, 1_000)]);
        rates.observe(&[node("a", "2026-11-30T12:00:05Z", 10, 10)]);
        assert_eq!(rates.totals()[&service_row()].packets, 0.0);
    }
}
