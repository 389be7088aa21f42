//! The agent's Prometheus metrics (`GET /metrics`).
//!
//! The counters live in the kernel maps, which the run loop owns; a scrape
//! therefore asks the loop for a page (a message with a reply channel) and
//! the loop renders it between two events. Nothing is computed when nobody
//! scrapes.

use std::net::SocketAddr;

use sluice_api::{
    metrics::{Exposition, Histogram, Kind},
    v1,
};
use sluice_common::reason;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::{
    maps::Maps,
    reconcile::State,
    status::{self, InterfaceReport},
};

/// A scrape waiting for its page.
pub type Scrape = oneshot::Sender<String>;

/// What the run loop counts itself, beside the maps.
#[derive(Default)]
pub struct AgentStats {
    pub reconciles: Histogram,
    pub reconcile_errors: u64,
    pub flow_events_read: u64,
    /// Flow-log events dropped on the way to the control service.
    pub flow_events_unsent: u64,
}

/// Binds `addr` and serves scrapes from a task; the returned channel brings
/// them to the run loop.
pub async fn start(addr: SocketAddr) -> std::io::Result<mpsc::Receiver<Scrape>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(listen = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
    let (tx, rx) = mpsc::channel::<Scrape>(8);
    tokio::spawn(async move {
        let render = move || {
            let tx = tx.clone();
            async move {
                let (reply, page) = oneshot::channel();
                tx.send(reply).await.ok()?;
                page.await.ok()
            }
        };
        if let Err(e) = sluice_api::metrics::serve(listener, render).await {
            warn!("metrics server stopped: {e}");
        }
    });
    Ok(rx)
}

/// What the maps were last made to match.
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
    pub policy_counters: Vec<v1::PolicyCounter>,
}

pub fn render(sources: &Sources<'_>) -> String {
    let mut page = Exposition::default();
    services(&mut page, sources);
    datapath(&mut page, sources);
    programs(&mut page, &sources.interfaces);
    agent(&mut page, sources);
    page.finish()
}

