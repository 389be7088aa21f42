//! Live state across replicas. What nodes report (probe verdicts, applied
//! versions, counters, flow events) and whether they are connected is live
//! state, kept in memory by the replica each node is connected to. Replicas
//! on a shared store register there ([`crate::store::Store::announce`], an
//! etcd key under a lease that ends with the replica) and each streams its
//! nodes' live state to every other (`Replica.WatchLive`, mutual TLS with a
//! certificate only a CA holder can issue). So health verdicts, `sluicectl
//! get nodes`, `sluicectl flows` and the dashboard are the whole cluster's on
//! every replica, within a report interval.
//!
//! The live state goes replica to replica, not through etcd: counters and
//! flow events change every second on every node, and each etcd write is a
//! revision its history keeps until compaction.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sluice_api::v1;
use tokio::sync::{broadcast, broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{AbortOnDrop, Control, NodeLive, health::Vote};
use crate::error::ApiError;

/// How long a peer's certificate is valid; each connection gets a fresh one.
const PEER_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Wait before connecting to a peer again.
const RECONNECT: Duration = Duration::from_secs(1);

/// This replica's part in sharing live state.
pub struct Peers {
    /// This replica's id in the registry: random, new at each start.
    pub id: String,
    /// The nodes connected to other replicas: replica id → node → live state.
    remote: Mutex<BTreeMap<String, BTreeMap<String, NodeLive>>>,
    /// What this replica's nodes do, for the other replicas' streams.
    events: broadcast::Sender<Arc<v1::LiveUpdate>>,
}

impl Default for Peers {
    fn default() -> Self {
        let mut id = [0u8; 6];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Self {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            remote: Mutex::default(),
            events: broadcast::channel(4096).0,
        }
    }
}

impl Peers {
    fn remote(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, NodeLive>>> {
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `node`'s whole live state as an update: what a peer starts from.
fn complete_update(node: &str, live: &NodeLive) -> v1::LiveUpdate {
    v1::LiveUpdate {
        node: node.to_owned(),
        watchers: live.watchers,
        report: live.last_report.map(|_| v1::ReportStatusRequest {
            applied_version: live.applied_version,
            counters: live
                .counters
                .iter()
                .map(v1::FrontendCounters::from)
                .collect(),
            unhealthy: live.unhealthy.iter().map(v1::BackendRef::from).collect(),
            policy_counters: live
                .policy_counters
                .iter()
                .map(v1::PolicyCounter::from)
                .collect(),
            ..Default::default()
        }),
        reported_unix_ms: live.last_report.map_or(0, unix_ms),
    }
}

/// Folds `other`, the same node's state on another replica, into `into`:
/// connected where either has it connected; the rest from the latest report.
fn merge(into: &mut NodeLive, other: &NodeLive) {
    let watchers = into.watchers + other.watchers;
    if other.last_report > into.last_report {
        *into = other.clone();
    }
    into.watchers = watchers;
}

impl Control {
    /// Every node's live state, from whichever replica it is connected to.
    pub(super) fn cluster_live(&self) -> BTreeMap<String, NodeLive> {
        let mut all = self.live().clone();
        for nodes in self.peers.remote().values() {
            for (name, theirs) in nodes {
                match all.get_mut(name) {
                    Some(mine) => merge(mine, theirs),
                    None => {
                        all.insert(name.clone(), theirs.clone());
                    }
                }
            }
        }
        all
    }

    /// One node's live state, from whichever replica it is connected to.
    pub(super) fn node_live(&self, name: &str) -> NodeLive {
        let mut live = self.live().get(name).cloned().unwrap_or_default();
        for nodes in self.peers.remote().values() {
            if let Some(theirs) = nodes.get(name) {
                merge(&mut live, theirs);
            }
        }
        live
    }

    /// Each prober's vote, from whichever replica it is connected to (no
    /// counters copied: this runs on every verdict change).
    pub(super) fn votes(&self) -> BTreeMap<String, Vote> {
        let mut votes: BTreeMap<String, (Option<SystemTime>, Vote)> = BTreeMap::new();
        let mut add = |name: &str, live: &NodeLive| {
            let (reported, vote) = votes.entry(name.to_owned()).or_default();
            vote.connected |= live.watchers > 0;
            if live.last_report > *reported {
                *reported = live.last_report;
                vote.unhealthy = live.unhealthy.clone();
            }
        };
        for (name, live) in self.live().iter() {
            add(name, live);
        }
        for nodes in self.peers.remote().values() {
            for (name, live) in nodes {
                add(name, live);
            }
        }
        votes.into_iter().map(|(n, (_, v))| (n, v)).collect()
    }

    /// Tells the other replicas what `node` just did here (a report, or a
    /// watch opened or closed); costs nothing while none listens.
    pub(super) fn share_live(&self, node: &str, report: Option<&v1::ReportStatusRequest>) {
        if self.peers.events.receiver_count() == 0 {
            return;
        }
        let watchers = self.live().get(node).map_or(0, |l| l.watchers);
        let _ = self.peers.events.send(Arc::new(v1::LiveUpdate {
            node: node.to_owned(),
            watchers,
            report: report.cloned(),
            reported_unix_ms: unix_ms(SystemTime::now()),
        }));
    }

    /// The live state of this replica's nodes: each complete, then every
    /// change (after falling behind, everything again).
    pub fn watch_live(self: &Arc<Self>) -> ReceiverStream<Result<v1::LiveUpdate, Status>> {
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before the snapshot: a change in between comes twice
        // (harmless: reports are idempotent), never not at all.
        let mut events = self.peers.events.subscribe();
        let control = self.clone();
        tokio::spawn(async move {
            let mut snapshot = true;
            loop {
                if std::mem::take(&mut snapshot) {
                    let all: Vec<v1::LiveUpdate> = control
                        .live()
                        .iter()
                        .map(|(name, live)| complete_update(name, live))
                        .collect();
                    for update in all {
                        if tx.send(Ok(update)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    event = events.recv() => match event {
                        Ok(update) => {
                            if tx.send(Ok((*update).clone())).await.is_err() {
                                return;
                            }
                        }
                        Err(RecvError::Lagged(_)) => snapshot = true,
                        Err(RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// Takes in what a peer says of one of its nodes.
    fn take_peer_update(&self, peer: &str, update: v1::LiveUpdate) {
        let v1::LiveUpdate {
            node,
            watchers,
            report,
            reported_unix_ms,
        } = update;
        let received = UNIX_EPOCH + Duration::from_millis(reported_unix_ms);
        let mut remote = self.peers.remote();
        let entry = remote
            .entry(peer.to_owned())
            .or_default()
            .entry(node.clone())
            .or_default();
        let was_connected = entry.watchers > 0;
        entry.watchers = watchers;
        let (flows, verdicts_changed) = match report {
            Some(report) => entry.take_report(&node, report, received),
            None => (Vec::new(), false),
        };
        let rejudge = verdicts_changed || was_connected != (watchers > 0);
        drop(remote);
        self.flows.record(&node, flows);
        if rejudge {
            self.judge_health();
        }
    }

    /// Forgets what a peer said (it is gone, or its stream broke: it sends
    /// everything again when it is back).
    fn forget_peer(&self, peer: &str) {
        if self.peers.remote().remove(peer).is_some() {
            self.judge_health();
        }
    }

    /// A node removed from the cluster is forgotten by every replica.
    pub(super) fn forget_node(&self, node: &str) {
        self.live().remove(node);
        for nodes in self.peers.remote().values_mut() {
            nodes.remove(node);
        }
    }

    /// Registers this replica at `address` (a shared store only) and keeps
    /// a stream from every other registered replica while it is registered.
    pub(super) fn join_peers(self: &Arc<Self>, address: String) {
        let Some(mut registry) = self.store.announce(&self.peers.id, &address) else {
            return;
        };
        tracing::info!(replica = %self.peers.id, %address, "registered as a control replica");
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut following: HashMap<String, (String, AbortOnDrop)> = HashMap::new();
            loop {
                let replicas = registry.borrow_and_update().clone();
                let Some(control) = weak.upgrade() else {
                    return;
                };
                following.retain(|peer, (address, _)| {
                    let keep = replicas.get(peer) == Some(address);
                    if !keep {
                        tracing::info!(%peer, "control replica left");
                        control.forget_peer(peer);
                    }
                    keep
                });
                for (peer, address) in replicas {
                    if peer == control.peers.id || following.contains_key(&peer) {
                        continue;
                    }
                    tracing::info!(%peer, %address, "following a control replica");
                    let task = tokio::spawn(follow_peer(
                        Arc::downgrade(&control),
                        peer.clone(),
                        address.clone(),
                    ));
                    following.insert(peer, (address, AbortOnDrop(task)));
                }
                drop(control);
                if registry.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// The calling replica, if it presents a replica certificate.
    fn authenticate_replica<T>(&self, request: &Request<T>) -> Result<String, ApiError> {
        match self.authenticate_any(request)? {
            sluice_pki::Identity::User { name, groups }
                if groups.iter().any(|g| g == sluice_pki::REPLICAS_GROUP) =>
            {
                Ok(name)
            }
            other => Err(ApiError::Unauthenticated {
                reason: format!("{other}: this call is for control replicas"),
            }),
        }
    }
}

/// Follows one peer's stream until the peer leaves the registry (the task
/// is aborted) or this replica stops.
async fn follow_peer(control: std::sync::Weak<Control>, peer: String, address: String) {
    loop {
        let Some(me) = control.upgrade() else {
            return;
        };
        let stream = async {
            let keys = sluice_pki::new_key_and_csr(&format!("replica-{}", me.peers.id))?;
            let issued = me
                .ca
                .sign_replica(&keys.csr_pem, &me.peers.id, PEER_CERT_TTL)?;
            let channel =
                sluice_pki::mtls_channel(&address, &me.ca.cert_pem(), &issued.pem, &keys.key_pem)
                    .await?;
            let mut client = v1::replica_client::ReplicaClient::new(channel)
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES);
            let request = v1::WatchLiveRequest {
                replica: me.peers.id.clone(),
            };
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                client.watch_live(request).await?.into_inner(),
            )
        }
        .await;
        drop(me);
        match stream {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(update)) => {
                        let Some(me) = control.upgrade() else {
                            return;
                        };
                        me.take_peer_update(&peer, update);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%peer, "live stream from a replica ended: {e}");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(%peer, %address, "connecting to a replica: {e}"),
        }
        if let Some(me) = control.upgrade() {
            me.forget_peer(&peer);
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

#[cfg(test)]
mod tests;

pub struct ReplicaApi(pub Arc<Control>);

#[tonic::async_trait]
impl v1::replica_server::Replica for ReplicaApi {
    type WatchLiveStream = ReceiverStream<Result<v1::LiveUpdate, Status>>;

    async fn watch_live(
        &self,
        request: Request<v1::WatchLiveRequest>,
    ) -> Result<Response<Self::WatchLiveStream>, Status> {
        let caller = self.0.authenticate_replica(&request)?;
        tracing::info!(%caller, "a control replica follows this one's live state");
        Ok(Response::new(self.0.watch_live()))
    }
}
