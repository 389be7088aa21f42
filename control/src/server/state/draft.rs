//! How a change is drafted and committed.
//!
//! Every change goes through a [`Draft`]: a copy of the state that the
//! handler edits while it records the store operations (persistent maps: a
//! copy costs nothing until written); the new view is refreshed from the
//! draft for what it touched, and the draft replaces the state only after
//! the store has durably committed all of it, in one transaction. A failed
//! validation or a conflict leaves both the store and the state untouched.

use std::sync::Arc;

use sluice_model::kind::Table;
use sluice_model::view::{Touched, View, ViewUpdate};
use sluice_model::{Kind, Node, ObjectKind, Service, Versioned};

use super::{HISTORY, State, TokenRecord, codec, tables};
use crate::error::ApiError;
use crate::store::{Expect, Key, Store, StoreError, StoreExt as _};

/// One store operation of a draft.
#[derive(Debug)]
struct Op {
    key: Key,
    value: Option<Vec<u8>>,
    expect: Expect,
}

/// Gives an object written by the draft the revision that committed it.
type Stamp = Box<dyn FnOnce(&mut State, u64) + Send>;

/// A copy of the state being edited, and the store operations that make the
/// same edits durable.
pub struct Draft {
    pub state: State,
    ops: Vec<Op>,
    stamps: Vec<Stamp>,
    /// The services before the draft, and what it touched: the view is
    /// refreshed for that only (see `sluice_model::view::refresh`).
    base_services: Table<Service>,
    touched: Touched,
    /// A policy, or something policies select, changed.
    policy_touched: bool,
}

/// What committing a draft produced.
pub struct Committed {
    pub state: State,
    /// The view update it caused, if any.
    pub update: Option<ViewUpdate>,
}

