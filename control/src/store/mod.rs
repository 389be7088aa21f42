//! The control service's durable state: a small transactional key-value store of opaque,
//! versioned values.
//!
//! # Model
//! - A value is opaque bytes (the API layer stores protobuf-encoded objects) under a [`Key`]:
//!   `(kind, namespace, name)`, with `namespace == ""` for cluster-scoped objects.
//! - The store has one global **revision**, a counter that every committed write transaction
//!   advances by exactly 1. A new, empty embedded store is at revision **1** (as an empty etcd
//!   cluster is), so the first write commits revision 2. On etcd, a fresh prefix is empty at
//!   whatever revision etcd is at, and its first write commits the next one.
//! - Every stored value carries its **version**: the revision of the transaction that last wrote
//!   it. Versions are therefore always ≥ 2, unique per transaction and comparable across keys:
//!   "written after revision r" is `version > r`. A delete removes the key and its version; a
//!   later re-create starts from the then-current revision.
//! - Writes may carry an expectation ([`Expect`]): `Any`, `Absent` (create only), or
//!   `Version(v)` (compare-and-swap against what was read earlier). A failed expectation dooms
//!   the whole transaction: nothing it wrote is committed, and it ends in
//!   [`StoreError::Conflict`], even if the closure caught that error and went on.
//!
//! # Transactions
//! Use [`StoreExt::read`] and [`StoreExt::write`]: they run a closure inside one transaction and
//! return its result with the revision. A read transaction is a consistent snapshot; a write
//! transaction sees its own writes, and write transactions are serialized, so
//! "read everything, decide, write" (VIP allocation, consuming a single-use join token and
//! creating the node) is atomic. An error returned by the closure aborts the transaction and is
//! passed through unchanged; the closure's error type only needs `From<StoreError>`, so API code
//! returns its own domain errors from inside a transaction:
//!
//! ```
//! use sluice_control::store::{Expect, Key, RedbStore, Store, StoreError, StoreExt};
//!
//! #[derive(Debug)]
//! enum ApiError { Store(StoreError), TokenUsed }
//! impl From<StoreError> for ApiError {
//!     fn from(e: StoreError) -> Self { ApiError::Store(e) }
//! }
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let store: std::sync::Arc<dyn Store> =
//!     std::sync::Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
//! let token = Key::cluster("token", "abc");
//! store.write(|tx| -> Result<(), StoreError> { tx.put(&token, b"unused", Expect::Absent) }).unwrap();
//! let ((), revision) = store
//!     .write(|tx| -> Result<(), ApiError> {
//!         let Some(t) = tx.get(&token)? else { return Err(ApiError::TokenUsed) };
//!         tx.delete(&token, Expect::Version(t.version))?;
//!         tx.put(&Key::cluster("node", "n1"), b"...", Expect::Absent)?;
//!         Ok(())
//!     })
//!     .unwrap();
//! assert_eq!(revision, 3);
//! ```
//!
//! A write closure that writes nothing commits nothing: the revision stays where it was and no
//! fsync is paid.
//!
//! # Blocking
//! All methods are synchronous. A write blocks for the fsync of its commit (milliseconds on an
//! SSD, more on a busy disk) and waits for the write transaction in progress, if any; reads do
//! not wait for writes (MVCC). From async code call them in `tokio::task::spawn_blocking`, or
//! directly when a short stall of that worker is acceptable. Keep closures short: a write
//! closure holds the single writer slot for as long as it runs.
//!
//! # Durability
//! When a write returns `Ok`, its transaction is on stable storage (fsync'd): the store survives
//! `kill -9` at any point, and power loss as far as the disk honours fsync, with every
//! acknowledged write present and each transaction either entirely present or entirely absent.
//! (The tests kill a writer process with SIGKILL after acknowledgements; power loss is not
//! simulated.) A transaction that was interrupted
//! before it returned may be present or absent after the restart (the acknowledgement may be the
//! part that was lost). See [`RedbStore`] for how the embedded implementation provides this, and
//! [`etcd`] for the replicated one (etcd acknowledges once a majority of members fsync'd the
//! transaction to their write-ahead logs).
//!
//! # Implementations
//! [`Store`] is object-safe (the server holds an `Arc<dyn Store>`). [`RedbStore`] is the embedded
//! implementation: one file on the control node's disk. [`EtcdStore`] is the replicated one, for
//! a control plane of several replicas: keys become `<prefix><kind>/<namespace>/<name>`, the
//! revision is etcd's, versions are `mod_revision`s, and a write transaction is optimistic: it
//! commits as one etcd `Txn` whose compares are its expectations and a sentinel key every write
//! transaction writes. A write transaction that lost the race to a writer in another process
//! fails with [`StoreError::Raced`] and wrote nothing; run it again on fresh state. On etcd, a
//! new prefix starts at whatever revision etcd is at (not 1), and the revision moves by exactly
//! one per write transaction only while nothing else writes to the cluster. See [`etcd`] for the
//! mapping and its reasons.

