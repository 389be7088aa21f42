//! The control service's in-memory copy of the desired state, in domain
//! types, how it is loaded from the store, and how a change is drafted before
//! it is committed ([`Draft`]).
//!
//! The state holds the objects of every kind ([`Objects`]), the joined
//! nodes, and the view computed from them with its recent history. Only
//! `codec` knows how any of it is written in the store.

mod codec;
mod draft;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_model::policy::compile::compile;
use sluice_model::view::{self, FrontendKey, Touched, View, ViewUpdate};
use sluice_model::{
    Endpoint, Grant, Kind, NetworkPolicy, Node, ObjectKind, Objects, Service, Versioned,
    kind::{KindVisitor, Table},
};

pub use crate::clock::rfc3339;
pub use draft::{Committed, Draft};

use super::history::History;
use crate::store::{Changes, Key, Store, StoreError, StoreExt as _};

/// Updates kept for agents that reconnect (in memory and in the store).
pub const HISTORY: usize = 256;

/// The store tables that belong to no object kind.
pub mod tables {
    pub const NODE: &str = "node";
    pub const TOKEN: &str = "token";
    pub const PKI: &str = "pki";
    pub const VIEW: &str = "view";
    pub const VIEW_LOG: &str = "viewlog";
}

/// A join token as stored: the secret only as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub secret_hash: String,
    /// Unix seconds.
    pub expires: u64,
    /// The node that used it; a token joins one node, once.
    pub used_by: Option<String>,
}

/// The cluster CA as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Clone, Debug)]
pub struct State {
    /// Store revision the state reflects.
    pub revision: u64,
    pub objects: Objects,
    pub nodes: BTreeMap<String, Versioned<Node>>,
    /// Every node's view (one for all nodes) at its version.
    pub view: View,
    pub history: Arc<History>,
}

