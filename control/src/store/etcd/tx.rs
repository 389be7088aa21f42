//! Read and write transactions over etcd: see the parent module for the protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};

use super::{EtcdStore, Head};
use crate::store::{BackendError, Expect, Key, ReadTx, StoreError, Versioned, WriteTx};

/// A snapshot: every read at one etcd revision.
pub(super) struct EtcdReadTx<'a> {
    store: &'a EtcdStore,
    revision: u64,
}

impl<'a> EtcdReadTx<'a> {
    pub(super) fn new(store: &'a EtcdStore, head: Head) -> Self {
        Self {
            store,
            revision: head.revision,
        }
    }
}

impl ReadTx for EtcdReadTx<'_> {
    fn revision(&self) -> u64 {
        self.revision
    }

    fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        Ok(self
            .store
            .get_at(key, self.revision, false)?
            .map(|(version, value)| Versioned { version, value }))
    }

    fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(Key, Versioned)>, StoreError> {
        self.store.list_at(kind, namespace, self.revision)
    }
}

/// A buffered write.
enum Op {
    Put(Vec<u8>),
    Delete,
}

/// The first failed expectation of a transaction: it can no longer commit.
struct Failed {
    key: Key,
    expected: Expect,
    actual: Option<u64>,
}

impl Failed {
    fn error(&self) -> StoreError {
        StoreError::Conflict {
            key: self.key.clone(),
            expected: self.expected,
            actual: self.actual,
        }
    }
}

/// Below this many keys, reading each on its own is as cheap.
const PREFETCH_FROM: usize = 16;
/// Gets per read-ahead transaction: under etcd's default `--max-txn-ops` (128).
const PREFETCH_BATCH: usize = 100;

pub(super) struct EtcdWriteTx<'a> {
    store: &'a EtcdStore,
    /// Held until the transaction ends: this process's writers go one at a time.
    _writer: MutexGuard<'a, ()>,
    /// The state this transaction reads and its compares refer to.
    base: Head,
    ops: BTreeMap<Key, Op>,
    /// Expectations checked against the base (not against this transaction's own writes):
    /// they become the `Txn`'s compares. The first one per key is the one etcd can check.
    compares: BTreeMap<Key, Expect>,
    /// Whether anything was put or deleted: a clean transaction commits nothing.
    dirty: bool,
    failed: Option<Failed>,
    /// Versions at the base read ahead by [`WriteTx::prefetch`] (`None`: absent).
    known: HashMap<Key, Option<u64>>,
}

impl<'a> EtcdWriteTx<'a> {
    pub(super) fn new(store: &'a EtcdStore, writer: MutexGuard<'a, ()>, base: Head) -> Self {
        Self {
            store,
            _writer: writer,
            base,
            ops: BTreeMap::new(),
            compares: BTreeMap::new(),
            dirty: false,
            failed: None,
            known: HashMap::new(),
        }
    }

    /// The version a buffered put will get if the commit is the next write to etcd.
    fn own_version(&self) -> u64 {
        self.base.revision + 1
    }

