//! The web dashboard: HTTPS on its own port, with the control service's own
//! server certificate, for people with a browser and a token from
//! `sluicectl dashboard`.
//!
//! | path | what |
//! |---|---|
//! | `/`, `/app.js`, `/app.css` | the page (embedded; no data in it, works offline) |
//! | `/api/snapshot` | one [`snapshot::Snapshot`] as JSON |
//! | `/api/events` | a snapshot every second, as server-sent events |
//!
//! The API paths need `Authorization: Bearer <token>`; the page reads the
//! token from the URL's fragment (`#token=…`), which browsers never send to
//! a server, so it stays out of proxies' and servers' access logs. No token,
//! an unknown or an expired one: 401 with the reason; a caller whose grants
//! let them see nothing: 403. Each second of a stream re-checks both, so an
//! expired token or a revoked grant ends it. Plain HTTP gets a short 400
//! pointing to `https://` instead of a TLS alert it cannot read.
//!
//! The page uses `fetch` with a streamed body rather than `EventSource`,
//! which cannot send an `Authorization` header (the token would have to go
//! into the URL or a cookie).

pub mod snapshot;
pub mod tokens;

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{
        IntoResponse as _, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use sluice_api::v1;
use sluice_model::observe::{FlowEvent, FlowFilter};
use sluice_pki::PkiError;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpListener,
    sync::mpsc::{self, error::TryRecvError},
};
use tracing::{debug, info};

use super::Control;
use crate::rates::Rates;
use crate::{error::ApiError, rbac::Caller};
use tokens::{IssueError, TokenRefused, Tokens};

/// Where the dashboard listens unless told otherwise (`--dashboard-listen`).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7444";
/// How often a live stream sends a snapshot.
pub const TICK: Duration = Duration::from_secs(1);
/// Live streams open at once, over all tokens: each costs a snapshot per
/// second, so a token holder cannot make the control service spend without
/// bound.
pub const MAX_STREAMS: usize = 256;
/// A client must finish its TLS handshake, and send its request head, in this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Only what the page itself loads; no inline script, no other origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The dashboard's live state inside the control service.
#[derive(Default)]
pub struct Dashboard {
    pub tokens: Tokens,
    rates: Mutex<Rates>,
    /// Set once it serves; `None`: disabled.
    port: OnceLock<u16>,
    /// Live streams open now.
    streams: AtomicUsize,
}

/// Counts a live stream while it lives.
struct StreamSlot(Arc<Control>);

impl StreamSlot {
    fn take(control: &Arc<Control>) -> Option<Self> {
        let open = control.dashboard.streams.fetch_add(1, Ordering::SeqCst);
        if open >= MAX_STREAMS {
            control.dashboard.streams.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(control.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.dashboard.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Control {
    /// A dashboard token for `caller` (the `CreateDashboardToken` call).
    pub fn create_dashboard_token(
        &self,
        caller: &Caller,
        ttl_seconds: u64,
    ) -> Result<v1::CreateDashboardTokenResponse, ApiError> {
        let port = *self.dashboard.port.get().ok_or_else(|| ApiError::Invalid {
            message: "this control service serves no dashboard (it was started with \
                      --dashboard-listen off)"
                .to_owned(),
        })?;
        // A token that could show nothing is refused now, with the missing
        // permission, rather than as a 403 in the browser later.
        self.dashboard_snapshot(caller, &Mutex::default(), &[])?;
        let issued = self
            .dashboard
            .tokens
            .issue(caller.clone(), Duration::from_secs(ttl_seconds))
            .map_err(|e| match e {
                IssueError::Random(source) => ApiError::Pki(PkiError::Random { source }),
                other => ApiError::Invalid {
                    message: other.to_string(),
                },
            })?;
        info!(user = %caller.name, "issued a dashboard token");
        Ok(v1::CreateDashboardTokenResponse {
            token: issued.token,
            expires: super::state::rfc3339(issued.expires),
            port: u32::from(port),
        })
    }

    /// Serves the dashboard on `listener` with `tls` (the API's certificate,
    /// without client authentication: browsers bring a token instead). The
    /// port is recorded at once, before the returned future first runs, so
    /// that tokens can be issued as soon as the API serves.
    pub(super) fn serve_dashboard(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let port = listener.local_addr().map_or(0, |a| a.port());
        let _ = self.dashboard.port.set(port);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let router = router(self);
        async move {
            info!(listen = ?listener.local_addr().ok(), "serving the dashboard (HTTPS only)");
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, typically: wait rather than spin.
                        debug!("dashboard accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, acceptor, router, port).await {
                        debug!(%peer, "dashboard connection: {e}");
                    }
                });
            }
        }
    }
}

/// A TLS record of type handshake starts every TLS connection; anything else
/// is most likely plain HTTP.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    port: u16,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await??;
    if peeked == 0 {
        return Ok(());
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        let body = format!(
            "This is the Sluice dashboard; it is served over HTTPS only: https://<host>:{port}/ \
             (the URL `sluicectl dashboard` prints).\n"
        );
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await?;
        return Ok(());
    }
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await??;
    let service = hyper_util::service::TowerToHyperService::new(router);
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await?;
    Ok(())
}

fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n") })
        .with_state(control)
}

/// Headers every answer carries: no caching of data, no sniffing, no
/// framing, no referrer (the page's URL holds the token in its fragment).
fn response(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    with_headers(r)
}

/// Adds the headers of [`response`] to `r` (replacing axum's own
/// `Cache-Control` on a stream).
fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    r
}

fn asset(content: &'static str, content_type: &str) -> Response {
    response(StatusCode::OK, content_type, Body::from(content))
}

fn text(status: StatusCode, message: &'static str) -> Response {
    response(status, "text/plain; charset=utf-8", Body::from(message))
}

/// `{"status": 401, "error": "…"}`, the shape the page shows.
fn error_json(status: StatusCode, message: &str) -> String {
    serde_json::json!({ "status": status.as_u16(), "error": message }).to_string()
}

fn refused(status: StatusCode, message: &str) -> Response {
    let mut r = response(
        status,
        "application/json",
        Body::from(error_json(status, message)),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"sluice-dashboard\""),
        );
    }
    r
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn authenticate(control: &Control, headers: &HeaderMap) -> Result<Caller, TokenRefused> {
    control.dashboard.tokens.resolve(bearer(headers).as_deref())
}

fn unauthenticated(e: &TokenRefused) -> Response {
    refused(StatusCode::UNAUTHORIZED, &e.to_string())
}

/// The recent flow events and the live feed, for one page: subscribed while
/// the caller may see flows.
#[derive(Default)]
struct FlowFeed {
    recent: VecDeque<Arc<FlowEvent>>,
    feed: Option<mpsc::Receiver<Arc<FlowEvent>>>,
}

/// Events taken from the feed per tick at most: a backlog of the store's
/// recent events (up to [`super::flows::KEPT`]) drains in one tick.
const DRAIN_PER_TICK: usize = super::flows::KEPT + 1_000;

impl FlowFeed {
    /// Catches up with the feed; subscribes if the caller may see flows
    /// (`sluicectl flows`'s permission), forgets everything if not.
    async fn update(&mut self, control: &Control, caller: &Caller, follow: bool) {
        if self.feed.is_none() {
            match control.follow_flows(caller, FlowFilter::default(), follow) {
                Ok(feed) => self.feed = Some(feed),
                Err(_) => {
                    self.recent.clear();
                    return;
                }
            }
        }
        let Some(feed) = self.feed.as_mut() else {
            return;
        };
        for _ in 0..DRAIN_PER_TICK {
            // The store replays its recent events through a small channel:
            // give its task a moment to refill before calling it caught up.
            let next = match feed.try_recv() {
                Err(TryRecvError::Empty) => {
                    match tokio::time::timeout(Duration::from_millis(5), feed.recv()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                }
                Ok(next) => Some(next),
                Err(TryRecvError::Disconnected) => None,
            };
            match next {
                Some(event) => {
                    if self.recent.len() == snapshot::FLOWS_SHOWN {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(event);
                }
                None => {
                    self.feed = None;
                    break;
                }
            }
        }
    }

    fn events(&self) -> Vec<Arc<FlowEvent>> {
        self.recent.iter().cloned().collect()
    }
}

async fn snapshot(State(control): State<Arc<Control>>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&control, &headers) {
        Ok(c) => c,
        Err(e) => return unauthenticated(&e),
    };
    let mut flows = FlowFeed::default();
    flows.update(&control, &caller, false).await;
    match control.dashboard_snapshot(&caller, &control.dashboard.rates, &flows.events()) {
        Ok(s) => match serde_json::to_string(&s) {
            Ok(json) => response(StatusCode::OK, "application/json", Body::from(json)),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding the snapshot\n"),
        },
        Err(denied) => refused(StatusCode::FORBIDDEN, &denied.to_string()),
    }
}

/// A server-sent event: `event: NAME` and one `data:` line (JSON has no
/// line breaks), the shape the page parses.
fn sse(event: &str, data: &str) -> Event {
    Event::default().event(event).data(data)
}

async fn events(State(control): State<Arc<Control>>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&control, &headers) {
        Ok(c) => c,
        Err(e) => return unauthenticated(&e),
    };
    if let Err(denied) = control.dashboard_snapshot(&caller, &control.dashboard.rates, &[]) {
        return refused(StatusCode::FORBIDDEN, &denied.to_string());
    }
    let Some(token) = bearer(&headers) else {
        return unauthenticated(&TokenRefused::Missing);
    };
    let Some(slot) = StreamSlot::take(&control) else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("too many live dashboards are open ({MAX_STREAMS}); close some and reload"),
        );
    };
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(2);
    tokio::spawn(async move {
        let _slot = slot;
        stream_events(control, token, tx).await;
    });
    // The keep-alive comment (`:`) only goes out if no event did for 15 s,
    // which a healthy stream never lets happen; the page skips it.
    let sse =
        Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default());
    let mut r = with_headers(sse.into_response());
    // Proxies must not hold the stream back.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Sends a snapshot every [`TICK`] until the page goes away, the token