fn services(page: &mut Exposition, sources: &Sources<'_>) {
    let services = match status::services(sources.maps, sources.state) {
        Ok(services) => services,
        Err(e) => {
            warn!("metrics: reading service counters: {e}");
            Vec::new()
        }
    };
    // Label sets, computed once per service and backend.
    let labelled: Vec<_> = services
        .iter()
        .map(|s| {
            let port = s.port.to_string();
            let backends: Vec<_> = s
                .backends
                .iter()
                .map(|b| (format!("{}:{}", b.address, b.port), b))
                .collect();
            (s, s.vip.to_string(), port, backends)
        })
        .collect();
    macro_rules! service_labels {
        ($s:expr, $vip:expr, $port:expr) => {
            [
                ("service", $s.name.as_str()),
                ("vip", $vip.as_str()),
                ("port", $port.as_str()),
                ("protocol", $s.protocol),
            ]
        };
    }
    let directions = |page: &mut Exposition, name: &str, labels: &[(&str, &str)], fwd, rev| {
        let mut with = labels.to_vec();
        with.push(("direction", "to_backend"));
        page.sample(name, &with, fwd as f64);
        with.pop();
        with.push(("direction", "to_client"));
        page.sample(name, &with, rev as f64);
    };

    page.family(
        "sluice_service_packets_total",
        "Packets balanced for a service port, by direction.",
        Kind::Counter,
    );
    for (s, vip, port, _) in &labelled {
        let labels = service_labels!(s, vip, port);
        directions(
            page,
            "sluice_service_packets_total",
            &labels,
            s.stats.packets_in,
            s.stats.packets_out,
        );
    }
    page.family(
        "sluice_service_bytes_total",
        "Bytes balanced for a service port, by direction (IP packet length).",
        Kind::Counter,
    );
    for (s, vip, port, _) in &labelled {
        let labels = service_labels!(s, vip, port);
        directions(
            page,
            "sluice_service_bytes_total",
            &labels,
            s.stats.bytes_in,
            s.stats.bytes_out,
        );
    }
    page.family(
        "sluice_service_new_flows_total",
        "Flows opened to a service port.",
        Kind::Counter,
    );
    for (s, vip, port, _) in &labelled {
        page.sample(
            "sluice_service_new_flows_total",
            &service_labels!(s, vip, port),
            s.stats.new_flows as f64,
        );
    }
    page.family(
        "sluice_service_active_connections",
        "Open connections of a service port (all its backends).",
        Kind::Gauge,
    );
    for (s, vip, port, _) in &labelled {
        let open: u64 = s.backends.iter().map(|b| b.active_connections).sum();
        page.sample(
            "sluice_service_active_connections",
            &service_labels!(s, vip, port),
            open as f64,
        );
    }

    macro_rules! backend_family {
        ($name:expr, $help:expr, $kind:expr, |$b:ident, $labels:ident| $body:expr) => {
            page.family($name, $help, $kind);
            for (s, vip, port, backends) in &labelled {
                for (address, $b) in backends {
                    let $labels = [
                        ("service", s.name.as_str()),
                        ("vip", vip.as_str()),
                        ("port", port.as_str()),
                        ("protocol", s.protocol),
                        ("backend", address.as_str()),
                    ];
                    $body;
                }
            }
        };
    }
    backend_family!(
        "sluice_backend_packets_total",
        "Packets balanced to and from a backend, by direction.",
        Kind::Counter,
        |b, labels| directions(
            page,
            "sluice_backend_packets_total",
            &labels,
            b.stats.packets_in,
            b.stats.packets_out
        )
    );
    backend_family!(
        "sluice_backend_bytes_total",
        "Bytes balanced to and from a backend, by direction.",
        Kind::Counter,
        |b, labels| directions(
            page,
            "sluice_backend_bytes_total",
            &labels,
            b.stats.bytes_in,
            b.stats.bytes_out
        )
    );
    backend_family!(
        "sluice_backend_new_flows_total",
        "Flows opened to a backend.",
        Kind::Counter,
        |b, labels| page.sample(
            "sluice_backend_new_flows_total",
            &labels,
            b.stats.new_flows as f64
        )
    );
    backend_family!(
        "sluice_backend_active_connections",
        "Open connections to a backend.",
        Kind::Gauge,
        |b, labels| page.sample(
            "sluice_backend_active_connections",
            &labels,
            b.active_connections as f64
        )
    );
    backend_family!(
        "sluice_backend_weight",
        "A backend's weight as programmed (0: no new flows: draining, unhealthy or no rollout share).",
        Kind::Gauge,
        |b, labels| page.sample("sluice_backend_weight", &labels, b.weight as f64)
    );
}

