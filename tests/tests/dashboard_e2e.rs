//! The web dashboard end to end, in a real headless Chromium: a cluster in
//! namespaces (see `sluice_tests::cluster`), the URL `sluicectl dashboard`
//! prints opened in a browser that runs in the control service's namespace
//! and trusts only the cluster CA's key, numbers that change while traffic
//! flows (in the same page, no reload), a policy's verdict counts and a
//! refused flow in the live flow view, 401 without a valid token, 400 for
//! plain HTTP, a viewer of another namespace who does not see the service
//! and loses the page when the grant is deleted. Saves a screenshot to
//! `target/dashboard.png`.
//!
//! Requires root and Debian's `chromium` and `chromium-driver` (`cargo xtask
//! bootstrap` installs them). Run with `cargo xtask test`, or after `cargo
//! build --workspace --exclude sluice-ebpf --bins` with `cargo test -p
//! sluice-tests --test dashboard_e2e`.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use sluice_tests::{
    browser::{self, Browser},
    cluster::{CONTROL_ADDR, Cluster, TIMEOUT, backend_addr},
    http_get,
};

/// The dashboard's default port, in the control service's namespace.
const DASHBOARD_PORT: u16 = 7444;
/// Bound on the page showing a change: agents report every few seconds.
const LIVE: Duration = Duration::from_secs(40);
/// New flows through node-1 the page must see while it watches.
const REQUESTS: usize = 300;
/// Bound on the requests node-1's client sends in the background.
const MAX_BACKGROUND: usize = 5_000;

fn manifests() -> String {
    let mut docs = vec![
        "kind: Service
namespace: shop
name: web
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
selector: { app: web }
"
        .to_owned(),
        // Another namespace's service: what the viewer of `blog` sees.
        "kind: Service
namespace: blog
name: news
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
selector: { app: news }
"
        .to_owned(),
        // Node-1's clients only: node-2's client is refused and shows up in
        // the policy's denied count and in the flow view.
        "kind: NetworkPolicy
namespace: shop
name: web-ingress
selector: { app: web }
ingress:
  - from: [{ cidr: 198.18.1.0/24 }]
    ports: [{ port: 8080, protocol: TCP }]
"
        .to_owned(),
        "kind: Grant
namespace: blog
name: bob-views-blog
subject: { user: bob }
role: viewer
scope: blog
"
        .to_owned(),
    ];
    for i in 1..=2 {
        docs.push(format!(
            "kind: Endpoint\nnamespace: shop\nname: web-{i}\nlabels: {{ app: web }}\naddress: {}\n",
            backend_addr(i)
        ));
    }
    docs.join("---\n")
}

/// base64 SHA-256 of the cluster CA's public key (SPKI), from the first
/// certificate of a sluicectl config (its `ca`): what Chromium trusts.
fn ca_spki_pin(cluster: &Cluster) -> String {
    let path = cluster.control.ca_pem_file();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | openssl base64 -A",
            path.display()
        ))
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `sluicectl -o json dashboard --ttl TTL` with `config`: the URL it prints.
fn dashboard_url(cluster: &Cluster, config: &std::path::Path, ttl: &str) -> String {
    let out = cluster
        .control
        .sluicectl_as(config, &["-o", "json", "dashboard", "--ttl", ttl]);
    assert!(out.status.success(), "sluicectl dashboard: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let url = v["url"].as_str().expect("a url").to_owned();
    let base = format!("https://{}:{DASHBOARD_PORT}/#token=", CONTROL_ADDR.ip());
    assert!(url.starts_with(&base), "{url}");
    url
}

/// A number the page shows, by its `data-metric` inside `scope` (a CSS
/// selector); null when absent.
fn metric_script(scope: &str, metric: &str) -> String {
    format!(
        "const e = document.querySelector('{scope} [data-metric=\"{metric}\"]'); \
         return e ? Number(e.dataset.value) : null;"
    )
}

fn screenshot_path() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("dashboard.png")
}