impl State {
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut tables: Vec<&str> = ObjectKind::ALL.iter().map(|k| k.visit(TableName)).collect();
        tables.extend([tables::NODE, tables::VIEW, tables::VIEW_LOG]);
        let (entries, revision) = store.load(&tables)?;
        let mut state = State {
            revision,
            objects: Objects::default(),
            nodes: BTreeMap::new(),
            view: View::default(),
            history: Arc::new(History::new(HISTORY)),
        };
        let mut log = Vec::new();
        for (key, v) in &entries {
            match state.put_stored(key, v)? {
                Stored::ViewVersion(version) => state.view.version = version,
                Stored::Log(from, update) => log.push((from, update)),
                Stored::Applied => {}
            }
        }
        let version = state.view.version;
        state.view = View {
            version,
            ..state.compute_view()
        };
        let mut history = History::new(HISTORY);
        log.sort_by_key(|(_, update)| update.version);
        for (from, update) in log {
            history.push(from, update);
        }
        state.history = Arc::new(history);
        Ok(state)
    }

    /// What another writer committed (followed through the store), applied
    /// to this copy: objects and nodes as stored, the view by the update the
    /// writer logged with them, so every replica has the same view at the
    /// same version. Returns those updates, in order.
    pub fn apply_changes(&mut self, changes: &Changes) -> Result<Vec<ViewUpdate>, StoreError> {
        let mut updates = Vec::new();
        let mut history = None;
        for key in &changes.deletes {
            match key.kind.as_str() {
                tables::NODE => {
                    self.nodes.remove(&key.name);
                }
                table => {
                    if let Some(kind) = ObjectKind::ALL.iter().find(|k| k.visit(TableName) == table)
                    {
                        kind.visit(Remove {
                            objects: &mut self.objects,
                            key,
                        });
                    }
                }
            }
        }
        for (key, v) in &changes.puts {
            if let Stored::Log(from, update) = self.put_stored(key, v)? {
                updates.push((from, update));
            }
        }
        updates.sort_by_key(|(_, u)| u.version);
        let mut applied = Vec::with_capacity(updates.len());
        for (from, update) in updates {
            if update.version <= self.view.version {
                continue;
            }
            self.view.apply(update.clone());
            history
                .get_or_insert_with(|| (*self.history).clone())
                .push(from, update.clone());
            applied.push(update);
        }
        if let Some(history) = history {
            self.history = Arc::new(history);
        }
        self.revision = self.revision.max(changes.revision);
        Ok(applied)
    }

    /// One stored record taken into this copy: objects and nodes are
    /// applied; the view's records are returned, for the caller to apply
    /// (at load, the version; following, the logged update).
    fn put_stored(&mut self, key: &Key, v: &crate::store::Versioned) -> Result<Stored, StoreError> {
        match key.kind.as_str() {
            tables::NODE => {
                let node = codec::decode_node(key, &v.value)?;
                self.nodes.insert(
                    node.name.clone(),
                    Versioned {
                        object: node,
                        version: v.version,
                    },
                );
            }
            tables::VIEW => {
                return Ok(Stored::ViewVersion(codec::decode_view_meta(key, &v.value)?));
            }
            tables::VIEW_LOG => {
                let (from, update) = codec::decode_log(key, &v.value)?;
                return Ok(Stored::Log(from, update));
            }
            table => {
                if let Some(kind) = ObjectKind::ALL.iter().find(|k| k.visit(TableName) == table) {
                    kind.visit(Decode {
                        objects: &mut self.objects,
                        key,
                        value: &v.value,
                        version: v.version,
                    })?;
                }
            }
        }
        Ok(Stored::Applied)
    }

    /// The view the objects make now (its version is the caller's to set).
    pub fn compute_view(&self) -> View {
        let nodes: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        let objects = &self.objects;
        View {
            version: 0,
            frontends: view::frontends(&nodes, objects.all::<Service>(), objects.all::<Endpoint>()),
            policy: compile(
                objects.all::<NetworkPolicy>(),
                objects.all::<Service>(),
                objects.all::<Endpoint>(),
            ),
        }
    }

    /// The view after a change that touched `touched` (and, with
    /// `policy_touched`, what policies select), from this state's objects
    /// and the view before it: only the affected frontends are recomputed.
    /// Also the frontend keys that may differ (`None`: any).
    pub fn refresh_view(
        &self,
        base_services: &Table<Service>,
        touched: &Touched,
        policy_touched: bool,
    ) -> (View, Option<BTreeSet<FrontendKey>>) {
        let nodes: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        let objects = &self.objects;
        let refreshed = view::refresh(
            &self.view.frontends,
            base_services,
            objects,
            &nodes,
            touched,
        );
        let policy = if policy_touched {
            compile(
                objects.all::<NetworkPolicy>(),
                objects.all::<Service>(),
                objects.all::<Endpoint>(),
            )
        } else {
            self.view.policy.clone()
        };
        let view = View {
            version: 0,
            frontends: refreshed.frontends,
            policy,
        };
        (view, refreshed.candidates)
    }

    /// Every grant, for RBAC.
    pub fn grants(&self) -> Vec<&Grant> {
        self.objects.all::<Grant>().collect()
    }
}

/// A kind's store table.
pub(crate) struct TableName;

impl KindVisitor for TableName {
    type Output = &'static str;
    fn visit<K: Kind>(self) -> &'static str {
        K::TABLE
    }
}

/// What a stored record was, to the view.
enum Stored {
    Applied,
    ViewVersion(u64),
    Log(u64, ViewUpdate),
}

/// Removes one object from its table.
struct Remove<'a> {
    objects: &'a mut Objects,
    key: &'a Key,
}

impl KindVisitor for Remove<'_> {
    type Output = ();
    fn visit<K: Kind>(self) {
        self.objects
            .remove::<K>(&self.key.namespace, &self.key.name);
    }
}

/// Decodes one stored object into its table.
struct Decode<'a> {
    objects: &'a mut Objects,
    key: &'a Key,
    value: &'a [u8],
    version: u64,
}

impl KindVisitor for Decode<'_> {
    type Output = Result<(), StoreError>;
    fn visit<K: Kind>(self) -> Result<(), StoreError> {
        let object: K = codec::decode_object(self.key, self.value)?;
        self.objects.insert(object, self.version);
        Ok(())
    }
}
