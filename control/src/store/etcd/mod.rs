//! The replicated store: the control service's state in an etcd (v3) cluster.
//!
//! # Mapping
//! - **Keys.** A [`Key`] is stored at `<prefix><kind>/<namespace>/<name>` (prefix `/sluice/` by
//!   default, ending with `/`), readable with `etcdctl get --prefix /sluice/`. Key parts may
//!   contain `/` ([`Key::validate`] forbids only NUL), so each part is escaped: `%` becomes `%25`
//!   and `/` becomes `%2F`. Escaped parts hold no `/`, so the encoding is injective and the keys
//!   of a kind, or of a kind and namespace, are exactly those under `<prefix><kind>/` or
//!   `<prefix><kind>/<namespace>/`: one range read. etcd returns a range in byte order, which is
//!   not `(namespace, name)` order (`-` and `.` sort below `/`: `web-1/…` before `web/…`), so a
//!   list sorts what it read by key. Two stores must not use nested prefixes.
//! - **Revisions.** The store's revision is etcd's, and a value's version is its
//!   `mod_revision`: the revision of the etcd transaction that last wrote it, as the [`Store`]
//!   contract asks. A commit advances etcd's revision by exactly one, so the store's revision
//!   advances by one per committed write transaction *as long as nothing else writes to that
//!   etcd cluster*; keys written beside it (another prefix, another program) advance it too.
//!   Versions stay what the contract needs them to be: unique per transaction and ordered
//!   ("written after revision r" is still `version > r`). A new prefix on a used etcd starts at
//!   whatever revision etcd is at.
//! - **Read transactions** are snapshots: [`Store::begin_read`] fetches the current revision
//!   (one linearizable read) and every read of the transaction asks etcd for that revision. A
//!   snapshot lasts as long as etcd keeps its revision: once etcd compacts past it, its reads
//!   fail (`mvcc: required revision has been compacted`). Snapshots are short here.
//! - **Write transactions are optimistic.** They read at the revision they began at (their
//!   *base*), buffer their writes (visible to their own later reads, with version
//!   `revision() + 1`) and check each [`Expect`](crate::store::Expect) at once against that state, so a failed
//!   expectation dooms the transaction as in the embedded store. `commit` sends **one** etcd
//!   `Txn`: its compares are every expectation that was checked against the base
//!   (`Absent`: `create_revision == 0`; `Version(v)`: `mod_revision == v`) and the **sentinel**,
//!   its success branch the buffered writes plus a write of the sentinel.
//!
//! # The sentinel
//! `<prefix>last-commit` is a key that every write transaction writes, so its `mod_revision` is
//! the revision of the last committed write transaction under the prefix. A transaction compares
//! it with the value it had at the base revision. Per-key compares alone cannot make "read,
//! decide, write" atomic: a transaction's decision also rests on what it read without writing
//! (a list of VIPs in use, a token it checked, a key it found absent and did not create), and
//! etcd has no compare for "this range is unchanged". The sentinel covers all of it with one
//! compare, so write transactions are serializable among all writers of the prefix, in any
//! process. The price is that two writers of one prefix never commit concurrently, which a
//! control plane's write rate does not feel. Within one process, writers wait for each other
//! (as [`Store::begin_write`] documents), so only writers in different processes race.
//!
//! # Raced and Conflict
//! When the `Txn` fails, its failure branch reads the sentinel and every compared key in the
//! same etcd transaction, so the store knows which compare failed without a second round trip:
//! - an expectation the caller wrote no longer holds → [`StoreError::Conflict`] with the version
//!   found, as the embedded store reports it;
//! - only the sentinel moved → [`StoreError::Raced`]: another writer committed after this
//!   transaction's base; it wrote nothing, and running it again on fresh state is correct.
//!
//! When both failed (another replica changed a key this transaction expected), `Conflict` wins:
//! the expectation is false on fresh state too, so a retry would only find that out. A
//! transaction that wrote nothing sends nothing and returns its base revision.
//!
//! # Durability
//! etcd acknowledges a `Txn` once it is committed in the Raft log: appended and fsync'd to the
//! write-ahead log of a majority of members. An acknowledged write therefore survives `kill -9`
//! of the writer and of any minority of members (the tests kill one member and the writer), and
//! power loss of a minority; an etcd transaction is applied whole or not at all. A commit whose
//! answer is lost (timeout, connection lost after sending) may or may not have been applied:
//! [`StoreError::CommitFailed`]. Unlike the embedded store, this store stays usable afterwards;
//! the caller should reload its state before trusting its own copy. So a commit is sent once,
//! unless it never left (the connection to the member it was routed to was refused: another
//! member gets it); one etcd refused outright (too many operations, say) is
//! [`StoreError::Backend`] and certainly not applied. Reads are sent again, up to three times,
//! when no member answered.
//!
//! # Connections
//! The client balances over every endpoint given, connects lazily and pings idle connections;
//! with [`EtcdTls`] it checks members' certificates against its CA and presents its own (etcd's
//! `--client-cert-auth`). It requires a leader, so a member cut off from the others fails
//! requests at once instead of holding them. Errors name the endpoints and the operation.
//!
//! # Limits
//! etcd refuses a `Txn` with more than `--max-txn-ops` (default 128) compares or writes and
//! requests over `--max-request-bytes` (1.5 MiB): a write transaction's writes plus one (the
//! sentinel) must fit. Deployments with large applies raise `--max-txn-ops`.
//!
//! # Blocking
//! etcd-client is async; the [`Store`] trait is not. Each store owns a one-worker tokio runtime
//! and runs every request there, waiting for the answer on a plain channel: that works from a
//! `spawn_blocking` thread of another runtime and from plain threads, and only stalls (does not
//! panic) when called on an async worker. Every request is bounded ([`REQUEST_TIMEOUT`]).

