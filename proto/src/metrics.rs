//! Prometheus text exposition (format 0.0.4), written by hand: the agent and
//! the control service both render their metrics from live state at scrape
//! time, so all they need is a correct writer, not a registry.

use std::fmt::Write as _;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metrics page under construction. Each family is declared once
/// ([`Exposition::family`]) and its samples follow it, as the format requires.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A histogram's `_bucket`, `_sum` and `_count` samples.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count;
            let _ = write!(self.out, "{name}_bucket");
            write_labels(&mut self.out, labels, Some(&number(*bound)));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let _ = write!(self.out, "{name}_bucket");
        write_labels(&mut self.out, labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", histogram.count);
        let _ = write!(self.out, "{name}_sum");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", number(histogram.sum));
        let _ = write!(self.out, "{name}_count");
        write_labels(&mut self.out, labels, None);
        let _ = writeln!(self.out, " {}", histogram.count);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn write_labels(out: &mut String, labels: &[(&str, &str)], le: Option<&str>) {
    if labels.is_empty() && le.is_none() {
        return;
    }
    out.push('{');
    let mut first = true;
    for (name, value) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
        if !first {
            out.push(',');
        }
        first = false;
        let _ = write!(out, "{name}=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
}

fn number(value: f64) -> String {
    if value.is_infinite() {
        return if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if value.fract() == 0.0 && value.abs() < 1e15 {
        return format!("{}", value as i64);
    }
    format!("{value}")
}

/// Serves `GET /metrics` (plain HTTP, as Prometheus scrapes) on `listener`
/// until the task is dropped; each scrape renders afresh with `render`
/// (`None`: the source is gone, answered 503).
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    use axum::{http::StatusCode, http::header::CONTENT_TYPE as HEADER, routing::get};
    let page = move || {
        let render = render.clone();
        async move {
            match render().await {
                Some(text) => (StatusCode::OK, [(HEADER, CONTENT_TYPE)], text),
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(HEADER, "text/plain")],
                    "shutting down\n".to_owned(),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(page))
        .fallback(|| async { (StatusCode::NOT_FOUND, "metrics are served at /metrics\n") });
    axum::serve(listener, app).await
}

/// Seconds, from 100 µs to 10 s: reconciles, API calls, store commits.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Observations counted per bucket (non-cumulative; the writer sums).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(LATENCY_BOUNDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping_follow_the_text_format() {
        let mut page = Exposition::default();
        page.family("sluice_x_total", "Things.\nCounted.", Kind::Counter);
        page.sample("sluice_x_total", &[("service", "a\"b\\c\nd")], 3.0);
        page.sample("sluice_x_total", &[], 0.5);
        let text = page.finish();
        assert_eq!(
            text,
            "# HELP sluice_x_total Things. Counted.\n\
             # TYPE sluice_x_total counter\n\
             sluice_x_total{service=\"a\\\"b\\\\c\\nd\"} 3\n\
             sluice_x_total 0.5\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 5.0] {
            h.observe(v);
        }
        let mut page = Exposition::default();
        page.histogram("d_seconds", &[("m", "x")], &h);
        let text = page.finish();
        assert!(
            text.contains("d_seconds_bucket{m=\"x\",le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{m=\"x\",le=\"1\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("d_seconds_bucket{m=\"x\",le=\"+Inf\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("d_seconds_sum{m=\"x\"} 6.25\n"), "{text}");
        assert!(text.contains("d_seconds_count{m=\"x\"} 4\n"), "{text}");
    }
}
