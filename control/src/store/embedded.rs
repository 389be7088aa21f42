//! The embedded store: one redb file on the control node's disk.
//!
//! # Why redb
//! redb is a pure-Rust, copy-on-write B-tree store with ACID transactions, one writer at a time
//! and MVCC readers that never block on it: the shape a control service's small, rarely written
//! state needs, without a C dependency (rusqlite) or an external process (etcd). Its file format
//! checksums every commit, and it locks the file, so a second control service pointed at the
//! same file fails to open it instead of corrupting it.
//!
//! # Durability
//! Every write transaction commits with `Durability::Immediate`: `commit` returns only after
//! redb's fsync. redb commits by writing the new tree copy-on-write, then flipping the header's
//! active commit slot; each slot is checksummed, and on open after a crash redb takes the newest
//! slot with a valid checksum and rebuilds its allocator state (the repair we log). A torn commit
//! is thus rolled back whole, and an acknowledged one is never lost. We keep redb's default
//! one-phase commit (one fsync per write): its two-phase mode only defends against an attacker
//! who can both choose the written data and order disk flushes. When this module creates the
//! file it also fsyncs the parent directory, since fsync(2) on a file does not make its
//! directory entry durable.
//!
//! A failed commit ([`StoreError::CommitFailed`]) has an unknown outcome and leaves redb
//! refusing further writes until the file is reopened; the server should exit and restart.
//!
//! # Layout (schema 1)
//! - table `meta` (`&str -> u64`): `schema` = 1, `revision` = the store revision.
//! - table `objects` (`&[u8] -> &[u8]`): key `kind \0 namespace \0 name` (key parts hold no NUL,
//!   so byte order is `(kind, namespace, name)` order and listing a kind or a namespace is a
//!   range scan over a prefix); value `[format = 1][version: u64 big-endian][payload]`.
//!
//! Both are committed in the same transaction, so the revision and the versions never disagree.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use redb::{
    Builder, Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};

use super::{BackendError, Expect, Key, ReadTx, Store, StoreError, Versioned, WriteTx};

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
pub(super) const SCHEMA_KEY: &str = "schema";
const REVISION_KEY: &str = "revision";
/// The layout this build reads and writes.
pub(super) const SCHEMA: u64 = 1;
/// The revision of a new, empty store.
const INITIAL_REVISION: u64 = 1;
/// First byte of every stored value.
const VALUE_FORMAT: u8 = 1;
const VALUE_HEADER: usize = 1 + 8;
const SEP: u8 = 0;

/// The embedded [`Store`]: see the module documentation.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating the file (not its directory) if it does not exist.
    /// After an unclean shutdown the open repairs the file first, which reads all of it.
    ///
    /// Fails with [`StoreError::Open`] (redb's `DatabaseAlreadyOpen`) while another process or
    /// another `RedbStore` holds the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let existed = path.exists();
        let warned = AtomicBool::new(false);
        let repair_path = path.clone();
        let db = Builder::new()
            .set_repair_callback(move |_| {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %repair_path.display(), "store was not closed cleanly; repairing");
                }
            })
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let store = Self { db, path };
        let revision = store.init()?;
        if !existed {
            sync_parent_dir(&store.path)?;
        }
        tracing::info!(path = %store.path.display(), revision, created = !existed, "store opened");
        Ok(store)
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the tables and metadata of a new store, or checks those of an existing one.
    /// Returns the current revision.
    fn init(&self) -> Result<u64, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend("begin write"))?;
        txn.set_durability(Durability::Immediate)
            .map_err(backend("set durability"))?;
        let (revision, created) = {
            let mut meta = txn.open_table(META).map_err(backend("open table"))?;
            txn.open_table(OBJECTS).map_err(backend("open table"))?;
            let schema = meta
                .get(SCHEMA_KEY)
                .map_err(backend("read"))?
                .map(|v| v.value());
            match schema {
                Some(SCHEMA) => (read_revision(&meta)?, false),
                Some(found) => {
                    return Err(StoreError::UnsupportedSchema {
                        found,
                        supported: SCHEMA,
                    });
                }
                None => {
                    if meta.get(REVISION_KEY).map_err(backend("read"))?.is_some() {
                        return Err(StoreError::CorruptMeta {
                            entry: SCHEMA_KEY,
                            reason: "missing while a revision is present",
                        });
                    }
                    meta.insert(SCHEMA_KEY, SCHEMA).map_err(backend("write"))?;
                    meta.insert(REVISION_KEY, INITIAL_REVISION)
                        .map_err(backend("write"))?;
                    (INITIAL_REVISION, true)
                }
            }
        };
        if created {
            txn.commit().map_err(|e| StoreError::CommitFailed {
                source: BackendError::Redb(e.into()),
            })?;
        } else {
            txn.abort().map_err(backend("abort"))?;
        }
        Ok(revision)
    }
}

