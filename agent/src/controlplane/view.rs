//! The node's view as the agent holds it between updates.

use std::collections::BTreeMap;

use sluice_api::v1;

/// A frontend's identity in the view: what `ViewUpdate.remove` names.
type FrontendId = (String, u32, i32);

fn id_of(frontend: &v1::FrontendView) -> FrontendId {
    (frontend.vip.clone(), frontend.port, frontend.protocol)
}

/// The view at one version: every frontend this node must program.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    version: u64,
    frontends: BTreeMap<FrontendId, v1::FrontendView>,
    policy: v1::PolicyView,
}

impl View {
    /// A view as saved by [`super::NodeState::save_view`].
    pub fn from_saved(
        version: u64,
        frontends: Vec<v1::FrontendView>,
        policy: v1::PolicyView,
    ) -> Self {
        View {
            version,
            frontends: frontends.into_iter().map(|f| (id_of(&f), f)).collect(),
            policy,
        }
    }

    /// The compiled network policy.
    pub fn policy(&self) -> &v1::PolicyView {
        &self.policy
    }

    /// The version of the last update applied; 0 before the first.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn frontends(&self) -> impl Iterator<Item = &v1::FrontendView> {
        self.frontends.values()
    }

    pub fn len(&self) -> usize {
        self.frontends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }

    /// Applies `update`: a snapshot replaces everything; a change removes,
    /// then upserts (a frontend both removed and upserted ends up upserted).
    pub fn apply(&mut self, update: v1::ViewUpdate) {
        if update.snapshot {
            self.frontends.clear();
            self.policy = v1::PolicyView::default();
        }
        if let Some(policy) = update.policy {
            self.policy = policy;
        }
        for key in update.remove {
            self.frontends.remove(&(key.vip, key.port, key.protocol));
        }
        for frontend in update.upsert {
            self.frontends.insert(id_of(&frontend), frontend);
        }
        self.version = update.version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontend(vip: &str, port: u32, backends: &[&str]) -> v1::FrontendView {
        v1::FrontendView {
            maglev_table_size: 0,
            service: format!("default/{vip}"),
            vip: vip.into(),
            port,
            protocol: v1::Protocol::Tcp as i32,
            target_port: port,
            algorithm: v1::Algorithm::RoundRobin as i32,
            backends: backends
                .iter()
                .map(|a| v1::ViewBackend {
                    address: (*a).into(),
                    weight: 1,
                    draining: Default::default(),
                    probers: Default::default(),
                })
                .collect(),
            drain_timeout_seconds: Default::default(),
            health_check: Default::default(),
            session_affinity_seconds: Default::default(),
            zones: Default::default(),
        }
    }

    fn key(vip: &str, port: u32) -> v1::FrontendKey {
        v1::FrontendKey {
            vip: vip.into(),
            port,
            protocol: v1::Protocol::Tcp as i32,
        }
    }

    #[test]
    fn changes_upsert_and_remove_by_key_and_snapshots_replace() {
        let mut view = View::default();
        view.apply(v1::ViewUpdate {
            version: 3,
            snapshot: true,
            upsert: vec![
                frontend("10.0.0.1", 80, &["10.1.0.1"]),
                frontend("10.0.0.2", 80, &["10.1.0.2"]),
            ],
            remove: vec![],
            policy: Default::default(),
        });
        assert_eq!((view.version(), view.len()), (3, 2));

        view.apply(v1::ViewUpdate {
            version: 4,
            snapshot: false,
            upsert: vec![frontend("10.0.0.1", 80, &["10.1.0.1", "10.1.0.9"])],
            remove: vec![key("10.0.0.2", 80), key("10.0.0.7", 80)],
            policy: Default::default(),
        });
        let got: Vec<_> = view.frontends().cloned().collect();
        assert_eq!(
            got,
            vec![frontend("10.0.0.1", 80, &["10.1.0.1", "10.1.0.9"])]
        );
        assert_eq!(view.version(), 4);

        // The same key on another protocol is another frontend.
        let mut udp = frontend("10.0.0.1", 80, &["10.1.0.5"]);
        udp.protocol = v1::Protocol::Udp as i32;
        view.apply(v1::ViewUpdate {
            version: 5,
            snapshot: false,
            upsert: vec![udp],
            remove: vec![],
            policy: Default::default(),
        });
        assert_eq!(view.len(), 2);

        view.apply(v1::ViewUpdate {
            version: 9,
            snapshot: true,
            upsert: vec![frontend("10.0.0.3", 53, &[])],
            remove: vec![],
            policy: Default::default(),
        });
        assert_eq!(view.len(), 1);
        assert_eq!(
            View::from_saved(9, view.frontends().cloned().collect(), Default::default()),
            view
        );
    }
}
