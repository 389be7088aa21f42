//! Health probes: the agent checks backends and takes the failing ones out
//! of rotation.
//!
//! A standalone agent probes every backend of its health-checked services. A
//! joined node probes only the backends the view assigns to it (a few nodes
//! per backend, see `sluice-control`'s `view::probers`), reports what it
//! finds, and follows the control service's verdicts for all backends: probes
//! grow with backends rather than nodes × backends, and a backend fails out
//! everywhere within `unhealthyThreshold × intervalMs` plus one report and
//! one broadcast. Its own verdicts act at once, before the round trip.
//!
//! Every distinct (address, port, check) is one [`Target`] with one task,
//! however many service ports share it. A task probes every `intervalMs`
//! (each target offset within the interval, so that a node's probes do not
//! leave in bursts) and reports a change once `unhealthyThreshold`
//! consecutive probes failed, or `healthyThreshold` succeeded. Targets start
//! healthy: a new service gets traffic at once, and a dead backend leaves
//! rotation within `unhealthyThreshold × intervalMs` (+ `timeoutMs`).
//!
//! [`overlay`] turns the health table into draining marks on the desired
//! state, so an unhealthy backend is handled exactly as a drained one: no new
//! flows, established flows continue until they close or the service's drain
//! timeout ends them. When every backend of a service port fails, the
//! service's `failOpen` decides: keep sending to all of them (a probe that is
//! wrong everywhere must not take the service down), or drop. A
//! topology-aware frontend whose own zone has no healthy backend left falls
//! back to every zone's first.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use sluice_model::observe::BackendRef;
use sluice_model::traffic::{HealthCheck, Probe};
use sluice_model::view::ServiceRef;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::reconcile::{Desired, DesiredBackend};

/// One thing to probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub address: Ipv4Addr,
    pub port: u16,
    pub check: HealthCheck,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.check.probe {
            Probe::Http { path, .. } => write!(f, "http://{}:{}{path}", self.address, self.port),
            Probe::Tcp { .. } => write!(f, "tcp {}:{}", self.address, self.port),
        }
    }
}

/// A probe result that changed a target's health.
#[derive(Debug)]
pub struct Change {
    pub target: Target,
    pub healthy: bool,
}

/// The probe tasks and what they found.
pub struct Health {
    tasks: HashMap<Target, JoinHandle<()>>,
    unhealthy: HashSet<Target>,
    /// The services each probed target is a backend of, for reports.
    services: HashMap<Target, Vec<ServiceRef>>,
    /// The control service's verdicts: the backends its probers find unhealthy.
    remote: HashSet<BackendRef>,
    changes_tx: mpsc::UnboundedSender<Change>,
    changes_rx: mpsc::UnboundedReceiver<Change>,
}

