//! The table output of each kind, and `describe`'s text. Pure: the clock is a parameter.

use std::time::{Duration, SystemTime};

use sluice_model::policy::{Peer, PolicyPort};
use sluice_model::traffic::{HealthCheck, Probe, Rollout};
use sluice_model::{
    BackendSpec, Endpoint, Grant, Labels, NetworkPolicy, Object, ObjectKind, ServicePort,
    ServiceSpec, Subject,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::duration::format_age;
use super::model::{Described, NodeInfo, Stored, Traffic};
use super::output::{Table, fields};

const NONE: &str = "-";

/// The table of `kind`; objects of other kinds are left out.
pub fn objects(kind: ObjectKind, items: &[Stored]) -> Table {
    match kind {
        ObjectKind::Service => services(items.iter().filter_map(|s| match &s.object {
            Object::Service(service) => Some((service, s.version)),
            _ => None,
        })),
        ObjectKind::Endpoint => endpoints(items.iter().filter_map(|s| match &s.object {
            Object::Endpoint(endpoint) => Some(endpoint),
            _ => None,
        })),
        ObjectKind::Grant => grants(items.iter().filter_map(|s| match &s.object {
            Object::Grant(grant) => Some(grant),
            _ => None,
        })),
        ObjectKind::NetworkPolicy => policies(items.iter().filter_map(|s| match &s.object {
            Object::NetworkPolicy(policy) => Some(policy),
            _ => None,
        })),
    }
}

fn policies<'a>(items: impl Iterator<Item = &'a NetworkPolicy>) -> Table {
    let mut table = Table::new(&["NAMESPACE", "NAME", "PROTECTS", "INGRESS", "EGRESS"]);
    for policy in items {
        let selector = match (&policy.selector, &policy.service) {
            (_, Some(service)) => format!("service {service}"),
            (Some(selector), None) if !selector.is_empty() => labels(selector),
            _ => "every endpoint".to_owned(),
        };
        let rules = |restricted: bool, rules: Vec<String>| {
            if !restricted {
                "open".to_owned()
            } else if rules.is_empty() {
                "deny all".to_owned()
            } else {
                rules.join("; ")
            }
        };
        let ingress = rules(
            policy.types.ingress,
            policy
                .ingress
                .iter()
                .map(|r| format!("from {}", rule_text(&r.from, &r.ports)))
                .collect(),
        );
        let egress = rules(
            policy.types.egress,
            policy
                .egress
                .iter()
                .map(|r| format!("to {}", rule_text(&r.to, &r.ports)))
                .collect(),
        );
        table.row(vec![
            policy.namespace.clone(),
            policy.name.clone(),
            selector,
            ingress,
            egress,
        ]);
    }
    table
}

