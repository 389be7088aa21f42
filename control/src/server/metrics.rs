//! The control service's Prometheus metrics (`GET /metrics`, plain HTTP on
//! `--metrics-listen`): API calls (a tower layer around every gRPC
//! service), store commits, and the nodes' programming progress.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
};

use super::Control;

/// Seconds, from 100 µs to 10 s: API calls, store commits.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug)]
struct MethodStats {
    /// Calls per gRPC status code name.
    codes: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

impl Default for MethodStats {
    fn default() -> Self {
        Self {
            codes: BTreeMap::new(),
            latency: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

/// What the control service counts as it serves.
pub struct ControlMetrics {
    /// Keyed by (gRPC service, method).
    api: Mutex<BTreeMap<(String, String), MethodStats>>,
    store_commits: Histogram,
    flow_events: AtomicU64,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self {
            api: Mutex::default(),
            store_commits: Histogram::new(LATENCY_BOUNDS),
            flow_events: AtomicU64::new(0),
        }
    }
}

impl ControlMetrics {
    fn record_call(&self, path: &str, code: &'static str, elapsed: Duration) {
        // Only our own and the standard services' methods are labels: a
        // client naming made-up paths must not grow the page.
        let (service, method) = match path.trim_start_matches('/').split_once('/') {
            Some((service, method))
                if service.starts_with("sluice.v1.") || service.starts_with("grpc.") =>
            {
                (service.to_owned(), method.to_owned())
            }
            _ => ("other".to_owned(), "other".to_owned()),
        };
        let mut api = self.api.lock().unwrap_or_else(|p| p.into_inner());
        let stats = api.entry((service, method)).or_default();
        *stats.codes.entry(code).or_default() += 1;
        stats.latency.observe(elapsed.as_secs_f64());
    }

    pub fn record_commit(&self, elapsed: Duration) {
        self.store_commits.observe(elapsed.as_secs_f64());
    }

    pub fn record_flow_events(&self, count: usize) {
        self.flow_events.fetch_add(count as u64, Ordering::Relaxed);
    }
}

/// Serves `GET /metrics` (plain HTTP, as Prometheus scrapes) on `listener`
/// until the task is dropped; each scrape renders afresh.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: Arc<Control>,
) -> std::io::Result<()> {
    use axum::{http::StatusCode, http::header::CONTENT_TYPE, routing::get};
    use prometheus_client::encoding::prometheus_text;
    let page = move || {
        let page = control.render_metrics();
        async move {
            match page {
                Ok(text) => (
                    StatusCode::OK,
                    [(CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
                    text,
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(CONTENT_TYPE, "text/plain")],
                    "encoding failed\n".to_owned(),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "metrics are served at /metrics\n") });
    axum::serve(listener, app).await
}

/// One node's programming progress.
#[derive(Debug)]
struct NodeProgress {
    name: String,
    applied_version: u64,
    lag: u64,
    connected: bool,
    /// Seconds since its last report, if any.
    report_age: Option<f64>,
}

/// What one page shows, copied out of the locks (a collector is `'static`).
#[derive(Debug)]
struct Snapshot {
    api: BTreeMap<(String, String), MethodStats>,
    store_commits: Histogram,
    flow_events: u64,
    objects: [(&'static str, usize); 4],
    view_version: u64,
    nodes: Vec<NodeProgress>,
}

/// -1 for never, else seconds.
#[derive(Debug)]
struct Age(Option<f64>);

impl EncodeGaugeValue for Age {
    fn encode(&self, encoder: &mut prometheus_client::encoding::GaugeValueEncoder) -> fmt::Result {
        match self.0 {
            Some(seconds) => seconds.encode(encoder),
            None => (-1i64).encode(encoder),
        }
    }
}

/// No labels.
const UNLABELLED: [(&str, &str); 0] = [];

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

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        family(
            e,
            "sluice_api_requests",
            "gRPC calls served, by method and status code.",
            self.api.iter().flat_map(|((service, method), stats)| {
                stats.codes.iter().map(move |(code, count)| {
                    (
                        [
                            ("service", service.as_str()),
                            ("method", method.as_str()),
                            ("code", *code),
                        ],
                        ConstCounter::new(*count),
                    )
                })
            }),
        )?;
        family(
            e,
            "sluice_api_request_duration_seconds",
            "Time from a gRPC call's arrival to its response (for streams: to the start of the stream).",
            self.api.iter().map(|((service, method), stats)| {
                (
                    [("service", service.as_str()), ("method", method.as_str())],
                    stats.latency.clone(),
                )
            }),
        )?;
        family(
            e,
            "sluice_store_commit_duration_seconds",
            "Time to commit one change durably to the store (acknowledged only after).",
            [(UNLABELLED, self.store_commits.clone())],
        )?;
        family(
            e,
            "sluice_flow_events_received",
            "Flow-log events the nodes reported.",
            [(UNLABELLED, ConstCounter::new(self.flow_events))],
        )?;
        family(
            e,
            "sluice_objects",
            "Objects in the desired state, by kind.",
            self.objects
                .iter()
                .map(|(kind, count)| ([("kind", *kind)], ConstGauge::new(*count as u64))),
        )?;
        family(
            e,
            "sluice_view_version",
            "The newest view version computed for the nodes.",
            [(UNLABELLED, ConstGauge::new(self.view_version))],
        )?;
        let per_node =
            |e: &mut DescriptorEncoder<'_>, name, help, value: fn(&NodeProgress) -> u64| {
                family(
                    e,
                    name,
                    help,
                    self.nodes
                        .iter()
                        .map(|n| ([("node", n.name.as_str())], ConstGauge::new(value(n)))),
                )
            };
        per_node(
            e,
            "sluice_node_applied_version",
            "The view version the node last reported as programmed.",
            |n| n.applied_version,
        )?;
        per_node(
            e,
            "sluice_node_version_lag",
            "View versions the node is behind (0: programmed with the newest).",
            |n| n.lag,
        )?;
        per_node(
            e,
            "sluice_node_connected",
            "1 while the node's agent watches its view.",
            |n| n.connected.into(),
        )?;
        family(
            e,
            "sluice_node_last_report_age_seconds",
            "Seconds since the node last reported (-1: never).",
            self.nodes.iter().map(|n| {
                (
                    [("node", n.name.as_str())],
                    ConstGauge::new(Age(n.report_age)),
                )
            }),
        )
    }
}

impl Control {
    /// The page, in the Prometheus text format 0.0.4.
    pub fn render_metrics(&self) -> Result<String, fmt::Error> {
        let metrics = &self.metrics;
        let state = self.state();
        let now = SystemTime::now();
        let nodes = {
            let live = self.cluster_live();
            state
                .nodes
                .keys()
                .map(|name| {
                    let l = live.get(name);
                    let applied_version = l.map_or(0, |l| l.applied_version);
                    NodeProgress {
                        name: name.clone(),
                        applied_version,
                        lag: state.view.version.saturating_sub(applied_version),
                        connected: l.is_some_and(|l| l.watchers > 0),
                        report_age: l
                            .and_then(|l| l.last_report)
                            .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                    }
                })
                .collect()
        };
        let snapshot = Snapshot {
            api: metrics
                .api
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            store_commits: metrics.store_commits.clone(),
            flow_events: metrics.flow_events.load(Ordering::Relaxed),
            objects: [
                (
                    "Service",
                    state.objects.count(sluice_model::ObjectKind::Service),
                ),
                (
                    "Endpoint",
                    state.objects.count(sluice_model::ObjectKind::Endpoint),
                ),
                (
                    "NetworkPolicy",
                    state.objects.count(sluice_model::ObjectKind::NetworkPolicy),
                ),
                ("Node", state.nodes.len()),
            ],
            view_version: state.view.version,
            nodes,
        };
        encode(snapshot)
    }
}

/// The page of one collector, in the text format 0.0.4.
fn encode(collector: impl Collector) -> Result<String, fmt::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(collector));
    let mut page = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut page, &registry)?;
    Ok(page)
}

