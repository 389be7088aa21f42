//! How a service treats its backends over time: health probes, draining and
//! rollouts between versions. The same in both manifest modes and in the API.
//!
//! ```yaml
//! healthCheck:                     # optional; agents probe the backends they forward to
//!   http: { path: /healthz, port: 8080 }   # or tcp: { port: 8080 }; port defaults to the target port
//!   intervalMs: 1000               # 100..=300000, default 2000
//!   timeoutMs: 500                 # 10..=intervalMs, default min(1000, intervalMs)
//!   unhealthyThreshold: 3          # consecutive failures to leave rotation, 1..=100, default 3
//!   healthyThreshold: 2            # consecutive successes to return, 1..=100, default 2
//!   failOpen: true                 # all unhealthy: true sends to all (default), false drops
//! drainTimeoutSeconds: 30          # optional: flows of a draining backend end after this
//! rollout: { to: v2, percent: 1 }  # backends with version v2 get exactly 1% of new flows
//! sessionAffinity:                 # optional: a client's new flows go to the backend its
//!   clientIP: { timeoutSeconds: 300 }  # last one went to, until idle this long (default 10800)
//! topologyAware: true              # optional: prefer backends in the node's zone
//! ```

use serde::Serialize;

use crate::rules::{self, Problem};
use crate::service::{Protocol, ServicePort};

pub const DEFAULT_INTERVAL_MS: u32 = 2_000;
pub const DEFAULT_TIMEOUT_MS: u32 = 1_000;
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
pub const INTERVAL_MS_RANGE: (u32, u32) = (100, 300_000);
pub const MIN_TIMEOUT_MS: u32 = 10;
pub const THRESHOLD_RANGE: (u32, u32) = (1, 100);
/// A day: longer drains are better served by not draining at all.
pub const MAX_DRAIN_TIMEOUT_SECONDS: u32 = 86_400;
/// Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;
pub const MAX_AFFINITY_SECONDS: u32 = 86_400;

/// A service's traffic policies; every one optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    #[serde(rename = "healthCheck", skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// `None`: flows of a draining or removed backend run until they close.
    #[serde(
        rename = "drainTimeoutSeconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub drain_timeout_seconds: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    #[serde(rename = "sessionAffinity", skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// New flows prefer healthy backends in the node's own zone.
    #[serde(rename = "topologyAware", skip_serializing_if = "std::ops::Not::not")]
    pub topology_aware: bool,
}

/// Client-IP affinity: a client's new flows go to the backend its previous
/// flow went to, while it is in rotation and the client was seen within the
/// timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionAffinity {
    pub timeout_seconds: u32,
}

/// Spelled as in Kubernetes: `sessionAffinity: { clientIP: { timeoutSeconds: N } }`.
impl Serialize for SessionAffinity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct ClientIp {
            #[serde(rename = "timeoutSeconds")]
            timeout_seconds: u32,
        }
        #[derive(Serialize)]
        struct Outer {
            #[serde(rename = "clientIP")]
            client_ip: ClientIp,
        }
        Outer {
            client_ip: ClientIp {
                timeout_seconds: self.timeout_seconds,
            },
        }
        .serialize(serializer)
    }
}