impl Store for RedbStore {
    fn begin_read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError> {
        let txn = self.db.begin_read().map_err(backend("begin read"))?;
        let meta = txn.open_table(META).map_err(backend("open table"))?;
        let revision = read_revision(&meta)?;
        // Tables keep the snapshot alive after the transaction handle is dropped.
        let objects = txn.open_table(OBJECTS).map_err(backend("open table"))?;
        Ok(Box::new(RedbReadTx { objects, revision }))
    }

    fn begin_write(&self) -> Result<Box<dyn WriteTx + '_>, StoreError> {
        let mut txn = self.db.begin_write().map_err(backend("begin write"))?;
        // The default, stated: the guarantee in the module docs rests on it.
        txn.set_durability(Durability::Immediate)
            .map_err(backend("set durability"))?;
        let base = read_revision(&txn.open_table(META).map_err(backend("open table"))?)?;
        Ok(Box::new(RedbWriteTx {
            txn,
            base,
            dirty: false,
            failed: None,
        }))
    }
}

struct RedbReadTx {
    objects: ReadOnlyTable<&'static [u8], &'static [u8]>,
    revision: u64,
}

impl ReadTx for RedbReadTx {
    fn revision(&self) -> u64 {
        self.revision
    }

    fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        get(&self.objects, key)
    }

    fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(Key, Versioned)>, StoreError> {
        list(&self.objects, kind, namespace)
    }
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

struct RedbWriteTx {
    txn: WriteTransaction,
    /// The revision before this transaction.
    base: u64,
    /// Whether anything was put or deleted: a clean transaction commits nothing.
    dirty: bool,
    failed: Option<Failed>,
}

impl RedbWriteTx {
    /// Fails with the transaction's conflict, if it had one: it can no longer write.
    fn doomed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(failed) => Err(failed.error()),
            None => Ok(()),
        }
    }

    /// Checks `expect` against the version stored under `raw`; returns that version.
    fn check(&mut self, key: &Key, raw: &[u8], expect: Expect) -> Result<Option<u64>, StoreError> {
        self.doomed()?;
        let table = self
            .txn
            .open_table(OBJECTS)
            .map_err(backend("open table"))?;
        let actual = match table.get(raw).map_err(backend("read"))? {
            Some(guard) => Some(decode_value(key, guard.value())?.0),
            None => None,
        };
        if expect.is_met_by(actual) {
            Ok(actual)
        } else {
            let failed = Failed {
                key: key.clone(),
                expected: expect,
                actual,
            };
            let err = failed.error();
            self.failed = Some(failed);
            Err(err)
        }
    }
}

impl ReadTx for RedbWriteTx {
    fn revision(&self) -> u64 {
        self.base
    }

    fn get(&self, key: &Key) -> Result<Option<Versioned>, StoreError> {
        get(
            &self
                .txn
                .open_table(OBJECTS)
                .map_err(backend("open table"))?,
            key,
        )
    }

    fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<(Key, Versioned)>, StoreError> {
        list(
            &self
                .txn
                .open_table(OBJECTS)
                .map_err(backend("open table"))?,
            kind,
            namespace,
        )
    }
}

impl WriteTx for RedbWriteTx {
    /// The revision moves only with writes, and one process writes.
    fn last_write(&self) -> u64 {
        self.revision()
    }

