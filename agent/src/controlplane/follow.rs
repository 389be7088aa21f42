//! The long-running loops: following the node's view across reconnects, and
//! renewing the certificate before it expires.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use sluice_api::v1;
use sluice_model::observe::BackendRef;
use sluice_model::view::ViewUpdate;
use sluice_model::wire::read_update;
use sluice_pki as pki;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{ControlClient, ControlError, NodeState};

/// The first reconnect waits this long (at most; jitter shortens it)...
pub const BACKOFF_START: Duration = Duration::from_millis(200);
/// ...doubling on each failure up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often [`keep_certificate_fresh`] looks at the certificate.
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// What [`follow`] tells its consumer.
#[derive(Debug)]
pub enum ViewEvent {
    /// A watch is open (after each connect); updates follow.
    Connected,
    /// The next change to apply, in version order. A snapshot replaces the
    /// whole view.
    Update(ViewUpdate),
    /// An update that cannot be applied at all (its network policy does not
    /// read: half a policy is not a safe one); the view stays as it is.
    Unreadable { version: u64, why: String },
    /// The backends their probers find unhealthy, all of them (replaces the
    /// previous set).
    Health(Vec<BackendRef>),
    /// The connection or the watch failed; [`follow`] reconnects (the text
    /// says why and when).
    Disconnected(String),
    /// The control service refused this node (removed, certificate revoked or
    /// unknown), or its identity on disk is missing or unreadable; retrying
    /// cannot help and [`follow`] has stopped. The data plane keeps the last
    /// view.
    Refused(String),
}

/// The wait before reconnect attempt `attempt` (0 after the first failure):
/// [`BACKOFF_START`] doubled per attempt, capped at [`BACKOFF_MAX`], then
/// shortened by up to half by `jitter` in [0, 1] (so nodes cut off together
/// do not come back together).
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let ceiling = BACKOFF_START
        .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    ceiling.mul_f64(1.0 - 0.5 * jitter)
}

/// A uniform value in [0, 1) for [`backoff_delay`]. `RandomState` is seeded
/// from the OS per process and varies per instance: enough for jitter, with no
/// random-number crate.
fn random_jitter() -> f64 {
    // The top 53 bits: exactly representable in an f64.
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

/// Follows the node's view until `updates` is closed or the control service
/// refuses the node.
///
/// Each round loads the credentials afresh (so a renewed certificate is
/// used), connects, watches from `since` (the version the consumer last
/// applied, which it keeps up to date), and delivers what arrives. After a
/// reconnect the control service resends what follows `since`; updates the
/// consumer was already given are dropped here, so it sees each version once
/// and in order (a snapshot always passes). Any failure is reported as
/// [`ViewEvent::Disconnected`] and retried after [`backoff_delay`], which
/// starts over once a stream has delivered something. A refusal retrying
/// cannot fix is reported as [`ViewEvent::Refused`] and ends the loop.
pub async fn follow(state: NodeState, since: Arc<AtomicU64>, updates: mpsc::Sender<ViewEvent>) {
    let mut attempt: u32 = 0;
    let mut delivered: u64 = 0;
    loop {
        let mut progressed = false;
        let round = watch_once(
            &state,
            since.load(Ordering::Acquire),
            &mut delivered,
            &mut progressed,
            &updates,
        );
        let error = tokio::select! {
            end = round => match end {
                End::Closed => return,
                End::Failed(error) => error,
            },
            () = updates.closed() => return,
        };
        let text = error.explain();
        if error.is_refusal() {
            warn!(error = %text, "the control service refused this node; no longer following its view");
            let _ = updates.send(ViewEvent::Refused(text)).await;
            return;
        }
        if progressed {
            attempt = 0;
        }
        let delay = backoff_delay(attempt, random_jitter());
        attempt = attempt.saturating_add(1);
        debug!(error = %text, ?delay, "view watch ended; reconnecting");
        let event = ViewEvent::Disconnected(format!("{text}; reconnecting in {delay:.1?}"));
        if updates.send(event).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = updates.closed() => return,
        }
    }
}

