//! Live rates from the counters agents report, for the dashboard (server
//! side) and `sluicectl top` (from `get nodes`).
//!
//! Agents report cumulative counters (packets, bytes, new flows per frontend
//! and backend, summed over CPUs) with each status report. A rate is the
//! difference between a node's last two reports over the time between them,
//! kept per node so that nodes reporting at different moments do not mix. A
//! counter that went down (its map was recreated) counts as no traffic
//! rather than a huge negative rate, and a node that stopped reporting
//! contributes nothing after [`STALE_AFTER`] report intervals.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use std::net::IpAddr;

use sluice_model::observe::{FrontendCounters, TrafficCounts};
use sluice_model::view::{FrontendKey as Port, ServiceRef};

/// A node's rates are dropped once its last report is older than this many
/// of its report intervals (it went away, or its agent is stuck), and not
/// before [`STALE_FLOOR`].
pub const STALE_AFTER: u32 = 3;
pub const STALE_FLOOR: Duration = Duration::from_secs(5);
/// Agents also report at once after each view update: a report this soon
/// after the previous one replaces it instead of starting a new window, so
/// that a rate is never taken over a few milliseconds.
pub const MIN_WINDOW: Duration = Duration::from_millis(500);

/// Per-second rates of one counter set.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
    pub new_flows: f64,
}

impl Rate {
    pub fn between(prev: &TrafficCounts, cur: &TrafficCounts, secs: f64) -> Self {
        let per_sec = |a: u64, b: u64| {
            if secs > 0.0 {
                b.saturating_sub(a) as f64 / secs
            } else {
                0.0
            }
        };
        Self {
            packets: per_sec(prev.packets, cur.packets),
            bytes: per_sec(prev.bytes, cur.bytes),
            new_flows: per_sec(prev.new_flows, cur.new_flows),
        }
    }

    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
    }
}

/// One report's counters.
#[derive(Clone, Debug)]
struct Sample {
    at: SystemTime,
    counters: Vec<FrontendCounters>,
}

/// A frontend: its service and its port.
pub type FrontendKey = (ServiceRef, Port);
/// A backend of a frontend: (address, port).
pub type BackendKey = (IpAddr, u16);

/// The rates of one node, by frontend and backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRates {
    pub frontends: BTreeMap<FrontendKey, Rate>,
    pub backends: BTreeMap<(FrontendKey, BackendKey), Rate>,
}

fn frontend_key(c: &FrontendCounters) -> FrontendKey {
    (c.service.clone(), c.key)
}

/// The last two reports of every node.
#[derive(Debug, Default)]
pub struct Rates {
    nodes: BTreeMap<String, (Option<Sample>, Sample)>,
}

impl Rates {
    /// Takes in `node`'s report made at `at` (once per report: the same
    /// report seen again changes nothing).
    pub fn observe(&mut self, node: &str, at: SystemTime, counters: &[FrontendCounters]) {
        let sample = Sample {
            at,
            counters: counters.to_vec(),
        };
        match self.nodes.get_mut(node) {
            Some((_, cur)) if cur.at == at => {}
            Some((Some(_), cur)) if at.duration_since(cur.at).is_ok_and(|gap| gap < MIN_WINDOW) => {
                *cur = sample;
            }
            Some((prev, cur)) => *prev = Some(std::mem::replace(cur, sample)),
            None => {
                self.nodes.insert(node.to_owned(), (None, sample));
            }
        }
    }

