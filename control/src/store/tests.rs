//! Behaviour every [`Store`] must have, run against [`RedbStore`] through `dyn Store`, plus the
//! embedded store's persistence and crash tests.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

// The store does not interpret table names; these stand for any.
const SERVICE: &str = "service";
const ENDPOINT: &str = "endpoint";
const TOKEN: &str = "token";
const NODE: &str = "node";

fn temp_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path().join("state.redb")).expect("open store");
    (dir, Arc::new(store))
}

fn svc(ns: &str, name: &str) -> Key {
    Key::new(SERVICE, ns, name)
}

/// One write transaction that puts one value; returns the new revision.
fn put(store: &dyn Store, key: &Key, value: &[u8], expect: Expect) -> Result<u64, StoreError> {
    store
        .write(|tx| tx.put(key, value, expect))
        .map(|((), rev)| rev)
}

fn get(store: &dyn Store, key: &Key) -> Option<Versioned> {
    store.read(|tx| tx.get(key)).map(|(v, _)| v).expect("read")
}

fn names(entries: &[(Key, Versioned)]) -> Vec<String> {
    entries.iter().map(|(k, _)| k.to_string()).collect()
}

#[test]
fn store_is_object_safe_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<RedbStore>();
    assert_send_sync::<Arc<dyn Store>>();
    assert_send_sync::<StoreError>();
}

#[test]
fn new_store_is_at_revision_1_and_empty() {
    let (_dir, store) = temp_store();
    assert_eq!(store.revision().expect("revision"), 1);
    let (all, rev) = store.load(&[SERVICE, NODE]).expect("load");
    assert!(all.is_empty());
    assert_eq!(rev, 1);
}

#[test]
fn crud_versions_and_revisions() {
    let (_dir, store) = temp_store();
    let web = svc("default", "web");

    assert_eq!(
        put(&*store, &web, b"v1", Expect::Absent).expect("create"),
        2
    );
    assert_eq!(
        get(&*store, &web),
        Some(Versioned {
            version: 2,
            value: b"v1".to_vec()
        })
    );

    // A write elsewhere advances the revision, not web's version.
    assert_eq!(
        put(&*store, &svc("default", "db"), b"x", Expect::Any).expect("put"),
        3
    );
    assert_eq!(get(&*store, &web).expect("present").version, 2);

    assert_eq!(
        put(&*store, &web, b"v2", Expect::Version(2)).expect("update"),
        4
    );
    let now = get(&*store, &web).expect("present");
    assert_eq!((now.version, now.value.as_slice()), (4, &b"v2"[..]));

    // Reads do not move the revision.
    assert_eq!(store.read(|tx| tx.get(&web)).expect("read").1, 4);
    assert_eq!(store.revision().expect("revision"), 4);

    let (removed, rev) = store
        .write(|tx| tx.delete(&web, Expect::Version(4)))
        .expect("delete");
    assert_eq!((removed, rev), (Some(4), 5));
    assert_eq!(get(&*store, &web), None);

    // Re-created: a fresh version, from the current revision.
    assert_eq!(
        put(&*store, &web, b"v3", Expect::Absent).expect("re-create"),
        6
    );
    assert_eq!(get(&*store, &web).expect("present").version, 6);
}

#[test]
fn a_transaction_that_writes_nothing_commits_nothing() {
    let (_dir, store) = temp_store();
    let web = svc("default", "web");
    put(&*store, &web, b"v1", Expect::Any).expect("put");

    let (found, rev) = store.write(|tx| tx.get(&web)).expect("read-only write");
    assert_eq!((found.map(|v| v.version), rev), (Some(2), 2));

    // Deleting what is not there is not a write either.
    let (removed, rev) = store
        .write(|tx| tx.delete(&svc("default", "nope"), Expect::Any))
        .expect("delete absent");
    assert_eq!((removed, rev), (None, 2));
    assert_eq!(store.revision().expect("revision"), 2);
}

#[test]
fn several_writes_in_one_transaction_share_one_revision() {
    let (_dir, store) = temp_store();
    let ((), rev) = store
        .write(|tx| {
            assert_eq!(tx.revision(), 1);
            for name in ["a", "b", "c"] {
                tx.put(&svc("ns", name), name.as_bytes(), Expect::Absent)?;
            }
            // The transaction sees its own writes.
            assert_eq!(tx.list(SERVICE, Some("ns"))?.len(), 3);
            tx.delete(&svc("ns", "c"), Expect::Version(2))?;
            assert_eq!(tx.get(&svc("ns", "c"))?, None);
            Ok::<_, StoreError>(())
        })
        .expect("write");
    assert_eq!(rev, 2);
    let (all, rev) = store.read(|tx| tx.list(SERVICE, None)).expect("list");
    assert_eq!(rev, 2);
    assert_eq!(names(&all), ["service/ns/a", "service/ns/b"]);
    assert!(all.iter().all(|(_, v)| v.version == 2));
}

