//! Drain deadlines: when a backend's established flows are ended.
//!
//! A backend out of rotation (marked draining, failing its health check, or
//! removed from the service) gets no new flows, and its established flows
//! keep going. With a `drainTimeoutSeconds` on the service, [`Drains::due`]
//! names the backends whose time is up, once each; the agent then deletes
//! their flows, so that the next packet of such a connection is balanced
//! again (and, for TCP, reset by the backend it lands on). Without a timeout
//! the flows run until they close. A backend that returns to rotation starts
//! a fresh drain the next time it leaves.

use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use sluice_common::types::{BACKEND_DRAINING, BACKEND_RETIRED};

use crate::reconcile::{Desired, State};

#[derive(Debug)]
struct Drain {
    deadline: Option<Instant>,
    since: Instant,
    ended: bool,
}

#[derive(Debug, Default)]
pub struct Drains {
    by_backend: HashMap<u32, Drain>,
}

impl Drains {
    /// Follows an applied `state` (and the `desired` state it came from,
    /// which holds the timeouts) at time `now`.
    pub fn track(&mut self, state: &State, desired: &Desired, now: Instant) {
        let timeouts: HashMap<u32, _> = desired
            .iter()
            .filter_map(|(key, want)| {
                Some((state.frontends.get(key)?.frontend.id, want.drain_timeout))
            })
            .collect();
        self.by_backend.retain(|id, _| {
            state
                .backends
                .get(id)
                .is_some_and(|b| b.flags & (BACKEND_DRAINING | BACKEND_RETIRED) != 0)
        });
        for (&id, backend) in &state.backends {
            if backend.flags & (BACKEND_DRAINING | BACKEND_RETIRED) == 0 {
                continue;
            }
            let drain = self.by_backend.entry(id).or_insert(Drain {
                deadline: None,
                since: now,
                ended: false,
            });
            // A deleted service port's flows were ended with it: no timeout.
            let timeout = timeouts.get(&backend.frontend_id).copied().flatten();
            drain.deadline = timeout.map(|t| drain.since + t);
        }
    }

    /// Backends whose drain timeout passed at `now`, each returned once.
    pub fn due(&mut self, now: Instant) -> BTreeSet<u32> {
        self.by_backend
            .iter_mut()
            .filter(|(_, d)| !d.ended && d.deadline.is_some_and(|at| at <= now))
            .map(|(&id, d)| {
                d.ended = true;
                id
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_common::types::{Backend, FrontendKeyV4, IPPROTO_TCP};

    use super::*;
    use crate::reconcile::{DesiredFrontend, FrontendState};
    use sluice_model::Algorithm;

    fn setup(timeout: Option<Duration>, flags: [u8; 3]) -> (State, Desired) {
        let key = FrontendKeyV4 {
            vip: 1,
            port: 80,
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        let mut state = State::default();
        state.frontends.insert(
            key,
            FrontendState {
                frontend: sluice_common::types::Frontend {
                    id: 7,
                    ..Default::default()
                },
                meta: Default::default(),
                slots: Vec::new(),
            },
        );
        for (id, flags) in flags.into_iter().enumerate() {
            state.backends.insert(
                id as u32,
                Backend {
                    frontend_id: 7,
                    flags,
                    ..Default::default()
                },
            );
        }
        let desired = Desired::from([(
            key,
            DesiredFrontend {
                service: sluice_model::view::ServiceRef {
                    namespace: "default".into(),
                    name: "web".into(),
                },
                name: "web".into(),
                target_port: 80,
                algorithm: Algorithm::RoundRobin,
                backends: Vec::new(),
                maglev_table_size: 0,
                health_check: None,
                drain_timeout: timeout,
                session_affinity: Default::default(),
                fallback_weights: Default::default(),
            },
        )]);
        (state, desired)
    }

    #[test]
    fn draining_and_retired_backends_are_due_once_after_the_timeout() {
        let t0 = Instant::now();
        let (state, desired) = setup(
            Some(Duration::from_secs(5)),
            [0, BACKEND_DRAINING, BACKEND_RETIRED],
        );
        let mut drains = Drains::default();
        drains.track(&state, &desired, t0);
        assert!(drains.due(t0 + Duration::from_secs(4)).is_empty());
        // Re-tracking later keeps the original start.
        drains.track(&state, &desired, t0 + Duration::from_secs(3));
        assert_eq!(
            drains.due(t0 + Duration::from_secs(5)),
            BTreeSet::from([1, 2])
        );
        assert!(drains.due(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn without_a_timeout_nothing_is_ended_and_a_return_resets_the_clock() {
        let t0 = Instant::now();
        let (state, desired) = setup(None, [BACKEND_DRAINING, 0, 0]);
        let mut drains = Drains::default();
        drains.track(&state, &desired, t0);
        assert!(drains.due(t0 + Duration::from_secs(86_400)).is_empty());

        let (draining, timed) = setup(Some(Duration::from_secs(5)), [BACKEND_DRAINING, 0, 0]);
        drains.track(&draining, &timed, t0);
        let (back, _) = setup(Some(Duration::from_secs(5)), [0, 0, 0]);
        drains.track(&back, &timed, t0 + Duration::from_secs(4));
        drains.track(&draining, &timed, t0 + Duration::from_secs(8));
        assert!(drains.due(t0 + Duration::from_secs(12)).is_empty());
        assert_eq!(
            drains.due(t0 + Duration::from_secs(13)),
            BTreeSet::from([0])
        );
    }
}
