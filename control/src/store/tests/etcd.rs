//! The etcd store: the shared behaviours, then what only a replicated store has: prefixes on a
//! shared cluster, writers in two processes ("replicas") racing, and kills of etcd members and
//! of the writer. Each test runs its own 3-member cluster (see [`crate::testing::etcd`]).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::suite::decode_counter;
use super::*;

shared_suite!(etcd_fixture());

fn connect(cluster: &EtcdCluster, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&cluster.endpoints(), None, prefix).expect("connect")
}

#[test]
fn a_fresh_prefix_is_empty_and_its_first_write_commits_the_next_revision() {
    let cluster = EtcdCluster::start(3).expect("cluster");
    let a = connect(&cluster, "/a/");
    for i in 0..3 {
        put(&a, &svc("ns", &format!("s{i}")), b"a's", Expect::Absent).expect("put");
    }
    let r_a = a.revision().expect("revision");
    // A fresh empty etcd is at revision 1, and each commit adds one: three writes, at 4.
    assert_eq!(r_a, 4);

    // `/a/b/` would nest in `/a/`; `/ab/` only shares bytes with it.
    let b = connect(&cluster, "/ab/");
    assert_eq!(b.revision().expect("revision"), r_a);
    assert!(b.load(&[SERVICE]).expect("load").0.is_empty());
    assert_eq!(get(&b, &svc("ns", "s0")), None);
    assert_eq!(
        put(&b, &svc("ns", "s0"), b"b's", Expect::Absent).expect("put"),
        r_a + 1
    );
    assert_eq!(get(&a, &svc("ns", "s0")).expect("present").value, b"a's");
    assert_eq!(a.load(&[SERVICE]).expect("load").0.len(), 3);
}

/// Two stores on one prefix are two replicas: each process's writers wait for each other, but
/// not for the other's.
fn two_replicas(cluster: &EtcdCluster) -> (EtcdStore, EtcdStore) {
    let prefix = test_prefix();
    (connect(cluster, &prefix), connect(cluster, &prefix))
}

#[test]
fn a_raced_transaction_wrote_nothing() {
    let cluster = EtcdCluster::start(3).expect("cluster");
    let (one, two) = two_replicas(&cluster);
    let counter = Key::cluster("counter", "c");
    let r1 = put(&one, &counter, &0u64.to_be_bytes(), Expect::Absent).expect("create");

    // `one` reads the counter and decides; `two` commits meanwhile; `one`'s commit must fail.
    let mut tx = one.begin_write().expect("begin");
    let seen = decode_counter(&tx.get(&counter).expect("get").expect("present"));
    tx.put(&counter, &(seen + 1).to_be_bytes(), Expect::Any)
        .expect("put");
    tx.put(&svc("ns", "side-effect"), b"x", Expect::Absent)
        .expect("put");
    let r2 = put(&two, &counter, &10u64.to_be_bytes(), Expect::Any).expect("other replica");
    match tx.commit() {
        Err(StoreError::Raced { base, winner }) => assert_eq!((base, winner), (r1, r2)),
        other => panic!("expected Raced, got {other:?}"),
    }
    // Nothing of it landed.
    assert_eq!(one.revision().expect("revision"), r2);
    assert_eq!(decode_counter(&get(&one, &counter).expect("present")), 10);
    assert_eq!(get(&one, &svc("ns", "side-effect")), None);
    let msg = StoreError::Raced { base: 3, winner: 4 }.to_string();
    assert_eq!(
        msg,
        "another writer committed (at revision 4) after this transaction read revision 3; \
         it wrote nothing: retry on fresh state"
    );
    // Run again on fresh state, it commits.
    let ((), r3) = one
        .write(|tx| {
            let seen = decode_counter(&tx.get(&counter)?.expect("present"));
            tx.put(&counter, &(seen + 1).to_be_bytes(), Expect::Any)
        })
        .expect("retry");
    assert_eq!(r3, r2 + 1);
    assert_eq!(decode_counter(&get(&two, &counter).expect("present")), 11);
}

