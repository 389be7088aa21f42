//! Behaviour every [`Store`] must have, written against `&dyn Store` and run against each
//! implementation by `shared_suite!`. Revisions are relative to where the store starts (`r0`):
//! 1 for a new embedded store, etcd's current revision for a fresh etcd prefix.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;

pub(super) fn new_store_is_empty(store: &dyn Store) {
    let r0 = store.revision().expect("revision");
    assert!(r0 >= 1);
    let (all, rev) = store.load(&[SERVICE, NODE]).expect("load");
    assert!(all.is_empty());
    assert_eq!(rev, r0);
}

pub(super) fn crud_versions_and_revisions(store: &dyn Store) {
    let r0 = store.revision().expect("revision");
    let web = svc("default", "web");

    assert_eq!(
        put(store, &web, b"v1", Expect::Absent).expect("create"),
        r0 + 1
    );
    assert_eq!(
        get(store, &web),
        Some(Versioned {
            version: r0 + 1,
            value: b"v1".to_vec()
        })
    );

    // A write elsewhere advances the revision, not web's version.
    assert_eq!(
        put(store, &svc("default", "db"), b"x", Expect::Any).expect("put"),
        r0 + 2
    );
    assert_eq!(get(store, &web).expect("present").version, r0 + 1);

    assert_eq!(
        put(store, &web, b"v2", Expect::Version(r0 + 1)).expect("update"),
        r0 + 3
    );
    let now = get(store, &web).expect("present");
    assert_eq!((now.version, now.value.as_slice()), (r0 + 3, &b"v2"[..]));

    // Reads do not move the revision.
    assert_eq!(store.read(|tx| tx.get(&web)).expect("read").1, r0 + 3);
    assert_eq!(store.revision().expect("revision"), r0 + 3);

    let (removed, rev) = store
        .write(|tx| tx.delete(&web, Expect::Version(r0 + 3)))
        .expect("delete");
    assert_eq!((removed, rev), (Some(r0 + 3), r0 + 4));
    assert_eq!(get(store, &web), None);

    // Re-created: a fresh version, from the current revision.
    assert_eq!(
        put(store, &web, b"v3", Expect::Absent).expect("re-create"),
        r0 + 5
    );
    assert_eq!(get(store, &web).expect("present").version, r0 + 5);
}

pub(super) fn a_transaction_that_writes_nothing_commits_nothing(store: &dyn Store) {
    let web = svc("default", "web");
    let r1 = put(store, &web, b"v1", Expect::Any).expect("put");

    let (found, rev) = store.write(|tx| tx.get(&web)).expect("read-only write");
    assert_eq!((found.map(|v| v.version), rev), (Some(r1), r1));

    // Deleting what is not there is not a write either.
    let (removed, rev) = store
        .write(|tx| tx.delete(&svc("default", "nope"), Expect::Any))
        .expect("delete absent");
    assert_eq!((removed, rev), (None, r1));
    assert_eq!(store.revision().expect("revision"), r1);
}

pub(super) fn several_writes_in_one_transaction_share_one_revision(store: &dyn Store) {
    let r0 = store.revision().expect("revision");
    let ((), rev) = store
        .write(|tx| {
            assert_eq!(tx.revision(), r0);
            for name in ["a", "b", "c"] {
                tx.put(&svc("ns", name), name.as_bytes(), Expect::Absent)?;
            }
            // The transaction sees its own writes, with the version they will have.
            assert_eq!(tx.list(SERVICE, Some("ns"))?.len(), 3);
            assert_eq!(tx.get(&svc("ns", "a"))?.map(|v| v.version), Some(r0 + 1));
            tx.delete(&svc("ns", "c"), Expect::Version(r0 + 1))?;
            assert_eq!(tx.get(&svc("ns", "c"))?, None);
            assert_eq!(
                names(&tx.list(SERVICE, None)?),
                ["service/ns/a", "service/ns/b"]
            );
            Ok::<_, StoreError>(())
        })
        .expect("write");
    assert_eq!(rev, r0 + 1);
    let (all, rev) = store.read(|tx| tx.list(SERVICE, None)).expect("list");
    assert_eq!(rev, r0 + 1);
    assert_eq!(names(&all), ["service/ns/a", "service/ns/b"]);
    assert!(all.iter().all(|(_, v)| v.version == r0 + 1));
}