mod error;
mod follow;
mod keys;
mod replicas;
mod tx;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, Identity, KvClient, TlsOptions,
};

pub use error::EtcdError;
use keys::Layout;
pub use keys::{EtcdUrlError, parse_etcd_url};

use super::{BackendError, Key, ReadTx, Store, StoreError, WriteTx};

/// The prefix of [`EtcdStore::connect`] when the operator names none.
pub const DEFAULT_PREFIX: &str = "/sluice/";
/// Bound on establishing a connection to one endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on each request, from sending it to its answer (including the wait for a connection).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Keys per range request: a list of a large kind reads in pages, all at one revision.
const PAGE: i64 = 500;
/// Large enough for a page of large values; etcd itself refuses requests over 1.5 MiB.
const MAX_MESSAGE: usize = 64 << 20;
/// Reads are retried this often when no member answered (one was just killed, say).
const READ_ATTEMPTS: u32 = 3;

/// The client certificate, its key and the CA etcd's server certificates are checked against.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("EtcdTls").finish_non_exhaustive()
    }
}

/// The replicated [`Store`]: see the module documentation.
pub struct EtcdStore {
    client: Client,
    layout: Layout,
    /// The endpoints as errors name them.
    endpoints: Arc<str>,
    /// Write transactions of this process wait here for each other.
    writer: Mutex<()>,
    /// Last: the client's tasks run on it until the client is dropped.
    runtime: OwnedRuntime,
}