/// Counts and times every gRPC call (a tower layer on the server).
#[derive(Clone)]
pub struct ApiMetricsLayer(pub Arc<Control>);

impl<S> tower::Layer<S> for ApiMetricsLayer {
    type Service = ApiMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiMetricsService {
            inner,
            control: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ApiMetricsService<S> {
    inner: S,
    control: Arc<Control>,
}

impl<S, B, R> tower::Service<http::Request<B>> for ApiMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let started = Instant::now();
        let response = self.inner.call(request);
        let control = self.control.clone();
        Box::pin(async move {
            let result = response.await;
            // A failed unary call answers with the status in the headers
            // (trailers only); a successful one sends it after the body.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .map_or("OK", |v| code_name(v.as_bytes())),
                Err(_) => "transport_error",
            };
            control.metrics.record_call(&path, code, started.elapsed());
            result
        })
    }
}

fn code_name(value: &[u8]) -> &'static str {
    use tonic::Code;
    match Code::from_bytes(value) {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_per_method_and_code_and_unknown_paths_are_folded() {
        let metrics = ControlMetrics::default();
        metrics.record_call("/sluice.v1.Resources/Apply", "OK", Duration::from_millis(3));
        metrics.record_call("/sluice.v1.Resources/Apply", "OK", Duration::from_millis(4));
        metrics.record_call(
            "/sluice.v1.Resources/Apply",
            "Aborted",
            Duration::from_millis(1),
        );
        metrics.record_call("/evil/../x", "Unimplemented", Duration::ZERO);
        let api = metrics.api.lock().unwrap_or_else(|p| p.into_inner());
        let apply = &api[&("sluice.v1.Resources".to_owned(), "Apply".to_owned())];
        assert_eq!(apply.codes["OK"], 2);
        assert_eq!(apply.codes["Aborted"], 1);
        assert_eq!(apply.latency.count(), 3);
        assert!(api.contains_key(&("other".to_owned(), "other".to_owned())));
        assert_eq!(api.len(), 2);
    }

    #[test]
    fn the_page_follows_the_text_format_with_escaped_labels_and_cumulative_buckets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        for ms in [50, 500, 700, 5000] {
            control.metrics.record_call(
                "/sluice.v1.Resources/Ap\"p\\ly",
                "OK",
                Duration::from_millis(ms),
            );
        }
        let text = control.render_metrics().expect("encodes");
        let method = r#"service="sluice.v1.Resources",method="Ap\"p\\ly""#;
        for expected in [
            "# HELP sluice_api_requests_total gRPC calls served, by method and status code.\n\
             # TYPE sluice_api_requests_total counter\n"
                .to_owned(),
            format!("sluice_api_requests_total{{{method},code=\"OK\"}} 4\n"),
            format!("sluice_api_request_duration_seconds_bucket{{{method},le=\"0.05\"}} 1\n"),
            format!("sluice_api_request_duration_seconds_bucket{{{method},le=\"0.1\"}} 1\n"),
            format!("sluice_api_request_duration_seconds_bucket{{{method},le=\"1\"}} 3\n"),
            format!("sluice_api_request_duration_seconds_bucket{{{method},le=\"5\"}} 4\n"),
            format!("sluice_api_request_duration_seconds_bucket{{{method},le=\"+Inf\"}} 4\n"),
            format!("sluice_api_request_duration_seconds_sum{{{method}}} 6.25\n"),
            format!("sluice_api_request_duration_seconds_count{{{method}}} 4\n"),
            "sluice_store_commit_duration_seconds_bucket{le=\"0.0001\"} ".to_owned(),
            "# TYPE sluice_flow_events_received_total counter\n\
             sluice_flow_events_received_total 0\n"
                .to_owned(),
            "sluice_objects{kind=\"NetworkPolicy\"} 0\n".to_owned(),
            "# TYPE sluice_node_last_report_age_seconds gauge\n".to_owned(),
        ] {
            assert!(text.contains(&expected), "{expected:?} not in\n{text}");
        }
        assert!(!text.contains("# EOF"), "{text}");
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, 10, "{text}");
    }

    #[test]
    fn a_node_that_never_reported_is_minus_one_seconds_old() {
        let page = |age| {
            let nodes = vec![NodeProgress {
                name: "n1".to_owned(),
                applied_version: 3,
                lag: 1,
                connected: true,
                report_age: age,
            }];
            let snapshot = Snapshot {
                api: BTreeMap::new(),
                store_commits: Histogram::new(LATENCY_BOUNDS),
                flow_events: 0,
                objects: [("Node", 1); 4],
                view_version: 4,
                nodes,
            };
            encode(snapshot).expect("encodes")
        };
        let never = page(None);
        assert!(
            never.contains("sluice_node_last_report_age_seconds{node=\"n1\"} -1\n"),
            "{never}"
        );
        assert!(
            never.contains("sluice_node_version_lag{node=\"n1\"} 1\n"),
            "{never}"
        );
        assert!(
            never.contains("sluice_node_connected{node=\"n1\"} 1\n"),
            "{never}"
        );
        let recent = page(Some(1.5));
        assert!(
            recent.contains("sluice_node_last_report_age_seconds{node=\"n1\"} 1.5\n"),
            "{recent}"
        );
    }

    #[test]
    fn grpc_status_values_have_their_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"7"), "PermissionDenied");
        assert_eq!(code_name(b"10"), "Aborted");
    }
}