impl Default for Health {
    fn default() -> Self {
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        Self {
            tasks: HashMap::new(),
            unhealthy: HashSet::new(),
            services: HashMap::new(),
            remote: HashSet::new(),
            changes_tx,
            changes_rx,
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl Health {
    /// Probes exactly the targets `desired` asks for: starts the new ones,
    /// stops (and forgets) the ones no service asks for any more.
    pub fn track(&mut self, desired: &Desired) {
        self.services.clear();
        for (key, targets) in targets(desired) {
            let want = &desired[&key];
            for (target, backend) in targets.into_iter().zip(&want.backends) {
                if backend.probe_here {
                    let services = self.services.entry(target).or_default();
                    if !services.contains(&want.service) {
                        services.push(want.service.clone());
                    }
                }
            }
        }
        let wanted: HashSet<Target> = self.services.keys().cloned().collect();
        self.tasks.retain(|target, task| {
            let keep = wanted.contains(target);
            if !keep {
                task.abort();
            }
            keep
        });
        self.unhealthy.retain(|target| wanted.contains(target));
        for target in wanted {
            if !self.tasks.contains_key(&target) {
                let task = tokio::spawn(probe_loop(target.clone(), self.changes_tx.clone()));
                self.tasks.insert(target, task);
            }
        }
    }

    /// Waits for a target's health to change and records it. Returns whether
    /// the table changed (a stale report of a target no longer probed does not).
    pub async fn next_change(&mut self) -> bool {
        let Some(Change { target, healthy }) = self.changes_rx.recv().await else {
            return std::future::pending().await;
        };
        if !self.tasks.contains_key(&target) {
            return false;
        }
        if healthy {
            info!(%target, "backend healthy again: back in rotation");
            self.unhealthy.remove(&target)
        } else {
            warn!(%target, "backend unhealthy: out of rotation, its flows drain");
            self.unhealthy.insert(target)
        }
    }

    /// This node's verdict (a target it does not probe is healthy) and the
    /// control service's.
    pub fn is_healthy(&self, service: &ServiceRef, target: &Target) -> bool {
        !self.unhealthy.contains(target)
            && !self.remote.contains(&BackendRef {
                service: service.clone(),
                address: target.address.into(),
            })
    }

    /// Takes the control service's verdicts; returns whether they changed.
    pub fn set_remote(&mut self, unhealthy: impl IntoIterator<Item = BackendRef>) -> bool {
        let remote: HashSet<BackendRef> = unhealthy.into_iter().collect();
        let changed = remote != self.remote;
        self.remote = remote;
        changed
    }

    /// What this node's probes find unhealthy, sorted.
    pub fn local_unhealthy(&self) -> Vec<BackendRef> {
        let mut out: Vec<BackendRef> = self
            .unhealthy
            .iter()
            .flat_map(|t| {
                self.services
                    .get(t)
                    .into_iter()
                    .flatten()
                    .map(|s| BackendRef {
                        service: s.clone(),
                        address: t.address.into(),
                    })
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn probing(&self) -> usize {
        self.tasks.len()
    }
}

/// Per frontend with a health check, the target of each backend (in order).
fn targets(desired: &Desired) -> HashMap<sluice_common::types::FrontendKeyV4, Vec<Target>> {
    desired
        .iter()
        .filter_map(|(key, want)| {
            let check = want.health_check.as_ref()?;
            let port = check.probe.port().unwrap_or(want.target_port);
            let list = want
                .backends
                .iter()
                .map(|b| Target {
                    address: b.address,
                    port,
                    check: check.clone(),
                })
                .collect();
            Some((*key, list))
        })
        .collect()
}

/// `desired` with unhealthy backends marked draining, as [`Health`] judges
/// them (see the module comment for all-unhealthy).
pub fn overlay(desired: &Desired, is_healthy: impl Fn(&ServiceRef, &Target) -> bool) -> Desired {
    let mut out = desired.clone();
    for (key, targets) in targets(desired) {
        let Some(want) = out.get_mut(&key) else {
            continue;
        };
        let fail_open = want.health_check.as_ref().is_some_and(|c| c.fail_open);
        let sick: Vec<bool> = targets
            .iter()
            .map(|t| !is_healthy(&want.service, t))
            .collect();
        let serving = |backends: &[DesiredBackend]| {
            backends
                .iter()
                .zip(&sick)
                .filter(|(b, _)| b.weight > 0 && !b.draining)
                .map(|(_, &sick)| !sick)
                .collect::<Vec<bool>>()
        };
        // Topology-aware: while no backend of the node's zone can take new
        // flows, every zone's can.
        if let Some(fallback) = &want.fallback_weights
            && !serving(&want.backends).contains(&true)
        {
            for (backend, &weight) in want.backends.iter_mut().zip(fallback) {
                backend.weight = weight;
            }
        }
        let all_down = !serving(&want.backends).contains(&true);
        if all_down && fail_open {
            continue;
        }
        for (backend, sick) in want.backends.iter_mut().zip(sick) {
            backend.draining |= sick;
        }
    }
    out
}

/// Probes `target` forever, reporting each change of health.
async fn probe_loop(target: Target, changes: mpsc::UnboundedSender<Change>) {
    let check = &target.check;
    let interval = Duration::from_millis(check.interval_ms.into());
    let timeout = Duration::from_millis(check.timeout_ms.into());
    // A stable offset per target spreads a node's probes over the interval.
    let mut hasher = DefaultHasher::new();
    target.hash(&mut hasher);
    let offset = Duration::from_millis(hasher.finish() % u64::from(check.interval_ms));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    let mut streak = 0;
    loop {
        ticks.tick().await;
        let ok = match tokio::time::timeout(timeout, probe(&target)).await {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                tracing::debug!(%target, %reason, "probe failed");
                false
            }
            Err(_) => {
                tracing::debug!(%target, "probe timed out");
                false
            }
        };
        if ok == healthy {
            streak = 0;
            continue;
        }
        streak += 1;
        let needed = if healthy {
            check.unhealthy_threshold
        } else {
            check.healthy_threshold
        };
        if streak >= needed {
            healthy = ok;
            streak = 0;
            let change = Change {
                target: target.clone(),
                healthy,
            };
            if changes.send(change).is_err() {
                return;
            }
        }
    }
}

/// One probe: a TCP connection, or an HTTP GET answered 2xx or 3xx.
async fn probe(target: &Target) -> Result<(), String> {
    let address = SocketAddr::from((target.address, target.port));
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Probe::Http { path, .. } = &target.check.probe else {
        return Ok(());
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: sluice-agent\r\n\
         Connection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream
            .read(&mut head[len..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        len += n;
    }
    status_ok(&head[..len])
}

fn status_ok(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", text.lines().next()))?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::types::{FrontendKeyV4, IPPROTO_TCP};

    use super::*;
    use crate::reconcile::{DesiredBackend, DesiredFrontend};
    use sluice_model::Algorithm;

    fn check(fail_open: bool) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp { port: None },
            interval_ms: 100,
            timeout_ms: 50,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            fail_open,
        }
    }

    fn service(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn unhealthy(name: &str, address: Ipv4Addr) -> BackendRef {
        BackendRef {
            service: service(name),
            address: address.into(),
        }
    }

    fn desired(fail_open: bool) -> (FrontendKeyV4, Desired) {
        let key = FrontendKeyV4 {
            vip: 1,
            port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let frontend = DesiredFrontend {
            service: service("web"),
            name: "web".into(),
            target_port: 8080,
            algorithm: Algorithm::RoundRobin,
            backends: (2..5)
                .map(|i| DesiredBackend::new(Ipv4Addr::new(198, 19, 0, i), 1))
                .collect(),
            maglev_table_size: 0,
            health_check: Some(check(fail_open)),
            drain_timeout: None,
            session_affinity: Default::default(),
            fallback_weights: Default::default(),
        };
        (key, Desired::from([(key, frontend)]))
    }

    fn draining(d: &Desired, key: &FrontendKeyV4) -> Vec<bool> {
        d[key].backends.iter().map(|b| b.draining).collect()
    }

    #[test]
    fn unhealthy_backends_drain_and_all_down_follows_fail_open() {
        let (key, d) = desired(true);
        let one_down = |_: &ServiceRef, t: &Target| t.address != Ipv4Addr::new(198, 19, 0, 3);
        assert_eq!(draining(&overlay(&d, one_down), &key), [false, true, false]);
        assert_eq!(draining(&overlay(&d, |_, _| false), &key), [false; 3]);
        let (key, closed) = desired(false);
        assert_eq!(draining(&overlay(&closed, |_, _| false), &key), [true; 3]);
        // The probe port defaults to the target port.
        let ports: HashSet<u16> = targets(&d)[&key].iter().map(|t| t.port).collect();
        assert_eq!(ports, HashSet::from([8080]));
    }

    #[test]
    fn a_zone_without_healthy_backends_falls_back_to_every_zone() {
        let (key, mut d) = desired(false);
        let want = d.get_mut(&key).expect("frontend");
        // The node's zone holds backend .2 only.
        want.fallback_weights = Some(vec![1, 1, 1]);
        for (backend, weight) in want.backends.iter_mut().zip([1, 0, 0]) {
            backend.weight = weight;
        }
        let weights = |d: &Desired| -> Vec<(u32, bool)> {
            d[&key]
                .backends
                .iter()
                .map(|b| (b.weight, b.draining))
                .collect()
        };
        assert_eq!(
            weights(&overlay(&d, |_, _| true)),
            [(1, false), (0, false), (0, false)]
        );
        let zone_down = |_: &ServiceRef, t: &Target| t.address != Ipv4Addr::new(198, 19, 0, 2);
        assert_eq!(
            weights(&overlay(&d, zone_down)),
            [(1, true), (1, false), (1, false)]
        );
    }

    #[test]
    fn http_status_lines_are_judged_by_code() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n").is_ok());
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n").is_ok());
        assert!(status_ok(b"HTTP/1.1 503 Unavailable\r\n").is_err());
        assert!(status_ok(b"SSH-2.0-OpenSSH").is_err());
        assert!(status_ok(b"").is_err());
    }

    /// Real probes against real listeners on loopback: a TCP probe follows
    /// the listener going away and coming back; an HTTP probe reads the status.
    #[tokio::test]
    async fn probes_follow_real_listeners() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback");
        let port = listener.local_addr().expect("test step").port();
        let tcp = Target {
            address: Ipv4Addr::LOCALHOST,
            port,
            check: check(true),
        };
        assert_eq!(probe(&tcp).await, Ok(()));
        drop(listener);
        assert!(probe(&tcp).await.is_err());

        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback");
        let port = server.local_addr().expect("test step").port();
        let serve = tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut conn, _) = server.accept().await.expect("loopback");
                let mut buf = [0u8; 256];
                let _ = conn.read(&mut buf).await.expect("loopback");
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                conn.write_all(reply.as_bytes()).await.expect("loopback");
            }
        });
        let http = Target {
            address: Ipv4Addr::LOCALHOST,
            port,
            check: HealthCheck {
                probe: Probe::Http {
                    path: "/healthz".into(),
                    port: None,
                },
                ..check(true)
            },
        };
        assert_eq!(probe(&http).await, Ok(()));
        assert_eq!(probe(&http).await, Err("status 500".into()));
        serve.await.expect("loopback");
    }

    /// The loop reports a change only after the threshold, then the recovery.
    #[tokio::test]
    async fn the_loop_reports_after_the_thresholds() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback");
        let port = listener.local_addr().expect("test step").port();
        let (key, mut d) = desired(true);
        let want = d.get_mut(&key).expect("test step");
        want.backends.truncate(1);
        want.backends[0].address = Ipv4Addr::LOCALHOST;
        want.target_port = port;
        let mut health = Health::default();
        health.track(&d);
        assert_eq!(health.probing(), 1);
        drop(listener);
        let wait = Duration::from_secs(10);
        assert!(
            tokio::time::timeout(wait, health.next_change())
                .await
                .expect("test step")
        );
        let target = targets(&d)[&key][0].clone();
        assert!(!health.is_healthy(&service("web"), &target));
        assert_eq!(
            health.local_unhealthy(),
            [unhealthy("web", Ipv4Addr::LOCALHOST)]
        );
        let _back = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("test step");
        assert!(
            tokio::time::timeout(wait, health.next_change())
                .await
                .expect("test step")
        );
        assert!(health.is_healthy(&service("web"), &target));
        // The control service's verdict counts too, for its service only.
        assert!(health.set_remote([unhealthy("web", Ipv4Addr::LOCALHOST)]));
        assert!(
            !health.is_healthy(&service("web"), &target)
                && health.is_healthy(&service("api"), &target)
        );
        // A backend assigned to other probers is not probed here.
        d.get_mut(&key).expect("frontend").backends[0].probe_here = false;
        health.track(&d);
        assert_eq!(health.probing(), 0);
        d.get_mut(&key).expect("frontend").backends[0].probe_here = true;
        // A service without the check stops its probes.
        d.get_mut(&key).expect("test step").health_check = None;
        health.track(&d);
        assert_eq!(health.probing(), 0);
    }
}