/// How one watch ended.
enum End {
    /// The consumer is gone.
    Closed,
    Failed(Box<ControlError>),
}

impl From<ControlError> for End {
    fn from(error: ControlError) -> Self {
        End::Failed(Box::new(error))
    }
}

/// One connection: connect, watch, deliver until something fails.
async fn watch_once(
    state: &NodeState,
    since: u64,
    delivered: &mut u64,
    progressed: &mut bool,
    updates: &mpsc::Sender<ViewEvent>,
) -> End {
    let creds = match state.load() {
        Ok(creds) => creds,
        Err(e) => return e.into(),
    };
    let (mut stream, mut health) = match ControlClient::connect(&creds).await {
        Ok(mut client) => {
            let stream = match client.watch(since).await {
                Ok(stream) => stream,
                Err(e) => return e.into(),
            };
            let health = match client.watch_health().await {
                Ok(health) => Some(health),
                // A control service from before health verdicts (during an
                // upgrade): follow the view without them.
                Err(ControlError::Status { status, .. })
                    if status.code() == tonic::Code::Unimplemented =>
                {
                    warn!(
                        "the control service sends no health verdicts; only this node's probes count"
                    );
                    None
                }
                Err(e) => return e.into(),
            };
            (stream, health)
        }
        Err(e) => return e.into(),
    };
    if updates.send(ViewEvent::Connected).await.is_err() {
        return End::Closed;
    }
    *delivered = (*delivered).max(since);
    loop {
        let message = tokio::select! {
            message = stream.message() => message,
            verdicts = next_verdicts(&mut health) => {
                let failed = |status| -> End {
                    ControlError::Status { op: "watch backend health", status }.into()
                };
                match verdicts {
                    Ok(Some(update)) => {
                        let unhealthy = update
                            .unhealthy
                            .into_iter()
                            .filter_map(|b| {
                                BackendRef::try_from(b)
                                    .inspect_err(|e| warn!("ignoring an unreadable health verdict: {e}"))
                                    .ok()
                            })
                            .collect();
                        if updates.send(ViewEvent::Health(unhealthy)).await.is_err() {
                            return End::Closed;
                        }
                        continue;
                    }
                    Ok(None) => return failed(tonic::Status::unavailable("the control service ended the health watch")),
                    Err(status) => return failed(status),
                }
            }
        };
        match message {
            Ok(Some(update)) => {
                *progressed = true;
                if !update.snapshot && update.version <= *delivered {
                    continue;
                }
                *delivered = update.version;
                let version = update.version;
                // The control service validates what it stores: a frontend
                // this agent cannot read means a newer control service. The
                // rest is programmed.
                let event = match read_update(update) {
                    Ok((update, skipped)) => {
                        for e in skipped {
                            warn!(
                                version,
                                "skipping a frontend of the view this agent cannot program: {e}"
                            );
                        }
                        ViewEvent::Update(update)
                    }
                    Err(e) => ViewEvent::Unreadable {
                        version,
                        why: e.to_string(),
                    },
                };
                if updates.send(event).await.is_err() {
                    return End::Closed;
                }
            }
            Ok(None) => {
                return ControlError::Status {
                    op: "watch the node's view",
                    status: tonic::Status::unavailable("the control service ended the watch"),
                }
                .into();
            }
            Err(status) => {
                return ControlError::Status {
                    op: "watch the node's view",
                    status,
                }
                .into();
            }
        }
    }
}

