//! How a change is drafted and committed.
//!
//! Every change goes through a [`Draft`]: a copy of the state that the
//! handler edits while it records the store operations; the new view is
//! computed from the draft, and the draft replaces the state only after the
//! store has durably committed all of it, in one transaction. A failed
//! validation or a conflict leaves both the store and the state untouched.

use std::sync::Arc;

use sluice_model::view::{View, ViewUpdate};
use sluice_model::{Kind, Node, Versioned};

use super::{HISTORY, State, TokenRecord, codec, tables};
use crate::error::ApiError;
use crate::store::{Expect, Key, Store, StoreExt as _};

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
}

/// What committing a draft produced.
pub struct Committed {
    pub state: State,
    /// The view update it caused, if any.
    pub update: Option<ViewUpdate>,
}

impl Draft {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            ops: Vec::new(),
            stamps: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn push(&mut self, key: Key, value: Option<Vec<u8>>, expect: Expect) {
        self.ops.push(Op { key, value, expect });
    }

    /// Stores `object` (created or replaced).
    pub fn put<K: Kind>(&mut self, object: K, expect: Expect) {
        let (namespace, name) = (object.namespace().to_owned(), object.name().to_owned());
        self.push(
            Key::new(K::TABLE, &namespace, &name),
            Some(codec::encode_object(&object)),
            expect,
        );
        self.state.objects.insert(object, 0);
        self.stamps.push(Box::new(move |state, revision| {
            let key = (namespace, name);
            if let Some(stored) = state.objects.table_mut::<K>().get_mut(&key) {
                stored.version = revision;
            }
        }));
    }

    /// Deletes the object of kind `K` (the caller checked it exists).
    pub fn delete<K: Kind>(&mut self, namespace: &str, name: &str, expect: Expect) {
        self.state.objects.remove::<K>(namespace, name);
        self.push(Key::new(K::TABLE, namespace, name), None, expect);
    }

    pub fn put_node(&mut self, node: Node, expect: Expect) {
        let name = node.name.clone();
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
        let new_view = View {
            version: from + 1,
            ..self.state.compute_view()
        };
        let update = self.state.view.diff(&new_view, new_view.version);
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
        let ((), revision) = store.write(|tx| -> Result<(), ApiError> {
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
