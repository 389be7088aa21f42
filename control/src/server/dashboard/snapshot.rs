//! What the dashboard shows, as one JSON document per second: built from the
//! state, the nodes' last reports and the recent flow events, and filtered by
//! the caller's grants as they are now.
//!
//! What needs which permission follows the admin API: services and their
//! backends need `list services` in their namespace, policies `list
//! networkpolicies`, nodes and flow events (both cluster-wide, as `sluicectl
//! get nodes` and `sluicectl flows`) `list nodes` cluster-wide. The overview
//! sums only what the caller may see.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use serde::Serialize;
use sluice_model::observe::{BackendState, FlowEvent, PolicyCounter, TrafficCounts};
use sluice_model::policy::compiled::{LabelSet, Slot};
use sluice_model::view::ServiceRef;
use sluice_model::{NetworkPolicy, Node, Service};

use crate::clock;
use crate::rates::{NodeRates, Rate, Rates};
use crate::{
    rbac::{self, Caller, Denied, Resource, Verb},
    server::{Control, NodeLive, describe::ResolvedBackend, state::rfc3339},
};

/// Flow events sent with each snapshot (the most recent).
pub const FLOWS_SHOWN: usize = 50;
/// A connected node whose last report is older than this is shown as silent.
const SILENT_AFTER_SECS: f64 = 30.0;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Open connections now (a gauge, not a running total).
    pub active_connections: u64,
}

