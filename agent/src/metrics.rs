//! The agent's Prometheus metrics (`GET /metrics`).
//!
//! The counters live in the kernel maps, which the run loop owns; a scrape
//! therefore asks the loop for a page (a message with a reply channel) and
//! the loop renders it between two events. Nothing is computed when nobody
//! scrapes. The page is read from the loop's state into a `Snapshot` and
//! encoded by prometheus-client's collector API in the Prometheus text
//! format 0.0.4 (a collector must own what it encodes).

use std::{collections::BTreeMap, fmt, net::SocketAddr};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
};
use sluice_common::reason;
use sluice_model::observe::PolicyCounter;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    maps::Maps,
    reconcile::State,
    status::{self, BackendReport, InterfaceReport, ServiceReport},
};

/// A rendered page (an encoder error answers 500).
pub type Page = Result<String, fmt::Error>;

/// A scrape waiting for its page.
pub type Scrape = oneshot::Sender<Page>;

/// Seconds, from 100 µs to 10 s: reconciles.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// What the run loop counts itself, beside the maps.
pub struct AgentStats {
    pub reconciles: Histogram,
    pub reconcile_errors: u64,
    pub flow_events_read: u64,
    /// Flow-log events dropped on the way to the control service.
    pub flow_events_unsent: u64,
}

impl Default for AgentStats {
    fn default() -> Self {
        Self {
            reconciles: Histogram::new(LATENCY_BOUNDS),
            reconcile_errors: 0,
            flow_events_read: 0,
            flow_events_unsent: 0,
        }
    }
}

/// Binds `addr` and serves scrapes from a task; the returned channel brings
/// them to the run loop.
pub async fn start(addr: SocketAddr) -> std::io::Result<mpsc::Receiver<Scrape>> {
    use axum::{http::StatusCode, http::header::CONTENT_TYPE, routing::get};
    use prometheus_client::encoding::prometheus_text;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(listen = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
    let (tx, rx) = mpsc::channel::<Scrape>(8);
    let page = move || {
        let tx = tx.clone();
        async move {
            let (reply, page) = oneshot::channel();
            let page = match tx.send(reply).await {
                Ok(()) => page.await.ok(),
                Err(_) => None,
            };
            match page {
                Some(Ok(text)) => (
                    StatusCode::OK,
                    [(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                    text,
                ),
                Some(Err(_)) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(CONTENT_TYPE, "text/plain")],
                    "encoding failed\n".to_owned(),
                ),
                // The run loop is gone.
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(CONTENT_TYPE, "text/plain")],
                    "shutting down\n".to_owned(),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "metrics are served at /metrics\n") });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(rx)
}

/// What the maps were last made to match.
#[derive(Clone, Copy, Debug)]
pub enum Applied {
    /// A joined node: the control service's view version.
    View(u64),
    /// A standalone agent: the manifest's content hash (`None` before any).
    Manifest(Option<u64>),
}

/// Everything the page is made of, borrowed from the run loop.
pub struct Sources<'a> {
    pub maps: &'a Maps,
    pub state: &'a State,
    pub interfaces: Vec<InterfaceReport>,
    pub applied: Applied,
    pub stats: &'a AgentStats,
    pub flow_events_lost: u64,
    pub policy_counters: Vec<PolicyCounter>,
}

pub fn render(sources: &Sources<'_>) -> Page {
    let services = status::services(sources.maps, sources.state).unwrap_or_else(|e| {
        warn!("metrics: reading service counters: {e}");
        Vec::new()
    });
    let outcomes = sources.maps.outcomes().unwrap_or_else(|e| {
        warn!("metrics: reading outcomes: {e}");
        Default::default()
    });
    let stats = sources.stats;
    encode(Snapshot {
        services,
        outcomes,
        policy_counters: sources
            .policy_counters
            .iter()
            .map(|c| PolicyCount {
                counter: c.counts.to_string(),
                allowed: c.allowed,
                denied: c.denied,
            })
            .collect(),
        // The kernel's own switch, not a guess from the view.
        enforcing: sources
            .maps
            .policy_state
            .get(&0, 0)
            .is_ok_and(|state| state.enabled != 0),
        flows_tracked: sources.maps.flows.keys().count(),
        interfaces: sources
            .interfaces
            .iter()
            .map(|i| Interface {
                name: i.name.clone(),
                hook: i.hook,
                attached: i.attached,
                xdp_egress: i.xdp_egress,
            })
            .collect(),
        applied: sources.applied,
        reconciles: stats.reconciles.clone(),
        reconcile_errors: stats.reconcile_errors,
        flow_events_read: stats.flow_events_read,
        flow_events_unsent: stats.flow_events_unsent,
        flow_events_lost: sources.flow_events_lost,
    })
}