#[test]
fn expect_absent_and_version_conflicts_report_what_was_found() {
    let (_dir, store) = temp_store();
    let web = svc("default", "web");
    put(&*store, &web, b"v1", Expect::Absent).expect("create");

    match put(&*store, &web, b"again", Expect::Absent) {
        Err(StoreError::Conflict {
            key,
            expected: Expect::Absent,
            actual: Some(2),
        }) => assert_eq!(key, web),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(matches!(
        put(&*store, &web, b"stale", Expect::Version(1)),
        Err(StoreError::Conflict {
            expected: Expect::Version(1),
            actual: Some(2),
            ..
        })
    ));
    assert!(matches!(
        put(&*store, &svc("default", "nope"), b"x", Expect::Version(2)),
        Err(StoreError::Conflict {
            expected: Expect::Version(2),
            actual: None,
            ..
        })
    ));
    assert!(matches!(
        store.write(|tx| tx.delete(&web, Expect::Version(3))),
        Err(StoreError::Conflict {
            actual: Some(2),
            ..
        })
    ));
    assert!(matches!(
        store.write(|tx| tx.delete(&web, Expect::Absent)),
        Err(StoreError::Conflict {
            expected: Expect::Absent,
            actual: Some(2),
            ..
        })
    ));
    // Nothing of that moved the store.
    assert_eq!(store.revision().expect("revision"), 2);
    assert_eq!(
        get(&*store, &web),
        Some(Versioned {
            version: 2,
            value: b"v1".to_vec()
        })
    );
    let msg = put(&*store, &web, b"x", Expect::Absent)
        .expect_err("conflict")
        .to_string();
    assert_eq!(
        msg,
        "conflict on service/default/web: expected absent, found version 2"
    );
}

#[test]
fn a_conflict_aborts_the_whole_transaction() {
    let (_dir, store) = temp_store();
    let taken = svc("default", "taken");
    put(&*store, &taken, b"first", Expect::Absent).expect("create");

    // The 2nd put conflicts: the 1st must not be visible after.
    let first = svc("default", "new");
    let result = store.write(|tx| {
        tx.put(&first, b"new", Expect::Absent)?;
        tx.put(&taken, b"second", Expect::Absent)?;
        Ok::<_, StoreError>(())
    });
    assert!(matches!(result, Err(StoreError::Conflict { .. })));
    assert_eq!(get(&*store, &first), None);
    assert_eq!(get(&*store, &taken).expect("present").value, b"first");
    assert_eq!(store.revision().expect("revision"), 2);

    // Even a closure that swallows the conflict cannot commit its other writes.
    let result = store.write(|tx| {
        tx.put(&first, b"new", Expect::Absent)?;
        let swallowed = tx.put(&taken, b"second", Expect::Absent);
        assert!(swallowed.is_err());
        // Later writes in a doomed transaction fail with the same conflict.
        assert!(matches!(
            tx.put(&svc("default", "other"), b"x", Expect::Any),
            Err(StoreError::Conflict { ref key, .. }) if *key == taken
        ));
        Ok::<_, StoreError>(())
    });
    assert!(matches!(result, Err(StoreError::Conflict { key, .. }) if key == taken));
    assert_eq!(get(&*store, &first), None);
    assert_eq!(store.revision().expect("revision"), 2);
}

#[derive(Debug)]
enum DomainError {
    Store(StoreError),
    TokenAlreadyUsed,
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        DomainError::Store(e)
    }
}

#[test]
fn a_closure_error_aborts_and_passes_through() {
    let (_dir, store) = temp_store();
    let token = Key::cluster(TOKEN, "t1");
    let node = Key::cluster(NODE, "n1");
    put(&*store, &token, b"single-use", Expect::Absent).expect("create token");

    let join = |node_name: &str| {
        store.write(|tx| -> Result<(), DomainError> {
            let node = Key::cluster(NODE, node_name);
            tx.put(&node, b"node", Expect::Absent)?;
            let Some(t) = tx.get(&token)? else {
                return Err(DomainError::TokenAlreadyUsed);
            };
            tx.delete(&token, Expect::Version(t.version))?;
            Ok(())
        })
    };
    let ((), rev) = join("n1").expect("first join");
    assert_eq!(rev, 3);
    assert!(get(&*store, &node).is_some());
    assert!(get(&*store, &token).is_none());

    // The second join fails with the domain error, and its node put is rolled back.
    assert!(matches!(join("n2"), Err(DomainError::TokenAlreadyUsed)));
    assert_eq!(get(&*store, &Key::cluster(NODE, "n2")), None);
    // A store error converts into the domain error.
    assert!(matches!(
        join("n1"),
        Err(DomainError::Store(StoreError::Conflict { .. }))
    ));
    assert_eq!(store.revision().expect("revision"), 3);
}