    fn doomed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(failed) => Err(failed.error()),
            None => Ok(()),
        }
    }

    /// Checks `expect` against the version under `key` in this transaction; returns that
    /// version.
    fn check(&mut self, key: &Key, expect: Expect) -> Result<Option<u64>, StoreError> {
        self.doomed()?;
        let (actual, at_base) = match self.ops.get(key) {
            Some(Op::Put(_)) => (Some(self.own_version()), false),
            Some(Op::Delete) => (None, false),
            None => match self.known.get(key) {
                Some(known) => (*known, true),
                None => (
                    self.store
                        .get_at(key, self.base.revision, true)?
                        .map(|(version, _)| version),
                    true,
                ),
            },
        };
        if !expect.is_met_by(actual) {
            let failed = Failed {
                key: key.clone(),
                expected: expect,
                actual,
            };
            let err = failed.error();
            self.failed = Some(failed);
            return Err(err);
        }
        if at_base && expect != Expect::Any {
            self.compares.entry(key.clone()).or_insert(expect);
        }
        Ok(actual)
    }

    /// The `Txn` this transaction commits with.
    fn txn(&self) -> Result<Txn, StoreError> {
        let layout = &self.store.layout;
        let sentinel = layout.sentinel();
        let mut compares = vec![Compare::mod_revision(
            sentinel.clone(),
            CompareOp::Equal,
            self.base.sentinel,
        )];
        // On failure, read what was compared: which compare failed decides the error.
        let mut on_failure = vec![TxnOp::get(
            sentinel.clone(),
            Some(GetOptions::new().with_keys_only()),
        )];
        for (key, expect) in &self.compares {
            let raw = layout.key(key);
            compares.push(match *expect {
                // Never recorded: nothing to compare.
                Expect::Any => continue,
                Expect::Absent => Compare::create_revision(raw.clone(), CompareOp::Equal, 0),
                Expect::Version(v) => Compare::mod_revision(
                    raw.clone(),
                    CompareOp::Equal,
                    self.store.etcd_revision(v)?,
                ),
            });
            on_failure.push(TxnOp::get(raw, Some(GetOptions::new().with_keys_only())));
        }
        let mut writes: Vec<TxnOp> = self
            .ops
            .iter()
            .map(|(key, op)| match op {
                Op::Put(value) => TxnOp::put(layout.key(key), value.clone(), None),
                Op::Delete => TxnOp::delete(layout.key(key), None),
            })
            .collect();
        writes.push(TxnOp::put(sentinel, Vec::new(), None));
        Ok(Txn::new()
            .when(compares)
            .and_then(writes)
            .or_else(on_failure))
    }

    /// The error of a `Txn` whose compares failed, from what its failure branch read.
    fn failure(&self, responses: Vec<TxnOpResponse>) -> StoreError {
        let mut found = responses.into_iter().map(|r| match r {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| kv.mod_revision())),
            _ => None,
        });
        let Some(Some(sentinel)) = found.next() else {
            return self.store.malformed("commit", "the sentinel's read");
        };
        for (key, expect) in &self.compares {
            let Some(Some(actual)) = found.next() else {
                return self.store.malformed("commit", "a compared key's read");
            };
            let actual = match actual {
                Some(v) => match self.store.revision_from(v, "commit") {
                    Ok(v) => Some(v),
                    Err(e) => return e,
                },
                None => None,
            };
            if !expect.is_met_by(actual) {
                return StoreError::Conflict {
                    key: key.clone(),
                    expected: *expect,
                    actual,
                };
            }
        }
        let sentinel = sentinel.unwrap_or(0);
        if sentinel != self.base.sentinel {
            return StoreError::Raced {
                base: self.base.revision,
                winner: u64::try_from(sentinel).unwrap_or(0),
            };
        }
        self.store
            .malformed("commit", "a failed compare (all held, yet the Txn failed)")
    }
}

impl ReadTx for EtcdWriteTx<'_> {
    fn revision(&self) -> u64 {
        self.base.revision
    }

    fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        key.validate()?;
        match self.ops.get(key) {
            Some(Op::Put(value)) => Ok(Some(Versioned {
                version: self.own_version(),
                value: value.clone(),
            })),
            Some(Op::Delete) => Ok(None),
            None => Ok(self
                .store
                .get_at(key, self.base.revision, false)?
                .map(|(version, value)| Versioned { version, value })),
        }
    }

    fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(Key, Versioned)>, StoreError> {
        let mut all: BTreeMap<Key, Versioned> = self
            .store
            .list_at(kind, namespace, self.base.revision)?
            .into_iter()
            .collect();
        let mine = self
            .ops
            .iter()
            .filter(|(k, _)| k.kind == kind && namespace.is_none_or(|ns| k.namespace == ns));
        for (key, op) in mine {
            match op {
                Op::Put(value) => {
                    all.insert(
                        key.clone(),
                        Versioned {
                            version: self.own_version(),
                            value: value.clone(),
                        },
                    );
                }
                Op::Delete => {
                    all.remove(key);
                }
            }
        }
        Ok(all.into_iter().collect())
    }
}

