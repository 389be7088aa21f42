//! Backend health as the probers see it.
//!
//! Probing is delegated: the view names, for each backend of a health-checked
//! service, a few nodes that probe it ([`sluice_model::view::probers`]), so probes
//! grow with the number of backends, not nodes × backends. Each agent reports
//! the backends it probes and finds unhealthy (the complete set, with every
//! status report and at once on a change). A backend is unhealthy when more
//! than half of its probers that are connected say so; a prober that is not
//! connected has no vote, and a backend with no connected prober counts as
//! healthy (the data plane keeps sending to it, as it would without a check).
//! Probers connected to other replicas vote too ([`super::peers`]).
//! The verdicts go to every agent on the `WatchHealth` stream as one complete
//! set per change. They are live state: not stored, not versioned. After a
//! restart the service waits [`WARMUP`] for the agents to report again before
//! it speaks, so that a restart does not put dead backends back in rotation.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use sluice_api::v1;
use sluice_model::observe::BackendRef;
use sluice_model::view::Frontends;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};

use super::Control;

pub type Unhealthy = BTreeSet<BackendRef>;

/// What one prober says, wherever it is connected.
#[derive(Clone, Debug, Default)]
pub struct Vote {
    /// A disconnected prober has no vote.
    pub connected: bool,
    /// The backends it probes and finds unhealthy.
    pub unhealthy: Unhealthy,
}

/// How long after start the service collects reports before it publishes
/// verdicts; agents report at once when they reconnect.
pub const WARMUP: Duration = Duration::from_secs(3);

/// The backends a majority of their connected probers find unhealthy.
pub fn verdicts(view: &Frontends, votes: &BTreeMap<String, Vote>) -> Unhealthy {
    let mut out = Unhealthy::new();
    let mut seen = BTreeSet::new();
    for frontend in view.values() {
        for backend in &frontend.backends {
            if backend.probers.is_empty() || !seen.insert((&frontend.service, backend.address)) {
                continue;
            }
            let key = BackendRef {
                service: frontend.service.clone(),
                address: backend.address.into(),
            };
            let voters: Vec<&Vote> = backend
                .probers
                .iter()
                .filter_map(|node| votes.get(node))
                .filter(|v| v.connected)
                .collect();
            let against = voters.iter().filter(|l| l.unhealthy.contains(&key)).count();
            if against * 2 > voters.len() {
                out.insert(key);
            }
        }
    }
    out
}

impl Control {
    /// Recomputes the verdicts and publishes them if they changed.
    pub(super) fn judge_health(&self) {
        let state = self.state();
        let now = verdicts(&state.view.frontends, &self.votes());
        self.health.send_if_modified(|current| {
            if **current == now {
                return false;
            }
            for BackendRef { service, address } in now.difference(current) {
                warn!(%service, %address, "backend unhealthy by its probers");
            }
            for BackendRef { service, address } in current.difference(&now) {
                info!(%service, %address, "backend healthy again by its probers");
            }
            *current = Arc::new(now);
            true
        });
    }

    /// The backends their probers find unhealthy now.
    pub fn unhealthy(&self) -> Arc<Unhealthy> {
        self.health.borrow().clone()
    }

    /// The verdicts as a stream: the complete set once warmed up, then again
    /// on every change.
    pub fn watch_health(self: &Arc<Self>) -> ReceiverStream<Result<v1::HealthUpdate, Status>> {
        let (tx, rx) = mpsc::channel(4);
        let mut changes = self.health.subscribe();
        let warm_at = self.started + WARMUP;
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(warm_at.into()) => {}
                () = tx.closed() => return,
            }
            loop {
                let current = changes.borrow_and_update().clone();
                let update = v1::HealthUpdate {
                    unhealthy: current.iter().map(v1::BackendRef::from).collect(),
                };
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

#[cfg(test)]
mod tests {
    use sluice_model::view::{Frontend, FrontendKey, ServiceRef, ViewBackend};
    use sluice_model::{Algorithm, Protocol};

    use super::*;

    fn web() -> ServiceRef {
        ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    fn view(probers: &[&str]) -> Frontends {
        let key = FrontendKey {
            vip: "198.18.0.1".parse().expect("ip"),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let frontend = Frontend {
            key,
            service: web(),
            target_port: 80,
            algorithm: Algorithm::RoundRobin,
            maglev_table_size: 0,
            health_check: None,
            drain_timeout_seconds: None,
            session_affinity_seconds: None,
            zones: Vec::new(),
            backends: vec![ViewBackend {
                address: "198.19.0.11".parse().expect("ip"),
                weight: 1,
                draining: false,
                probers: probers.iter().map(|p| p.to_string()).collect(),
            }],
        };
        Frontends::from_iter([(key, frontend)])
    }

    fn live(nodes: &[(&str, bool, bool)]) -> BTreeMap<String, Vote> {
        let key = BackendRef {
            service: web(),
            address: "198.19.0.11".parse().expect("ip"),
        };
        nodes
            .iter()
            .map(|&(name, connected, says_down)| {
                let mut l = Vote {
                    connected,
                    ..Default::default()
                };
                if says_down {
                    l.unhealthy.insert(key.clone());
                }
                (name.to_owned(), l)
            })
            .collect()
    }

    #[test]
    fn a_majority_of_connected_probers_decides() {
        let v = view(&["a", "b", "c"]);
        assert!(
            verdicts(
                &v,
                &live(&[("a", true, true), ("b", true, false), ("c", true, false)])
            )
            .is_empty()
        );
        assert_eq!(
            verdicts(
                &v,
                &live(&[("a", true, true), ("b", true, true), ("c", true, false)])
            )
            .len(),
            1
        );
        // A disconnected prober has no vote: one of one connected is a majority.
        assert_eq!(
            verdicts(
                &v,
                &live(&[("a", true, true), ("b", false, false), ("c", false, false)])
            )
            .len(),
            1
        );
        // Nobody connected, or a node that is not a prober: no verdict.
        assert!(verdicts(&v, &live(&[("a", false, true)])).is_empty());
        assert!(verdicts(&v, &live(&[("z", true, true)])).is_empty());
        // Without probers (no health check) nothing is judged.
        assert!(verdicts(&view(&[]), &live(&[("a", true, true)])).is_empty());
    }
}