#[test]
fn an_expectation_broken_by_another_replica_is_a_conflict_with_what_it_found() {
    let cluster = EtcdCluster::start(3).expect("cluster");
    let (one, two) = two_replicas(&cluster);
    let web = svc("default", "web");
    let v1 = put(&one, &web, b"v1", Expect::Absent).expect("create");

    let mut tx = one.begin_write().expect("begin");
    tx.put(&web, b"mine", Expect::Version(v1))
        .expect("holds at the base");
    tx.put(&svc("default", "new"), b"x", Expect::Absent)
        .expect("holds at the base");
    let v2 = put(&two, &web, b"theirs", Expect::Version(v1)).expect("other replica");
    match tx.commit() {
        Err(StoreError::Conflict {
            key,
            expected: Expect::Version(expected),
            actual: Some(actual),
        }) => assert_eq!((key, expected, actual), (web.clone(), v1, v2)),
        other => panic!("expected a conflict on {web}, got {other:?}"),
    }
    assert_eq!(get(&one, &web).expect("present").value, b"theirs");
    assert_eq!(get(&one, &svc("default", "new")), None);

    // An `Absent` broken the same way reports what now exists.
    let mut tx = one.begin_write().expect("begin");
    tx.put(&svc("default", "late"), b"mine", Expect::Absent)
        .expect("absent at the base");
    let v3 = put(&two, &svc("default", "late"), b"theirs", Expect::Absent).expect("other");
    assert!(matches!(
        tx.commit(),
        Err(StoreError::Conflict { expected: Expect::Absent, actual: Some(a), .. }) if a == v3
    ));
}

#[test]
fn two_replicas_reading_deciding_and_writing_lose_no_increment() {
    const THREADS_PER_REPLICA: u64 = 2;
    const INCREMENTS: u64 = 15;
    let cluster = EtcdCluster::start(3).expect("cluster");
    let (one, two) = two_replicas(&cluster);
    let counter = Key::cluster("counter", "c");
    let r1 = put(&one, &counter, &0u64.to_be_bytes(), Expect::Absent).expect("create");
    let raced = AtomicU64::new(0);
    let conflicts = AtomicU64::new(0);

    std::thread::scope(|s| {
        for (replica, expect_version) in [(&one, true), (&two, false)] {
            for _ in 0..THREADS_PER_REPLICA {
                let (raced, conflicts, counter) = (&raced, &conflicts, &counter);
                s.spawn(move || {
                    for _ in 0..INCREMENTS {
                        // Read, decide, write in one transaction: replica one with a
                        // compare-and-swap, replica two with none (the sentinel alone).
                        loop {
                            let result = replica.write(|tx| {
                                let current = tx.get(counter)?.expect("present");
                                let expect = if expect_version {
                                    Expect::Version(current.version)
                                } else {
                                    Expect::Any
                                };
                                let next = decode_counter(&current) + 1;
                                tx.put(counter, &next.to_be_bytes(), expect)
                            });
                            match result {
                                Ok(_) => break,
                                Err(StoreError::Raced { .. }) => {
                                    raced.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(StoreError::Conflict { .. }) => {
                                    conflicts.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(other) => panic!("increment failed: {other}"),
                            }
                        }
                    }
                });
            }
        }
    });

    let total = 2 * THREADS_PER_REPLICA * INCREMENTS;
    let last = get(&two, &counter).expect("present");
    assert_eq!(decode_counter(&last), total);
    // One revision per successful increment: lost races wrote nothing.
    assert_eq!(one.revision().expect("revision"), r1 + total);
    assert_eq!(last.version, r1 + total);
    eprintln!(
        "{total} increments by two replicas: {} races and {} conflicts retried",
        raced.load(Ordering::Relaxed),
        conflicts.load(Ordering::Relaxed)
    );
}

#[test]
fn connecting_to_nothing_fails_in_bounded_time_naming_the_endpoints_even_on_a_worker() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let endpoints = [format!("127.0.0.1:{port}")];
    let started = Instant::now();
    let err = EtcdStore::connect(&endpoints, None, DEFAULT_PREFIX).expect_err("nothing there");
    let waited = started.elapsed();
    assert!(
        waited < CONNECT_TIMEOUT + REQUEST_TIMEOUT * 4,
        "took {waited:?}"
    );
    assert!(
        matches!(err, StoreError::Backend { op: "connect", .. }),
        "{err:?}"
    );
    let chain = error_chain(&err);
    assert!(chain.contains(&endpoints[0]), "{chain}");
    eprintln!("after {waited:?}: {chain}");

    // On an async worker too: failing, or being dropped there, must not panic (a dropped
    // runtime blocks, which tokio refuses inside a runtime).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        assert!(EtcdStore::connect(&endpoints, None, DEFAULT_PREFIX).is_err());
        let cluster = EtcdCluster::start(1).expect("cluster");
        let store = connect(&cluster, &test_prefix());
        put(&store, &svc("a", "b"), b"x", Expect::Absent).expect("put on a worker");
        drop(store);
    });

    assert!(matches!(
        EtcdStore::connect(&[], None, DEFAULT_PREFIX),
        Err(StoreError::Backend { op: "connect", .. })
    ));
    assert!(matches!(
        EtcdStore::connect(&endpoints, None, "no-slash"),
        Err(StoreError::Backend {
            source: BackendError::Etcd(EtcdError::Prefix { .. }),
            ..
        })
    ));
}