/// The page of one collector, in the text format 0.0.4.
fn encode(collector: impl Collector) -> Page {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut page = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut page, &registry)?;
    Ok(page)
}

/// One family: its HELP and TYPE lines, then a sample per label set.
/// Counters are named without `_total`: the encoder appends it.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// No labels.
const UNLABELLED: [(&str, &str); 0] = [];

#[derive(Debug)]
struct Interface {
    name: String,
    hook: &'static str,
    attached: bool,
    xdp_egress: bool,
}

/// A network-policy counter as the page labels it: what it counts, as
/// `sluicectl` and the dashboard spell it.
#[derive(Debug)]
struct PolicyCount {
    counter: String,
    allowed: u64,
    denied: u64,
}

/// What one page shows, owned: a collector is `'static`, the maps are the
/// run loop's.
#[derive(Debug)]
struct Snapshot {
    services: Vec<ServiceReport>,
    outcomes: BTreeMap<&'static str, u64>,
    policy_counters: Vec<PolicyCount>,
    enforcing: bool,
    flows_tracked: usize,
    interfaces: Vec<Interface>,
    applied: Applied,
    reconciles: Histogram,
    reconcile_errors: u64,
    flow_events_read: u64,
    flow_events_unsent: u64,
    flow_events_lost: u64,
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: u64) -> ConstGauge<u64> {
    ConstGauge::new(value)
}

/// The `direction` label.
type Direction = [(&'static str, &'static str); 1];

/// A sample per direction, `to_backend` first.
fn directions<L: Clone>(
    labels: L,
    to_backend: u64,
    to_client: u64,
) -> [((L, Direction), ConstCounter<u64>); 2] {
    [
        (
            (labels.clone(), [("direction", "to_backend")]),
            counter(to_backend),
        ),
        ((labels, [("direction", "to_client")]), counter(to_client)),
    ]
}

/// A service's label values, formatted once per page.
struct Labelled<'a> {
    service: &'a ServiceReport,
    vip: String,
    port: String,
    backends: Vec<(String, &'a BackendReport)>,
}