pub(super) fn expect_absent_and_version_conflicts_report_what_was_found(store: &dyn Store) {
    let web = svc("default", "web");
    let v = put(store, &web, b"v1", Expect::Absent).expect("create");

    match put(store, &web, b"again", Expect::Absent) {
        Err(StoreError::Conflict {
            key,
            expected: Expect::Absent,
            actual: Some(found),
        }) => assert_eq!((key, found), (web.clone(), v)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(matches!(
        put(store, &web, b"stale", Expect::Version(v - 1)),
        Err(StoreError::Conflict {
            expected: Expect::Version(e),
            actual: Some(found),
            ..
        }) if e == v - 1 && found == v
    ));
    assert!(matches!(
        put(store, &svc("default", "nope"), b"x", Expect::Version(v)),
        Err(StoreError::Conflict {
            expected: Expect::Version(_),
            actual: None,
            ..
        })
    ));
    assert!(matches!(
        store.write(|tx| tx.delete(&web, Expect::Version(v + 1))),
        Err(StoreError::Conflict { actual: Some(found), .. }) if found == v
    ));
    assert!(matches!(
        store.write(|tx| tx.delete(&web, Expect::Absent)),
        Err(StoreError::Conflict {
            expected: Expect::Absent,
            actual: Some(found),
            ..
        }) if found == v
    ));
    // Nothing of that moved the store.
    assert_eq!(store.revision().expect("revision"), v);
    assert_eq!(
        get(store, &web),
        Some(Versioned {
            version: v,
            value: b"v1".to_vec()
        })
    );
    let msg = put(store, &web, b"x", Expect::Absent)
        .expect_err("conflict")
        .to_string();
    assert_eq!(
        msg,
        format!("conflict on service/default/web: expected absent, found version {v}")
    );
}

pub(super) fn a_conflict_aborts_the_whole_transaction(store: &dyn Store) {
    let taken = svc("default", "taken");
    let r1 = put(store, &taken, b"first", Expect::Absent).expect("create");

    // The 2nd put conflicts: the 1st must not be visible after.
    let first = svc("default", "new");
    let result = store.write(|tx| {
        tx.put(&first, b"new", Expect::Absent)?;
        tx.put(&taken, b"second", Expect::Absent)?;
        Ok::<_, StoreError>(())
    });
    assert!(matches!(result, Err(StoreError::Conflict { .. })));
    assert_eq!(get(store, &first), None);
    assert_eq!(get(store, &taken).expect("present").value, b"first");
    assert_eq!(store.revision().expect("revision"), r1);

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
    assert_eq!(get(store, &first), None);
    assert_eq!(store.revision().expect("revision"), r1);
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

pub(super) fn a_closure_error_aborts_and_passes_through(store: &dyn Store) {
    let token = Key::cluster(TOKEN, "t1");
    let node = Key::cluster(NODE, "n1");
    let r1 = put(store, &token, b"single-use", Expect::Absent).expect("create token");

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
    assert_eq!(rev, r1 + 1);
    assert!(get(store, &node).is_some());
    assert!(get(store, &token).is_none());

    // The second join fails with the domain error, and its node put is rolled back.
    assert!(matches!(join("n2"), Err(DomainError::TokenAlreadyUsed)));
    assert_eq!(get(store, &Key::cluster(NODE, "n2")), None);
    // A store error converts into the domain error.
    assert!(matches!(
        join("n1"),
        Err(DomainError::Store(StoreError::Conflict { .. }))
    ));
    assert_eq!(store.revision().expect("revision"), r1 + 1);
}

pub(super) fn list_by_kind_and_namespace_is_exact_and_sorted(store: &dyn Store) {
    let keys = [
        svc("b", "z"),
        svc("a", "y"),
        svc("ab", "x"),
        svc("a", "x"),
        svc("a-b", "x"),
        svc("a", "x-1"),
        svc("", "cluster-wide"),
        Key::new("services", "a", "x"),
        Key::new("servic", "a", "x"),
        Key::new(ENDPOINT, "a", "x"),
    ];
    let (_, r1) = store
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
            "service/a/x-1",
            "service/a/y",
            "service/a-b/x",
            "service/ab/x",
            "service/b/z"
        ]
    );
    assert_eq!(
        read(SERVICE, Some("a")),
        ["service/a/x", "service/a/x-1", "service/a/y"]
    );
    assert_eq!(read(SERVICE, Some("")), ["service/cluster-wide"]);
    assert_eq!(read(SERVICE, Some("c")), Vec::<String>::new());
    assert_eq!(read("services", None), ["services/a/x"]);
    assert_eq!(read("servic", None), ["servic/a/x"]);
    assert_eq!(read(NODE, None), Vec::<String>::new());
    let (all, rev) = store.load(&[ENDPOINT, "services"]).expect("load");
    assert_eq!(names(&all), ["endpoint/a/x", "services/a/x"]);
    assert_eq!(rev, r1);
}

/// Key parts may hold anything but NUL, separators of other encodings included.
pub(super) fn key_parts_may_hold_slashes_and_percent_signs(store: &dyn Store) {
    let keys = [
        Key::new("a/b", "c", "d"),
        Key::new("a", "b/c", "d"),
        Key::new("a", "b", "c/d"),
        Key::new("a", "", "b/c/d"),
        Key::new("a", "%2F", "%"),
        Key::new("a", "b", "c"),
    ];
    store
        .write(|tx| {
            for (i, key) in keys.iter().enumerate() {
                tx.put(key, &[u8::try_from(i).expect("small")], Expect::Absent)?;
            }
            Ok::<_, StoreError>(())
        })
        .expect("write");
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            get(store, key).expect("present").value,
            [u8::try_from(i).expect("small")],
            "{key:?}"
        );
    }
    let list = |kind: &str, ns: Option<&str>| {
        let (entries, _) = store.read(|tx| tx.list(kind, ns)).expect("list");
        entries.into_iter().map(|(k, _)| k).collect::<Vec<_>>()
    };
    assert_eq!(list("a/b", None), [keys[0].clone()]);
    assert_eq!(
        list("a", None),
        [
            keys[3].clone(),
            keys[4].clone(),
            keys[5].clone(),
            keys[2].clone(),
            keys[1].clone()
        ]
    );
    assert_eq!(list("a", Some("b")), [keys[5].clone(), keys[2].clone()]);
    assert_eq!(list("a", Some("b/c")), [keys[1].clone()]);
    assert_eq!(list("a", Some("%2F")), [keys[4].clone()]);
}