#[test]
fn a_commit_that_reaches_no_member_fails_within_the_timeout() {
    let mut cluster = EtcdCluster::start(3).expect("cluster");
    let store = connect(&cluster, &test_prefix());
    let key = svc("ns", "lost");
    let mut tx = store.begin_write().expect("begin");
    tx.put(&key, b"x", Expect::Absent).expect("put");
    for i in 0..cluster.size() {
        cluster.kill(i).expect("kill");
    }
    let started = Instant::now();
    let err = tx.commit().expect_err("no member");
    let waited = started.elapsed();
    assert!(waited < REQUEST_TIMEOUT * 2, "took {waited:?}");
    assert!(
        matches!(
            err,
            StoreError::CommitFailed { .. } | StoreError::Backend { op: "commit", .. }
        ),
        "{err:?}"
    );
    eprintln!("after {waited:?}: {}", error_chain(&err));
    // Reads fail too, bounded, until the members are back; then all is as before.
    assert!(matches!(store.revision(), Err(StoreError::Backend { .. })));
    cluster.revive().expect("restart");
    // The store reconnects by itself; the lost commit did not land.
    assert_eq!(get(&store, &key), None);
    put(&store, &key, b"y", Expect::Absent).expect("put after restart");
}

#[test]
fn tls_with_a_client_certificate_connects_and_anything_less_is_refused() {
    let ca = sluice_pki::ClusterCa::generate().expect("CA");
    let (cert_pem, key_pem) = ca.issue_server(&[], &[]).expect("server cert");
    let cluster = EtcdCluster::start_tls(
        3,
        &crate::testing::ServerTls {
            ca_pem: ca.cert_pem(),
            cert_pem,
            key_pem,
        },
    )
    .expect("TLS cluster");
    let client = sluice_pki::new_key_and_csr("sluice-control").expect("key");
    let cert = ca
        .sign_user(
            &client.csr_pem,
            "sluice-control",
            &[],
            Duration::from_secs(3600),
        )
        .expect("client cert");
    let tls = EtcdTls {
        ca_pem: ca.cert_pem(),
        cert_pem: cert.pem,
        key_pem: client.key_pem.clone(),
    };
    let store = EtcdStore::connect(&cluster.endpoints(), Some(tls.clone()), &test_prefix())
        .expect("connect over TLS");
    let r = put(&store, &svc("ns", "web"), b"over TLS", Expect::Absent).expect("put");
    assert_eq!(get(&store, &svc("ns", "web")).expect("present").version, r);

    let refused = |tls: Option<EtcdTls>| {
        let started = Instant::now();
        let err = EtcdStore::connect(&cluster.endpoints(), tls, &test_prefix())
            .expect_err("must be refused");
        assert!(started.elapsed() < CONNECT_TIMEOUT + REQUEST_TIMEOUT * 4);
        let chain = error_chain(&err);
        assert!(chain.contains(&cluster.endpoint(0)), "{chain}");
        chain
    };
    // Plain text to a TLS port; a server the client's CA did not sign; a client certificate
    // etcd's CA did not sign.
    eprintln!("plain text: {}", refused(None));
    let other = sluice_pki::ClusterCa::generate().expect("other CA");
    eprintln!(
        "unknown server: {}",
        refused(Some(EtcdTls {
            ca_pem: other.cert_pem(),
            ..tls.clone()
        }))
    );
    let stranger = other
        .sign_user(&client.csr_pem, "stranger", &[], Duration::from_secs(3600))
        .expect("foreign client cert");
    eprintln!(
        "unknown client: {}",
        refused(Some(EtcdTls {
            cert_pem: stranger.pem,
            ..tls
        }))
    );
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

// --- Durability: a child process writes and is SIGKILLed, and so is an etcd member.

const ENDPOINTS_ENV: &str = "SLUICE_STORE_ETCD_CRASH_ENDPOINTS";
const PREFIX_ENV: &str = "SLUICE_STORE_ETCD_CRASH_PREFIX";
const CRASH_VALUE_LEN: usize = 4 * 1024;

/// The child side of `acknowledged_writes_survive_kills_of_a_member_and_of_the_writer`: prints
/// `FROM <i>`, then writes transactions of two objects each, printing `ACK <i>` to stderr once
/// a commit returned (or, after a commit of unknown outcome, once a read shows it landed),
/// until it is killed. Does nothing when run without the parent's environment.
#[test]
#[ignore = "helper process of acknowledged_writes_survive_kills_of_a_member_and_of_the_writer"]
fn crash_child() {
    let (Ok(endpoints), Ok(prefix)) = (std::env::var(ENDPOINTS_ENV), std::env::var(PREFIX_ENV))
    else {
        return;
    };
    let endpoints: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
    let store = EtcdStore::connect(&endpoints, None, &prefix).expect("child connect");
    let (existing, _) = store
        .read(|tx| tx.list(CRASH_KIND, Some("a")))
        .expect("child list");
    let mut out = std::io::stderr().lock();
    let from = u64::try_from(existing.len()).expect("fits");
    writeln!(out, "FROM {from}").expect("from");
    for i in from.. {
        let mut attempts = 0;
        loop {
            attempts += 1;
            assert!(attempts < 100, "write {i} failed 100 times");
            let result = store.write(|tx| {
                tx.put(
                    &crash_key("a", i),
                    &crash_value(i, CRASH_VALUE_LEN),
                    Expect::Absent,
                )?;
                tx.put(
                    &crash_key("b", i),
                    &crash_value(i, CRASH_VALUE_LEN),
                    Expect::Absent,
                )?;
                Ok::<_, StoreError>(())
            });
            match result {
                Ok(_) => break,
                // An earlier attempt of unknown outcome landed.
                Err(StoreError::Conflict { ref key, .. }) if *key == crash_key("a", i) => {
                    assert!(get(&store, &crash_key("b", i)).is_some(), "half of {i}");
                    break;
                }
                // A member is down or a leader is being elected: try again.
                Err(e) => {
                    writeln!(out, "retrying {i}: {}", error_chain(&e)).expect("log");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        writeln!(out, "ACK {i}").expect("ack");
        out.flush().expect("flush ack");
    }
}

#[test]
fn acknowledged_writes_survive_kills_of_a_member_and_of_the_writer() {
    let mut cluster = EtcdCluster::start(3).expect("cluster");
    let prefix = test_prefix();
    let exe = std::env::current_exe().expect("test binary");
    let mut acked = 0u64;
    for round in 0..6u64 {
        // Each round kills another member after the child's first acknowledgement, then the
        // child after a varying number more: 2, 4, 8, 2, ...
        let member = usize::try_from(round).expect("small") % cluster.size();
        let kill_after = 2 << (round % 3);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "store::tests::etcd::crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENDPOINTS_ENV, cluster.endpoints().join(","))
            .env(PREFIX_ENV, &prefix)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let pipe = child.stderr.take().expect("piped stderr");
        let mut acks = 0;
        for line in BufReader::new(pipe).lines() {
            let line = line.expect("child output");
            if let Some(from) = line.strip_prefix("FROM ") {
                let from: u64 = from.parse().expect("number");
                // An unacknowledged commit of the last round may have landed since.
                assert!(from == acked || from == acked + 1, "child starts at {from}");
                acked = from;
                continue;
            }
            let Some(i) = line.strip_prefix("ACK ") else {
                eprintln!("crash child: {line}");
                continue;
            };
            assert_eq!(i.parse::<u64>().expect("number"), acked, "out of order");
            acked += 1;
            acks += 1;
            if acks == 1 {
                cluster.kill(member).expect("kill member");
            }
            if acks == kill_after {
                child.kill().expect("kill child");
                break;
            }
        }
        let status = child.wait().expect("reap child");
        assert!(
            !status.success(),
            "round {round}: child exited by itself ({status}) after {acks} acks"
        );
        cluster.restart(member).expect("restart member");

        // Read through the restarted member alone: it has caught up with every acknowledged
        // transaction, each whole, and at most one more.
        let store = EtcdStore::connect(&[cluster.endpoint(member)], None, &prefix)
            .expect("connect to the restarted member");
        let ((a, b), _) = store
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
            "round {round}: {committed} transactions in etcd, {acked} acknowledged"
        );
        assert_eq!(a.len(), b.len(), "round {round}: a transaction was split");
        for (i, ((ka, va), (kb, vb))) in (0u64..).zip(a.iter().zip(&b)) {
            assert_eq!((ka, kb), (&crash_key("a", i), &crash_key("b", i)));
            assert_eq!(va.version, vb.version, "one transaction, one version");
            assert!(
                va.value == crash_value(i, CRASH_VALUE_LEN)
                    && vb.value == crash_value(i, CRASH_VALUE_LEN),
                "value {i}"
            );
        }
        eprintln!(
            "round {round}: member m{member} and the writer killed after {acks} acks; \
             {committed} transactions in etcd, {acked} acknowledged"
        );
    }
    assert!(acked >= 12, "only {acked} writes in 6 rounds");
}
