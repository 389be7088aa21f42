//! The store tests: the behaviour every [`Store`] must have ([`suite`]), run against
//! [`RedbStore`] (in `redb`) and [`EtcdStore`] on a 3-member etcd cluster (in `etcd`), each
//! through `dyn Store`; then what is particular to each: the embedded store's file, schema and
//! crash tests, and the etcd store's prefixes, races between replicas and kills of members.

use std::any::Any;
use std::sync::Arc;

use super::*;
use crate::testing::EtcdCluster;

mod etcd;
mod redb;
mod suite;

// The store does not interpret table names; these stand for any.
const SERVICE: &str = "service";
const ENDPOINT: &str = "endpoint";
const TOKEN: &str = "token";
const NODE: &str = "node";

/// A store under test and what it lives on (a temp dir, an etcd cluster), dropped after it.
struct Fixture {
    store: Arc<dyn Store>,
    _home: Box<dyn Any>,
}

fn redb_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = RedbStore::open(dir.path().join("state.redb")).expect("open store");
    Fixture {
        store: Arc::new(store),
        _home: Box::new(dir),
    }
}

/// A store on its own 3-member cluster, under a prefix named after the test, after another
/// prefix was written: the store starts at a revision above 1 and must not see that prefix.
fn etcd_fixture() -> Fixture {
    let cluster = EtcdCluster::start(3).expect("etcd cluster");
    let other = EtcdStore::connect(&cluster.endpoints(), None, "/other/").expect("connect");
    put(&other, &svc("default", "web"), b"not yours", Expect::Any).expect("foreign put");
    let store = EtcdStore::connect(&cluster.endpoints(), None, &test_prefix()).expect("connect");
    Fixture {
        store: Arc::new(store),
        _home: Box::new(cluster),
    }
}

/// A prefix of this test's own (the test's name, from its thread).
fn test_prefix() -> String {
    let thread = std::thread::current();
    format!("/sluice-test/{}/", thread.name().unwrap_or("unnamed"))
}

// --- Crash tests: what a child process writes until it is killed.

const CRASH_KIND: &str = "crash";

/// Value `i` of a crash test, `len` bytes that say which write they are.
fn crash_value(i: u64, len: usize) -> Vec<u8> {
    let mut v = vec![u8::try_from(i % 251).expect("< 251"); len];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v
}

fn crash_key(ns: &str, i: u64) -> Key {
    Key::new(CRASH_KIND, ns, format!("k{i:08}"))
}

/// Runs each behaviour of [`suite`] as a test of the module it is invoked in, on the store
/// `$fixture` makes: as `&dyn Store`, or (the second list) as the `Arc` a server holds.
macro_rules! shared_suite {
    ($fixture:expr) => {
        shared_suite!(@tests $fixture; [
            new_store_is_empty,
            crud_versions_and_revisions,
            a_transaction_that_writes_nothing_commits_nothing,
            several_writes_in_one_transaction_share_one_revision,
            expect_absent_and_version_conflicts_report_what_was_found,
            a_conflict_aborts_the_whole_transaction,
            a_closure_error_aborts_and_passes_through,
            list_by_kind_and_namespace_is_exact_and_sorted,
            key_parts_may_hold_slashes_and_percent_signs,
            invalid_keys_are_refused,
            a_read_transaction_is_a_snapshot,
            concurrent_writers_with_compare_and_swap_lose_no_increment,
            prefetched_expectations_are_checked_as_read_ones,
        ] [
            works_from_spawn_blocking_and_from_async_tasks,
        ]);
    };
    (@tests $fixture:expr; [$($name:ident),* $(,)?] [$($arc:ident),* $(,)?]) => {
        mod shared {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let fixture = $fixture;
                    super::super::suite::$name(&*fixture.store);
                }
            )*
            $(
                #[test]
                fn $arc() {
                    let fixture = $fixture;
                    super::super::suite::$arc(&fixture.store);
                }
            )*
        }
    };
}
use shared_suite;

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
    assert_send_sync::<EtcdStore>();
    assert_send_sync::<Arc<dyn Store>>();
    assert_send_sync::<StoreError>();
}