    fn put(&mut self, key: &Key, value: &[u8], expect: Expect) -> Result<(), StoreError> {
        key.validate()?;
        let raw = encode_key(key);
        if expect == Expect::Any {
            // No need to read the old record, which also lets a corrupt one be overwritten.
            self.doomed()?;
        } else {
            self.check(key, &raw, expect)?;
        }
        let encoded = encode_value(self.base + 1, value);
        self.txn
            .open_table(OBJECTS)
            .map_err(backend("open table"))?
            .insert(raw.as_slice(), encoded.as_slice())
            .map_err(backend("write"))?;
        self.dirty = true;
        Ok(())
    }

    fn delete(&mut self, key: &Key, expect: Expect) -> Result<Option<u64>, StoreError> {
        key.validate()?;
        let raw = encode_key(key);
        let actual = self.check(key, &raw, expect)?;
        if actual.is_some() {
            self.txn
                .open_table(OBJECTS)
                .map_err(backend("open table"))?
                .remove(raw.as_slice())
                .map_err(backend("write"))?;
            self.dirty = true;
        }
        Ok(actual)
    }

    fn commit(self: Box<Self>) -> Result<u64, StoreError> {
        let RedbWriteTx {
            txn,
            base,
            dirty,
            failed,
        } = *self;
        if let Some(failed) = failed {
            // Dropping the transaction aborts it; the conflict is the error worth reporting.
            drop(txn);
            return Err(failed.error());
        }
        if !dirty {
            txn.abort().map_err(backend("abort"))?;
            return Ok(base);
        }
        let revision = base + 1;
        txn.open_table(META)
            .map_err(backend("open table"))?
            .insert(REVISION_KEY, revision)
            .map_err(backend("write"))?;
        txn.commit().map_err(|e| StoreError::CommitFailed {
            source: BackendError::Redb(e.into()),
        })?;
        Ok(revision)
    }
}

/// Maps any redb error into [`StoreError::Backend`] for `op`.
fn backend<E: Into<redb::Error>>(op: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: BackendError::Redb(e.into()),
    }
}

fn read_revision(meta: &impl ReadableTable<&'static str, u64>) -> Result<u64, StoreError> {
    match meta.get(REVISION_KEY).map_err(backend("read"))? {
        Some(v) if v.value() >= INITIAL_REVISION => Ok(v.value()),
        Some(_) => Err(StoreError::CorruptMeta {
            entry: REVISION_KEY,
            reason: "below the initial revision",
        }),
        None => Err(StoreError::CorruptMeta {
            entry: REVISION_KEY,
            reason: "missing",
        }),
    }
}

fn get(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &Key,
) -> Result<Option<Versioned>, StoreError> {
    key.validate()?;
    let Some(guard) = table
        .get(encode_key(key).as_slice())
        .map_err(backend("read"))?
    else {
        return Ok(None);
    };
    let (version, value) = decode_value(key, guard.value())?;
    Ok(Some(Versioned {
        version,
        value: value.to_vec(),
    }))
}

fn list(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    kind: &str,
    namespace: Option<&str>,
) -> Result<Vec<(Key, Versioned)>, StoreError> {
    // Validate the selector as a key with a placeholder name.
    Key::new(kind, namespace.unwrap_or(""), "-").validate()?;
    // Every key with this prefix, and only those: the prefix ends with the separator, and
    // replacing it by the next byte gives the exclusive upper bound.
    let mut lower = Vec::with_capacity(kind.len() + namespace.map_or(0, str::len) + 2);
    lower.extend_from_slice(kind.as_bytes());
    lower.push(SEP);
    if let Some(ns) = namespace {
        lower.extend_from_slice(ns.as_bytes());
        lower.push(SEP);
    }
    let mut upper = lower.clone();
    if let Some(last) = upper.last_mut() {
        *last = SEP + 1;
    }
    let mut out = Vec::new();
    for entry in table
        .range::<&[u8]>(lower.as_slice()..upper.as_slice())
        .map_err(backend("range"))?
    {
        let (k, v) = entry.map_err(backend("range"))?;
        let key = decode_key(k.value())?;
        let (version, value) = decode_value(&key, v.value())?;
        out.push((
            key,
            Versioned {
                version,
                value: value.to_vec(),
            },
        ));
    }
    Ok(out)
}