#[test]
fn the_dashboard_shows_the_cluster_live_to_the_holder_of_a_token_within_their_grants() {
    if !browser::available() {
        eprintln!(
            "skipped: needs Debian's chromium and chromium-driver (cargo xtask bootstrap installs them)"
        );
        return;
    }
    let cluster = Cluster::start(2, 2, &[]);
    cluster.apply(&manifests());
    cluster.wait_programmed();
    let service = cluster
        .control
        .sluicectl_json(&["get", "service", "web", "-n", "shop"]);
    let vip = service["vip"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VIP in {service}"));
    let to = SocketAddrV4::new(vip, 80);
    // Some traffic before the page opens: counters exist.
    cluster.topology.node(1).client.enter(|| {
        for _ in 0..10 {
            http_get(to, TIMEOUT).expect("node-1's client is admitted");
        }
    });

    let admin_url = dashboard_url(&cluster, &cluster.control.admin_conf(), "10m");
    let bob_conf = cluster.control.scratch().join("bob.conf");
    cluster.control.sluicectl_ok(&[
        "user",
        "create",
        "bob",
        "--out",
        &bob_conf.display().to_string(),
    ]);
    let bob_url = dashboard_url(&cluster, &bob_conf, "10m");
    let base = format!("https://{}:{DASHBOARD_PORT}/", CONTROL_ADDR.ip());

    let browser = Browser::start(&cluster.topology.control, &ca_spki_pin(&cluster));
    browser.goto(&admin_url);
    let web = "[data-service=\"shop/web\"]";
    browser.wait_for(
        "the page shows both nodes and shop/web with its two backends",
        &format!(
            "return [document.querySelectorAll('[data-node]').length, \
                     document.querySelectorAll('{web} [data-backend]').length, \
                     location.hash];"
        ),
        LIVE,
        |v| v[0] == 2 && v[1] == 2,
    );
    // The token left the address bar.
    assert_eq!(browser.eval("return location.hash;"), "");
    browser.wait_for(
        "both nodes healthy and up to date",
        "return [...document.querySelectorAll('[data-node] .badge')].map(e => e.textContent);",
        LIVE,
        |v| {
            v.as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|h| h == "ok"))
        },
    );
    // A mark that a reload would erase.
    browser.eval("window.sluiceTestMark = 42; return null;");
    let flows_before = browser.eval(&metric_script(&format!("{web} .svc-stats"), "flows"));
    let flows_before = flows_before.as_f64().expect("a flow total");

    // Traffic through node-1 while the page watches, a request every 20 ms
    // (so that every report interval sees some), until the screenshot is
    // taken; bounded in count, and stopped at once if a check fails.
    let sending = AtomicBool::new(true);
    thread::scope(|scope| {
        scope.spawn(|| {
            cluster.topology.node(1).client.enter(|| {
                for _ in 0..MAX_BACKGROUND {
                    if !sending.load(Ordering::SeqCst) {
                        break;
                    }
                    http_get(to, TIMEOUT).expect("node-1's client is admitted");
                    thread::sleep(Duration::from_millis(20));
                }
            })
        });
        let _stop = StopOnDrop(&sending);
        watch_traffic(&browser, &cluster, to, flows_before);
        let shot = screenshot_path();
        browser.screenshot(&shot);
        eprintln!("screenshot: {}", shot.display());
    });

    // No token, a wrong one: 401, with the reason.
    let status = browser.eval_async(
        "const done = arguments[arguments.length - 1]; \
         fetch('/api/snapshot').then(r => done(r.status), e => done(String(e)));",
    );
    assert_eq!(status, 401);
    let status = browser.eval_async(
        "const done = arguments[arguments.length - 1]; \
         fetch('/api/events', { headers: { Authorization: 'Bearer ' + '0'.repeat(64) } })\
         .then(r => r.json().then(b => done([r.status, b.error])), e => done(String(e)));",
    );
    assert_eq!(status[0], 401, "{status}");
    assert!(
        status[1].as_str().is_some_and(|e| e.contains("unknown")),
        "{status}"
    );
    let refused_page = |url: &str| {
        browser.eval("sessionStorage.clear(); return null;");
        browser.goto("about:blank");
        browser.goto(url);
        browser.wait_for(
            "the page says why it shows nothing",
            "return [document.body.dataset.refused || null, \
                     document.getElementById('refused-message').textContent];",
            LIVE,
            |v| v[0] != Value::Null,
        )
    };
    let v = refused_page(&base);
    assert_eq!(v[0], "401", "{v}");
    assert!(
        v[1].as_str()
            .is_some_and(|m| m.contains("no dashboard token")),
        "{v}"
    );
    let v = refused_page(&format!("{base}#token={}", "0".repeat(64)));
    assert_eq!(v[0], "401", "{v}");
    assert!(v[1].as_str().is_some_and(|m| m.contains("unknown")), "{v}");

    // Plain HTTP is refused, with a pointer to https.
    let plain = cluster.topology.control.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "-w",
        "\n%{http_code}",
        &base.replace("https://", "http://"),
    ]);
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(
        plain.ends_with("\n400") && plain.contains("HTTPS only"),
        "{plain}"
    );

    // Bob views `blog` only: its service, not shop's, no nodes, no flows.
    browser.eval("sessionStorage.clear(); return null;");
    browser.goto("about:blank");
    browser.goto(&bob_url);
    let seen = browser.wait_for(
        "bob's page",
        "return document.body.dataset.updated ? \
           [[...document.querySelectorAll('[data-service]')].map(e => e.dataset.service), \
            document.getElementById('nodes').textContent, \
            document.querySelectorAll('[data-policy]').length] : null;",
        LIVE,
        |v| !v.is_null(),
    );
    assert_eq!(seen[0], serde_json::json!(["blog/news"]), "{seen}");
    assert!(
        seen[1]
            .as_str()
            .is_some_and(|t| t.contains("lacks the permission `list nodes`")),
        "{seen}"
    );
    assert_eq!(seen[2], 0, "{seen}");
    // Deleting his grant ends his stream: the next second says 403.
    cluster
        .control
        .sluicectl_ok(&["delete", "grant", "bob-views-blog", "-n", "blog"]);
    let v = browser.wait_for(
        "bob's page after his grant is gone",
        "return [document.body.dataset.refused || null, \
                 document.getElementById('refused-message').textContent];",
        Duration::from_secs(10),
        |v| v[0] != Value::Null,
    );
    assert_eq!(v[0], "403", "{v}");
    assert!(v[1].as_str().is_some_and(|m| m.contains("bob")), "{v}");

    // A token that expires ends the live page with a 401 saying so.
    let short = dashboard_url(&cluster, &cluster.control.admin_conf(), "6s");
    browser.eval("sessionStorage.clear(); return null;");
    browser.goto("about:blank");
    browser.goto(&short);
    browser.wait_for(
        "the page is live before the token expires",
        "return document.body.dataset.updated || null;",
        Duration::from_secs(6),
        |v| !v.is_null(),
    );
    let v = browser.wait_for(
        "the page after the token expired",
        "return [document.body.dataset.refused || null, \
                 document.getElementById('refused-message').textContent];",
        Duration::from_secs(15),
        |v| v[0] != Value::Null,
    );
    assert_eq!(v[0], "401", "{v}");
    assert!(v[1].as_str().is_some_and(|m| m.contains("expired")), "{v}");
}

