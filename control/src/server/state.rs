//! The control service's in-memory copy of the desired state, how it is
//! loaded from the store, and how a change is drafted before it is committed.
//!
//! Every change goes through a [`Draft`]: a copy of the state that the
//! handler edits while it records the store operations; the new view is
//! computed from the draft, and the draft replaces the state only after the
//! store has durably committed all of it, in one transaction. A failed
//! validation or a conflict leaves both the store and the state untouched.

use std::collections::BTreeMap;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use sluice_api::v1;

use crate::{
    error::ApiError,
    store::{Expect, Key, Store, StoreError, StoreExt as _, kind},
    view::{self, Frontends, History},
};

/// Updates kept for agents that reconnect (in memory and in the store).
pub const HISTORY: usize = 256;

/// Store kinds the server adds to [`crate::store::kind`].
pub mod kinds {
    pub const VIEW: &str = "view";
    pub const VIEW_LOG: &str = "viewlog";
}

/// A joined node as stored. (The API's `v1::Node` adds live status.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub zone: String,
    /// Serial numbers of the certificates the node may use: the current one
    /// first, then the one it replaces while a renewal is under way.
    pub serials: Vec<String>,
    /// RFC 3339.
    pub certificate_expires: String,
    pub joined_at: String,
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

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct ViewMeta {
    version: u64,
}

pub type Named = (String, String);

#[derive(Clone, Debug)]
pub struct State {
    /// Store revision the state reflects.
    pub revision: u64,
    pub services: BTreeMap<Named, v1::Service>,
    pub endpoints: BTreeMap<Named, v1::Endpoint>,
    pub grants: BTreeMap<Named, v1::Grant>,
    pub policies: BTreeMap<Named, v1::NetworkPolicy>,
    pub nodes: BTreeMap<String, (NodeRecord, u64)>,
    /// Every node's view (one for all nodes) and its version.
    pub view: Frontends,
    /// The compiled network policy, part of the view.
    pub policy: v1::PolicyView,
    pub view_version: u64,
    pub history: std::sync::Arc<History>,
}

fn named(key: &Key) -> Named {
    (key.namespace.clone(), key.name.clone())
}

fn corrupt(key: &Key) -> StoreError {
    StoreError::Corrupt {
        key: key.clone(),
        reason: "undecodable value",
    }
}

/// Stamps an object's metadata with the store's version of it.
fn with_version(meta: &mut Option<v1::ObjectMeta>, version: u64) {
    if let Some(m) = meta.as_mut() {
        m.resource_version = version;
    }
}