impl Totals {
    fn add(&mut self, c: &TrafficCounts) {
        self.packets += c.packets;
        self.bytes += c.bytes;
        self.new_flows += c.new_flows;
        self.active_connections += c.active_connections;
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub time: String,
    pub user: String,
    pub groups: Vec<String>,
    pub overview: Overview,
    /// `None`: the caller may not list nodes (`nodes_hidden` says so).
    pub nodes: Option<Vec<NodeRow>>,
    pub nodes_hidden: Option<String>,
    pub services: Vec<ServiceRow>,
    pub policies: Vec<PolicyRow>,
    /// Most recent first; `None` as for nodes.
    pub flows: Option<Vec<FlowRow>>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    pub nodes: Option<usize>,
    pub nodes_connected: Option<usize>,
    pub services: usize,
    pub backends: usize,
    pub backends_serving: usize,
    pub policies: usize,
    pub view_version: u64,
    pub rate: Rate,
    pub totals: Totals,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub name: String,
    pub zone: String,
    pub joined_at: String,
    pub connected: bool,
    pub applied_version: u64,
    pub desired_version: u64,
    /// Versions the node is behind.
    pub lag: u64,
    pub last_report: String,
    pub last_report_age_secs: Option<f64>,
    /// "ok", "behind", "silent" or "disconnected".
    pub health: &'static str,
    pub rate: Rate,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub vip: String,
    /// "80/TCP→8080".
    pub ports: Vec<String>,
    pub algorithm: &'static str,
    pub totals: Totals,
    pub rate: Rate,
    pub backends: Vec<BackendRow>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    pub address: String,
    pub port: u32,
    pub weight: u32,
    /// "serving", "draining", "unhealthy" or "no share".
    pub state: String,
    pub source: String,
    pub totals: Totals,
    pub rate: Rate,
    /// Its share of the service's new flows over the last report interval,
    /// in percent; `None` when the service had none.
    pub share_now: Option<f64>,
    /// The same over everything counted so far.
    pub share_total: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRow {
    pub namespace: String,
    pub name: String,
    /// What it protects: "service shop/web", "shop:{app=web}".
    pub target: String,
    /// New flows its rules admitted.
    pub allowed: u64,
    /// New flows refused to (or, egress, from) what it selects.
    pub denied: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRow {
    pub time: String,
    pub node: String,
    /// new, close or drop.
    pub kind: String,
    pub verdict: String,
    pub reason: String,
    pub client: String,
    pub vip: String,
    pub service: String,
    pub backend: String,
    pub protocol: &'static str,
    pub counted_as: String,
}

fn algorithm_name(a: sluice_model::Algorithm) -> &'static str {
    use sluice_model::Algorithm as A;
    match a {
        A::RoundRobin => "round-robin",
        A::WeightedRoundRobin => "weighted round-robin",
        A::LeastConnections => "least connections",
        A::WeightedLeastConnections => "weighted least connections",
        A::Maglev => "maglev",
    }
}

fn percent(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| (part / whole * 100.0).clamp(0.0, 100.0))
}

fn flow_row(e: &FlowEvent) -> FlowRow {
    FlowRow {
        time: clock::rfc3339_ms(clock::from_unix_ms(e.observed_unix_ms)),
        node: e.node.clone(),
        kind: e.kind.to_string(),
        verdict: e.verdict.to_string(),
        reason: e.reason.to_string(),
        client: e.client.to_string(),
        vip: e.vip.to_string(),
        service: e
            .service
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        backend: e.backend.map(|b| b.to_string()).unwrap_or_default(),
        protocol: e.protocol.as_str(),
        counted_as: e.counted_as.to_string(),
    }
}

/// Whether `p` selects the endpoints of `set` (a policy on a service's VIP
/// selects none).
fn selects(p: &NetworkPolicy, set: &LabelSet) -> bool {
    p.selector.as_ref().is_some_and(|selector| {
        set.namespace == p.namespace && selector.iter().all(|(k, v)| set.labels.get(k) == Some(v))
    })
}

/// A policy's row: what it admitted and what was refused to what it selects.
pub fn policy_row(p: &NetworkPolicy, counters: &[&PolicyCounter]) -> PolicyRow {
    let mut row = PolicyRow {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        target: match (&p.service, &p.selector) {
            (Some(service), _) => format!("service {}/{service}", p.namespace),
            (None, selector) => LabelSet {
                namespace: p.namespace.clone(),
                labels: selector.clone().unwrap_or_default(),
            }
            .to_string(),
        },
        allowed: 0,
        denied: 0,
    };
    for c in counters {
        match &c.counts {
            Slot::AllowedBy(policy) if policy.namespace == p.namespace && policy.name == p.name => {
                row.allowed += c.allowed;
            }
            Slot::DeniedToService(ServiceRef { namespace, name })
                if *namespace == p.namespace && p.service.as_ref() == Some(name) =>
            {
                row.denied += c.denied;
            }
            Slot::DeniedTo(set) if p.types.ingress && selects(p, set) => row.denied += c.denied,
            Slot::EgressDeniedFrom(set) if p.types.egress && selects(p, set) => {
                row.denied += c.denied;
            }
            _ => {}
        }
    }
    row
}

/// A service's row: its counters summed over the nodes' last reports, its
/// rates over each node's last two, and each backend's share of new flows.
fn service_row(
    service: &Service,
    backends: Vec<ResolvedBackend>,
    live: &BTreeMap<String, NodeLive>,
    node_rates: &BTreeMap<String, NodeRates>,
) -> ServiceRow {
    let name = ServiceRef {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
    };
    let mut totals = Totals::default();
    let mut rate = Rate::default();
    let mut backend_totals: BTreeMap<(std::net::IpAddr, u16), Totals> = BTreeMap::new();
    let mut backend_rates: BTreeMap<(std::net::IpAddr, u16), Rate> = BTreeMap::new();
    for l in live.values() {
        for c in l.counters.iter().filter(|c| c.service == name) {
            totals.add(&c.counts);
            for b in &c.backends {
                backend_totals
                    .entry((b.address, b.port))
                    .or_default()
                    .add(&b.counts);
            }
        }
    }
    for r in node_rates.values() {
        for (_, fr) in r.frontends.iter().filter(|(k, _)| k.0 == name) {
            rate.add(fr);
        }
        for ((fk, b), br) in &r.backends {
            if fk.0 == name {
                backend_rates.entry(*b).or_default().add(br);
            }
        }
    }
    let backends = backends
        .into_iter()
        .map(|b| {
            let key = (std::net::IpAddr::V4(b.address), b.port);
            let t = backend_totals.get(&key).cloned().unwrap_or_default();
            let r = backend_rates.get(&key).copied().unwrap_or_default();
            BackendRow {
                share_now: percent(r.new_flows, rate.new_flows),
                share_total: percent(t.new_flows as f64, totals.new_flows as f64),
                address: b.address.to_string(),
                port: b.port.into(),
                weight: b.weight,
                state: b.state.to_string(),
                source: b
                    .endpoint
                    .map_or_else(|| "static".to_owned(), |(ns, name)| format!("{ns}/{name}")),
                totals: t,
                rate: r,
            }
        })
        .collect();
    ServiceRow {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
        vip: service.vip.to_string(),
        ports: service
            .ports
            .iter()
            .map(|p| format!("{}/{}→{}", p.port, p.protocol, p.target_port))
            .collect(),
        algorithm: algorithm_name(service.algorithm),
        totals,
        rate,
        backends,
    }
}

/// A node's row: its record, what its agent last reported, and its health.
fn node_row(
    name: &str,
    record: &Node,
    live: Option<&NodeLive>,
    desired_version: u64,
    rates: Option<&NodeRates>,
    now: SystemTime,
) -> NodeRow {
    let l = live.cloned().unwrap_or_default();
    let connected = l.watchers > 0;
    let age = l
        .last_report
        .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64());
    let lag = desired_version.saturating_sub(l.applied_version);
    let mut rate = Rate::default();
    for r in rates.iter().flat_map(|r| r.frontends.values()) {
        rate.add(r);
    }
    NodeRow {
        name: name.to_owned(),
        zone: record.zone.clone().unwrap_or_default(),
        joined_at: rfc3339(record.joined_at),
        connected,
        applied_version: l.applied_version,
        desired_version,
        lag,
        last_report: l.last_report.map(rfc3339).unwrap_or_default(),
        last_report_age_secs: age,
        health: if !connected {
            "disconnected"
        } else if age.is_none_or(|a| a > SILENT_AFTER_SECS) {
            "silent"
        } else if lag > 0 {
            "behind"
        } else {
            "ok"
        },
        rate,
    }
}