/// `PEERS to PORTS` of one rule.
fn rule_text(peers: &[Peer], ports: &[PolicyPort]) -> String {
    let from = if peers.is_empty() {
        "anyone".to_owned()
    } else {
        peers
            .iter()
            .map(|peer| match peer {
                Peer::Endpoints {
                    selector,
                    namespace,
                } => {
                    let who = if selector.is_empty() {
                        "endpoints".to_owned()
                    } else {
                        labels(selector)
                    };
                    match namespace {
                        Some(ns) => format!("{who} in {ns}"),
                        None => who,
                    }
                }
                Peer::Cidr { cidr, except } if except.is_empty() => cidr.to_string(),
                Peer::Cidr { cidr, except } => {
                    let except: Vec<String> = except.iter().map(ToString::to_string).collect();
                    format!("{cidr} except {}", except.join(","))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ports = if ports.is_empty() {
        "any port".to_owned()
    } else {
        ports
            .iter()
            .map(|p| format!("{}/{}", p.port, p.protocol))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("{from} on {ports}")
}

fn services<'a>(items: impl Iterator<Item = (&'a ServiceSpec, u64)>) -> Table {
    let mut table = Table::new(&[
        "NAMESPACE",
        "NAME",
        "VIP",
        "PORTS",
        "ALGORITHM",
        "BACKENDS",
        "VERSION",
    ]);
    for (service, version) in items {
        let ServiceSpec {
            namespace,
            name,
            vip,
            ports: service_ports,
            algorithm,
            backends,
            selector,
            ..
        } = service;
        let backends = if selector.is_empty() {
            backends.len().to_string()
        } else {
            format!("selector {}", labels(selector))
        };
        table.row(vec![
            namespace.clone(),
            name.clone(),
            vip.map_or_else(|| "<pending>".to_owned(), |v| v.to_string()),
            ports(service_ports, ","),
            algorithm.to_string(),
            backends,
            version.to_string(),
        ]);
    }
    table
}

fn endpoints<'a>(items: impl Iterator<Item = &'a Endpoint>) -> Table {
    let mut table = Table::new(&[
        "NAMESPACE",
        "NAME",
        "ADDRESS",
        "NODE",
        "ZONE",
        "WEIGHT",
        "READY",
        "LABELS",
    ]);
    for endpoint in items {
        let Endpoint {
            namespace,
            name,
            labels: endpoint_labels,
            address,
            node,
            zone,
            weight,
            ready,
            draining,
        } = endpoint;
        table.row(vec![
            namespace.clone(),
            name.clone(),
            address.to_string(),
            node.clone().unwrap_or_else(|| NONE.to_owned()),
            zone.clone().unwrap_or_else(|| NONE.to_owned()),
            weight.to_string(),
            match (*ready, *draining) {
                (true, true) => "draining".to_owned(),
                (ready, _) => yes_no(ready),
            },
            labels(endpoint_labels),
        ]);
    }
    table
}

fn grants<'a>(items: impl Iterator<Item = &'a Grant>) -> Table {
    let mut table = Table::new(&["NAMESPACE", "NAME", "SUBJECT", "ROLE", "SCOPE"]);
    for grant in items {
        let Grant {
            namespace,
            name,
            subject,
            role,
            scope,
            permissions,
            ..
        } = grant;
        let subject = match subject {
            Subject::User(user) => format!("user:{user}"),
            Subject::Group(group) => format!("group:{group}"),
        };
        // A custom role is its permissions; spell them out.
        let role = if permissions.is_empty() {
            role.to_string()
        } else {
            let list: Vec<String> = permissions
                .iter()
                .map(|p| format!("{} {}", p.verb, p.resource))
                .collect();
            format!("{role} ({})", list.join(", "))
        };
        table.row(vec![
            namespace.clone(),
            name.clone(),
            subject,
            role,
            scope.to_string(),
        ]);
    }
    table
}

pub fn nodes(items: &[NodeInfo], now: SystemTime) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "ZONE",
        "CONNECTED",
        "APPLIED/DESIRED",
        "LAST-REPORT",
        "CERT-EXPIRES",
    ]);
    for node in items {
        let NodeInfo {
            name,
            zone,
            connected,
            applied_version,
            desired_version,
            last_report,
            certificate_expires,
            ..
        } = node;
        let last_report = last_report
            .as_deref()
            .map_or_else(|| "never".to_owned(), |t| relative(t, now));
        table.row(vec![
            name.clone(),
            if zone.is_empty() {
                NONE.to_owned()
            } else {
                zone.clone()
            },
            yes_no(*connected),
            format!("{applied_version}/{desired_version}"),
            last_report,
            relative(certificate_expires, now),
        ]);
    }
    table
}

fn health_check(check: &HealthCheck) -> String {
    let HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        unhealthy_threshold,
        healthy_threshold,
        fail_open,
    } = check;
    let port = probe
        .port()
        .map_or_else(|| "target port".to_owned(), |p| format!("port {p}"));
    let probe = match probe {
        Probe::Http { path, .. } => format!("http GET {path} on {port}"),
        Probe::Tcp { .. } => format!("tcp connect to {port}"),
    };
    let all_down = if *fail_open { "send to all" } else { "drop" };
    format!(
        "{probe} every {interval_ms}ms (timeout {timeout_ms}ms); out after \
         {unhealthy_threshold} failures, back after {healthy_threshold} successes; \
         all unhealthy: {all_down}"
    )
}