impl WriteTx for EtcdWriteTx<'_> {
    /// The keys' versions at the base, read in transactions of [`PREFETCH_BATCH`] gets
    /// each instead of one round trip per key: a bulk load of thousands of objects then costs
    /// a few round trips.
    fn prefetch(&mut self, keys: &[Key]) -> Result<(), StoreError> {
        if keys.len() < PREFETCH_FROM {
            return Ok(());
        }
        let at = self.store.etcd_revision(self.base.revision)?;
        let kv = self.store.kv();
        for chunk in keys.chunks(PREFETCH_BATCH) {
            for key in chunk {
                key.validate()?;
            }
            let gets: Vec<TxnOp> = chunk
                .iter()
                .map(|key| {
                    let options = GetOptions::new().with_keys_only().with_revision(at);
                    TxnOp::get(self.store.layout.key(key), Some(options))
                })
                .collect();
            let txn = Txn::new().and_then(gets);
            let resp = self.store.read_request("read", || {
                let (mut kv, txn) = (kv.clone(), txn.clone());
                async move { kv.txn(txn).await }
            })?;
            let responses = resp.op_responses();
            if responses.len() != chunk.len() {
                return Err(self.store.malformed("read", "an answer to every read"));
            }
            for (key, response) in chunk.iter().zip(responses) {
                let TxnOpResponse::Get(get) = response else {
                    return Err(self.store.malformed("read", "a read's answer"));
                };
                let version = match get.kvs().first() {
                    Some(found) => Some(self.store.revision_from(found.mod_revision(), "read")?),
                    None => None,
                };
                self.known.insert(key.clone(), version);
            }
        }
        Ok(())
    }

    /// The sentinel's `mod_revision`: every write transaction of this prefix writes it.
    fn last_write(&self) -> u64 {
        u64::try_from(self.base.sentinel).unwrap_or(0)
    }

    fn put(&mut self, key: &Key, value: &[u8], expect: Expect) -> Result<(), StoreError> {
        key.validate()?;
        if expect == Expect::Any {
            // Nothing to read: the sentinel alone orders this write.
            self.doomed()?;
        } else {
            self.check(key, expect)?;
        }
        self.ops.insert(key.clone(), Op::Put(value.to_vec()));
        self.dirty = true;
        Ok(())
    }

    fn delete(&mut self, key: &Key, expect: Expect) -> Result<Option<u64>, StoreError> {
        key.validate()?;
        let actual = self.check(key, expect)?;
        if actual.is_some() {
            self.ops.insert(key.clone(), Op::Delete);
            self.dirty = true;
        }
        Ok(actual)
    }

    fn commit(self: Box<Self>) -> Result<u64, StoreError> {
        self.doomed()?;
        if !self.dirty {
            return Ok(self.base.revision);
        }
        let txn = self.txn()?;
        let kv = self.store.kv();
        let mut attempt = 1;
        let resp = loop {
            let (mut kv, txn) = (kv.clone(), txn.clone());
            match self.store.request(async move { kv.txn(txn).await }) {
                Ok(resp) => break resp,
                // Routed to a member that is down: another may take it.
                Err(e) if e.unsent() && attempt < super::READ_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "etcd commit not sent; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100 * u64::from(attempt)));
                    attempt += 1;
                }
                Err(e) if e.unsent() || e.refused() => {
                    return Err(StoreError::Backend {
                        op: "commit",
                        source: BackendError::Etcd(e),
                    });
                }
                Err(e) => {
                    return Err(StoreError::CommitFailed {
                        source: BackendError::Etcd(e),
                    });
                }
            }
        };
        if !resp.succeeded() {
            return Err(self.failure(resp.op_responses()));
        }
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| self.store.malformed("commit", "a header"))?;
        let revision = self.store.revision_from(revision, "commit")?;
        if revision <= self.base.revision {
            return Err(self
                .store
                .malformed("commit", "a revision above the transaction's base"));
        }
        Ok(revision)
    }
}
