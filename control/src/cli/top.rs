//! `top`: live traffic rates per service and backend, summed over the nodes.
//!
//! Nodes report cumulative counters every second or so; the rates are
//! computed as the dashboard computes them ([`crate::rates`]): per node,
//! between its last two reports, over the time between them (the node's own
//! report times, not when `top` happened to look).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use super::{Context, args::TopArgs, error::CliError, model::NodeInfo, output::print};
use crate::rates::{Rate, Rates};

/// A row of the table: a service port, or one backend of it (`backend`
/// empty for the port's own row).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    service: String,
    vip: String,
    backend: String,
}

/// Rates summed over the nodes, with the open connections of their last
/// reports (a gauge, not a rate).
type Totals = BTreeMap<Row, (Rate, u64)>;

/// Feeds `nodes` (one `get nodes`) to `rates` and sums what they give.
fn observe(rates: &mut Rates, nodes: &[NodeInfo], now: SystemTime) -> Totals {
    rates.retain(|kept| nodes.iter().any(|n| n.name == kept));
    let mut totals = Totals::new();
    for node in nodes {
        let Some(reported) = node.reported else {
            continue;
        };
        rates.observe(&node.name, reported, &node.counters);
        let node_rates = rates.node(&node.name, now);
        for c in &node.counters {
            let key = (c.service.clone(), c.key);
            let service = c.service.to_string();
            let vip = c.key.to_string();
            let mut add = |backend: String, rate: Option<&Rate>, active: u64| {
                let row = Row {
                    service: service.clone(),
                    vip: vip.clone(),
                    backend,
                };
                let total = totals.entry(row).or_default();
                if let Some(rate) = rate {
                    total.0.add(rate);
                }
                total.1 += active;
            };
            add(
                String::new(),
                node_rates.frontends.get(&key),
                c.counts.active_connections,
            );
            for b in &c.backends {
                let rate = node_rates.backends.get(&(key.clone(), (b.address, b.port)));
                add(
                    format!("{}:{}", b.address, b.port),
                    rate,
                    b.counts.active_connections,
                );
            }
        }
    }
    totals
}

fn render(totals: &Totals, namespace: Option<&str>, nodes: usize) -> String {
    let mut out = format!(
        "{nodes} node(s); rates between each node's last two reports\n\
         {:<32} {:<26} {:>10} {:>12} {:>11} {:>8}\n",
        "SERVICE / BACKEND", "VIP:PORT", "PACKETS/S", "BYTES/S", "NEW FLOWS/S", "ACTIVE"
    );
    let wanted = |row: &Row| namespace.is_none_or(|ns| row.service.split('/').next() == Some(ns));
    for (row, (rate, active)) in totals.iter().filter(|(row, _)| wanted(row)) {
        let (name, vip) = if row.backend.is_empty() {
            (row.service.clone(), row.vip.as_str())
        } else {
            (format!("  {}", row.backend), "")
        };
        out.push_str(&format!(
            "{name:<32} {vip:<26} {:>10.1} {:>12.0} {:>11.1} {active:>8}\n",
            rate.packets, rate.bytes, rate.new_flows
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
        let totals = observe(&mut rates, &nodes, SystemTime::now());
        let table = render(&totals, args.namespace.as_deref(), nodes.len());
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

    use sluice_model::observe::{BackendCounters, FrontendCounters, TrafficCounts};
    use sluice_model::view::{FrontendKey, ServiceRef};

    fn traffic(packets: u64, active: u64) -> TrafficCounts {
        TrafficCounts {
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
            active_connections: active,
        }
    }

    fn node(name: &str, report: &str, packets: u64, backend_packets: u64) -> NodeInfo {
        NodeInfo {
            name: name.to_owned(),
            zone: String::new(),
            connected: true,
            applied_version: 0,
            desired_version: 0,
            last_report: Some(report.to_owned()),
            joined_at: String::new(),
            certificate_serial: String::new(),
            certificate_expires: String::new(),
            resource_version: 0,
            traffic: Vec::new(),
            policy: Vec::new(),
            reported: Some(at(report)),
            counters: vec![FrontendCounters {
                service: ServiceRef {
                    namespace: "shop".into(),
                    name: "web".into(),
                },
                key: FrontendKey {
                    vip: "198.18.0.10".parse().expect("ip"),
                    port: 80,
                    protocol: sluice_model::Protocol::Tcp,
                },
                counts: traffic(packets, 3),
                backends: vec![BackendCounters {
                    address: "198.19.0.2".parse().expect("ip"),
                    port: 8080,
                    counts: traffic(backend_packets, 3),
                }],
            }],
        }
    }

    fn service_row() -> Row {
        Row {
            service: "shop/web".to_owned(),
            vip: "198.18.0.10:80/TCP".to_owned(),
            backend: String::new(),
        }
    }

    fn at(rfc3339: &str) -> SystemTime {
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
            .expect("time")
            .into()
    }

    #[test]
    fn rates_come_from_each_nodes_own_report_times_and_sum_over_nodes() {
        let mut rates = Rates::default();
        let now = at("2026-11-30T12:00:01Z");
        let totals = observe(
            &mut rates,
            &[
                node("a", "2026-11-30T12:00:00Z", 1_000, 500),
                node("b", "2026-11-30T12:00:01Z", 0, 0),
            ],
            now,
        );
        assert_eq!(totals[&service_row()].0.packets, 0.0, "one report: no rate");
        assert_eq!(totals[&service_row()].1, 6, "open connections at once");
        // a reports 5 s later (+5,000 packets: 1,000/s), b 2 s later (+400: 200/s).
        let nodes = [
            node("a", "2026-11-30T12:00:05Z", 6_000, 3_000),
            node("b", "2026-11-30T12:00:03Z", 400, 0),
        ];
        let now = at("2026-11-30T12:00:05Z");
        let totals = observe(&mut rates, &nodes, now);
        let (rate, active) = totals[&service_row()];
        assert!((rate.packets - 1_200.0).abs() < 1e-6, "{rate:?}");
        assert!((rate.bytes - 120_000.0).abs() < 1e-6, "{rate:?}");
        assert!((rate.new_flows - 120.0).abs() < 1e-6, "{rate:?}");
        assert_eq!(active, 6);
        // Looked at again before anyone reported: the same rates, not zero.
        assert_eq!(
            observe(&mut rates, &nodes, now)[&service_row()],
            (rate, active)
        );
        let table = render(&totals, None, 2);
        assert!(table.contains("shop/web"), "{table}");
        assert!(table.contains("  198.19.0.2:8080"), "{table}");
        assert!(table.contains("1200.0"), "{table}");
        assert!(!render(&totals, Some("other"), 2).contains("shop/web"));
    }

    #[test]
    fn a_counter_reset_gives_no_rate_rather_than_a_huge_one() {
        let mut rates = Rates::default();
        observe(
            &mut rates,
            &[node("a", "2026-11-30T12:00:00Z", 1_000, 1_000)],
            at("2026-11-30T12:00:00Z"),
        );
        let totals = observe(
            &mut rates,
            &[node("a", "2026-11-30T12:00:05Z", 10, 10)],
            at("2026-11-30T12:00:05Z"),
        );
        assert_eq!(totals[&service_row()].0.packets, 0.0);
    }
}