/// The overview, over what the caller sees.
fn overview(
    nodes: Option<&[NodeRow]>,
    services: &[ServiceRow],
    policies: usize,
    view_version: u64,
) -> Overview {
    let mut overview = Overview {
        nodes: nodes.map(<[NodeRow]>::len),
        nodes_connected: nodes.map(|n| n.iter().filter(|n| n.connected).count()),
        services: services.len(),
        backends: 0,
        backends_serving: 0,
        policies,
        view_version,
        rate: Rate::default(),
        totals: Totals::default(),
    };
    let mut seen = BTreeSet::new();
    for s in services {
        overview.rate.add(&s.rate);
        let t = &s.totals;
        overview.totals.packets += t.packets;
        overview.totals.bytes += t.bytes;
        overview.totals.new_flows += t.new_flows;
        overview.totals.active_connections += t.active_connections;
        for b in &s.backends {
            if seen.insert((&s.namespace, &s.name, &b.address)) {
                overview.backends += 1;
                overview.backends_serving += usize::from(b.state == BackendState::Serving.as_str());
            }
        }
    }
    overview
}

fn visible(allowed: &Option<Vec<String>>, ns: &str) -> bool {
    allowed
        .as_ref()
        .is_none_or(|list| list.iter().any(|n| n == ns))
}