impl Labelled<'_> {
    fn service(&self) -> [(&'static str, &str); 4] {
        [
            ("service", self.service.name.as_str()),
            ("vip", self.vip.as_str()),
            ("port", self.port.as_str()),
            ("protocol", self.service.protocol),
        ]
    }

    /// Each backend's labels (the service's and `backend`), with the backend.
    fn backends(&self) -> impl Iterator<Item = ([(&'static str, &str); 5], &BackendReport)> {
        let [service, vip, port, protocol] = self.service();
        self.backends.iter().map(move |(address, b)| {
            (
                [service, vip, port, protocol, ("backend", address.as_str())],
                *b,
            )
        })
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.services(&mut encoder)?;
        self.datapath(&mut encoder)?;
        self.programs(&mut encoder)?;
        self.agent(&mut encoder)
    }
}

impl Snapshot {
    fn services(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let labelled: Vec<_> = self
            .services
            .iter()
            .map(|s| Labelled {
                service: s,
                vip: s.vip.to_string(),
                port: s.port.to_string(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| (format!("{}:{}", b.address, b.port), b))
                    .collect(),
            })
            .collect();
        let backends = || labelled.iter().flat_map(Labelled::backends);
        family(
            e,
            "sluice_service_packets",
            "Packets balanced for a service port, by direction.",
            labelled.iter().flat_map(|l| {
                let stats = &l.service.stats;
                directions(l.service(), stats.packets_in, stats.packets_out)
            }),
        )?;
        family(
            e,
            "sluice_service_bytes",
            "Bytes balanced for a service port, by direction (IP packet length).",
            labelled.iter().flat_map(|l| {
                let stats = &l.service.stats;
                directions(l.service(), stats.bytes_in, stats.bytes_out)
            }),
        )?;
        family(
            e,
            "sluice_service_new_flows",
            "Flows opened to a service port.",
            labelled
                .iter()
                .map(|l| (l.service(), counter(l.service.stats.new_flows))),
        )?;
        family(
            e,
            "sluice_service_active_connections",
            "Open connections of a service port (all its backends).",
            labelled.iter().map(|l| {
                let open = l.service.backends.iter().map(|b| b.active_connections);
                (l.service(), gauge(open.sum()))
            }),
        )?;
        family(
            e,
            "sluice_backend_packets",
            "Packets balanced to and from a backend, by direction.",
            backends().flat_map(|(labels, b)| {
                directions(labels, b.stats.packets_in, b.stats.packets_out)
            }),
        )?;
        family(
            e,
            "sluice_backend_bytes",
            "Bytes balanced to and from a backend, by direction.",
            backends()
                .flat_map(|(labels, b)| directions(labels, b.stats.bytes_in, b.stats.bytes_out)),
        )?;
        family(
            e,
            "sluice_backend_new_flows",
            "Flows opened to a backend.",
            backends().map(|(labels, b)| (labels, counter(b.stats.new_flows))),
        )?;
        family(
            e,
            "sluice_backend_active_connections",
            "Open connections to a backend.",
            backends().map(|(labels, b)| (labels, gauge(b.active_connections))),
        )?;
        family(
            e,
            "sluice_backend_weight",
            "A backend's weight as programmed (0: no new flows: draining, unhealthy or no rollout share).",
            backends().map(|(labels, b)| (labels, gauge(b.weight.into()))),
        )
    }

    fn datapath(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        family(
            e,
            "sluice_datapath_packets",
            "Packets the data plane saw, by what became of them (see ebpf/common/src/reason.rs).",
            self.outcomes
                .iter()
                .map(|(outcome, count)| ([("outcome", *outcome)], counter(*count))),
        )?;
        family(
            e,
            "sluice_dropped_packets",
            "Packets to a VIP the data plane dropped, by reason.",
            reason::NAMES
                .iter()
                .filter(|n| n.starts_with("drop_"))
                .map(|name| {
                    let count = self.outcomes.get(name).copied().unwrap_or(0);
                    (
                        [("reason", name.trim_start_matches("drop_"))],
                        counter(count),
                    )
                }),
        )?;
        family(
            e,
            "sluice_policy_verdicts",
            "New flows network policy allowed or denied, per counter (what counted them).",
            self.policy_counters.iter().flat_map(|c| {
                [
                    (
                        [("counter", c.counter.as_str()), ("verdict", "allowed")],
                        counter(c.allowed),
                    ),
                    (
                        [("counter", c.counter.as_str()), ("verdict", "denied")],
                        counter(c.denied),
                    ),
                ]
            }),
        )?;
        family(
            e,
            "sluice_policy_enforcing",
            "1 when a network policy is installed in the data plane.",
            [(UNLABELLED, gauge(self.enforcing.into()))],
        )?;
        family(
            e,
            "sluice_flows_tracked",
            "Entries in the connection table (client to VIP direction).",
            [(UNLABELLED, gauge(self.flows_tracked as u64))],
        )
    }

    fn programs(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        family(
            e,
            "sluice_program_attached",
            "1 when the data plane's program is attached to the interface at the hook.",
            self.interfaces.iter().map(|i| {
                (
                    [("interface", i.name.as_str()), ("hook", i.hook)],
                    gauge(i.attached.into()),
                )
            }),
        )?;
        family(
            e,
            "sluice_xdp_redirect_target",
            "1 when XDP may redirect into the interface (it takes redirected frames).",
            self.interfaces
                .iter()
                .map(|i| ([("interface", i.name.as_str())], gauge(i.xdp_egress.into()))),
        )
    }

    fn agent(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        family(
            e,
            "sluice_reconcile_duration_seconds",
            "Time to plan and write one desired state into the maps.",
            [(UNLABELLED, self.reconciles.clone())],
        )?;
        family(
            e,
            "sluice_reconcile_errors",
            "Desired states that could not be applied (the maps kept the previous one).",
            [(UNLABELLED, counter(self.reconcile_errors))],
        )?;
        match self.applied {
            Applied::View(version) => family(
                e,
                "sluice_view_applied_version",
                "The control service's view version this node last programmed.",
                [(UNLABELLED, gauge(version))],
            )?,
            Applied::Manifest(hash) => {
                let hash = hash.map(|hash| format!("{hash:016x}"));
                family(
                    e,
                    "sluice_manifest_applied_info",
                    "The manifest content applied (hash label).",
                    hash.iter()
                        .map(|hash| ([("hash", hash.as_str())], gauge(1))),
                )?
            }
        }
        family(
            e,
            "sluice_flow_events",
            "Flow-log events read from the data plane.",
            [(UNLABELLED, counter(self.flow_events_read))],
        )?;
        family(
            e,
            "sluice_flow_events_lost",
            "Flow-log events lost: the kernel ring was full, or the agent could not keep up with sending.",
            [
                ([("where", "kernel")], counter(self.flow_events_lost)),
                ([("where", "agent")], counter(self.flow_events_unsent)),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::status::Traffic;

    fn snapshot(applied: Applied) -> Snapshot {
        let reconciles = Histogram::new([0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            reconciles.observe(v);
        }
        let traffic = |packets_in, packets_out| Traffic {
            packets_in,
            packets_out,
            bytes_in: packets_in * 100,
            bytes_out: packets_out * 1000,
            new_flows: 3,
            ..Default::default()
        };
        Snapshot {
            services: vec![ServiceReport {
                name: "a\"b\\c\nd".to_owned(),
                vip: Ipv4Addr::new(198, 18, 0, 10),
                port: 80,
                protocol: "TCP",
                target_port: 8080,
                algorithm: "round_robin",
                session_affinity_seconds: None,
                stats: traffic(7, 5),
                backends: vec![BackendReport {
                    id: 1,
                    address: Ipv4Addr::new(198, 19, 0, 11),
                    port: 8080,
                    weight: 2,
                    state: "active",
                    active_connections: 1,
                    stats: traffic(7, 5),
                }],
            }],
            outcomes: [("pass_not_vip", 11), ("drop_no_backend", 2)].into(),
            policy_counters: vec![PolicyCount {
                counter: "default/p ingress 0".to_owned(),
                allowed: 4,
                denied: 1,
            }],
            enforcing: true,
            flows_tracked: 9,
            interfaces: vec![Interface {
                name: "eth0".to_owned(),
                hook: "xdp",
                attached: true,
                xdp_egress: false,
            }],
            applied,
            reconciles,
            reconcile_errors: 0,
            flow_events_read: 12,
            flow_events_unsent: 1,
            flow_events_lost: 0,
        }
    }

    fn page(applied: Applied) -> String {
        encode(snapshot(applied)).expect("encodes")
    }

    #[test]
    fn families_samples_and_escaping_follow_the_text_format() {
        let text = page(Applied::View(4));
        let service = r#"service="a\"b\\c\nd",vip="198.18.0.10",port="80",protocol="TCP""#;
        for expected in [
            "# HELP sluice_service_packets_total Packets balanced for a service port, by direction.\n\
             # TYPE sluice_service_packets_total counter\n"
                .to_owned(),
            format!("sluice_service_packets_total{{{service},direction=\"to_backend\"}} 7\n"),
            format!("sluice_service_packets_total{{{service},direction=\"to_client\"}} 5\n"),
            format!("sluice_service_bytes_total{{{service},direction=\"to_client\"}} 5000\n"),
            "# TYPE sluice_service_active_connections gauge\n".to_owned(),
            format!("sluice_service_active_connections{{{service}}} 1\n"),
            format!(
                "sluice_backend_weight{{{service},backend=\"198.19.0.11:8080\"}} 2\n"
            ),
            "sluice_datapath_packets_total{outcome=\"drop_no_backend\"} 2\n".to_owned(),
            "sluice_dropped_packets_total{reason=\"no_backend\"} 2\n".to_owned(),
            "sluice_policy_verdicts_total{counter=\"default/p ingress 0\",verdict=\"denied\"} 1\n"
                .to_owned(),
            "\nsluice_policy_enforcing 1\n".to_owned(),
            "\nsluice_flows_tracked 9\n".to_owned(),
            "sluice_program_attached{interface=\"eth0\",hook=\"xdp\"} 1\n".to_owned(),
            "sluice_xdp_redirect_target{interface=\"eth0\"} 0\n".to_owned(),
            "# TYPE sluice_reconcile_errors_total counter\nsluice_reconcile_errors_total 0\n"
                .to_owned(),
            "# TYPE sluice_view_applied_version gauge\nsluice_view_applied_version 4\n".to_owned(),
            "sluice_flow_events_total 12\n".to_owned(),
            "sluice_flow_events_lost_total{where=\"kernel\"} 0\n\
             sluice_flow_events_lost_total{where=\"agent\"} 1\n"
                .to_owned(),
        ] {
            assert!(text.contains(&expected), "{expected:?} not in\n{text}");
        }
        assert!(!text.contains("manifest"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        // Each family once, in the order the page always had.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(families.len(), 21, "{families:?}");
        assert_eq!(families[0], "sluice_service_packets_total counter");
        assert_eq!(families[20], "sluice_flow_events_lost_total counter");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let text = page(Applied::View(4));
        assert!(
            text.contains(
                "# TYPE sluice_reconcile_duration_seconds histogram\n\
                 sluice_reconcile_duration_seconds_bucket{le=\"0.1\"} 1\n\
                 sluice_reconcile_duration_seconds_bucket{le=\"1\"} 3\n\
                 sluice_reconcile_duration_seconds_bucket{le=\"+Inf\"} 4\n\
                 sluice_reconcile_duration_seconds_sum 6.25\n\
                 sluice_reconcile_duration_seconds_count 4\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_standalone_agent_shows_the_manifest_it_applied() {
        let none = page(Applied::Manifest(None));
        assert!(
            none.contains("# TYPE sluice_manifest_applied_info gauge\n# HELP sluice_flow_events"),
            "{none}"
        );
        let some = page(Applied::Manifest(Some(0xab)));
        assert!(
            some.contains("sluice_manifest_applied_info{hash=\"00000000000000ab\"} 1\n"),
            "{some}"
        );
        assert!(!some.contains("sluice_view_applied_version"), "{some}");
    }
}