/// `describe service`.
pub fn describe(described: &Described) -> String {
    let Described {
        service,
        resource_version,
        backends,
        nodes,
    } = described;
    let ServiceSpec {
        namespace,
        name,
        labels: service_labels,
        vip,
        ports: service_ports,
        algorithm,
        backends: static_backends,
        selector,
        maglev_table_size,
        traffic,
    } = service;
    let mut pairs = vec![
        ("Name", name.clone()),
        ("Namespace", namespace.clone()),
        ("Labels", labels(service_labels)),
        (
            "VIP",
            vip.map_or_else(|| "<pending>".to_owned(), |v| v.to_string()),
        ),
        ("Ports", ports(service_ports, ", ")),
        (
            "Algorithm",
            match maglev_table_size {
                Some(size) => format!("{algorithm} (table size {size})"),
                None => algorithm.to_string(),
            },
        ),
    ];
    if selector.is_empty() {
        let list: Vec<String> = static_backends
            .iter()
            .map(
                |BackendSpec {
                     address,
                     weight,
                     version,
                     draining,
                 }| {
                    let mut text = format!("{address} (weight {weight}");
                    if let Some(version) = version {
                        text.push_str(&format!(", version {version}"));
                    }
                    if *draining {
                        text.push_str(", draining");
                    }
                    text + ")"
                },
            )
            .collect();
        let value = if list.is_empty() {
            "none (traffic is dropped)".to_owned()
        } else {
            list.join(", ")
        };
        pairs.push(("Static backends", value));
    } else {
        pairs.push(("Selector", labels(selector)));
    }
    if let Some(check) = &traffic.health_check {
        pairs.push(("Health check", health_check(check)));
    }
    if let Some(seconds) = traffic.drain_timeout_seconds {
        pairs.push(("Drain timeout", format!("{seconds}s")));
    }
    if let Some(Rollout { to, percent }) = &traffic.rollout {
        pairs.push((
            "Rollout",
            format!("{percent}% of new flows to version {to}, the rest to other versions"),
        ));
    }
    pairs.push(("Version", resource_version.to_string()));
    let mut out = fields(&pairs);

    out.push_str("\nResolved backends:\n");
    if backends.is_empty() {
        out.push_str("  none\n");
    } else {
        let probed = backends.iter().any(|b| !b.probers.is_empty());
        let mut columns = vec!["ADDRESS", "PORT", "WEIGHT", "STATE", "SOURCE"];
        if probed {
            columns.push("PROBERS");
        }
        let mut table = Table::new(&columns);
        for backend in backends {
            let mut row = vec![
                backend.address.clone(),
                backend.port.to_string(),
                backend.weight.to_string(),
                backend.state.clone(),
                backend.source.clone(),
            ];
            if probed {
                row.push(backend.probers.join(","));
            }
            table.row(row);
        }
        out.push_str(&table.render_indented("  "));
    }

    out.push_str("\nNodes:\n");
    if nodes.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut table = Table::new(&[
            "NODE",
            "CONNECTED",
            "APPLIED",
            "DESIRED",
            "PACKETS",
            "BYTES",
            "ACTIVE",
        ]);
        for node in nodes {
            let counter = |f: fn(&Traffic) -> u64| {
                node.traffic
                    .as_ref()
                    .map_or_else(|| NONE.to_owned(), |t| f(t).to_string())
            };
            table.row(vec![
                node.node.clone(),
                yes_no(node.connected),
                node.applied_version.to_string(),
                node.desired_version.to_string(),
                counter(|t| t.packets),
                counter(|t| t.bytes),
                counter(|t| t.active_connections),
            ]);
        }
        out.push_str(&table.render_indented("  "));
    }
    out
}

/// `80/TCP→8080`, or `53/UDP` when the target port is the port.
pub fn ports(ports: &[ServicePort], separator: &str) -> String {
    let list: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.target_port == p.port {
                format!("{}/{}", p.port, p.protocol)
            } else {
                format!("{}/{}→{}", p.port, p.protocol, p.target_port)
            }
        })
        .collect();
    list.join(separator)
}

/// `app=web,tier=frontend`, or `-`.
pub fn labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return NONE.to_owned();
    }
    let list: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    list.join(",")
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// `12s ago` or `in 23h`; the text as is if it is not RFC 3339.
pub fn relative(timestamp: &str, now: SystemTime) -> String {
    let Ok(then) = OffsetDateTime::parse(timestamp, &Rfc3339) else {
        return timestamp.to_owned();
    };
    let now = OffsetDateTime::from(now);
    let seconds = |d: time::Duration| Duration::from_secs(d.whole_seconds().unsigned_abs());
    if then <= now {
        format!("{} ago", format_age(seconds(now - then)))
    } else {
        format!("in {}", format_age(seconds(then - now)))
    }
}

pub use crate::clock::rfc3339;

#[cfg(test)]
mod tests {
    use sluice_model::manifest::parse_objects;

    use super::*;
    use crate::cli::model::{Programming, ResolvedBackend};