/// The next health update, or never without a health stream.
async fn next_verdicts(
    health: &mut Option<tonic::Streaming<v1::HealthUpdate>>,
) -> Result<Option<v1::HealthUpdate>, tonic::Status> {
    match health {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: two
/// thirds into its lifetime, counted from when it was issued (certificates
/// are back-dated by [`pki::BACKDATE`]).
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let issued = pki::issued_at(not_before, not_after);
    let lifetime = not_after.duration_since(issued).unwrap_or_default();
    issued.checked_add(lifetime / 3 * 2).unwrap_or(not_after)
}

/// Renews the node certificate if `now` is past its [`renewal_time`];
/// returns the new certificate's details if it did.
pub async fn renew_if_due(
    state: &NodeState,
    now: SystemTime,
) -> Result<Option<pki::CertInfo>, ControlError> {
    let creds = state.load()?;
    let current = pki::parse_cert(&creds.cert_pem)?;
    if now < renewal_time(current.not_before, current.not_after) {
        return Ok(None);
    }
    let mut client = ControlClient::connect(&creds).await?;
    let renewed = client.renew(state).await?;
    Ok(Some(pki::parse_cert(&renewed.cert_pem)?))
}

/// Keeps the node certificate fresh: renews it at its [`renewal_time`],
/// looking again at least every [`CERT_CHECK_INTERVAL`] (the file may be
/// replaced by another process). Runs until dropped; failures are logged and
/// retried after a backoff (a certificate renewed at two thirds has a third
/// of its life for retries). New connections pick the new certificate up
/// from `state`; an open watch is not interrupted.
pub async fn keep_certificate_fresh(state: NodeState) {
    let mut failures: u32 = 0;
    loop {
        let wait = match renew_if_due(&state, SystemTime::now()).await {
            Ok(renewed) => {
                failures = 0;
                if let Some(cert) = renewed {
                    info!(serial = %cert.serial, expires = ?cert.not_after, "renewed the node certificate");
                }
                next_check(&state, SystemTime::now())
            }
            Err(e) => {
                let delay = backoff_delay(failures.saturating_add(3), random_jitter());
                failures = failures.saturating_add(1);
                warn!(error = %sluice_model::error_chain(&e), "cannot renew the node certificate; trying again in {delay:.1?}");
                delay
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// How long until the certificate in `state` is due, capped at
/// [`CERT_CHECK_INTERVAL`] (and at least a second, so a certificate that
/// cannot be read does not spin).
fn next_check(state: &NodeState, now: SystemTime) -> Duration {
    let due = state
        .load()
        .ok()
        .and_then(|creds| pki::parse_cert(&creds.cert_pem).ok())
        .map(|cert| renewal_time(cert.not_before, cert.not_after));
    due.and_then(|due| due.duration_since(now).ok())
        .unwrap_or_default()
        .clamp(Duration::from_secs(1), CERT_CHECK_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_200ms_to_10s() {
        let ceilings: Vec<Duration> = (0..10).map(|a| backoff_delay(a, 0.0)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            ceilings,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(6400),
                ms(10_000),
                ms(10_000),
                ms(10_000),
                ms(10_000)
            ]
        );
        assert_eq!(backoff_delay(u32::MAX, 0.0), BACKOFF_MAX, "no overflow");
    }

    #[test]
    fn jitter_shortens_by_at_most_half() {
        assert_eq!(backoff_delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(2, 0.5), Duration::from_millis(600));
        assert_eq!(backoff_delay(9, 1.0), Duration::from_secs(5));
        // Out-of-range jitter is clamped, never a panic or a longer wait.
        assert_eq!(backoff_delay(0, 7.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(0, -1.0), Duration::from_millis(200));
        assert_eq!(backoff_delay(0, f64::NAN), Duration::from_millis(200));
        for _ in 0..1000 {
            let j = random_jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        // 24 h from issue (5 min after not_before): due 16 h after issue.
        let end = start + pki::BACKDATE + Duration::from_secs(24 * 3600);
        assert_eq!(
            renewal_time(start, end),
            start + pki::BACKDATE + Duration::from_secs(16 * 3600)
        );
        // Back-dated as the control service issues them: two thirds of the
        // time from issue, not from `not_before`.
        let issued = start + pki::BACKDATE;
        let end = issued + Duration::from_secs(6);
        assert_eq!(renewal_time(start, end), issued + Duration::from_secs(4));
        // A certificate whose dates are backwards is due at once.
        assert_eq!(renewal_time(end, start), end);
    }
}