impl Control {
    /// The dashboard's document for `caller`, by their grants now; `flows`
    /// are the recent flow events (shown only with `list nodes`). Refused
    /// when the caller may see nothing at all.
    pub fn dashboard_snapshot(
        &self,
        caller: &Caller,
        rates: &std::sync::Mutex<Rates>,
        flows: &[Arc<FlowEvent>],
    ) -> Result<Snapshot, Denied> {
        let state = self.state();
        let grants = state.grants();
        let nodes_denied = rbac::check(caller, Verb::List, Resource::Nodes, None, &grants).err();
        let service_ns = rbac::namespaces_allowed(caller, Verb::List, Resource::Services, &grants);
        let policy_ns =
            rbac::namespaces_allowed(caller, Verb::List, Resource::NetworkPolicies, &grants);
        let nothing = |ns: &Option<Vec<String>>| ns.as_ref().is_some_and(Vec::is_empty);
        if nothing(&service_ns)
            && nothing(&policy_ns)
            && let Some(denied) = nodes_denied
        {
            // Phrase it as the first thing the dashboard needs.
            return Err(Denied {
                resource: Resource::Services,
                ..denied
            });
        }
        let now = SystemTime::now();
        let live: BTreeMap<String, NodeLive> = self.cluster_live();
        let node_rates = {
            let mut rates = rates.lock().unwrap_or_else(|p| p.into_inner());
            for (node, l) in &live {
                if let Some(at) = l.last_report {
                    rates.observe(node, at, &l.counters);
                }
            }
            rates.retain(|n| state.nodes.contains_key(n));
            live.keys()
                .map(|n| (n.clone(), rates.node(n, now)))
                .collect::<BTreeMap<_, _>>()
        };

        let services: Vec<ServiceRow> = state
            .objects
            .all::<Service>()
            .filter(|service| visible(&service_ns, &service.namespace))
            // As `describe`, which shows the same backends, needs.
            .filter(|service| {
                rbac::check(
                    caller,
                    Verb::Get,
                    Resource::Services,
                    Some(&service.namespace),
                    &grants,
                )
                .is_ok()
            })
            .map(|service| {
                let backends = self.resolved_backends(&state, service);
                service_row(service, backends, &live, &node_rates)
            })
            .collect();

        let counters: Vec<&PolicyCounter> =
            live.values().flat_map(|l| &l.policy_counters).collect();
        let policies: Vec<PolicyRow> = state
            .objects
            .all::<NetworkPolicy>()
            .filter(|p| visible(&policy_ns, &p.namespace))
            .map(|p| policy_row(p, &counters))
            .collect();

        let nodes = nodes_denied.is_none().then(|| {
            state
                .nodes
                .iter()
                .map(|(name, record)| {
                    node_row(
                        name,
                        &record.object,
                        live.get(name),
                        state.view.version,
                        node_rates.get(name),
                        now,
                    )
                })
                .collect::<Vec<_>>()
        });
        let flows = nodes_denied.is_none().then(|| {
            flows
                .iter()
                .rev()
                .take(FLOWS_SHOWN)
                .map(|e| flow_row(e))
                .collect()
        });

        let overview = overview(
            nodes.as_deref(),
            &services,
            policies.len(),
            state.view.version,
        );
        Ok(Snapshot {
            time: rfc3339(now),
            user: caller.name.clone(),
            groups: caller.groups.clone(),
            overview,
            nodes,
            nodes_hidden: nodes_denied.map(|d| d.to_string()),
            services,
            policies,
            flows,
        })
    }
}

#[cfg(test)]
mod tests {
    use sluice_api::v1;
    use sluice_model::observe::{BackendCounters, FrontendCounters};
    use sluice_model::policy::PolicyTypes;
    use sluice_model::policy::compiled::PolicyRef;
    use sluice_model::view::FrontendKey;
    use sluice_model::{Labels, Protocol, ServicePort};

    use super::*;