    const MANIFEST: &str = "\
kind: Service
namespace: shop
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP }
selector: { app: web, tier: frontend }
---
kind: Service
name: db
ports: [{ port: 5432, protocol: TCP }]
algorithm: least-connections
backends: [{ address: 198.19.1.2 }, { address: 198.19.1.3, weight: 3 }]
---
kind: Endpoint
namespace: shop
name: web-1
labels: { app: web }
address: 198.19.1.2
node: node-1
zone: eu-1a
---
kind: Endpoint
namespace: shop
name: web-2
address: 198.19.1.3
weight: 5
ready: false
---
kind: Grant
namespace: shop
name: alice
subject: { user: alice }
role: editor
scope: shop
---
kind: Grant
name: readers
subject: { group: dev }
role: custom
scope: \"*\"
permissions: [{ verb: get, resource: services }, { verb: list, resource: nodes }]
";

    fn stored() -> Vec<Stored> {
        parse_objects("test.yaml", MANIFEST)
            .expect("valid manifest")
            .into_iter()
            .zip(1..)
            .map(|(object, version)| Stored { object, version })
            .collect()
    }

    fn at(timestamp: &str) -> SystemTime {
        OffsetDateTime::parse(timestamp, &Rfc3339)
            .expect("RFC 3339")
            .into()
    }

    #[test]
    fn services_table() {
        assert_eq!(
            objects(ObjectKind::Service, &stored()).render(),
            "\
NAMESPACE   NAME   VIP           PORTS                ALGORITHM           BACKENDS                         VERSION
shop        web    198.18.0.10   80/TCP→8080,53/UDP   round-robin         selector app=web,tier=frontend   1
default     db     <pending>     5432/TCP             least-connections   2                                2
"
        );
    }

    #[test]
    fn endpoints_table() {
        assert_eq!(
            objects(ObjectKind::Endpoint, &stored()).render(),
            "\
NAMESPACE   NAME    ADDRESS      NODE     ZONE    WEIGHT   READY   LABELS
shop        web-1   198.19.1.2   node-1   eu-1a   1        yes     app=web
shop        web-2   198.19.1.3   -        -       5        no      -
"
        );
    }

    #[test]
    fn grants_table() {
        assert_eq!(
            objects(ObjectKind::Grant, &stored()).render(),
            "\
NAMESPACE   NAME      SUBJECT      ROLE                                SCOPE
shop        alice     user:alice   editor                              shop
default     readers   group:dev    custom (get services, list nodes)   *
"
        );
    }

    #[test]
    fn nodes_table() {
        let node = |name: &str, zone: &str, last_report: Option<&str>| NodeInfo {
            name: name.to_owned(),
            zone: zone.to_owned(),
            connected: last_report.is_some(),
            applied_version: 13,
            desired_version: 14,
            last_report: last_report.map(str::to_owned),
            joined_at: "2025-01-01T00:00:00Z".to_owned(),
            certificate_serial: "0a".to_owned(),
            certificate_expires: "2025-01-02T11:00:00Z".to_owned(),
            resource_version: 3,
            traffic: Vec::new(),
            policy: Default::default(),
            reported: None,
            counters: Vec::new(),
        };
        let items = [
            node("node-1", "eu-1a", Some("2025-01-01T11:59:48Z")),
            node("node-2", "", None),
        ];
        assert_eq!(
            nodes(&items, at("2025-01-01T12:00:00Z")).render(),
            "\
NAME     ZONE    CONNECTED   APPLIED/DESIRED   LAST-REPORT   CERT-EXPIRES
node-1   eu-1a   yes         13/14             12s ago       in 23h
node-2   -       no          13/14             never         in 23h
"
        );
    }

    #[test]
    fn describe_text() {
        let Some(Object::Service(service)) = stored().into_iter().next().map(|s| s.object) else {
            panic!("the first object is a service");
        };
        let described = Described {
            service,
            resource_version: 7,
            backends: vec![ResolvedBackend {
                address: "198.19.1.2".to_owned(),
                port: 8080,
                weight: 1,
                source: "shop/web-1".to_owned(),
                probers: vec!["node-1".to_owned(), "node-2".to_owned()],
                state: "unhealthy".to_owned(),
            }],
            nodes: vec![
                Programming {
                    node: "node-1".to_owned(),
                    connected: true,
                    applied_version: 14,
                    desired_version: 14,
                    traffic: Some(Traffic {
                        packets: 120,
                        bytes: 9000,
                        new_flows: 4,
                        active_connections: 2,
                    }),
                },
                Programming {
                    node: "node-2".to_owned(),
                    connected: false,
                    applied_version: 0,
                    desired_version: 14,
                    traffic: None,
                },
            ],
        };
        assert_eq!(
            describe(&described),
            "\
Name:       web
Namespace:  shop
Labels:     -
VIP:        198.18.0.10
Ports:      80/TCP→8080, 53/UDP
Algorithm:  round-robin
Selector:   app=web,tier=frontend
Version:    7

Resolved backends:
  ADDRESS      PORT   WEIGHT   STATE       SOURCE       PROBERS
  198.19.1.2   8080   1        unhealthy   shop/web-1   node-1,node-2

Nodes:
  NODE     CONNECTED   APPLIED   DESIRED   PACKETS   BYTES   ACTIVE
  node-1   yes         14        14        120       9000    2
  node-2   no          0         14        -         -       -
"
        );
    }

    #[test]
    fn times_are_relative_to_now() {
        let now = at("2025-01-01T12:00:00Z");
        assert_eq!(relative("2025-01-01T11:58:00Z", now), "2m ago");
        assert_eq!(relative("2025-01-03T12:00:00Z", now), "in 2d");
        assert_eq!(relative("2025-01-01T12:00:00Z", now), "0s ago");
        assert_eq!(relative("soon", now), "soon");
        assert_eq!(rfc3339(now), "2025-01-01T12:00:00Z");
    }
}