fn encode_key(key: &Key) -> Vec<u8> {
    let Key {
        kind,
        namespace,
        name,
    } = key;
    let mut raw = Vec::with_capacity(kind.len() + namespace.len() + name.len() + 2);
    raw.extend_from_slice(kind.as_bytes());
    raw.push(SEP);
    raw.extend_from_slice(namespace.as_bytes());
    raw.push(SEP);
    raw.extend_from_slice(name.as_bytes());
    raw
}

fn decode_key(raw: &[u8]) -> Result<Key, StoreError> {
    let corrupt = |reason| StoreError::CorruptKey {
        raw: raw.to_vec(),
        reason,
    };
    let mut parts = raw.split(|&b| b == SEP);
    let (Some(kind), Some(namespace), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt("not three NUL-separated parts"));
    };
    let text = |part| std::str::from_utf8(part).map_err(|_| corrupt("not UTF-8"));
    Ok(Key::new(text(kind)?, text(namespace)?, text(name)?))
}

fn encode_value(version: u64, value: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(VALUE_HEADER + value.len());
    raw.push(VALUE_FORMAT);
    raw.extend_from_slice(&version.to_be_bytes());
    raw.extend_from_slice(value);
    raw
}

fn decode_value<'a>(key: &Key, raw: &'a [u8]) -> Result<(u64, &'a [u8]), StoreError> {
    let corrupt = |reason| StoreError::Corrupt {
        key: key.clone(),
        reason,
    };
    let Some((&format, rest)) = raw.split_first() else {
        return Err(corrupt("empty record"));
    };
    if format != VALUE_FORMAT {
        return Err(corrupt("unknown record format"));
    }
    let Some((version, value)) = rest.split_first_chunk::<8>() else {
        return Err(corrupt("record shorter than its header"));
    };
    Ok((u64::from_be_bytes(*version), value))
}

/// Makes a newly created file's directory entry durable (fsync(2): "Calling fsync() does not
/// necessarily ensure that the entry in the directory containing the file has also reached disk.
/// For that an explicit fsync() on a file descriptor for the directory is also needed.").
fn sync_parent_dir(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::SyncDir {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_encoding_round_trips_and_orders_like_the_tuple() {
        let keys = [
            Key::new("service", "", "a"),
            Key::new("service", "a", "b"),
            Key::new("service", "a", "bb"),
            Key::new("service", "ab", "a"),
            Key::new("services", "", "a"),
        ];
        for pair in keys.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(encode_key(&pair[0]) < encode_key(&pair[1]), "{pair:?}");
        }
        for key in &keys {
            assert_eq!(&decode_key(&encode_key(key)).expect("decodes"), key);
        }
        assert!(matches!(
            decode_key(b"a\0b"),
            Err(StoreError::CorruptKey { .. })
        ));
        assert!(matches!(
            decode_key(b"a\0b\0c\0d"),
            Err(StoreError::CorruptKey { .. })
        ));
        assert!(matches!(
            decode_key(b"a\0\xff\0c"),
            Err(StoreError::CorruptKey { .. })
        ));
    }

    #[test]
    fn value_encoding_round_trips_and_rejects_garbage() {
        let key = Key::cluster("node", "n1");
        let raw = encode_value(7, b"payload");
        assert_eq!(
            decode_value(&key, &raw).expect("decodes"),
            (7, &b"payload"[..])
        );
        assert_eq!(
            decode_value(&key, &encode_value(9, b"")).expect("decodes"),
            (9, &b""[..])
        );
        for garbage in [&b""[..], &[2, 0, 0, 0, 0, 0, 0, 0, 1][..], &[1, 0, 0][..]] {
            assert!(matches!(
                decode_value(&key, garbage),
                Err(StoreError::Corrupt { .. })
            ));
        }
    }
}