#[test]
fn list_by_kind_and_namespace_is_exact_and_sorted() {
    let (_dir, store) = temp_store();
    let keys = [
        svc("b", "z"),
        svc("a", "y"),
        svc("ab", "x"),
        svc("a", "x"),
        svc("", "cluster-wide"),
        Key::new("services", "a", "x"),
        Key::new("servic", "a", "x"),
        Key::new(ENDPOINT, "a", "x"),
    ];
    store
        .write(|tx| {
            for key in &keys {
                tx.put(key, key.to_string().as_bytes(), Expect::Absent)?;
            }
            Ok::<_, StoreError>(())
        })
        .expect("write");

    let read = |kind: &str, ns: Option<&str>| {
        let (entries, _) = store.read(|tx| tx.list(kind, ns)).expect("list");
        for (key, v) in &entries {
            assert_eq!(v.value, key.to_string().as_bytes());
        }
        names(&entries)
    };
    assert_eq!(
        read(SERVICE, None),
        [
            "service/cluster-wide",
            "service/a/x",
            "service/a/y",
            "service/ab/x",
            "service/b/z"
        ]
    );
    assert_eq!(read(SERVICE, Some("a")), ["service/a/x", "service/a/y"]);
    assert_eq!(read(SERVICE, Some("")), ["service/cluster-wide"]);
    assert_eq!(read(SERVICE, Some("c")), Vec::<String>::new());
    assert_eq!(read("services", None), ["services/a/x"]);
    assert_eq!(read("servic", None), ["servic/a/x"]);
    assert_eq!(read(NODE, None), Vec::<String>::new());
    let (all, rev) = store.load(&[ENDPOINT, "services"]).expect("load");
    assert_eq!(names(&all), ["endpoint/a/x", "services/a/x"]);
    assert_eq!(rev, 2);
}

#[test]
fn invalid_keys_are_refused() {
    let (_dir, store) = temp_store();
    for key in [
        Key::new("", "ns", "name"),
        Key::new("kind", "ns", ""),
        Key::new("kind", "n\0s", "name"),
        Key::new("ki\0nd", "", "name"),
        Key::new("kind", "", "na\0me"),
    ] {
        assert!(
            matches!(
                put(&*store, &key, b"x", Expect::Any),
                Err(StoreError::InvalidKey { .. })
            ),
            "{key:?}"
        );
        assert!(matches!(
            store.read(|tx| tx.get(&key)),
            Err(StoreError::InvalidKey { .. })
        ));
    }
    assert!(matches!(
        store.read(|tx| tx.list("", None)),
        Err(StoreError::InvalidKey { .. })
    ));
    assert!(matches!(
        store.read(|tx| tx.list("kind", Some("a\0"))),
        Err(StoreError::InvalidKey { .. })
    ));
    assert_eq!(store.revision().expect("revision"), 1);
}

#[test]
fn a_read_transaction_is_a_snapshot() {
    let (_dir, store) = temp_store();
    let web = svc("default", "web");
    put(&*store, &web, b"v1", Expect::Any).expect("put");

    let snapshot = store.begin_read().expect("begin read");
    put(&*store, &web, b"v2", Expect::Any).expect("put");
    put(&*store, &svc("default", "db"), b"x", Expect::Any).expect("put");

    assert_eq!(snapshot.revision(), 2);
    assert_eq!(
        snapshot.get(&web).expect("get").expect("present").value,
        b"v1"
    );
    assert_eq!(snapshot.list(SERVICE, None).expect("list").len(), 1);
    drop(snapshot);
    assert_eq!(store.revision().expect("revision"), 4);
}