/// Backends whose `version` is `to` get `percent`% of new flows; the others the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollout {
    pub to: String,
    pub percent: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    #[serde(flatten)]
    pub probe: Probe,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// When every backend is unhealthy: true keeps sending to all of them (a probe
    /// that is wrong everywhere must not take the service down), false drops.
    pub fail_open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Probe {
    /// A GET of `path` that must answer 2xx or 3xx.
    Http {
        path: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    /// A TCP connection that must be accepted.
    Tcp {
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
}

impl Probe {
    /// The port the probe names, if it names one.
    pub fn port(&self) -> Option<u16> {
        match self {
            Self::Http { port, .. } | Self::Tcp { port } => *port,
        }
    }

    /// The probe with its port set.
    pub fn with_port(&self, port: u16) -> Self {
        match self {
            Self::Http { path, .. } => Self::Http {
                path: path.clone(),
                port: Some(port),
            },
            Self::Tcp { .. } => Self::Tcp { port: Some(port) },
        }
    }
}

/// The port a service's health check probes on each backend: the probe's
/// own, or else the target port of the service's first TCP port (HTTP and TCP
/// probes cannot check a UDP port). `None`: neither exists, which validation
/// rejects.
pub fn probe_port(check: &HealthCheck, ports: &[ServicePort]) -> Option<u16> {
    check.probe.port().or_else(|| {
        ports
            .iter()
            .find(|p| p.protocol == Protocol::Tcp)
            .map(|p| p.target_port)
    })
}

/// Weights that realise a rollout's shares exactly: backends of version
/// `rollout.to` share `percent`% of new flows in proportion to their own
/// weights, all other backends the rest; zero means no new flows (the backend
/// keeps its established ones). Without a rollout the weights are returned as
/// they are, and so they are when one side has no backend at all: the side
/// that exists takes every flow rather than the service dropping them.
///
/// The results are reduced by their common divisor; a slot table realises them
/// exactly while they sum to no more than its size (65,536 slots), which any
/// rollout between up to a few hundred equally weighted backends does.
pub fn rollout_weights(backends: &[(u32, Option<&str>)], rollout: Option<&Rollout>) -> Vec<u32> {
    let plain = || backends.iter().map(|&(w, _)| w).collect();
    let Some(rollout) = rollout else {
        return plain();
    };
    let is_target = |version: Option<&str>| version == Some(rollout.to.as_str());
    let side_total = |target: bool| -> u128 {
        backends
            .iter()
            .filter(|(_, v)| is_target(*v) == target)
            .map(|&(w, _)| u128::from(w))
            .sum()
    };
    let (target_total, other_total) = (side_total(true), side_total(false));
    if target_total == 0 || other_total == 0 {
        return plain();
    }
    let percent = u128::from(rollout.percent.min(100));
    let exact: Vec<u128> = backends
        .iter()
        .map(|&(w, v)| {
            if is_target(v) {
                percent * u128::from(w) * other_total
            } else {
                (100 - percent) * u128::from(w) * target_total
            }
        })
        .collect();
    let divisor = exact.iter().copied().fold(0, gcd);
    let reduced: Vec<u128> = exact.iter().map(|&w| w / divisor.max(1)).collect();
    // Beyond what a slot table holds, exactness is lost anyway: keep the
    // numbers in range, nonzero weights nonzero.
    let total: u128 = reduced.iter().sum();
    let limit: u128 = 1 << 24;
    reduced
        .into_iter()
        .map(|w| {
            let scaled = if total > limit { w * limit / total } else { w };
            if w > 0 { scaled.max(1) as u32 } else { 0 }
        })
        .collect()
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// ---------------------------------------------------------------------------------------
// Rules, shared with API messages
// ---------------------------------------------------------------------------------------

pub fn validate_percent(value: i128) -> Result<u32, Problem> {
    u32::try_from(value)
        .ok()
        .filter(|p| *p <= 100)
        .ok_or(Problem::OutOfRange {
            value,
            min: 0,
            max: 100,
        })
}

/// A version is a label value, and not empty.
pub fn validate_version(value: &str) -> Result<(), Problem> {
    if value.is_empty() {
        return Err(Problem::EmptyVersion);
    }
    rules::validate_label_value(value)
}

pub fn validate_affinity_timeout(value: i128) -> Result<u32, Problem> {
    in_range(value, 1, MAX_AFFINITY_SECONDS)
}

pub fn validate_drain_timeout(value: i128) -> Result<u32, Problem> {
    in_range(value, 1, MAX_DRAIN_TIMEOUT_SECONDS)
}

pub fn validate_interval(value: i128) -> Result<u32, Problem> {
    in_range(value, INTERVAL_MS_RANGE.0, INTERVAL_MS_RANGE.1)
}

pub fn validate_timeout(value: i128, interval_ms: u32) -> Result<u32, Problem> {
    in_range(value, MIN_TIMEOUT_MS, interval_ms)
}

pub fn validate_threshold(value: i128) -> Result<u32, Problem> {
    in_range(value, THRESHOLD_RANGE.0, THRESHOLD_RANGE.1)
}

/// An absolute path of printable ASCII, as it goes on the request line.
pub fn validate_http_path(path: &str) -> Result<(), Problem> {
    let printable = path.bytes().all(|b| b.is_ascii_graphic());
    if path.starts_with('/') && printable && path.len() <= 1024 {
        Ok(())
    } else {
        Err(Problem::HttpPath {
            value: path.to_owned(),
        })
    }
}

fn in_range(value: i128, min: u32, max: u32) -> Result<u32, Problem> {
    u32::try_from(value)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or(Problem::OutOfRange {
            value,
            min: min.into(),
            max: max.into(),
        })
}

/// The timeout a health check gets when it names none.
pub fn default_timeout(interval_ms: u32) -> u32 {
    DEFAULT_TIMEOUT_MS.min(interval_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(to: &str, percent: u32) -> Rollout {
        Rollout {
            to: to.to_owned(),
            percent,
        }
    }

    fn shares(weights: &[u32], backends: &[(u32, Option<&str>)], to: &str) -> (u64, u64) {
        let mut target = 0;
        let mut other = 0;
        for (w, (_, v)) in weights.iter().zip(backends) {
            if *v == Some(to) {
                target += u64::from(*w);
            } else {
                other += u64::from(*w);
            }
        }
        (target, other)
    }

    #[test]
    fn a_rollout_gives_the_target_version_exactly_its_percent() {
        let backends = [
            (1, Some("v1")),
            (1, Some("v1")),
            (3, Some("v1")),
            (2, Some("v2")),
        ];
        for percent in 0..=100 {
            let weights = rollout_weights(&backends, Some(&rollout("v2", percent)));
            let (target, other) = shares(&weights, &backends, "v2");
            assert_eq!(
                target * 100,
                u64::from(percent) * (target + other),
                "{percent}%"
            );
            // Within a side, shares follow the backends' own weights.
            if percent < 100 {
                assert_eq!(weights[2], 3 * weights[0]);
            }
        }
    }

    #[test]
    fn one_percent_of_four_equal_backends_fits_a_hundred_slots() {
        let backends = [
            (1, Some("v1")),
            (1, Some("v1")),
            (1, Some("v1")),
            (1, Some("v2")),
        ];
        let weights = rollout_weights(&backends, Some(&rollout("v2", 1)));
        assert_eq!(weights, [33, 33, 33, 1]);
    }

    #[test]
    fn without_a_rollout_or_a_side_weights_stay() {
        let backends = [(2, Some("v1")), (5, None)];
        assert_eq!(rollout_weights(&backends, None), [2, 5]);
        // Nothing carries v3: the others keep every flow.
        assert_eq!(rollout_weights(&backends, Some(&rollout("v3", 50))), [2, 5]);
        // Only v1 exists: undoing to 0% must not leave the service empty.
        let only_target = [(2, Some("v1"))];
        assert_eq!(rollout_weights(&only_target, Some(&rollout("v1", 0))), [2]);
    }

    #[test]
    fn unversioned_backends_count_as_the_old_version() {
        let backends = [(1, None), (1, Some("v2"))];
        assert_eq!(
            rollout_weights(&backends, Some(&rollout("v2", 100))),
            [0, 1]
        );
        assert_eq!(rollout_weights(&backends, Some(&rollout("v2", 0))), [1, 0]);
    }

    #[test]
    fn huge_weights_stay_in_range() {
        let backends: Vec<(u32, Option<&str>)> = (0..4096)
            .map(|i| (10_000 - i, Some(if i % 2 == 0 { "a" } else { "b" })))
            .collect();
        let weights = rollout_weights(&backends, Some(&rollout("b", 37)));
        assert!(weights.iter().all(|&w| w > 0));
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        assert!(total <= 1 << 24, "{total}");
        let (target, _) = shares(&weights, &backends, "b");
        let share = target as f64 / total as f64;
        assert!((share - 0.37).abs() < 0.001, "{share}");
    }

    #[test]
    fn http_paths_are_absolute_and_printable() {
        assert!(validate_http_path("/healthz?full=1").is_ok());
        for bad in ["healthz", "/a b", "", "/\u{e9}"] {
            assert!(validate_http_path(bad).is_err(), "{bad:?}");
        }
    }
}
