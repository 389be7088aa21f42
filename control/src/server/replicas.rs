//! Replicas on a shared store (etcd): each follows what the others commit,
//! so its state, its view and its agents' watches stay current; a change
//! drafted on a copy that missed a write is drafted again after a reload
//! (see `Control::mutate`). Nothing here runs for the embedded store.

use std::sync::Arc;

use super::{ApiError, Control, State};

impl Control {
    /// Reads the whole state from the store again (after missing other
    /// writers' changes) and publishes the view updates it brings. The
    /// caller holds the write lock.
    pub(super) async fn reload(&self) -> Result<(), ApiError> {
        let store = self.store.clone();
        let fresh = tokio::task::spawn_blocking(move || State::load(store.as_ref()))
            .await
            .map_err(|e| ApiError::Invalid {
                message: format!("reload task failed: {e}"),
            })??;
        let old = self.state();
        let missed = fresh.history.since(old.view.version, fresh.view.version);
        let fresh = Arc::new(fresh);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        for update in missed.into_iter().flatten() {
            self.publish(&update);
        }
        self.end_removed_nodes(&old, &fresh);
        Ok(())
    }

    /// Nodes another replica removed: their watch streams here end too, and
    /// what they reported is forgotten.
    fn end_removed_nodes(&self, before: &State, after: &State) {
        for name in before.nodes.keys() {
            if !after.nodes.contains_key(name) {
                self.forget_node(name);
                let _ = self.removed_nodes.send(name.clone());
            }
        }
    }

    /// Follows what other replicas commit to a shared store (etcd), so that
    /// this one's state, view and watchers stay current; nothing for the
    /// embedded store. Runs until the service is dropped; a watch that ends
    /// (compaction, etcd gone for long) is replaced after a full reload.
    pub fn follow_store(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(control) = weak.upgrade() else {
                    return;
                };
                let after = control.state().revision;
                let Some(mut changes) = control.store.follow(after) else {
                    return;
                };
                drop(control);
                while let Some(next) = changes.recv().await {
                    let Some(control) = weak.upgrade() else {
                        return;
                    };
                    match next {
                        Ok(changes) => control.take_changes(&changes).await,
                        Err(e) => {
                            tracing::warn!(
                                "following the store: {}",
                                sluice_model::error_chain(&e)
                            );
                            break;
                        }
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let Some(control) = weak.upgrade() else {
                    return;
                };
                let _serial = control.writes.lock().await;
                if let Err(e) = control.reload().await {
                    tracing::warn!("reloading the state after the watch ended: {e}");
                }
            }
        });
    }

    /// One transaction another replica (or this one) committed.
    async fn take_changes(&self, changes: &crate::store::Changes) {
        let _serial = self.writes.lock().await;
        let current = self.state();
        if changes.revision <= current.revision {
            // This replica's own commit, or already loaded.
            return;
        }
        let mut next = (*current).clone();
        match next.apply_changes(changes) {
            Ok(updates) => {
                let next = Arc::new(next);
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
                for update in &updates {
                    self.publish(update);
                }
                self.end_removed_nodes(&current, &next);
            }
            Err(e) => {
                tracing::warn!(
                    revision = changes.revision,
                    "following the store: {e}; reloading"
                );
                if let Err(e) = self.reload().await {
                    tracing::warn!("reloading the state: {e}");
                }
            }
        }
    }
}
