//! Following what every writer of the prefix commits, through etcd's watch:
//! a replica keeps its copy of the state current with the others' writes.
//! Events come grouped by the revision (the transaction) that made them, in
//! order; the store's own sentinel and the replicas' registrations are left out. A watch that ends (etcd
//! compacted the revisions it needed, or the connection went for good)
//! says so once and closes: the follower then reloads everything.

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use super::{EtcdError, EtcdStore};
use crate::store::{BackendError, Changes, StoreError, Versioned};

impl EtcdStore {
    /// The changes committed after revision `after`, as they come.
    pub(super) fn watch_changes(
        &self,
        after: u64,
    ) -> mpsc::UnboundedReceiver<Result<Changes, StoreError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watch = self.client.watch_client();
        let layout = self.layout.clone();
        let sentinel = layout.sentinel();
        let replicas = layout.replicas();
        let endpoints = self.endpoints.clone();
        let ended = move |why: String| StoreError::Backend {
            op: "watch",
            source: BackendError::Etcd(EtcdError::WatchEnded {
                endpoints: endpoints.clone(),
                why,
            }),
        };
        let start = i64::try_from(after.saturating_add(1)).unwrap_or(i64::MAX);
        let Some(runtime) = self.runtime.0.as_ref() else {
            let _ = tx.send(Err(ended("the client's runtime stopped".into())));
            return rx;
        };
        runtime.spawn(async move {
            let options = WatchOptions::new().with_prefix().with_start_revision(start);
            let mut stream = match watch.watch(layout.prefix().to_vec(), Some(options)).await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = tx.send(Err(ended(e.to_string())));
                    return;
                }
            };
            loop {
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        let _ = tx.send(Err(ended("etcd closed the watch".into())));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(ended(e.to_string())));
                        return;
                    }
                };
                if response.compact_revision() > 0 || response.canceled() {
                    let why = format!(
                        "etcd compacted the revisions to follow (up to {})",
                        response.compact_revision()
                    );
                    let _ = tx.send(Err(ended(why)));
                    return;
                }
                let mut pending: Option<Changes> = None;
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    if kv.key() == sentinel.as_slice() || kv.key().starts_with(&replicas) {
                        continue;
                    }
                    let revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                    let key = match layout.decode(kv.key()) {
                        Ok(key) => key,
                        Err(e) => {
                            tracing::warn!("following the store: skipping a key: {e}");
                            continue;
                        }
                    };
                    if pending.as_ref().is_some_and(|p| p.revision != revision)
                        && let Some(done) = pending.take()
                        && tx.send(Ok(done)).is_err()
                    {
                        return;
                    }
                    let changes = pending.get_or_insert_with(|| Changes {
                        revision,
                        puts: Vec::new(),
                        deletes: Vec::new(),
                    });
                    match event.event_type() {
                        EventType::Put => changes.puts.push((
                            key,
                            Versioned {
                                version: revision,
                                value: kv.value().to_vec(),
                            },
                        )),
                        EventType::Delete => changes.deletes.push(key),
                    }
                }
                if let Some(done) = pending.take()
                    && tx.send(Ok(done)).is_err()
                {
                    return;
                }
            }
        });
        rx
    }
}
