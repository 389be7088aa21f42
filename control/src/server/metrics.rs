//! The control service's Prometheus metrics (`GET /metrics`, plain HTTP on
//! `--metrics-listen`): API calls (a tower layer around every gRPC
//! service), store commits, and the nodes' programming progress.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use sluice_api::metrics::{Exposition, Histogram, Kind};

use super::Control;

#[derive(Default)]
struct MethodStats {
    /// Calls per gRPC status code name.
    codes: BTreeMap<&'static str, u64>,
    latency: Histogram,
}

/// What the control service counts as it serves.
#[derive(Default)]
pub struct ControlMetrics {
    /// Keyed by (gRPC service, method).
    api: Mutex<BTreeMap<(String, String), MethodStats>>,
    store_commits: Mutex<Histogram>,
    flow_events: AtomicU64,
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
        self.store_commits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(elapsed.as_secs_f64());
    }

    pub fn record_flow_events(&self, count: usize) {
        self.flow_events.fetch_add(count as u64, Ordering::Relaxed);
    }
}

impl Control {
    pub fn render_metrics(&self) -> String {
        let mut page = Exposition::default();
        let metrics = &self.metrics;
        {
            let api = metrics.api.lock().unwrap_or_else(|p| p.into_inner());
            page.family(
                "sluice_api_requests_total",
                "gRPC calls served, by method and status code.",
                Kind::Counter,
            );
            for ((service, method), stats) in api.iter() {
                for (code, count) in &stats.codes {
                    page.sample(
                        "sluice_api_requests_total",
                        &[("service", service), ("method", method), ("code", code)],
                        *count as f64,
                    );
                }
            }
            page.family(
                "sluice_api_request_duration_seconds",
                "Time from a gRPC call's arrival to its response (for streams: to the start of the stream).",
                Kind::Histogram,
            );
            for ((service, method), stats) in api.iter() {
                page.histogram(
                    "sluice_api_request_duration_seconds",
                    &[("service", service), ("method", method)],
                    &stats.latency,
                );
            }
        }
        page.family(
            "sluice_store_commit_duration_seconds",
            "Time to commit one change durably to the store (acknowledged only after).",
            Kind::Histogram,
        );
        page.histogram(
            "sluice_store_commit_duration_seconds",
            &[],
            &metrics
                .store_commits
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        page.family(
            "sluice_flow_events_received_total",
            "Flow-log events the nodes reported.",
            Kind::Counter,
        );
        page.sample(
            "sluice_flow_events_received_total",
            &[],
            metrics.flow_events.load(Ordering::Relaxed) as f64,
        );

        let state = self.state();
        page.family(
            "sluice_objects",
            "Objects in the desired state, by kind.",
            Kind::Gauge,
        );
        for (kind, count) in [
            ("Service", state.services.len()),
            ("Endpoint", state.endpoints.len()),
            ("NetworkPolicy", state.policies.len()),
            ("Node", state.nodes.len()),
        ] {
            page.sample("sluice_objects", &[("kind", kind)], count as f64);
        }
        page.family(
            "sluice_view_version",
            "The newest view version computed for the nodes.",
            Kind::Gauge,
        );
        page.sample("sluice_view_version", &[], state.view_version as f64);

        let live = self.live().clone();
        let now = SystemTime::now();
        let nodes: Vec<_> = state
            .nodes
            .keys()
            .map(|name| (name.as_str(), live.get(name).cloned().unwrap_or_default()))
            .collect();
        let per_node = |page: &mut Exposition,
                        name: &str,
                        help: &str,
                        value: &dyn Fn(&super::NodeLive) -> f64| {
            page.family(name, help, Kind::Gauge);
            for (node, l) in &nodes {
                page.sample(name, &[("node", node)], value(l));
            }
        };
        per_node(
            &mut page,
            "sluice_node_applied_version",
            "The view version the node last reported as programmed.",
            &|l| l.applied_version as f64,
        );
        per_node(
            &mut page,
            "sluice_node_version_lag",
            "View versions the node is behind (0: programmed with the newest).",
            &|l| state.view_version.saturating_sub(l.applied_version) as f64,
        );
        per_node(
            &mut page,
            "sluice_node_connected",
            "1 while the node's agent watches its view.",
            &|l| f64::from(u8::from(l.watchers > 0)),
        );
        per_node(
            &mut page,
            "sluice_node_last_report_age_seconds",
            "Seconds since the node last reported (-1: never).",
            &|l| {
                l.last_report.map_or(-1.0, |t| {
                    now.duration_since(t).unwrap_or_default().as_secs_f64()
                })
            },
        );
        page.finish()
    }
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
    fn grpc_status_values_have_their_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"7"), "PermissionDenied");
        assert_eq!(code_name(b"10"), "Aborted");
    }
}