mod embedded;
pub mod etcd;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

pub use embedded::RedbStore;
pub use etcd::{
    CONNECT_TIMEOUT, DEFAULT_PREFIX, EtcdError, EtcdStore, EtcdTls, EtcdUrlError, REQUEST_TIMEOUT,
    parse_etcd_url,
};

/// Where a value lives. Listing is by `kind`, or by `(kind, namespace)`, in
/// `(namespace, name)` order.
///
/// `kind` and `name` must not be empty; no part may contain a NUL byte (the embedded store uses
/// NUL as its separator). Other rules for names (DNS labels and such) belong to the API layer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub kind: String,
    /// `""` for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(
        kind: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A cluster-scoped key (empty namespace).
    pub fn cluster(kind: impl Into<String>, name: impl Into<String>) -> Self {
        Self::new(kind, "", name)
    }

    /// Checks the rules every [`Store`] enforces on keys it is given.
    pub fn validate(&self) -> Result<(), StoreError> {
        let reason = if self.kind.is_empty() {
            Some("empty kind")
        } else if self.name.is_empty() {
            Some("empty name")
        } else if [&self.kind, &self.namespace, &self.name]
            .iter()
            .any(|part| part.contains('\0'))
        {
            Some("NUL byte in a key part")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidKey {
                key: self.clone(),
                reason,
            }),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What a write expects to find under its key before it writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Anything, including nothing.
    Any,
    /// Nothing: the write creates the key.
    Absent,
    /// A value written at exactly this version (compare-and-swap).
    Version(u64),
}

