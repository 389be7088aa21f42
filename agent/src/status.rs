//! `sluice-agent status`: what the data plane is doing, read from the pinned
//! maps alone (it works whether or not the agent is running).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::Ipv4Addr,
};

use serde::Serialize;
use sluice_common::{
    layout::{LAYOUT_VERSION, MAX_INTERFACES, map},
    types::{
        BACKEND_DRAINING, BACKEND_RETIRED, IPPROTO_TCP, TrafficStats, algorithm, hook, name_str,
    },
};

use crate::{
    apply::{self, ApplyError},
    dataplane,
    maps::{Maps, MapsError},
    pins::{LinkKind, PinDir},
    reconcile::State,
    sys,
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no Sluice data plane in this network namespace ({dir} does not exist)")]
    NotRunning { dir: String },
    #[error(
        "the data plane in {dir} has layout version {found}, this agent reads {expected}: \
         use the agent that created it, or `sluice-agent down` to reset it"
    )]
    LayoutVersion {
        dir: String,
        found: u32,
        expected: u32,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub pin_dir: String,
    pub netns_cookie: u64,
    pub layout_version: u32,
    /// FNV-1a of the last manifest applied, hex.
    pub manifest_hash: String,
    /// Unix seconds of the last successful reconcile.
    pub applied_at: u64,
    pub interfaces: Vec<InterfaceReport>,
    pub services: Vec<ServiceReport>,
    /// Entries in the connection table.
    pub flows: usize,
    /// Per-reason outcome counters (see sluice_common::reason).
    pub outcomes: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct InterfaceReport {
    pub name: String,
    pub ifindex: u32,
    /// "xdp" (native XDP fast path + TC companion) or "tc".
    pub hook: &'static str,
    /// Whether the pinned links are attached to this interface.
    pub attached: bool,
    /// Whether XDP may redirect frames into this interface.
    pub xdp_egress: bool,
}

#[derive(Debug, Serialize)]
pub struct ServiceReport {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: &'static str,
    pub target_port: u16,
    pub algorithm: &'static str,
    /// Client-IP session affinity timeout; absent when off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_seconds: Option<u32>,
    pub stats: Traffic,
    pub backends: Vec<BackendReport>,
}

#[derive(Debug, Serialize)]
pub struct BackendReport {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// "active" (receives new flows) or "retired" (removed; its flows finish).
    pub state: &'static str,
    pub active_connections: u64,
    pub stats: Traffic,
}

/// Traffic counters; "in" is towards the backends, "out" the replies.
#[derive(Debug, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub new_flows: u64,
}

impl From<TrafficStats> for Traffic {
    fn from(s: TrafficStats) -> Self {
        Self {
            packets: s.fwd_packets + s.rev_packets,
            bytes: s.fwd_bytes + s.rev_bytes,
            packets_in: s.fwd_packets,
            bytes_in: s.fwd_bytes,
            packets_out: s.rev_packets,
            bytes_out: s.rev_bytes,
            new_flows: s.new_flows,
        }
    }
}

fn algorithm_name(value: u32) -> &'static str {
    match value {
        algorithm::ROUND_ROBIN => "round-robin",
        algorithm::WEIGHTED_ROUND_ROBIN => "weighted-round-robin",
        algorithm::LEAST_CONNECTIONS => "least-connections",
        algorithm::WEIGHTED_LEAST_CONNECTIONS => "weighted-least-connections",
        algorithm::MAGLEV => "maglev",
        _ => "unknown",
    }
}

fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// Reads the report from the data plane pinned in `pins`.
pub fn report(pins: &PinDir) -> Result<Report, StatusError> {
    if !pins.exists() {
        return Err(StatusError::NotRunning {
            dir: pins.path().display().to_string(),
        });
    }
    // Another layout's maps would fail to open (a missing map, another value
    // size) with an error that does not say why.
    if let Some(found) = dataplane::pinned_layout_version(pins)
        && found != LAYOUT_VERSION
    {
        return Err(StatusError::LayoutVersion {
            dir: pins.path().display().to_string(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    let maps = Maps::open_pinned(pins.maps())?;
    let state = apply::read_state(&maps)?;
    let meta = maps.agent_meta.get(&0, 0).unwrap_or_default();

    let interfaces = interfaces(&maps, pins);
    let services = services(&maps, &state)?;

    Ok(Report {
        pin_dir: pins.path().display().to_string(),
        netns_cookie: meta.netns_cookie,
        layout_version: meta.layout_version,
        manifest_hash: format!("{:016x}", meta.manifest_hash),
        applied_at: meta.applied_at,
        interfaces,
        services,
        flows: maps.flows.keys().count(),
        outcomes: maps.outcomes()?,
    })
}

/// The interfaces the data plane serves, with their hook and whether its
/// program is attached (a live link pin).
pub fn interfaces(maps: &Maps, pins: &PinDir) -> Vec<InterfaceReport> {
    let mut interfaces = Vec::new();
    let links = pins.link_pins().unwrap_or_default();
    for slot in 0..MAX_INTERFACES {
        let Ok(m) = maps.iface_meta.get(&slot, 0) else {
            continue;
        };
        if m.ifindex == 0 {
            continue;
        }
        // The hook's own link (an XDP interface also has its TC companion).
        let kind = if m.hook == hook::XDP {
            LinkKind::Xdp
        } else {
            LinkKind::Tc
        };
        let attached = links
            .iter()
            .filter(|p| p.ifindex == m.ifindex && p.kind == kind)
            .any(|p| link_live(&p.path, m.ifindex));
        interfaces.push(InterfaceReport {
            name: name_str(&m.name).to_string(),
            ifindex: m.ifindex,
            hook: if m.hook == hook::XDP { "xdp" } else { "tc" },
            attached,
            xdp_egress: maps.xdp_egress.get(m.ifindex, 0).is_ok(),
        });
    }

    interfaces
}

/// Services and backends with their counters, from open maps and the state
/// read from them.
pub fn services(maps: &Maps, state: &State) -> Result<Vec<ServiceReport>, StatusError> {
    // Grouped once: services × backends would be quadratic at cluster scale.
    let mut by_frontend: HashMap<u32, Vec<_>> = HashMap::new();
    for (id, b) in &state.backends {
        by_frontend.entry(b.frontend_id).or_default().push((*id, b));
    }
    let mut services = Vec::new();
    for (key, f) in &state.frontends {
        let stats = Maps::traffic(&maps.frontend_stats, f.frontend.id, map::FRONTEND_STATS)?;
        let mut backends = Vec::new();
        for &(id, b) in by_frontend.get(&f.frontend.id).into_iter().flatten() {
            backends.push(BackendReport {
                id,
                address: ip(b.addr[0]),
                port: u16::from_be(b.port),
                weight: b.weight,
                state: if b.flags & BACKEND_RETIRED != 0 {
                    "retired"
                } else if b.flags & BACKEND_DRAINING != 0 {
                    "draining"
                } else if b.weight == 0 {
                    "no share"
                } else {
                    "active"
                },
                active_connections: maps.conns.get(id),
                stats: Maps::traffic(&maps.backend_stats, id, map::BACKEND_STATS)?.into(),
            });
        }
        services.push(ServiceReport {
            name: name_str(&f.meta.name).to_string(),
            vip: ip(key.vip),
            port: u16::from_be(key.port),
            protocol: if key.proto == IPPROTO_TCP {
                "TCP"
            } else {
                "UDP"
            },
            target_port: f.meta.target_port,
            algorithm: algorithm_name(f.frontend.algorithm),
            session_affinity_seconds: (f.frontend.affinity_timeout_s != 0)
                .then_some(f.frontend.affinity_timeout_s),
            stats: stats.into(),
            backends,
        });
    }
    services.sort_by(|a, b| (&a.name, a.port, a.protocol).cmp(&(&b.name, b.port, b.protocol)));

    Ok(services)
}

fn link_live(path: &std::path::Path, ifindex: u32) -> bool {
    sys::pinned_link_target(path).is_ok_and(|t| t.ifindex == ifindex)
}

/// Human-readable rendering.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "data plane   {}", report.pin_dir);
    let _ = writeln!(
        out,
        "manifest     {}  (applied at unix time {})",
        report.manifest_hash, report.applied_at
    );
    let _ = writeln!(out, "flows        {}", report.flows);
    let _ = writeln!(
        out,
        "\nINTERFACE        IFINDEX  HOOK  ATTACHED  XDP-EGRESS"
    );
    for i in &report.interfaces {
        let _ = writeln!(
            out,
            "{:<16} {:>7}  {:<4}  {:<8}  {}",
            i.name,
            i.ifindex,
            i.hook,
            yes_no(i.attached),
            yes_no(i.xdp_egress)
        );
    }
    for s in &report.services {
        let affinity = s
            .session_affinity_seconds
            .map(|t| format!("  client-IP affinity {t}s"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\nservice {}  {}:{}/{} -> :{}  {}{}  packets {}  bytes {}  flows {}",
            s.name,
            s.vip,
            s.port,
            s.protocol,
            s.target_port,
            s.algorithm,
            affinity,
            s.stats.packets,
            s.stats.bytes,
            s.stats.new_flows
        );
        let _ = writeln!(
            out,
            "  {:<21} {:>6}  {:<7}  {:>6}  {:>10}  {:>12}  {:>9}",
            "BACKEND", "WEIGHT", "STATE", "ACTIVE", "PACKETS", "BYTES", "NEW FLOWS"
        );
        if s.backends.is_empty() {
            let _ = writeln!(out, "  (no backends: traffic to this port is dropped)");
        }
        for b in &s.backends {
            let _ = writeln!(
                out,
                "  {:<21} {:>6}  {:<7}  {:>6}  {:>10}  {:>12}  {:>9}",
                format!("{}:{}", b.address, b.port),
                b.weight,
                b.state,
                b.active_connections,
                b.stats.packets,
                b.stats.bytes,
                b.stats.new_flows
            );
        }
    }
    let _ = writeln!(out, "\nOUTCOME                      PACKETS");
    for (name, count) in report.outcomes.iter().filter(|(_, c)| **c > 0) {
        let _ = writeln!(out, "{name:<28} {count:>8}");
    }
    out
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