pub(super) fn invalid_keys_are_refused(store: &dyn Store) {
    let r0 = store.revision().expect("revision");
    for key in [
        Key::new("", "ns", "name"),
        Key::new("kind", "ns", ""),
        Key::new("kind", "n\0s", "name"),
        Key::new("ki\0nd", "", "name"),
        Key::new("kind", "", "na\0me"),
    ] {
        assert!(
            matches!(
                put(store, &key, b"x", Expect::Any),
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
    assert_eq!(store.revision().expect("revision"), r0);
}

pub(super) fn a_read_transaction_is_a_snapshot(store: &dyn Store) {
    let web = svc("default", "web");
    let r1 = put(store, &web, b"v1", Expect::Any).expect("put");

    let snapshot = store.begin_read().expect("begin read");
    put(store, &web, b"v2", Expect::Any).expect("put");
    put(store, &svc("default", "db"), b"x", Expect::Any).expect("put");

    assert_eq!(snapshot.revision(), r1);
    assert_eq!(
        snapshot.get(&web).expect("get").expect("present").value,
        b"v1"
    );
    assert_eq!(snapshot.list(SERVICE, None).expect("list").len(), 1);
    drop(snapshot);
    assert_eq!(store.revision().expect("revision"), r1 + 2);
}

pub(super) fn concurrent_writers_with_compare_and_swap_lose_no_increment(store: &dyn Store) {
    const THREADS: u64 = 4;
    const INCREMENTS: u64 = 25;
    let counter = Key::cluster("counter", "c");
    let r1 = put(store, &counter, &0u64.to_be_bytes(), Expect::Absent).expect("create");
    let conflicts = AtomicU64::new(0);
    let last_seen_revision = AtomicU64::new(0);

    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                for _ in 0..INCREMENTS {
                    // Optimistic concurrency: read in one transaction, write in another with the
                    // version read; retry when someone else got there first.
                    loop {
                        let current = get(store, &counter).expect("present");
                        let next = (decode_counter(&current) + 1).to_be_bytes();
                        match put(store, &counter, &next, Expect::Version(current.version)) {
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
    let last = get(store, &counter).expect("present");
    assert_eq!(decode_counter(&last), total);
    // One revision per successful increment; conflicts wrote nothing.
    assert_eq!(store.revision().expect("revision"), r1 + total);
    assert_eq!(last.version, r1 + total);
    eprintln!(
        "{total} increments, {} conflicts retried",
        conflicts.load(Ordering::Relaxed)
    );
}

/// The server calls the store from `spawn_blocking` and, for short reads, straight from async
/// handlers; both must work whatever the store does inside (the etcd store runs a runtime).
pub(super) fn works_from_spawn_blocking_and_from_async_tasks(store: &Arc<dyn Store>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let key = svc("rt", "k");
    runtime.block_on(async {
        let (s, k) = (store.clone(), key.clone());
        let rev = tokio::task::spawn_blocking(move || put(&*s, &k, b"x", Expect::Absent))
            .await
            .expect("join")
            .expect("put from spawn_blocking");
        // Directly on a worker: stalls it for the request, must not panic.
        assert_eq!(get(&**store, &key).expect("present").version, rev);
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let s = store.clone();
                tokio::task::spawn_blocking(move || {
                    put(&*s, &svc("rt", &format!("k{i}")), b"x", Expect::Absent)
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("join").expect("concurrent put");
        }
    });
    drop(runtime);
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (listed, _) = single
        .block_on(async { store.read(|tx| tx.list(SERVICE, Some("rt"))) })
        .expect("list on a current-thread runtime");
    assert_eq!(listed.len(), 9);
}

pub(super) fn decode_counter(v: &Versioned) -> u64 {
    u64::from_be_bytes(v.value.as_slice().try_into().expect("8 bytes"))
}

/// A bulk transaction that reads its keys' versions ahead (`prefetch`) checks
/// every expectation as one read key by key would, including keys written
/// in the transaction itself.
pub(super) fn prefetched_expectations_are_checked_as_read_ones(store: &dyn Store) {
    let existing: Vec<Key> = (0..20).map(|i| svc("bulk", &format!("s{i:02}"))).collect();
    let fresh: Vec<Key> = (0..20).map(|i| svc("bulk", &format!("n{i:02}"))).collect();
    let (_, written) = store
        .write(|tx| -> Result<(), StoreError> {
            for key in &existing {
                tx.put(key, b"old", Expect::Absent)?;
            }
            Ok(())
        })
        .expect("seed");
    let all: Vec<Key> = existing.iter().chain(&fresh).cloned().collect();
    // Every expectation met: creates of the fresh, updates of the existing.
    store
        .write(|tx| -> Result<(), StoreError> {
            tx.prefetch(&all)?;
            for key in &fresh {
                tx.put(key, b"new", Expect::Absent)?;
            }
            for key in &existing {
                tx.put(key, b"newer", Expect::Version(written))?;
            }
            // Written in this transaction: no longer absent.
            assert!(matches!(
                tx.put(&fresh[0], b"again", Expect::Absent),
                Err(StoreError::Conflict { .. })
            ));
            Ok(())
        })
        .expect_err("the last put dooms it");
    // An existing key expected absent: a conflict naming its version.
    let error = store
        .write(|tx| -> Result<(), StoreError> {
            tx.prefetch(&all)?;
            tx.put(&existing[3], b"x", Expect::Absent)
        })
        .expect_err("exists");
    match error {
        StoreError::Conflict { actual, .. } => assert_eq!(actual, Some(written)),
        other => panic!("{other:?}"),
    }
    // Nothing of the doomed transactions was committed.
    assert_eq!(get(store, &fresh[0]), None);
    assert_eq!(
        get(store, &existing[0]).expect("kept").value,
        b"old".to_vec()
    );
}