impl Expect {
    /// Whether `actual` (the version found, `None` when absent) satisfies the expectation.
    pub fn is_met_by(self, actual: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => actual.is_none(),
            Expect::Version(v) => actual == Some(v),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Any => f.write_str("anything"),
            Expect::Absent => f.write_str("absent"),
            Expect::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// A stored value with the revision that last wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub value: Vec<u8>,
}

/// The errors of a storage backend, one variant per implementation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Redb(#[from] ::redb::Error),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An [`Expect`] was not met; the transaction wrote nothing.
    #[error("conflict on {key}: expected {expected}, found {}", found(*.actual))]
    Conflict {
        key: Key,
        expected: Expect,
        /// The version found; `None` when the key was absent.
        actual: Option<u64>,
    },
    /// Another writer (another process on the same replicated store) committed after this
    /// write transaction began, so what it read may be stale; it wrote nothing. Unlike
    /// [`StoreError::Conflict`], no expectation of the caller failed: running the transaction
    /// again on fresh state is correct.
    #[error(
        "another writer committed (at revision {winner}) after this transaction read revision \
         {base}; it wrote nothing: retry on fresh state"
    )]
    Raced { base: u64, winner: u64 },
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey { key: Key, reason: &'static str },
    #[error("opening the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: ::redb::DatabaseError,
    },
    /// Making a newly created store file's directory entry durable failed.
    #[error("syncing directory {path}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store was written by a newer Sluice (schema {found}; this build reads {supported})"
    )]
    UnsupportedSchema { found: u64, supported: u64 },
    /// The backend failed during `op`; nothing was committed.
    #[error("store {op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: BackendError,
    },
    /// The commit itself failed: its outcome is unknown (it may have become durable), and the
    /// embedded store refuses further writes until it is reopened. Treat as fatal: restart,
    /// reload from the store. (The etcd store: the answer to its `Txn` was lost, by a timeout
    /// or a broken connection.)
    #[error("store commit failed; its outcome is unknown")]
    CommitFailed {
        #[source]
        source: BackendError,
    },
    #[error("stored value under {key} is corrupt: {reason}")]
    Corrupt { key: Key, reason: &'static str },
    #[error("stored key {raw:?} is corrupt: {reason}")]
    CorruptKey { raw: Vec<u8>, reason: &'static str },
    #[error("store metadata {entry:?} is corrupt: {reason}")]
    CorruptMeta {
        entry: &'static str,
        reason: &'static str,
    },
}

fn found(actual: Option<u64>) -> String {
    match actual {
        Some(v) => format!("version {v}"),
        None => "absent".to_owned(),
    }
}

/// A consistent view of the store: a snapshot in a read transaction, or the state (including
/// its own writes) inside a write transaction.
pub trait ReadTx {
    /// The revision this transaction reads at. In a write transaction: the revision before it;
    /// what it writes gets `revision() + 1`.
    fn revision(&self) -> u64;

    /// The value under `key`, if any.
    fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError>;

    /// All values of `kind`, in one namespace or (with `None`) in all, sorted by namespace then
    /// name.
    fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(Key, Versioned)>, StoreError>;
}

/// A write transaction. Dropping it without [`WriteTx::commit`] aborts it.
pub trait WriteTx: ReadTx {
    /// Stores `value` under `key` if `expect` holds; its version becomes `revision() + 1`.
    /// With [`Expect::Any`] the old record is not read, so a put can replace a corrupt one.
    fn put(&mut self, key: &Key, value: &[u8], expect: Expect) -> Result<(), StoreError>;

    /// Removes `key` if `expect` holds; returns the version removed (`None`: nothing was there).
    fn delete(&mut self, key: &Key, expect: Expect) -> Result<Option<u64>, StoreError>;

    /// The revision of the last write committed before this transaction began (by any
    /// writer). A copy of the state kept in memory at revision `r` missed a write when this is
    /// greater than `r`.
    fn last_write(&self) -> u64;

    /// A hint: expectations on `keys` follow, so a store that pays a round trip per read may
    /// read their versions ahead in bulk. Changes nothing else.
    fn prefetch(&mut self, keys: &[Key]) -> Result<(), StoreError> {
        let _ = keys;
        Ok(())
    }

    /// Commits and returns the new revision; when the transaction wrote nothing, commits nothing
    /// and returns the current revision. Returns only once the commit is durable. Fails with
    /// [`StoreError::Conflict`] if any expectation failed during the transaction.
    fn commit(self: Box<Self>) -> Result<u64, StoreError>;
}

/// A transactional store of versioned values. See the module documentation.
///
/// Prefer [`StoreExt::read`] and [`StoreExt::write`] to the `begin_*` methods: they make it
/// impossible to forget a commit or hold a transaction across an `.await`.
pub trait Store: Send + Sync {
    fn begin_read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError>;

    /// Waits for the write transaction in progress, if any.
    fn begin_write(&self) -> Result<Box<dyn WriteTx + '_>, StoreError>;

    /// The current revision.
    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.begin_read()?.revision())
    }

    /// What every writer commits after revision `after`, as it is committed, for a store other
    /// processes write too (etcd); `None` for one only this process writes (redb). After an
    /// error the stream ends: reload, and follow again from there.
    fn follow(
        &self,
        after: u64,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<Result<Changes, StoreError>>> {
        let _ = after;
        None
    }

    /// Registers this process as replica `id`, reachable at `address`, for as long as the store
    /// lives, and follows every registered replica (id → address), for a store several replicas
    /// share (etcd); `None` for one that only this process uses (redb).
    fn announce(
        &self,
        id: &str,
        address: &str,
    ) -> Option<tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>> {
        let _ = (id, address);
        None
    }
}

/// What one write transaction committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changes {
    pub revision: u64,
    pub puts: Vec<(Key, Versioned)>,
    pub deletes: Vec<Key>,
}

/// Closure-style transactions over any [`Store`], including `dyn Store`.
pub trait StoreExt: Store {
    /// Runs `f` on a snapshot; returns its result and the snapshot's revision.
    fn read<T, E>(&self, f: impl FnOnce(&dyn ReadTx) -> Result<T, E>) -> Result<(T, u64), E>
    where
        E: From<StoreError>,
    {
        let tx = self.begin_read()?;
        let out = f(tx.as_ref())?;
        Ok((out, tx.revision()))
    }

    /// Runs `f` in a write transaction and commits it if `f` returns `Ok`; returns `f`'s result
    /// and the revision after the commit. An error from `f` aborts and is returned unchanged.
    fn write<T, E>(&self, f: impl FnOnce(&mut dyn WriteTx) -> Result<T, E>) -> Result<(T, u64), E>
    where
        E: From<StoreError>,
    {
        let mut tx = self.begin_write()?;
        let out = f(tx.as_mut())?;
        let revision = tx.commit()?;
        Ok((out, revision))
    }

    /// Everything of the given kinds at one revision (the server's load at start).
    fn load(&self, kinds: &[&str]) -> Result<(Vec<(Key, Versioned)>, u64), StoreError> {
        self.read(|tx| {
            let mut all = Vec::new();
            for kind in kinds {
                all.extend(tx.list(kind, None)?);
            }
            Ok(all)
        })
    }
}

impl<S: Store + ?Sized> StoreExt for S {}