#[test]
fn everything_survives_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    let expected = {
        let store = RedbStore::open(&path).expect("open");
        for i in 0..50u32 {
            let key = svc(&format!("ns{}", i % 3), &format!("svc{i:02}"));
            put(&store, &key, &i.to_be_bytes(), Expect::Absent).expect("put");
        }
        store
            .write(|tx| tx.delete(&svc("ns0", "svc00"), Expect::Any))
            .expect("delete");
        let (all, rev) = store.load(&[SERVICE]).expect("load");
        assert_eq!(rev, 52);
        (all, rev)
    };
    let store = RedbStore::open(&path).expect("reopen");
    assert_eq!(store.load(&[SERVICE]).expect("load"), expected);
    assert_eq!(store.revision().expect("revision"), 52);
    // And it keeps counting from there.
    assert_eq!(
        put(&store, &svc("ns0", "svc00"), b"back", Expect::Absent).expect("put"),
        53
    );
}

#[test]
fn a_second_open_of_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    let _store = RedbStore::open(&path).expect("open");
    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::Open {
            source: redb::DatabaseError::DatabaseAlreadyOpen,
            ..
        })
    ));
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    drop(RedbStore::open(&path).expect("create"));
    {
        let db = redb::Database::open(&path).expect("raw open");
        let txn = db.begin_write().expect("begin");
        txn.open_table(embedded::META)
            .expect("meta")
            .insert(embedded::SCHEMA_KEY, embedded::SCHEMA + 1)
            .expect("insert");
        txn.commit().expect("commit");
    }
    assert!(matches!(
        RedbStore::open(&path),
        Err(StoreError::UnsupportedSchema {
            found: 2,
            supported: 1
        })
    ));
}

#[test]
fn a_corrupt_record_is_reported_not_trusted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    drop(RedbStore::open(&path).expect("create"));
    {
        let db = redb::Database::open(&path).expect("raw open");
        let txn = db.begin_write().expect("begin");
        {
            let mut objects = txn.open_table(embedded::OBJECTS).expect("objects");
            objects
                .insert(&b"service\0ns\0bad"[..], &b"\x01\x00"[..])
                .expect("insert");
            objects
                .insert(&b"service\0ns"[..], &b""[..])
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let store = RedbStore::open(&path).expect("open");
    assert!(matches!(
        store.read(|tx| tx.get(&svc("ns", "bad"))),
        Err(StoreError::Corrupt { key, .. }) if key == svc("ns", "bad")
    ));
    assert!(matches!(
        store.read(|tx| tx.list(SERVICE, None)),
        Err(StoreError::CorruptKey { .. })
    ));
    // A corrupt record cannot be compared against, so conditional writes over it fail too...
    assert!(matches!(
        put(&store, &svc("ns", "bad"), b"x", Expect::Version(2)),
        Err(StoreError::Corrupt { .. })
    ));
    // ...but an unconditional put replaces it.
    put(&store, &svc("ns", "bad"), b"fixed", Expect::Any).expect("overwrite");
    assert_eq!(
        get(&store, &svc("ns", "bad")).expect("present").value,
        b"fixed"
    );
}

#[test]
fn concurrent_writers_with_compare_and_swap_lose_no_increment() {
    const THREADS: u64 = 4;
    const INCREMENTS: u64 = 25;
    let (_dir, store) = temp_store();
    let counter = Key::cluster("counter", "c");
    put(&*store, &counter, &0u64.to_be_bytes(), Expect::Absent).expect("create");
    let conflicts = AtomicU64::new(0);
    let last_seen_revision = AtomicU64::new(0);

    let decode =
        |v: &Versioned| u64::from_be_bytes(v.value.as_slice().try_into().expect("8 bytes"));
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..INCREMENTS {
                    // Optimistic concurrency: read in one transaction, write in another with the
                    // version read; retry when someone else got there first.
                    loop {
                        let current = get(&*store, &counter).expect("present");
                        let next = (decode(&current) + 1).to_be_bytes();
                        match put(&*store, &counter, &next, Expect::Version(current.version)) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => {
                                conflicts.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(other) => panic!("increment failed: {other}"),
                        }
                    }
                }
            });
        }
        // A reader alongside: revisions only move forward.
        s.spawn(|| {
            for _ in 0..200 {
                let rev = store.revision().expect("revision");
                let prev = last_seen_revision.swap(rev, Ordering::Relaxed);
                assert!(rev >= prev, "revision went back from {prev} to {rev}");
            }
        });
    });

    let total = THREADS * INCREMENTS;
    let last = get(&*store, &counter).expect("present");
    assert_eq!(decode(&last), total);
    // One revision for the create, one per successful increment; conflicts wrote nothing.
    assert_eq!(store.revision().expect("revision"), 2 + total);
    assert_eq!(last.version, 2 + total);
    eprintln!(
        "{total} increments, {} conflicts retried",
        conflicts.load(Ordering::Relaxed)
    );
}