fn datapath(page: &mut Exposition, sources: &Sources<'_>) {
    let outcomes = sources.maps.outcomes().unwrap_or_else(|e| {
        warn!("metrics: reading outcomes: {e}");
        Default::default()
    });
    page.family(
        "sluice_datapath_packets_total",
        "Packets the data plane saw, by what became of them (see ebpf/common/src/reason.rs).",
        Kind::Counter,
    );
    for (outcome, count) in &outcomes {
        page.sample(
            "sluice_datapath_packets_total",
            &[("outcome", outcome)],
            *count as f64,
        );
    }
    page.family(
        "sluice_dropped_packets_total",
        "Packets to a VIP the data plane dropped, by reason.",
        Kind::Counter,
    );
    for name in reason::NAMES.iter().filter(|n| n.starts_with("drop_")) {
        let count = outcomes.get(name).copied().unwrap_or(0);
        let why = name.trim_start_matches("drop_");
        page.sample(
            "sluice_dropped_packets_total",
            &[("reason", why)],
            count as f64,
        );
    }
    page.family(
        "sluice_policy_verdicts_total",
        "New flows network policy allowed or denied, per counter (what counted them).",
        Kind::Counter,
    );
    for c in &sources.policy_counters {
        page.sample(
            "sluice_policy_verdicts_total",
            &[("counter", &c.counts), ("verdict", "allowed")],
            c.allowed as f64,
        );
        page.sample(
            "sluice_policy_verdicts_total",
            &[("counter", &c.counts), ("verdict", "denied")],
            c.denied as f64,
        );
    }
    page.family(
        "sluice_policy_enforcing",
        "1 when a network policy is installed in the data plane.",
        Kind::Gauge,
    );
    // The kernel's own switch, not a guess from the view.
    let enforcing = sources
        .maps
        .policy_state
        .get(&0, 0)
        .is_ok_and(|state| state.enabled != 0);
    page.sample(
        "sluice_policy_enforcing",
        &[],
        f64::from(u8::from(enforcing)),
    );
    page.family(
        "sluice_flows_tracked",
        "Entries in the connection table (client to VIP direction).",
        Kind::Gauge,
    );
    page.sample(
        "sluice_flows_tracked",
        &[],
        sources.maps.flows.keys().count() as f64,
    );
}

fn programs(page: &mut Exposition, interfaces: &[InterfaceReport]) {
    page.family(
        "sluice_program_attached",
        "1 when the data plane's program is attached to the interface at the hook.",
        Kind::Gauge,
    );
    for i in interfaces {
        page.sample(
            "sluice_program_attached",
            &[("interface", &i.name), ("hook", i.hook)],
            f64::from(u8::from(i.attached)),
        );
    }
    page.family(
        "sluice_xdp_redirect_target",
        "1 when XDP may redirect into the interface (it takes redirected frames).",
        Kind::Gauge,
    );
    for i in interfaces {
        page.sample(
            "sluice_xdp_redirect_target",
            &[("interface", &i.name)],
            f64::from(u8::from(i.xdp_egress)),
        );
    }
}

fn agent(page: &mut Exposition, sources: &Sources<'_>) {
    let stats = sources.stats;
    page.family(
        "sluice_reconcile_duration_seconds",
        "Time to plan and write one desired state into the maps.",
        Kind::Histogram,
    );
    page.histogram("sluice_reconcile_duration_seconds", &[], &stats.reconciles);
    page.family(
        "sluice_reconcile_errors_total",
        "Desired states that could not be applied (the maps kept the previous one).",
        Kind::Counter,
    );
    page.sample(
        "sluice_reconcile_errors_total",
        &[],
        stats.reconcile_errors as f64,
    );
    match sources.applied {
        Applied::View(version) => {
            page.family(
                "sluice_view_applied_version",
                "The control service's view version this node last programmed.",
                Kind::Gauge,
            );
            page.sample("sluice_view_applied_version", &[], version as f64);
        }
        Applied::Manifest(hash) => {
            page.family(
                "sluice_manifest_applied_info",
                "The manifest content applied (hash label).",
                Kind::Gauge,
            );
            if let Some(hash) = hash {
                let hash = format!("{hash:016x}");
                page.sample("sluice_manifest_applied_info", &[("hash", &hash)], 1.0);
            }
        }
    }
    page.family(
        "sluice_flow_events_total",
        "Flow-log events read from the data plane.",
        Kind::Counter,
    );
    page.sample(
        "sluice_flow_events_total",
        &[],
        stats.flow_events_read as f64,
    );
    page.family(
        "sluice_flow_events_lost_total",
        "Flow-log events lost: the kernel ring was full, or the agent could not keep up with sending.",
        Kind::Counter,
    );
    page.sample(
        "sluice_flow_events_lost_total",
        &[("where", "kernel")],
        sources.flow_events_lost as f64,
    );
    page.sample(
        "sluice_flow_events_lost_total",
        &[("where", "agent")],
        stats.flow_events_unsent as f64,
    );
}