/// A runtime that, dropped, stops without waiting for its tasks: a plain `Runtime` blocks when
/// dropped, which panics on an async worker (where the server may drop its store, or fail to
/// connect one).
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &String::from_utf8_lossy(self.layout.prefix()))
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`HOST:PORT`, see [`parse_etcd_url`]; with
    /// `tls`, over TLS with a client certificate) and checks that it answers, within
    /// [`CONNECT_TIMEOUT`] and [`REQUEST_TIMEOUT`]. The store's keys live under `prefix`
    /// ([`DEFAULT_PREFIX`] unless several stores share one cluster), which must end with `/`.
    pub fn connect(
        endpoints: &[String],
        tls: Option<EtcdTls>,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let connect_error = |e: EtcdError| StoreError::Backend {
            op: "connect",
            source: BackendError::Etcd(e),
        };
        let layout = Layout::new(prefix).map_err(connect_error)?;
        if endpoints.is_empty() {
            return Err(connect_error(EtcdError::NoEndpoints));
        }
        let names: Arc<str> = endpoints.join(",").into();
        let runtime = OwnedRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("sluice-etcd")
                .enable_all()
                .build()
                .map_err(|source| connect_error(EtcdError::Runtime { source }))?,
        ));
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // A member cut off from the others fails requests at once instead of holding them.
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3));
        if let Some(tls) = tls {
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(tls.ca_pem))
                    .identity(Identity::from_pem(tls.cert_pem, tls.key_pem)),
            );
        }
        let owned: Vec<String> = endpoints.to_vec();
        let client = run(&runtime, &names, CONNECT_TIMEOUT, async move {
            Client::connect(owned, Some(options)).await
        })
        .map_err(connect_error)?;
        let store = Self {
            client,
            layout,
            endpoints: names,
            writer: Mutex::new(()),
            runtime,
        };
        // The client connects lazily: this first read is the check that etcd answers.
        let head = store.head().map_err(|e| match e {
            StoreError::Backend { source, .. } => StoreError::Backend {
                op: "connect",
                source,
            },
            other => other,
        })?;
        tracing::info!(
            endpoints = %store.endpoints,
            prefix = %String::from_utf8_lossy(store.layout.prefix()),
            revision = head.revision,
            "etcd store connected"
        );
        Ok(store)
    }

    /// The endpoints, comma-separated, as errors name them.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE)
    }

    /// Runs one request on the store's runtime, bounded by [`REQUEST_TIMEOUT`].
    fn request<T, F>(&self, fut: F) -> Result<T, EtcdError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        run(&self.runtime, &self.endpoints, REQUEST_TIMEOUT, fut)
    }

    /// A read, sent again (briefly later) when no member answered it.
    fn read_request<T, F>(&self, op: &'static str, make: impl Fn() -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let mut attempt = 1;
        loop {
            match self.request(make()) {
                Ok(out) => return Ok(out),
                Err(e) if e.unanswered() && attempt < READ_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "etcd read unanswered; retrying");
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
                    attempt += 1;
                }
                Err(e) => {
                    return Err(StoreError::Backend {
                        op,
                        source: BackendError::Etcd(e),
                    });
                }
            }
        }
    }

    /// The current revision and the sentinel's `mod_revision` at it (0: never written).
    fn head(&self) -> Result<Head, StoreError> {
        let sentinel = self.layout.sentinel();
        let kv = self.kv();
        let resp = self.read_request("read", || {
            let (mut kv, key) = (kv.clone(), sentinel.clone());
            async move { kv.get(key, Some(GetOptions::new().with_keys_only())).await }
        })?;
        let revision = resp
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| self.malformed("read", "a header"))?;
        Ok(Head {
            revision: self.revision_from(revision, "read")?,
            sentinel: resp.kvs().first().map_or(0, |kv| kv.mod_revision()),
        })
    }

    /// The `mod_revision` and value under `key` at `revision`.
    fn get_at(
        &self,
        key: &Key,
        revision: u64,
        keys_only: bool,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        key.validate()?;
        let raw = self.layout.key(key);
        let at = self.etcd_revision(revision)?;
        let kv = self.kv();
        let mut resp = self.read_request("read", || {
            let (mut kv, raw) = (kv.clone(), raw.clone());
            let mut options = GetOptions::new().with_revision(at);
            if keys_only {
                options = options.with_keys_only();
            }
            async move { kv.get(raw, Some(options)).await }
        })?;
        match resp.take_kvs().into_iter().next() {
            Some(found) => {
                let version = self.revision_from(found.mod_revision(), "read")?;
                Ok(Some((version, found.into_key_value().1)))
            }
            None => Ok(None),
        }
    }

    /// Every value of `kind` (in `namespace`) at `revision`, in key order.
    fn list_at(
        &self,
        kind: &str,
        namespace: Option<&str>,
        revision: u64,
    ) -> Result<Vec<(Key, super::Versioned)>, StoreError> {
        // Validate the selector as a key with a placeholder name.
        Key::new(kind, namespace.unwrap_or(""), "-").validate()?;
        let (mut start, end) = self.layout.range(kind, namespace);
        let at = self.etcd_revision(revision)?;
        let kv = self.kv();
        let mut out = Vec::new();
        loop {
            let mut resp = self.read_request("range", || {
                let (mut kv, start, end) = (kv.clone(), start.clone(), end.clone());
                async move {
                    let options = GetOptions::new()
                        .with_range(end)
                        .with_revision(at)
                        .with_limit(PAGE);
                    kv.get(start, Some(options)).await
                }
            })?;
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            // The next page starts right after this one's last key.
            start = last.key().to_vec();
            start.push(0);
            for found in kvs {
                let key = self.layout.decode(found.key())?;
                let version = self.revision_from(found.mod_revision(), "range")?;
                out.push((
                    key,
                    super::Versioned {
                        version,
                        value: found.into_key_value().1,
                    },
                ));
            }
            if !more {
                break;
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn malformed(&self, op: &'static str, what: &'static str) -> StoreError {
        StoreError::Backend {
            op,
            source: BackendError::Etcd(EtcdError::Malformed {
                endpoints: self.endpoints.clone(),
                what,
            }),
        }
    }

    /// An etcd revision as a store revision: etcd's are positive.
    fn revision_from(&self, revision: i64, op: &'static str) -> Result<u64, StoreError> {
        u64::try_from(revision)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| self.malformed(op, "a positive revision"))
    }

    fn etcd_revision(&self, revision: u64) -> Result<i64, StoreError> {
        i64::try_from(revision).map_err(|_| self.malformed("read", "a revision below 2^63"))
    }
}

/// The state a transaction starts from.
#[derive(Clone, Copy, Debug)]
struct Head {
    revision: u64,
    sentinel: i64,
}

/// Runs `fut` on `runtime` within `timeout` and waits for it on a plain channel, so that the
/// caller may be any thread, including a `spawn_blocking` thread of another runtime.
fn run<T, F>(
    runtime: &OwnedRuntime,
    endpoints: &Arc<str>,
    timeout: Duration,
    fut: F,
) -> Result<T, EtcdError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
{
    let runtime = runtime.0.as_ref().ok_or(EtcdError::RuntimeGone)?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let names = endpoints.clone();
    runtime.spawn(async move {
        let out = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(source)) => Err(EtcdError::Request {
                endpoints: names,
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: names,
                timeout,
            }),
        };
        // The caller waits for this; if it is gone there is no one to tell.
        let _ = tx.send(out);
    });
    rx.recv().map_err(|_| EtcdError::RuntimeGone)?
}

impl Store for EtcdStore {
    fn follow(
        &self,
        after: u64,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<Result<crate::store::Changes, StoreError>>>
    {
        Some(self.watch_changes(after))
    }

    fn announce(
        &self,
        id: &str,
        address: &str,
    ) -> Option<tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>> {
        Some(self.announce_replica(id, address))
    }

    fn begin_read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError> {
        let head = self.head()?;
        Ok(Box::new(tx::EtcdReadTx::new(self, head)))
    }

    fn begin_write(&self) -> Result<Box<dyn WriteTx + '_>, StoreError> {
        // The guard protects no data, so a panicked holder left nothing inconsistent.
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.head()?;
        Ok(Box::new(tx::EtcdWriteTx::new(self, guard, head)))
    }
}