impl Draft {
    pub fn new(state: &State) -> Self {
        // Persistent maps: both copies cost nothing until written.
        Self {
            state: state.clone(),
            ops: Vec::new(),
            stamps: Vec::new(),
            base_services: state.objects.table::<Service>().clone(),
            touched: Touched::default(),
            policy_touched: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn push(&mut self, key: Key, value: Option<Vec<u8>>, expect: Expect) {
        self.ops.push(Op { key, value, expect });
    }

    /// Records what writing (or, with `new` `None`, deleting) the object of
    /// kind `K` at `namespace/name` means for the view.
    fn touch<K: Kind>(&mut self, namespace: &str, name: &str, new: Option<&K>) {
        match K::KIND {
            ObjectKind::Service => {
                self.touched
                    .services
                    .insert((namespace.to_owned(), name.to_owned()));
                self.policy_touched = true;
            }
            ObjectKind::Endpoint => {
                let old = self.state.objects.get::<K>(namespace, name);
                for labels in old
                    .map(|o| o.object.labels())
                    .into_iter()
                    .chain(new.map(|n| n.labels()))
                {
                    self.touched
                        .endpoint_labels
                        .push((namespace.to_owned(), labels.clone()));
                }
                self.policy_touched = true;
            }
            ObjectKind::NetworkPolicy => self.policy_touched = true,
            ObjectKind::Grant => {}
        }
    }

    /// Stores `object` (created or replaced).
    pub fn put<K: Kind>(&mut self, object: K, expect: Expect) {
        let (namespace, name) = (object.namespace().to_owned(), object.name().to_owned());
        self.touch(&namespace, &name, Some(&object));
        self.push(
            Key::new(K::TABLE, &namespace, &name),
            Some(codec::encode_object(&object)),
            expect,
        );
        self.state.objects.insert(object, 0);
        self.stamps.push(Box::new(move |state, revision| {
            let key = (namespace, name);
            state.objects.set_version::<K>(&key.0, &key.1, revision);
        }));
    }

    /// Deletes the object of kind `K` (the caller checked it exists).
    pub fn delete<K: Kind>(&mut self, namespace: &str, name: &str, expect: Expect) {
        self.touch::<K>(namespace, name, None);
        self.state.objects.remove::<K>(namespace, name);
        self.push(Key::new(K::TABLE, namespace, name), None, expect);
    }

    pub fn put_node(&mut self, node: Node, expect: Expect) {
        let name = node.name.clone();
        // A renewal keeps the node (and the probers); a join adds one.
        self.touched.nodes |= !self.state.nodes.contains_key(&name);
        self.push(
            codec::node_key(&name),
            Some(codec::encode_node(&node)),
            expect,
        );
        self.state.nodes.insert(
            name.clone(),
            Versioned {
                object: node,
                version: 0,
            },
        );
        self.stamps.push(Box::new(move |state, revision| {
            if let Some(node) = state.nodes.get_mut(&name) {
                node.version = revision;
            }
        }));
    }

    pub fn delete_node(&mut self, name: &str, expect: Expect) {
        self.touched.nodes = true;
        self.state.nodes.remove(name);
        self.push(codec::node_key(name), None, expect);
    }

    pub fn put_token(
        &mut self,
        id: &str,
        record: &TokenRecord,
        expect: Expect,
    ) -> Result<(), ApiError> {
        let value = serde_json::to_vec(record).map_err(|e| ApiError::Invalid {
            message: format!("encoding token {id}: {e}"),
        })?;
        self.push(Key::cluster(tables::TOKEN, id), Some(value), expect);
        Ok(())
    }

    /// Commits the draft in one durable transaction. Computes the new view
    /// first so that its version and the update that led to it are stored
    /// with the objects that caused them.
    pub fn commit(mut self, store: &dyn Store) -> Result<Committed, ApiError> {
        let from = self.state.view.version;
        let (new_view, candidates) =
            self.state
                .refresh_view(&self.base_services, &self.touched, self.policy_touched);
        let new_view = View {
            version: from + 1,
            ..new_view
        };
        // Every test run (debug builds) holds the refresh to the full
        // computation; release builds trust it (and its property test).
        #[cfg(debug_assertions)]
        {
            let full = self.state.compute_view();
            assert!(
                full.frontends == new_view.frontends && full.policy == new_view.policy,
                "the refreshed view differs from the computed one after touching {:?}",
                self.touched
            );
        }
        let update = self
            .state
            .view
            .diff_among(&new_view, new_view.version, candidates.as_ref());
        if let Some(update) = &update {
            self.push(
                codec::view_meta_key(),
                Some(codec::encode_view_meta(update.version)),
                Expect::Any,
            );
            self.push(
                codec::log_key(update.version),
                Some(codec::encode_log(from, update)),
                Expect::Any,
            );
            if update.version > HISTORY as u64 {
                self.push(
                    codec::log_key(update.version - HISTORY as u64),
                    None,
                    Expect::Any,
                );
            }
        }
        let ops = std::mem::take(&mut self.ops);
        let based_on = self.state.revision;
        let ((), revision) = store.write(|tx| -> Result<(), ApiError> {
            // Drafted on a copy that missed another replica's write: the
            // view and the checks it made may be stale.
            if tx.last_write() > based_on {
                return Err(StoreError::Raced {
                    base: based_on,
                    winner: tx.last_write(),
                }
                .into());
            }
            let expected: Vec<Key> = ops
                .iter()
                .filter(|op| op.expect != Expect::Any)
                .map(|op| op.key.clone())
                .collect();
            tx.prefetch(&expected)?;
            for op in &ops {
                match &op.value {
                    Some(v) => tx.put(&op.key, v, op.expect)?,
                    None => {
                        tx.delete(&op.key, op.expect)?;
                    }
                }
            }
            Ok(())
        })?;
        let Self {
            mut state, stamps, ..
        } = self;
        state.revision = revision;
        for stamp in stamps {
            stamp(&mut state, revision);
        }
        if let Some(update) = &update {
            let mut history = (*state.history).clone();
            history.push(from, update.clone());
            state.history = Arc::new(history);
            state.view = new_view;
        }
        Ok(Committed { state, update })
    }
}