impl State {
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let (entries, revision) = store.load(&[
            kind::SERVICE,
            kind::ENDPOINT,
            kind::GRANT,
            kind::NETWORK_POLICY,
            kind::NODE,
            kinds::VIEW,
            kinds::VIEW_LOG,
        ])?;
        let mut state = State {
            revision,
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            grants: BTreeMap::new(),
            policies: BTreeMap::new(),
            nodes: BTreeMap::new(),
            view: Frontends::new(),
            policy: v1::PolicyView::default(),
            view_version: 0,
            history: std::sync::Arc::new(History::new(HISTORY)),
        };
        let mut log = Vec::new();
        for (key, v) in entries {
            match key.kind.as_str() {
                kind::SERVICE => {
                    let mut s =
                        v1::Service::decode(v.value.as_slice()).map_err(|_| corrupt(&key))?;
                    with_version(&mut s.meta, v.version);
                    state.services.insert(named(&key), s);
                }
                kind::ENDPOINT => {
                    let mut e =
                        v1::Endpoint::decode(v.value.as_slice()).map_err(|_| corrupt(&key))?;
                    with_version(&mut e.meta, v.version);
                    state.endpoints.insert(named(&key), e);
                }
                kind::GRANT => {
                    let mut g = v1::Grant::decode(v.value.as_slice()).map_err(|_| corrupt(&key))?;
                    with_version(&mut g.meta, v.version);
                    state.grants.insert(named(&key), g);
                }
                kind::NETWORK_POLICY => {
                    let mut p =
                        v1::NetworkPolicy::decode(v.value.as_slice()).map_err(|_| corrupt(&key))?;
                    with_version(&mut p.meta, v.version);
                    state.policies.insert(named(&key), p);
                }
                kind::NODE => {
                    let n: NodeRecord =
                        serde_json::from_slice(&v.value).map_err(|_| corrupt(&key))?;
                    state.nodes.insert(key.name.clone(), (n, v.version));
                }
                kinds::VIEW => {
                    let m: ViewMeta =
                        serde_json::from_slice(&v.value).map_err(|_| corrupt(&key))?;
                    state.view_version = m.version;
                }
                kinds::VIEW_LOG => log.push((key, v.value)),
                _ => {}
            }
        }
        state.view = state.compute_view();
        state.policy = state.compute_policy();
        let mut history = History::new(HISTORY);
        log.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        for (key, bytes) in log {
            let (from, update) = decode_log(&bytes).ok_or_else(|| corrupt(&key))?;
            history.push(from, update);
        }
        state.history = std::sync::Arc::new(history);
        Ok(state)
    }

    pub fn compute_view(&self) -> Frontends {
        let endpoints: Vec<&v1::Endpoint> = self.endpoints.values().collect();
        let nodes: Vec<&str> = self.nodes.keys().map(String::as_str).collect();
        view::compute(&nodes, self.services.values(), &endpoints)
    }

    pub fn compute_policy(&self) -> v1::PolicyView {
        crate::policy::compile(&self.policies, &self.services, &self.endpoints)
    }

    pub fn grants(&self) -> Vec<v1::Grant> {
        self.grants.values().cloned().collect()
    }
}

fn encode_log(from: u64, update: &v1::ViewUpdate) -> Vec<u8> {
    let mut bytes = from.to_le_bytes().to_vec();
    bytes.extend(update.encode_to_vec());
    bytes
}

fn decode_log(bytes: &[u8]) -> Option<(u64, v1::ViewUpdate)> {
    let (from, rest) = bytes.split_at_checked(8)?;
    let from = u64::from_le_bytes(from.try_into().ok()?);
    Some((from, v1::ViewUpdate::decode(rest).ok()?))
}

fn log_key(version: u64) -> Key {
    // Zero-padded so that names sort as numbers.
    Key::cluster(kinds::VIEW_LOG, format!("{version:020}"))
}

/// One store operation of a draft.
#[derive(Debug)]
struct Op {
    key: Key,
    value: Option<Vec<u8>>,
    expect: Expect,
}

/// A copy of the state being edited, and the store operations that make the
/// same edits durable.
pub struct Draft {
    pub state: State,
    ops: Vec<Op>,
    /// Objects written, to stamp with the new revision once committed.
    touched: Vec<Key>,
}

/// What committing a draft produced.
pub struct Committed {
    pub state: State,
    /// The view update it caused, if any.
    pub update: Option<v1::ViewUpdate>,
}

