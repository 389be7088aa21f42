//! Introspection end to end: the flow log (`sluicectl flows`), Prometheus
//! metrics of the agents and of the control service, and `sluicectl top`,
//! against a cluster in namespaces with real clients and servers (see
//! `sluice_tests::cluster`).
//!
//! Requires root. Run with `cargo xtask test`, or after
//! `cargo build --workspace --exclude sluice-ebpf --bins` with
//! `cargo test -p sluice-tests --test introspection_e2e`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use sluice_tests::{
    Agent, ScratchDir,
    cluster::{Cluster, NODE_INTERFACES, TIMEOUT, backend_addr, web_by_selector},
    http_get,
    netns::Netns,
    scrape_metrics,
};

/// `GET /metrics` from inside `ns` (the agents and the control service
/// serve it on their namespace's loopback).
fn scrape(ns: &Netns, port: u16) -> String {
    let addr = SocketAddrV4::new([127, 0, 0, 1].into(), port);
    ns.enter(|| scrape_metrics(addr, TIMEOUT))
        .unwrap_or_else(|e| panic!("scraping {addr} in {}: {e}", ns.name()))
}

/// The value of the sample whose line starts with `name{` and holds every
/// label in `labels` (`key="value"` each).
fn value(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_flow_log_names_every_flow_cluster_wide_and_filters_it() {
    let cluster = Cluster::start(2, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    cluster.spread(1, vip, 6);
    cluster.spread(2, vip, 4);
    // A port the VIP does not serve: dropped, and logged as such.
    let unserved = cluster
        .topology
        .node(1)
        .client
        .enter(|| http_get(SocketAddrV4::new(vip, 81), Duration::from_millis(500)));
    assert!(unserved.is_err(), "port 81 is not a service port");

    // Agents pass events on within moments; wait for all 10 closings.
    let deadline = Instant::now() + TIMEOUT;
    let lines = loop {
        let out = cluster
            .control
            .sluicectl_ok(&["flows", "--service", "web", "-o", "json"]);
        let events: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let closes = events.iter().filter(|e| e["kind"] == "close").count();
        if closes >= 10 || Instant::now() > deadline {
            break events;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let of = |kind: &str, node: &str| {
        lines
            .iter()
            .filter(|e| e["kind"] == kind && e["node"] == node)
            .count()
    };
    assert_eq!(
        (of("new", "node-1"), of("close", "node-1")),
        (6, 6),
        "{lines:#?}"
    );
    assert_eq!(
        (of("new", "node-2"), of("close", "node-2")),
        (4, 4),
        "{lines:#?}"
    );
    for e in &lines {
        assert_eq!(e["service"], "default/web", "{e}");
        assert_eq!(e["vip"], format!("{vip}:80"), "{e}");
        assert_eq!(e["verdict"], "forwarded", "{e}");
        assert_eq!(e["protocol"], "TCP", "{e}");
        let backend = e["backend"].as_str().expect("backend");
        assert!(
            (1..=3).any(|i| backend == format!("{}:8080", backend_addr(i))),
            "{e}"
        );
        // Timed by the node when its data plane saw it: RFC 3339, ms.
        let time = e["time"].as_str().expect("time");
        assert!(
            time.starts_with("20") && time.contains('T') && time.ends_with('Z'),
            "{time}"
        );
    }
    let client = |e: &serde_json::Value| e["client"].as_str().map(str::to_owned);
    let opened: std::collections::BTreeSet<_> = lines
        .iter()
        .filter(|e| e["kind"] == "new")
        .filter_map(client)
        .collect();
    let closed: std::collections::BTreeSet<_> = lines
        .iter()
        .filter(|e| e["kind"] == "close")
        .filter_map(client)
        .collect();
    assert_eq!(opened, closed, "every flow opened was closed");

    // The drop is not the service's (no service port matched), but the
    // whole log has it, with its reason.
    let dropped = cluster
        .control
        .sluicectl_ok(&["flows", "--verdict", "dropped", "-o", "json"]);
    assert!(
        dropped.contains("\"reason\":\"drop_vip_unknown_port\"")
            && dropped.contains(&format!("{vip}:81")),
        "{dropped}"
    );
    // Filters: only closings; the table names its columns.
    let closes = cluster
        .control
        .sluicectl_ok(&["flows", "--kind", "close", "-o", "json"]);
    assert_eq!(closes.lines().count(), 10, "{closes}");
    assert!(closes.lines().all(|l| l.contains("\"kind\":\"close\"")));
    let table = cluster.control.sluicectl_ok(&["flows", "--service", "web"]);
    assert!(
        table.starts_with("TIME") && table.contains("default/web"),
        "{table}"
    );
    // Bad filters are refused with the flag named.
    let bad = cluster.control.sluicectl(&["flows", "--kind", "opened"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--kind"),
        "{bad:?}"
    );
}

#[test]
fn agents_and_the_control_service_serve_prometheus_metrics() {
    let cluster = Cluster::start(2, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    let node = cluster.topology.node(1);
    let service = [
        "service=\"default/web\"",
        &format!("vip=\"{vip}\""),
        "port=\"80\"",
        "protocol=\"TCP\"",
    ];
    let before = scrape(&node.ns, 9464);
    let new_flows = |page: &str| value(page, "sluice_service_new_flows_total", &service);
    assert_eq!(new_flows(&before), Some(0.0), "{before}");
    cluster.spread(1, vip, 30);
    // One connection stays open, to be seen as active.
    let held = cluster.hold(1, vip, 1);
    let after = scrape(&node.ns, 9464);
    assert_eq!(new_flows(&after), Some(31.0), "{after}");
    let to_backend = [&service[..], &["direction=\"to_backend\""]].concat();
    let packets = value(&after, "sluice_service_packets_total", &to_backend).expect("packets");
    assert!(
        packets >= 31.0 * 4.0,
        "a request is several packets: {packets}"
    );
    assert_eq!(
        value(&after, "sluice_service_active_connections", &service),
        Some(1.0),
        "{after}"
    );
    let backend_1 = format!("backend=\"{}:8080\"", backend_addr(1));
    let backend_flows = value(
        &after,
        "sluice_backend_new_flows_total",
        &[&service[..], &[backend_1.as_str()]].concat(),
    )
    .expect("backend flows");
    assert!(
        (10.0..=11.0).contains(&backend_flows),
        "round-robin: {backend_flows}"
    );
    for (name, labels, expected) in [
        ("sluice_program_attached", vec!["hook="], 1.0),
        (
            "sluice_dropped_packets_total",
            vec!["reason=\"policy\""],
            0.0,
        ),
        (
            "sluice_flow_events_lost_total",
            vec!["where=\"kernel\""],
            0.0,
        ),
    ] {
        assert_eq!(
            value(&after, name, &labels),
            Some(expected),
            "{name}: {after}"
        );
    }
    let applied = value(&after, "sluice_view_applied_version", &[]).expect("applied version");
    assert_eq!(applied as u64, cluster.control.view_version(), "{after}");
    assert!(
        value(&after, "sluice_reconcile_duration_seconds_count", &[]).expect("reconciles") >= 1.0
    );
    // Conventions: one HELP and TYPE per family, counters end in _total.
    for line in after.lines().filter(|l| l.starts_with("# TYPE ")) {
        let parts: Vec<&str> = line.split(' ').collect();
        if parts[3] == "counter" {
            assert!(parts[2].ends_with("_total"), "{line}");
        }
    }
    drop(held);

    // The control service: calls by method and code, commits, node lag.
    let bad = cluster
        .control
        .apply("bad.yaml", "kind: Service\nname: x\nports: []\n");
    assert!(!bad.status.success());
    let control = scrape(&cluster.topology.control, 9465);
    let apply_ok = value(
        &control,
        "sluice_api_requests_total",
        &["method=\"Apply\"", "code=\"OK\""],
    )
    .expect("apply calls");
    assert!(apply_ok >= 1.0, "{control}");
    assert!(
        value(
            &control,
            "sluice_api_request_duration_seconds_count",
            &["method=\"Apply\""]
        )
        .expect("apply latency")
            >= apply_ok
    );
    assert!(
        value(&control, "sluice_store_commit_duration_seconds_count", &[]).expect("commits") >= 1.0,
        "{control}"
    );
    for node in ["node-1", "node-2"] {
        let label = format!("node=\"{node}\"");
        assert_eq!(
            value(&control, "sluice_node_version_lag", &[&label]),
            Some(0.0),
            "{control}"
        );
        assert_eq!(
            value(&control, "sluice_node_connected", &[&label]),
            Some(1.0),
            "{control}"
        );
    }
    assert_eq!(
        value(&control, "sluice_objects", &["kind=\"Endpoint\""]),
        Some(3.0),
        "{control}"
    );
}

#[test]
fn sluicectl_top_shows_live_rates_per_service_and_backend() {
    let cluster = Cluster::start(1, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    // Steady traffic over many report intervals (1 s), bounded.
    let client = &cluster.topology.node(1).client;
    let traffic = thread::scope(|scope| {
        let load = scope.spawn(|| {
            client.enter(|| {
                let until = Instant::now() + Duration::from_secs(13);
                let mut sent = 0;
                while Instant::now() < until && sent < 2_000 {
                    http_get(SocketAddrV4::new(vip, 80), TIMEOUT).expect("request");
                    sent += 1;
                    thread::sleep(Duration::from_millis(20));
                }
                sent
            })
        });
        let top = cluster
            .control
            .sluicectl_ok(&["top", "--interval", "2", "--count", "7"]);
        (load.join().expect("load"), top)
    });
    let (sent, top) = traffic;
    assert!(sent > 100, "{sent}");
    // The last tables show the service with a new-flow rate near what was
    // sent (about 40/s here), and each backend with about a third of it.
    let last = top.split("node(s);").last().expect("a table");
    let row = |prefix: &str| {
        last.lines()
            .find(|l| l.trim_start().starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} row in {last}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let service = row("default/web");
    let new_flows: f64 = service[service.len() - 2].parse().expect("rate");
    assert!(
        (10.0..=60.0).contains(&new_flows),
        "new flows/s {new_flows} in {top}"
    );
    let backend = row(&format!("{}:8080", backend_addr(1)));
    let share: f64 = backend[backend.len() - 2].parse().expect("rate");
    assert!(
        (new_flows / 3.0 - 3.0..=new_flows / 3.0 + 3.0).contains(&share),
        "a third of {new_flows}: {share} in {top}"
    );
}

/// The checked-in list of every metric family the agent and the control
/// service can expose: `name type label,label` (`-`: no labels).
const METRICS_NAMES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metrics_names.txt");

/// A family's type and the label names its samples carry (with `le` for a
/// histogram's buckets), from a text-format page; how many samples it had.
type Families = BTreeMap<String, (String, BTreeSet<String>, usize)>;

/// The label names of a sample's `{...}` (values may hold escaped quotes,
/// commas and braces), and the sample's name.
fn sample_labels(line: &str) -> (&str, Vec<String>) {
    let Some((name, mut rest)) = line.split_once('{') else {
        return (line.split(' ').next().unwrap_or(line), Vec::new());
    };
    let mut names = Vec::new();
    while let Some((key, after)) = rest.split_once("=\"") {
        names.push(key.trim_start_matches(',').to_owned());
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => {
                    chars.next();
                }
                Some((i, '"')) => break i,
                Some(_) => {}
                None => panic!("unterminated label value in {line}"),
            }
        };
        rest = &after[end + 1..];
        if rest.starts_with('}') {
            break;
        }
    }
    (name, names)
}

fn families(page: &str, into: &mut Families) {
    let mut current: Option<String> = None;
    for line in page.lines().filter(|l| !l.is_empty()) {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').expect("# TYPE name type");
            let previous = into.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new(), 0));
            assert!(previous.is_none(), "family {name} declared twice");
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (sample, labels) = sample_labels(line);
        let family = current
            .as_deref()
            .unwrap_or_else(|| panic!("sample before any # TYPE: {line}"));
        let (kind, names, samples) = into.get_mut(family).expect("declared");
        let belongs = sample == family
            || (kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| sample.strip_suffix(suffix) == Some(family)));
        assert!(belongs, "sample {sample} under family {family}: {line}");
        names.extend(labels);
        *samples += 1;
    }
}

fn family_lines(families: &Families) -> BTreeSet<String> {
    families
        .iter()
        .map(|(name, (kind, labels, _))| {
            let labels = if labels.is_empty() {
                "-".to_owned()
            } else {
                labels.iter().cloned().collect::<Vec<_>>().join(",")
            };
            format!("{name} {kind} {labels}")
        })
        .collect()
}

/// Every family either side can emit, with traffic that makes each one have
/// samples: a policy (verdict counters), a standalone agent (the manifest
/// it applied), API calls that fail (status codes), flows (the flow log).
/// The list pins names, types and label names; `SLUICE_BLESS_METRICS=1`
/// rewrites it from what the binaries serve.
#[test]
fn metric_families_types_and_label_names_match_the_checked_in_list() {
    let cluster = Cluster::start_joined(2, 1, 3, &[]);
    cluster.apply(&web_by_selector(3));
    cluster.apply(
        "kind: NetworkPolicy
name: web-from-clients
selector: { app: web }
ingress:
  - from:
      - cidr: 198.18.0.0/16
    ports: [{ port: 8080, protocol: TCP }]
",
    );
    cluster.wait_programmed();
    let vip = cluster.web_vip();
    cluster.spread(1, vip, 6);
    let held = cluster.hold(1, vip, 1);
    let bad = cluster
        .control
        .apply("bad.yaml", "kind: Service\nname: x\nports: []\n");
    assert!(!bad.status.success());
    // Node 2 runs a standalone agent, from a manifest.
    let scratch = ScratchDir::new();
    let manifest = scratch.write(
        "services.yaml",
        format!(
            "kind: Service\nname: solo\nvip: 198.18.200.10\nports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]\nbackends: [{{ address: {} }}]\n",
            backend_addr(1)
        ),
    );
    let interfaces: Vec<String> = NODE_INTERFACES.iter().map(|&i| i.to_owned()).collect();
    let standalone = Agent::start(&cluster.topology.node(2).ns, &manifest, &interfaces, &[]);

    // The flow log reaches the control service within moments.
    let deadline = Instant::now() + TIMEOUT;
    let mut found = Families::new();
    loop {
        found.clear();
        let control = scrape(&cluster.topology.control, 9465);
        families(&control, &mut found);
        let received = value(&control, "sluice_flow_events_received_total", &[]);
        if received.is_some_and(|n| n > 0.0) || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    families(&scrape(&cluster.topology.node(1).ns, 9464), &mut found);
    let mut solo = Families::new();
    families(&scrape(&cluster.topology.node(2).ns, 9464), &mut solo);
    // Its families without samples (no policy here) have no labels to compare.
    for (name, family) in solo {
        match found.get(&name) {
            Some((kind, labels, _)) => {
                assert_eq!(
                    kind, &family.0,
                    "{name}: standalone and joined types differ"
                );
                if family.2 > 0 {
                    assert_eq!(
                        labels, &family.1,
                        "{name}: standalone and joined labels differ"
                    );
                }
            }
            None => {
                found.insert(name, family);
            }
        }
    }
    drop(held);
    drop(standalone);

    let empty: Vec<&String> = found
        .iter()
        .filter(|(_, (_, _, samples))| *samples == 0)
        .map(|(name, _)| name)
        .collect();
    assert!(
        empty.is_empty(),
        "families without samples (the traffic should make every one have some): {empty:?}"
    );
    let served = family_lines(&found);
    if std::env::var_os("SLUICE_BLESS_METRICS").is_some() {
        let mut text = "# Every metric family the agent and the control service expose: name, type,\n\
                        # label names (-: none). Checked by introspection_e2e; regenerate with\n\
                        # SLUICE_BLESS_METRICS=1 cargo test -p sluice-tests --test introspection_e2e metric_families\n"
            .to_owned();
        for line in &served {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(METRICS_NAMES, text).expect("writing the metrics list");
        return;
    }
    let listed: BTreeSet<String> = std::fs::read_to_string(METRICS_NAMES)
        .unwrap_or_else(|e| panic!("{METRICS_NAMES}: {e}"))
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let missing: Vec<_> = listed.difference(&served).collect();
    let unlisted: Vec<_> = served.difference(&listed).collect();
    assert!(
        missing.is_empty() && unlisted.is_empty(),
        "the metrics served differ from {METRICS_NAMES}:\n  listed, not served:\n    {}\n  served, not listed:\n    {}",
        missing
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    "),
        unlisted
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n    "),
    );
}

#[test]
fn label_names_are_read_past_escaped_values() {
    let (name, labels) = sample_labels(r#"x_total{a="q\"},b=\\",b="",c="}"} 1"#);
    assert_eq!(name, "x_total");
    assert_eq!(labels, ["a", "b", "c"]);
    assert_eq!(sample_labels("y 2"), ("y", Vec::new()));
}