// --- Crash safety: a child process writes and is SIGKILLed right after an acknowledgement.

const CRASH_DIR_ENV: &str = "SLUICE_STORE_CRASH_TEST_DIR";
const CRASH_KIND: &str = "crash";
/// Large enough that each commit writes several pages.
const CRASH_VALUE_LEN: usize = 16 * 1024;

fn crash_value(i: u64) -> Vec<u8> {
    let mut v = vec![u8::try_from(i % 251).expect("< 251"); CRASH_VALUE_LEN];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v
}

fn crash_key(ns: &str, i: u64) -> Key {
    Key::new(CRASH_KIND, ns, format!("k{i:08}"))
}

/// The child side of `acknowledged_writes_survive_sigkill`: writes transactions of two objects
/// each, printing `ACK <i> <revision>` to stderr after each commit returns, until it is killed
/// (stderr, because libtest writes its own unterminated lines to stdout). Does nothing when run
/// without the parent's environment.
#[test]
#[ignore = "helper process of acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let store = RedbStore::open(Path::new(&dir).join("state.redb")).expect("child open");
    let (existing, _) = store
        .read(|tx| tx.list(CRASH_KIND, Some("a")))
        .expect("child list");
    let mut acks = std::io::stderr().lock();
    for i in u64::try_from(existing.len()).expect("fits").. {
        let ((), rev) = store
            .write(|tx| {
                tx.put(&crash_key("a", i), &crash_value(i), Expect::Absent)?;
                tx.put(&crash_key("b", i), &crash_value(i), Expect::Absent)?;
                Ok::<_, StoreError>(())
            })
            .expect("child write");
        writeln!(acks, "ACK {i} {rev}").expect("ack");
        acks.flush().expect("flush ack");
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("state.redb");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked = 0u64;
    for round in 0..8u64 {
        // Kill after a varying number of acknowledgements: 1, 2, 4, 8, 1, 2, ...
        let kill_after = 1 << (round % 4);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store::tests::crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let acks_pipe = child.stderr.take().expect("piped stderr");
        let mut acks = 0;
        for line in BufReader::new(acks_pipe).lines() {
            let line = line.expect("child output");
            let Some(ack) = line.strip_prefix("ACK ") else {
                eprintln!("crash child: {line}");
                continue;
            };
            let mut fields = ack.split(' ').map(|f| f.parse::<u64>().expect("number"));
            let (i, rev) = (
                fields.next().expect("index"),
                fields.next().expect("revision"),
            );
            assert_eq!(i, acked, "child wrote out of order");
            assert_eq!(rev, i + 2, "one revision per transaction");
            acked += 1;
            acks += 1;
            if acks == kill_after {
                // SIGKILL, most likely in the middle of the next commit.
                child.kill().expect("kill child");
                break;
            }
        }
        let status = child.wait().expect("reap child");
        assert!(
            !status.success(),
            "round {round}: child exited by itself ({status}) after {acks} acks"
        );

        // Every acknowledged transaction is there, whole; at most one more made it.
        let store = RedbStore::open(&path).expect("reopen after kill");
        let ((a, b), rev) = store
            .read(|tx| {
                Ok::<_, StoreError>((
                    tx.list(CRASH_KIND, Some("a"))?,
                    tx.list(CRASH_KIND, Some("b"))?,
                ))
            })
            .expect("read back");
        let committed = u64::try_from(a.len()).expect("fits");
        assert!(
            committed == acked || committed == acked + 1,
            "round {round}: {committed} transactions on disk, {acked} acknowledged"
        );
        assert_eq!(a.len(), b.len(), "round {round}: a transaction was split");
        assert_eq!(rev, committed + 1, "round {round}: revision");
        for (i, ((ka, va), (kb, vb))) in (0u64..).zip(a.iter().zip(&b)) {
            assert_eq!(*ka, crash_key("a", i));
            assert_eq!(*kb, crash_key("b", i));
            assert_eq!(va.version, i + 2);
            assert_eq!(vb.version, i + 2);
            assert!(
                va.value == crash_value(i) && vb.value == crash_value(i),
                "value {i}"
            );
        }
        eprintln!(
            "round {round}: killed after {acks} acks; {committed} transactions on disk, \
             {acked} acknowledged"
        );
        // An unacknowledged commit that made it counts from now on.
        acked = committed;
        drop(store);
    }
    assert!(acked >= 8, "only {acked} writes in 8 rounds");
}