    fn counter(counts: Slot, allowed: u64, denied: u64) -> PolicyCounter {
        PolicyCounter {
            counts,
            allowed,
            denied,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn set(namespace: &str, pairs: &[(&str, &str)]) -> LabelSet {
        LabelSet {
            namespace: namespace.into(),
            labels: labels(pairs),
        }
    }

    fn allowed_by(namespace: &str, name: &str) -> Slot {
        Slot::AllowedBy(PolicyRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    fn policy(selector: &[(&str, &str)], service: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: "shop".into(),
            name: "web-ingress".into(),
            labels: Labels::new(),
            selector: service.is_empty().then(|| labels(selector)),
            service: (!service.is_empty()).then(|| service.into()),
            types: PolicyTypes {
                ingress: true,
                egress: false,
            },
            ingress: Vec::new(),
            egress: Vec::new(),
        }
    }

    #[test]
    fn a_policy_counts_what_it_admitted_and_what_was_refused_to_what_it_selects() {
        let counters = [
            counter(allowed_by("shop", "web-ingress"), 7, 0),
            counter(allowed_by("shop", "web-ingress"), 3, 0),
            counter(allowed_by("shop", "other"), 100, 0),
            counter(
                Slot::DeniedTo(set("shop", &[("app", "web"), ("tier", "front")])),
                0,
                4,
            ),
            counter(Slot::DeniedTo(set("shop", &[("app", "db")])), 0, 50),
            counter(Slot::DeniedTo(set("blog", &[("app", "web")])), 0, 60),
            counter(
                Slot::EgressDeniedFrom(set("shop", &[("app", "web")])),
                0,
                70,
            ),
        ];
        let refs: Vec<&PolicyCounter> = counters.iter().collect();
        let row = policy_row(&policy(&[("app", "web")], ""), &refs);
        assert_eq!(
            row,
            PolicyRow {
                namespace: "shop".into(),
                name: "web-ingress".into(),
                target: "shop:{app=web}".into(),
                allowed: 10,
                // Egress refusals do not count for an ingress-only policy.
                denied: 4,
            }
        );
        let by_service = [
            counter(
                Slot::DeniedToService(ServiceRef {
                    namespace: "shop".into(),
                    name: "web".into(),
                }),
                0,
                9,
            ),
            counter(Slot::DeniedTo(set("shop", &[("app", "web")])), 0, 1),
        ];
        let refs: Vec<&PolicyCounter> = by_service.iter().collect();
        let row = policy_row(&policy(&[], "web"), &refs);
        assert_eq!((row.target.as_str(), row.denied), ("service shop/web", 9));
    }

    fn caller(name: &str, groups: &[&str]) -> Caller {
        Caller {
            name: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    const OBJECTS: &str = "kind: Service
namespace: shop
name: web
ports: [{ port: 80, protocol: TCP }]
backends: [{ address: 198.19.0.11 }]
---
kind: Service
namespace: blog
name: news
ports: [{ port: 80, protocol: TCP }]
backends: [{ address: 198.19.0.12 }]
---
kind: NetworkPolicy
namespace: shop
name: web-ingress
service: web
ingress: [{ from: [{ cidr: 198.18.1.0/24 }] }]
---
kind: Grant
namespace: blog
name: bob-views-blog
subject: { user: bob }
role: viewer
scope: blog
";

    #[tokio::test]
    async fn each_caller_sees_what_their_grants_allow_now() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        let admin = caller("root", &[rbac::ADMIN_GROUP]);
        let objects = sluice_model::manifest::parse_objects("t.yaml", OBJECTS)
            .expect("manifest")
            .iter()
            .map(v1::Object::from)
            .collect();
        control.apply(&admin, objects, false).await.expect("apply");
        let rates = std::sync::Mutex::default();

        let all = control
            .dashboard_snapshot(&admin, &rates, &[])
            .expect("admin");
        let names = |s: &Snapshot| -> Vec<String> {
            s.services
                .iter()
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect()
        };
        assert_eq!(names(&all), ["blog/news", "shop/web"]);
        assert_eq!(all.policies.len(), 1);
        assert!(all.nodes.is_some() && all.flows.is_some());
        assert_eq!(all.overview.backends, 2);

        // A viewer of blog: blog's service only, no policy of shop, no
        // nodes, no flows, and totals over what they see.
        let bob = caller("bob", &[]);
        let seen = control.dashboard_snapshot(&bob, &rates, &[]).expect("bob");
        assert_eq!(names(&seen), ["blog/news"]);
        assert!(seen.policies.is_empty());
        assert!(seen.nodes.is_none() && seen.flows.is_none());
        assert!(
            seen.nodes_hidden
                .as_deref()
                .is_some_and(|m| m.contains("`list nodes`")),
            "{:?}",
            seen.nodes_hidden
        );
        assert_eq!((seen.overview.services, seen.overview.backends), (1, 1));

        // Nobody else sees anything, and the refusal says what is missing.
        let eve = caller("eve", &["dev"]);
        let denied = control
            .dashboard_snapshot(&eve, &rates, &[])
            .expect_err("no grant");
        assert!(denied.to_string().contains("`list services`"), "{denied}");

        // Revoking bob's grant takes effect on the next snapshot.
        control
            .delete(
                &admin,
                v1::DeleteRequest {
                    kind: v1::Kind::Grant as i32,
                    namespace: "blog".into(),
                    name: "bob-views-blog".into(),
                    resource_version: 0,
                },
            )
            .await
            .expect("delete");
        assert!(control.dashboard_snapshot(&bob, &rates, &[]).is_err());
    }

    fn traffic(packets: u64, new_flows: u64, active: u64) -> TrafficCounts {
        TrafficCounts {
            packets,
            bytes: packets * 100,
            new_flows,
            active_connections: active,
        }
    }

    fn web() -> Service {
        Service {
            namespace: "shop".into(),
            name: "web".into(),
            labels: Labels::new(),
            vip: "198.18.100.1".parse().expect("ip"),
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
            }],
            algorithm: Default::default(),
            backends: Vec::new(),
            selector: Labels::new(),
            maglev_table_size: None,
            traffic: Default::default(),
        }
    }

    /// A node's report for shop/web: (total, backend .11, backend .12).
    fn node_report(
        at: SystemTime,
        t: (u64, u64, u64),
        b11: (u64, u64, u64),
        b12: (u64, u64, u64),
    ) -> NodeLive {
        let backend = |address: &str, c: (u64, u64, u64)| BackendCounters {
            address: address.parse().expect("ip"),
            port: 8080,
            counts: traffic(c.0, c.1, c.2),
        };
        let service = web();
        NodeLive {
            watchers: 1,
            last_report: Some(at),
            counters: vec![FrontendCounters {
                service: ServiceRef {
                    namespace: service.namespace,
                    name: service.name,
                },
                key: FrontendKey {
                    vip: service.vip,
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                counts: traffic(t.0, t.1, t.2),
                backends: vec![backend("198.19.0.11", b11), backend("198.19.0.12", b12)],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_service_sums_its_nodes_and_shares_are_of_its_new_flows() {
        let t0 = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let t1 = t0 + std::time::Duration::from_secs(2);
        let mut rates = Rates::default();
        // node-1: 40 new flows in 2 s, 30 to .11 and 10 to .12; node-2: idle.
        let first = node_report(t0, (0, 0, 0), (0, 0, 0), (0, 0, 0));
        let then = node_report(t1, (400, 40, 3), (300, 30, 2), (100, 10, 1));
        let idle = node_report(t1, (100, 20, 0), (50, 10, 0), (50, 10, 0));
        rates.observe("node-1", t0, &first.counters);
        rates.observe("node-1", t1, &then.counters);
        rates.observe("node-2", t0, &idle.counters);
        rates.observe("node-2", t1, &idle.counters);
        let live = BTreeMap::from([("node-1".to_owned(), then), ("node-2".to_owned(), idle)]);
        let node_rates = live
            .keys()
            .map(|n| (n.clone(), rates.node(n, t1)))
            .collect();
        let resolved = |address: &str| ResolvedBackend {
            address: address.parse().expect("ip"),
            port: 8080,
            weight: 1,
            endpoint: None,
            state: BackendState::Serving,
            probers: Vec::new(),
        };
        let row = service_row(
            &web(),
            vec![resolved("198.19.0.11"), resolved("198.19.0.12")],
            &live,
            &node_rates,
        );
        assert_eq!(row.ports, ["80/TCP→8080"]);
        // Totals over both nodes; rates from node-1's delta only.
        assert_eq!(
            row.totals,
            Totals {
                packets: 500,
                bytes: 50_000,
                new_flows: 60,
                active_connections: 3
            }
        );
        assert_eq!(row.rate.new_flows, 20.0);
        assert_eq!(row.rate.packets, 200.0);
        let b11 = &row.backends[0];
        assert_eq!(b11.totals.new_flows, 40);
        assert_eq!(b11.rate.new_flows, 15.0);
        assert_eq!(b11.share_now, Some(75.0));
        assert_eq!(b11.share_total.map(f64::round), Some(67.0));
        assert_eq!(row.backends[1].share_now, Some(25.0));
        // The overview adds services up and counts backends once.
        let o = overview(None, &[row.clone(), row], 0, 7);
        assert_eq!((o.services, o.backends, o.backends_serving), (2, 2, 2));
        assert_eq!(o.totals.new_flows, 120);
        assert_eq!(o.nodes, None);
    }
}