/// expires or the caller's grants no longer show anything (a `refused` event
/// with the reason, then the end).
async fn stream_events(
    control: Arc<Control>,
    token: String,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flows = FlowFeed::default();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        let caller = match control.dashboard.tokens.resolve(Some(&token)) {
            Ok(c) => c,
            Err(e) => {
                let data = error_json(StatusCode::UNAUTHORIZED, &e.to_string());
                let _ = tx.send(Ok(sse("refused", &data))).await;
                return;
            }
        };
        flows.update(&control, &caller, true).await;
        let message =
            match control.dashboard_snapshot(&caller, &control.dashboard.rates, &flows.events()) {
                Ok(s) => match serde_json::to_string(&s) {
                    Ok(json) => sse("snapshot", &json),
                    Err(_) => continue,
                },
                Err(denied) => {
                    let data = error_json(StatusCode::FORBIDDEN, &denied.to_string());
                    let _ = tx.send(Ok(sse("refused", &data))).await;
                    return;
                }
            };
        if tx.send(Ok(message)).await.is_err() {
            return;
        }
    }
}

/// The dashboard's TLS configuration: the API's certificate chain and key,
/// HTTP/1.1, no client certificates.
pub fn tls_config(
    ca: &sluice_pki::ClusterCa,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, PkiError> {
    use sluice_pki::{certs_from_pem, key_from_pem, ring_provider};
    let mut chain = certs_from_pem(cert_pem)?;
    let ca_der = certs_from_pem(&ca.cert_pem())?;
    if chain.last() != ca_der.first() {
        chain.extend(ca_der);
    }
    let mut config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| PkiError::TlsConfig { source })?
        .with_no_client_auth()
        .with_single_cert(chain, key_from_pem(key_pem)?)
        .map_err(|source| PkiError::TlsConfig { source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_streams_are_capped_and_a_closed_one_frees_its_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        let mut slots: Vec<StreamSlot> = (0..MAX_STREAMS)
            .map(|_| StreamSlot::take(&control).expect("a slot"))
            .collect();
        assert!(StreamSlot::take(&control).is_none());
        slots.pop();
        assert!(StreamSlot::take(&control).is_some());
        drop(slots);
        assert_eq!(control.dashboard.streams.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_token_comes_from_a_bearer_header_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&headers).as_deref(), Some("abc"));
    }

    #[tokio::test]
    async fn an_event_is_written_in_the_shape_the_page_parses() {
        let events = tokio_stream::iter([Ok::<_, Infallible>(sse("snapshot", "{\"a\":1}"))]);
        let body = Sse::new(events).into_response().into_body();
        let bytes = axum::body::to_bytes(body, 1 << 16).await.expect("body");
        assert_eq!(&bytes[..], b"event: snapshot\ndata: {\"a\":1}\n\n");
    }

    #[tokio::test]
    async fn a_live_stream_has_the_pages_headers_and_ends_when_its_token_expires() {
        use tokio_stream::StreamExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        let admin = Caller {
            name: "root".into(),
            groups: vec![crate::rbac::ADMIN_GROUP.into()],
        };
        let issued = control
            .dashboard
            .tokens
            .issue(admin, Duration::from_secs(2))
            .expect("issue");
        let mut headers = HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {}", issued.token)).expect("header");
        headers.insert(header::AUTHORIZATION, bearer);
        let r = events(State(control.clone()), headers).await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(h["x-accel-buffering"], "no");
        assert_eq!(control.dashboard.streams.load(Ordering::SeqCst), 1);

        let mut body = r.into_body().into_data_stream();
        let mut blocks = Vec::new();
        let read = async {
            while let Some(chunk) = body.next().await {
                blocks.push(String::from_utf8(chunk.expect("chunk").to_vec()).expect("UTF-8"));
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the stream ends once the token expired");
        let (last, snapshots) = blocks.split_last().expect("some events");
        assert!(snapshots.len() >= 2, "a snapshot a second: {blocks:?}");
        for block in snapshots {
            assert!(block.starts_with("event: snapshot\ndata: {"), "{block}");
            assert!(block.ends_with("}\n\n") && block.matches('\n').count() == 3);
        }
        let refused = last
            .strip_prefix("event: refused\ndata: ")
            .and_then(|b| b.strip_suffix("\n\n"))
            .unwrap_or_else(|| panic!("{last:?}"));
        let refused: serde_json::Value = serde_json::from_str(refused).expect("JSON");
        assert_eq!(refused["status"], 401);
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|e| e.contains("expired"))
        );
        // The stream's task ended and gave its slot back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(control.dashboard.streams.load(Ordering::SeqCst), 0);
    }
}