/// Sets the flag to false when dropped (a panic included): stops the
/// background traffic before the scope waits for it.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// While node-1's client sends: the numbers change in the same page, the
/// backends share the flows, and node-2's refused client shows up in the
/// policy's counts and the flow view.
fn watch_traffic(browser: &Browser<'_>, cluster: &Cluster, to: SocketAddrV4, flows_before: f64) {
    let web = "[data-service=\"shop/web\"]";
    let deadline = Instant::now() + LIVE;
    let mut max_rate: f64 = 0.0;
    let mut flows = flows_before;
    while Instant::now() < deadline {
        let v = browser.eval(&format!(
            "const m = (k) => {{ const e = document.querySelector('{web} .svc-stats [data-metric=\"' + k + '\"]'); \
             return e ? Number(e.dataset.value) : null; }}; \
             return [m('flows'), m('packets-rate'), window.sluiceTestMark];"
        ));
        assert_eq!(v[2], 42, "the page reloaded");
        flows = v[0].as_f64().unwrap_or(flows);
        max_rate = max_rate.max(v[1].as_f64().unwrap_or(0.0));
        if flows >= flows_before + REQUESTS as f64 && max_rate > 0.0 {
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    assert!(
        flows >= flows_before + REQUESTS as f64,
        "the flow total went from {flows_before} to only {flows} in the same page"
    );
    assert!(
        max_rate > 0.0,
        "the packet rate never rose above 0 while traffic flowed"
    );
    // The two backends share the flows (round-robin: about half each).
    let shares = browser.eval(&format!(
        "return [...document.querySelectorAll('{web} [data-backend] [data-metric=\"share\"]')]\
         .map(e => Number(e.dataset.value));"
    ));
    let shares: Vec<f64> = shares
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    assert_eq!(shares.len(), 2, "{shares:?}");
    assert!((shares[0] + shares[1] - 100.0).abs() < 1.0, "{shares:?}");
    assert!(
        shares.iter().all(|s| (30.0..=70.0).contains(s)),
        "{shares:?}"
    );
    // The bars are drawn to scale (their width is set despite the page's
    // strict CSP).
    let bars = browser.eval(&format!(
        "return [...document.querySelectorAll('{web} .bar')]\
         .map(b => b.firstElementChild.getBoundingClientRect().width / b.getBoundingClientRect().width);"
    ));
    let bars: Vec<f64> = bars
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    assert!(
        bars.len() == 2 && bars.iter().all(|b| (0.25..=0.75).contains(b)),
        "bar fill ratios {bars:?} for shares {shares:?}"
    );

    // Node-2's client is refused: the policy's denied count and the flow view
    // show it.
    cluster.topology.node(2).client.enter(|| {
        for _ in 0..3 {
            let refused = http_get(to, Duration::from_millis(700));
            assert!(refused.is_err(), "node-2's client got through: {refused:?}");
        }
    });
    let policy = "[data-policy=\"shop/web-ingress\"]";
    browser.wait_for(
        "the policy counts allowed and denied flows",
        &format!(
            "return [(() => {{ {} }})(), (() => {{ {} }})()];",
            metric_script(policy, "allowed"),
            metric_script(policy, "denied")
        ),
        LIVE,
        |v| v[0].as_f64().unwrap_or(0.0) >= REQUESTS as f64 && v[1].as_f64().unwrap_or(0.0) >= 1.0,
    );
    let client2 = cluster.topology.node(2).client_addr().to_string();
    browser.wait_for(
        "the refused flow in the live flow view",
        "return [...document.querySelectorAll('tr.flow')].map(r => r.textContent);",
        LIVE,
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    r.as_str()
                        .is_some_and(|t| t.contains(&client2) && t.contains("denied"))
                })
            })
        },
    );
}