    /// Forgets nodes that are not in `nodes` any more.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.nodes.retain(|name, _| keep(name));
    }

    /// `node`'s rates as of `now`; empty until it reported twice, and once
    /// it has been silent for [`STALE_AFTER`] of its intervals.
    pub fn node(&self, node: &str, now: SystemTime) -> NodeRates {
        let mut out = NodeRates::default();
        let Some((Some(prev), cur)) = self.nodes.get(node) else {
            return out;
        };
        let Ok(interval) = cur.at.duration_since(prev.at) else {
            return out;
        };
        let age = now.duration_since(cur.at).unwrap_or_default();
        if interval.is_zero() || age > (interval * STALE_AFTER).max(STALE_FLOOR) {
            return out;
        }
        let secs = interval.as_secs_f64();
        let before: BTreeMap<FrontendKey, &FrontendCounters> =
            prev.counters.iter().map(|c| (frontend_key(c), c)).collect();
        let zero = TrafficCounts::default();
        for c in &cur.counters {
            let key = frontend_key(c);
            // A frontend new since the last report starts from zero.
            let old = before.get(&key);
            let old_total = old.map_or(&zero, |o| &o.counts);
            out.frontends
                .insert(key.clone(), Rate::between(old_total, &c.counts, secs));
            let old_backends: BTreeMap<BackendKey, &TrafficCounts> = old
                .into_iter()
                .flat_map(|o| &o.backends)
                .map(|ob| ((ob.address, ob.port), &ob.counts))
                .collect();
            for b in &c.backends {
                let old_b = old_backends
                    .get(&(b.address, b.port))
                    .copied()
                    .unwrap_or(&zero);
                out.backends.insert(
                    (key.clone(), (b.address, b.port)),
                    Rate::between(old_b, &b.counts, secs),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use sluice_model::Protocol;
    use sluice_model::observe::BackendCounters;

    fn traffic(packets: u64, bytes: u64, new_flows: u64) -> TrafficCounts {
        TrafficCounts {
            packets,
            bytes,
            new_flows,
            active_connections: 0,
        }
    }

    fn report(total: (u64, u64, u64), backend: (u64, u64, u64)) -> Vec<FrontendCounters> {
        let (service, key) = key();
        vec![FrontendCounters {
            service,
            key,
            counts: traffic(total.0, total.1, total.2),
            backends: vec![BackendCounters {
                address: backend_address(),
                port: 8080,
                counts: traffic(backend.0, backend.1, backend.2),
            }],
        }]
    }

    fn backend_address() -> IpAddr {
        "198.19.0.11".parse().expect("ip")
    }

    fn key() -> FrontendKey {
        (
            ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            },
            Port {
                vip: "198.18.100.1".parse().expect("ip"),
                port: 80,
                protocol: Protocol::Tcp,
            },
        )
    }

    #[test]
    fn rates_are_deltas_over_the_time_between_two_reports() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut rates = Rates::default();
        rates.observe("node-1", t0, &report((100, 10_000, 10), (50, 5_000, 5)));
        // One report: no rate yet.
        assert_eq!(rates.node("node-1", t0), NodeRates::default());
        let t1 = t0 + Duration::from_secs(2);
        rates.observe("node-1", t1, &report((300, 30_000, 30), (150, 9_000, 13)));
        // The same report seen again changes nothing.
        rates.observe("node-1", t1, &report((300, 30_000, 30), (150, 9_000, 13)));
        let r = rates.node("node-1", t1 + Duration::from_secs(1));
        assert_eq!(
            r.frontends[&key()],
            Rate {
                packets: 100.0,
                bytes: 10_000.0,
                new_flows: 10.0
            }
        );
        assert_eq!(
            r.backends[&(key(), (backend_address(), 8080))],
            Rate {
                packets: 50.0,
                bytes: 2_000.0,
                new_flows: 4.0
            }
        );
        // Silent for more than three intervals (and the floor): no rate.
        assert!(
            !rates
                .node("node-1", t1 + Duration::from_secs(5))
                .frontends
                .is_empty()
        );
        assert!(
            rates
                .node("node-1", t1 + Duration::from_secs(7))
                .frontends
                .is_empty()
        );
        assert!(rates.node("node-2", t1).frontends.is_empty());
    }

    #[test]
    fn a_report_right_after_another_extends_the_window() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut rates = Rates::default();
        rates.observe("n", t0, &report((0, 0, 0), (0, 0, 0)));
        let t1 = t0 + Duration::from_secs(1);
        rates.observe("n", t1, &report((100, 1_000, 10), (100, 1_000, 10)));
        // 50 ms later (a report after a view update): one window of 1.05 s.
        let t2 = t1 + Duration::from_millis(50);
        rates.observe("n", t2, &report((105, 1_050, 10), (105, 1_050, 10)));
        let r = rates.node("n", t2).frontends[&key()];
        assert!((r.packets - 100.0).abs() < 1e-9, "{r:?}");
        // The next regular report starts a new window from t2.
        let t3 = t2 + Duration::from_secs(1);
        rates.observe("n", t3, &report((205, 2_050, 20), (205, 2_050, 20)));
        assert_eq!(rates.node("n", t3).frontends[&key()].packets, 100.0);
    }

    #[test]
    fn a_counter_that_went_down_is_no_traffic_not_a_negative_rate() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut rates = Rates::default();
        rates.observe("n", t0, &report((500, 50_000, 50), (500, 50_000, 50)));
        let t1 = t0 + Duration::from_secs(1);
        rates.observe("n", t1, &report((20, 2_000, 2), (20, 2_000, 2)));
        assert_eq!(rates.node("n", t1).frontends[&key()], Rate::default());
        rates.retain(|n| n != "n");
        assert!(rates.node("n", t1).frontends.is_empty());
    }
}