impl Draft {
    pub fn new(state: &State) -> Self {
        Self {
            state: state.clone(),
            ops: Vec::new(),
            touched: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn push(&mut self, key: Key, value: Option<Vec<u8>>, expect: Expect) {
        self.touched.push(key.clone());
        self.ops.push(Op { key, value, expect });
    }

    pub fn put_service(&mut self, s: v1::Service, expect: Expect) {
        let (ns, name) = meta_key(s.meta.as_ref());
        self.push(
            Key::new(kind::SERVICE, &ns, &name),
            Some(s.encode_to_vec()),
            expect,
        );
        self.state.services.insert((ns, name), s);
    }

    pub fn put_endpoint(&mut self, e: v1::Endpoint, expect: Expect) {
        let (ns, name) = meta_key(e.meta.as_ref());
        self.push(
            Key::new(kind::ENDPOINT, &ns, &name),
            Some(e.encode_to_vec()),
            expect,
        );
        self.state.endpoints.insert((ns, name), e);
    }

    pub fn put_grant(&mut self, g: v1::Grant, expect: Expect) {
        let (ns, name) = meta_key(g.meta.as_ref());
        self.push(
            Key::new(kind::GRANT, &ns, &name),
            Some(g.encode_to_vec()),
            expect,
        );
        self.state.grants.insert((ns, name), g);
    }

    pub fn put_policy(&mut self, p: v1::NetworkPolicy, expect: Expect) {
        let (ns, name) = meta_key(p.meta.as_ref());
        self.push(
            Key::new(kind::NETWORK_POLICY, &ns, &name),
            Some(p.encode_to_vec()),
            expect,
        );
        self.state.policies.insert((ns, name), p);
    }

    pub fn put_node(
        &mut self,
        name: &str,
        record: NodeRecord,
        expect: Expect,
    ) -> Result<(), ApiError> {
        let value = serde_json::to_vec(&record).map_err(|e| ApiError::Invalid {
            message: format!("encoding node {name}: {e}"),
        })?;
        self.push(Key::cluster(kind::NODE, name), Some(value), expect);
        self.state.nodes.insert(name.to_string(), (record, 0));
        Ok(())
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
        self.push(Key::cluster(kind::TOKEN, id), Some(value), expect);
        Ok(())
    }

    /// Deletes a stored object of `kind`; the caller updates `state` itself.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str, expect: Expect) {
        self.push(Key::new(kind, namespace, name), None, expect);
    }

    /// Commits the draft in one durable transaction. Computes the new view
    /// first so that its version and the update that led to it are stored
    /// with the objects that caused them.
    pub fn commit(mut self, store: &dyn Store) -> Result<Committed, ApiError> {
        let new_view = self.state.compute_view();
        let new_policy = self.state.compute_policy();
        let update = view::diff(
            &self.state.view,
            &new_view,
            &self.state.policy,
            &new_policy,
            self.state.view_version + 1,
        );
        if let Some(update) = &update {
            let from = self.state.view_version;
            let meta = serde_json::to_vec(&ViewMeta {
                version: update.version,
            })
            .map_err(|e| ApiError::Invalid {
                message: format!("encoding the view version: {e}"),
            })?;
            self.ops.push(Op {
                key: Key::cluster(kinds::VIEW, "current"),
                value: Some(meta),
                expect: Expect::Any,
            });
            self.ops.push(Op {
                key: log_key(update.version),
                value: Some(encode_log(from, update)),
                expect: Expect::Any,
            });
            if update.version > HISTORY as u64 {
                self.ops.push(Op {
                    key: log_key(update.version - HISTORY as u64),
                    value: None,
                    expect: Expect::Any,
                });
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
        let mut state = self.state;
        state.revision = revision;
        for key in &self.touched {
            let n = named(key);
            match key.kind.as_str() {
                kind::SERVICE => {
                    if let Some(s) = state.services.get_mut(&n) {
                        with_version(&mut s.meta, revision);
                    }
                }
                kind::ENDPOINT => {
                    if let Some(e) = state.endpoints.get_mut(&n) {
                        with_version(&mut e.meta, revision);
                    }
                }
                kind::GRANT => {
                    if let Some(g) = state.grants.get_mut(&n) {
                        with_version(&mut g.meta, revision);
                    }
                }
                kind::NETWORK_POLICY => {
                    if let Some(p) = state.policies.get_mut(&n) {
                        with_version(&mut p.meta, revision);
                    }
                }
                kind::NODE => {
                    if let Some(node) = state.nodes.get_mut(&key.name) {
                        node.1 = revision;
                    }
                }
                _ => {}
            }
        }
        if let Some(update) = &update {
            let mut history = (*state.history).clone();
            history.push(state.view_version, update.clone());
            state.history = std::sync::Arc::new(history);
            state.view_version = update.version;
            state.view = new_view;
            state.policy = new_policy;
        }
        Ok(Committed { state, update })
    }
}

/// (namespace, name) of an object, "default" for an empty namespace.
pub fn meta_key(meta: Option<&v1::ObjectMeta>) -> Named {
    meta.map_or_else(
        || ("default".to_string(), String::new()),
        |m| {
            let ns = if m.namespace.is_empty() {
                "default".to_string()
            } else {
                m.namespace.clone()
            };
            (ns, m.name.clone())
        },
    )
}

/// RFC 3339 for a time.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
