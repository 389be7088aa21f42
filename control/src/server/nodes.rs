//! `NodeAgent`: how nodes join, keep their certificates fresh, follow their
//! view and report back.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sluice_api::v1;
use sluice_pki as pki;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use sluice_model::Node;
use sluice_model::observe::{BackendRef, FlowEvent, FrontendCounters, PolicyCounter};
use sluice_model::view::FrontendKey;

use super::{
    Control, NodeLive,
    state::{TokenRecord, tables},
};
use crate::{
    error::ApiError,
    store::{Expect, Key},
};

pub struct NodeAgentApi(pub Arc<Control>);

impl Control {
    /// Proves the token once and signs the node's certificate; the token is
    /// consumed and the node recorded in one transaction, so a token joins
    /// exactly one node even if two agents race with it.
    pub async fn join(&self, req: v1::JoinRequest) -> Result<v1::JoinResponse, ApiError> {
        let token_error = |reason: &str| ApiError::Token {
            reason: reason.to_string(),
        };
        let (id, _) = pki::parse_token(&req.token).map_err(|_| {
            token_error("malformed (expected <id>.<secret>, as `sluicectl token create` prints it)")
        })?;
        sluice_pki::validate_name("node", &req.node_name)?;
        let (version, bytes) = self
            .read_raw(&Key::cluster(tables::TOKEN, &id))?
            .ok_or_else(|| token_error("unknown token"))?;
        let record: TokenRecord = serde_json::from_slice(&bytes)
            .map_err(|_| token_error("the stored token is unreadable"))?;
        if !pki::verify_token_secret(&req.token, &id, &record.secret_hash) {
            return Err(token_error("unknown token"));
        }
        if let Some(node) = &record.used_by {
            return Err(token_error(&format!(
                "already used (node \"{node}\" joined with it); create a new one"
            )));
        }
        let now = SystemTime::now();
        if now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) >= record.expires {
            return Err(token_error("expired; create a new one"));
        }
        if self.state().nodes.contains_key(&req.node_name) {
            return Err(ApiError::AlreadyExists {
                kind: "Node",
                name: req.node_name,
                hint: "; remove it first (sluicectl node remove)",
            });
        }
        let issued = self
            .ca
            .sign_node(&req.csr_pem, &req.node_name, self.options.node_cert_ttl)?;
        let node = req.node_name.clone();
        let node_record = Node {
            name: node.clone(),
            zone: (!req.zone.is_empty()).then(|| req.zone.clone()),
            serials: vec![issued.serial.clone()],
            certificate_expires: issued.not_after,
            joined_at: now,
        };
        let used = TokenRecord {
            used_by: Some(node.clone()),
            ..record
        };
        self.mutate(false, move |draft| {
            draft.put_token(&id, &used, Expect::Version(version))?;
            draft.put_node(node_record.clone(), Expect::Absent);
            Ok(())
        })
        .await
        .map_err(|e| match e {
            // Another join won the race for this token or this name.
            ApiError::Conflict {
                kind: "join token", ..
            } => token_error("already used"),
            ApiError::Conflict {
                kind: "Node", name, ..
            } => ApiError::AlreadyExists {
                kind: "Node",
                name,
                hint: "",
            },
            other => other,
        })?;
        tracing::info!(node = %req.node_name, zone = %req.zone, serial = %issued.serial, "node joined");
        Ok(v1::JoinResponse {
            certificate_pem: issued.pem,
            ca_pem: self.ca.cert_pem(),
        })
    }

    /// A fresh certificate for a member; the previous one stays valid until
    /// the next renewal, so connections made with it are not cut.
    pub async fn renew(&self, node: String, csr_pem: &str) -> Result<String, ApiError> {
        let issued = self
            .ca
            .sign_node(csr_pem, &node, self.options.node_cert_ttl)?;
        let serial = issued.serial.clone();
        let expires = issued.not_after;
        let name = node.clone();
        self.mutate(false, move |draft| {
            let Some(stored) = draft.state.nodes.get(&name).cloned() else {
                return Err(ApiError::NotFound {
                    kind: "Node",
                    name: name.clone(),
                });
            };
            let mut serials = vec![serial.clone()];
            serials.extend(stored.object.serials.first().cloned());
            let renewed = Node {
                serials,
                certificate_expires: expires,
                ..stored.object
            };
            draft.put_node(renewed, Expect::Version(stored.version));
            Ok(())
        })
        .await?;
        tracing::info!(%node, serial = %issued.serial, "renewed a node certificate");
        Ok(issued.pem)
    }

    /// The stream of view updates for `node` from `since`.
    pub fn watch(
        self: &Arc<Self>,
        node: String,
        since: u64,
    ) -> ReceiverStream<Result<v1::ViewUpdate, Status>> {
        let (tx, rx) = mpsc::channel(64);
        // Subscribe before reading the state: an update published in between
        // is then both in the catch-up and in the channel, and deduplicated
        // by version, never lost.
        let mut updates = self.updates.subscribe();
        let mut removed = self.removed_nodes.subscribe();
        let state = self.state();
        // The watch encoder: the history is domain updates; each goes on
        // the wire once per stream (live ones arrive encoded once for all).
        let catch_up: Vec<v1::ViewUpdate> = match state.history.since(since, state.view.version) {
            Some(missed) => missed.iter().map(|u| v1::ViewUpdate::from(&**u)).collect(),
            None => vec![v1::ViewUpdate::from(&state.view)],
        };
        self.live().entry(node.clone()).or_default().watchers += 1;
        self.share_live(&node, None);
        let control = self.clone();
        tokio::spawn(async move {
            let _watching = Watching {
                control: control.clone(),
                node: node.clone(),
            };
            let mut last = since;
            for update in catch_up {
                last = update.version;
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
            }
            loop {
                tokio::select! {
                    update = updates.recv() => match update {
                        Ok(u) if u.version > last => {
                            last = u.version;
                            if tx.send(Ok((*u).clone())).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // Fell behind: start over from the whole view.
                        Err(RecvError::Lagged(_)) => {
                            let state = control.state();
                            last = state.view.version;
                            if tx.send(Ok(v1::ViewUpdate::from(&state.view))).await.is_err() {
                                return;
                            }
                        }
                        Err(RecvError::Closed) => return,
                    },
                    gone = removed.recv() => {
                        if matches!(&gone, Ok(name) if *name == node) {
                            let _ = tx.send(Err(Status::permission_denied(format!(
                                "node \"{node}\" was removed from the cluster; its certificate is revoked"
                            )))).await;
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }

    /// Takes in a node's report (and passes it on to the other replicas).
    pub fn report(&self, node: &str, req: v1::ReportStatusRequest) {
        self.metrics.record_flow_events(req.flows.len());
        self.share_live(node, Some(&req));
        let mut live = self.live();
        let (flows, verdicts_changed) =
            live.entry(node.to_string())
                .or_default()
                .take_report(node, req, SystemTime::now());
        drop(live);
        self.flows.record(node, flows);
        if verdicts_changed {
            self.judge_health();
        }
    }
}

impl NodeLive {
    /// Takes in what `node` reported at `received`, here or on another
    /// replica; returns its flow events and whether its probe verdicts
    /// changed. What does not read (from an agent of another version) is
    /// left out and logged; the rest still counts.
    pub(super) fn take_report(
        &mut self,
        node: &str,
        req: v1::ReportStatusRequest,
        received: SystemTime,
    ) -> (Vec<FlowEvent>, bool) {
        let v1::ReportStatusRequest {
            applied_version,
            counters,
            unhealthy,
            flows,
            policy_counters,
            flows_only,
            counters_changed_only,
            counters_gone,
        } = req;
        let flows: Vec<FlowEvent> = readable(node, "flow event", flows);
        if flows_only {
            return (flows, false);
        }
        let counters: Vec<FrontendCounters> = readable(node, "counters", counters);
        let unhealthy: super::health::Unhealthy =
            readable::<_, BackendRef>(node, "probe verdict", unhealthy)
                .into_iter()
                .collect();
        self.applied_version = applied_version;
        if counters_changed_only {
            merge_counters(&mut self.counters, counters, &gone(node, counters_gone));
        } else {
            self.counters = counters;
            self.counters.sort_by_key(|c| c.key);
        }
        self.policy_counters = policy_counters
            .into_iter()
            .map(PolicyCounter::from)
            .collect();
        self.last_report = Some(received);
        let changed = self.unhealthy != unhealthy;
        self.unhealthy = unhealthy;
        (flows, changed)
    }
}

/// The frontends a node reports it no longer has.
fn gone(node: &str, keys: Vec<v1::FrontendKey>) -> Vec<FrontendKey> {
    keys.into_iter()
        .filter_map(|key| {
            FrontendKey::try_from(key)
                .inspect_err(
                    |e| tracing::warn!(%node, "ignoring a frontend the node reported gone: {e}"),
                )
                .ok()
        })
        .collect()
}

/// A report of what changed, merged into what the node reported before:
/// changed frontends replace theirs, gone ones leave; the order stays the
/// frontends' order.
fn merge_counters(
    held: &mut Vec<FrontendCounters>,
    changed: Vec<FrontendCounters>,
    gone: &[FrontendKey],
) {
    let mut by_key: std::collections::BTreeMap<FrontendKey, FrontendCounters> =
        std::mem::take(held)
            .into_iter()
            .map(|c| (c.key, c))
            .collect();
    for key in gone {
        by_key.remove(key);
    }
    for c in changed {
        by_key.insert(c.key, c);
    }
    *held = by_key.into_values().collect();
}

/// The entries of a report that read as domain values.
fn readable<W, D>(node: &str, what: &str, entries: Vec<W>) -> Vec<D>
where
    D: TryFrom<W, Error = sluice_model::wire::ReportError>,
{
    entries
        .into_iter()
        .filter_map(|entry| {
            D::try_from(entry)
                .inspect_err(|e| tracing::warn!(%node, "ignoring a {what} the node reported: {e}"))
                .ok()
        })
        .collect()
}

/// Marks a node connected while one of its watch streams is open.
struct Watching {
    control: Arc<Control>,
    node: String,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if let Some(live) = self.control.live().get_mut(&self.node) {
            live.watchers = live.watchers.saturating_sub(1);
        }
        self.control.share_live(&self.node, None);
        // A prober that is gone has no vote any more.
        self.control.judge_health();
    }
}

/// The default validity of node certificates; agents renew at two thirds.
pub const DEFAULT_NODE_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

#[tonic::async_trait]
impl v1::node_agent_server::NodeAgent for NodeAgentApi {
    async fn join(
        &self,
        request: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        Ok(Response::new(self.0.join(request.into_inner()).await?))
    }

    async fn renew_certificate(
        &self,
        request: Request<v1::RenewCertificateRequest>,
    ) -> Result<Response<v1::RenewCertificateResponse>, Status> {
        let node = self.0.authenticate_node(&request)?;
        let pem = self.0.renew(node, &request.get_ref().csr_pem).await?;
        Ok(Response::new(v1::RenewCertificateResponse {
            certificate_pem: pem,
        }))
    }

    type WatchViewStream = ReceiverStream<Result<v1::ViewUpdate, Status>>;

    async fn watch_view(
        &self,
        request: Request<v1::WatchViewRequest>,
    ) -> Result<Response<Self::WatchViewStream>, Status> {
        let node = self.0.authenticate_node(&request)?;
        let since = request.get_ref().since_version;
        tracing::info!(%node, since, "watching its view");
        Ok(Response::new(self.0.watch(node, since)))
    }

    type WatchHealthStream = ReceiverStream<Result<v1::HealthUpdate, Status>>;

    async fn watch_health(
        &self,
        request: Request<v1::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        self.0.authenticate_node(&request)?;
        Ok(Response::new(self.0.watch_health()))
    }

    async fn report_status(
        &self,
        request: Request<v1::ReportStatusRequest>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let node = self.0.authenticate_node(&request)?;
        self.0.report(&node, request.into_inner());
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}

impl NodeLive {
    /// Whether the node reported within `within`.
    pub fn recent(&self, within: Duration) -> bool {
        self.last_report
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age <= within)
    }
}

#[cfg(test)]
mod tests {
    use sluice_api::v1;

    use super::super::Control;

    fn counters(last_octet: u8, packets: u64) -> v1::FrontendCounters {
        v1::FrontendCounters {
            service: Some(v1::ObjectName {
                namespace: "default".into(),
                name: format!("svc-{last_octet}"),
            }),
            vip: vec![198, 18, 0, last_octet],
            port: 80,
            protocol: v1::Protocol::Tcp as i32,
            counters: Some(v1::TrafficCounters {
                packets,
                ..Default::default()
            }),
            backends: Vec::new(),
        }
    }

    fn held(control: &Control) -> Vec<(u8, u64)> {
        control.live()["n1"]
            .counters
            .iter()
            .map(|c| (c.key.vip.octets()[3], c.counts.packets))
            .collect()
    }

    #[test]
    fn a_report_of_changes_is_merged_into_the_complete_one_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = Control::open_for_tests(dir.path());
        control.report(
            "n1",
            v1::ReportStatusRequest {
                counters: vec![counters(3, 30), counters(1, 10), counters(2, 20)],
                ..Default::default()
            },
        );
        assert_eq!(held(&control), [(1, 10), (2, 20), (3, 30)]);
        control.report(
            "n1",
            v1::ReportStatusRequest {
                counters: vec![counters(2, 25), counters(4, 1)],
                counters_changed_only: true,
                counters_gone: vec![v1::FrontendKey {
                    vip: "198.18.0.3".into(),
                    port: 80,
                    protocol: v1::Protocol::Tcp as i32,
                }],
                ..Default::default()
            },
        );
        assert_eq!(held(&control), [(1, 10), (2, 25), (4, 1)]);
        // A complete report replaces everything.
        control.report(
            "n1",
            v1::ReportStatusRequest {
                counters: vec![counters(5, 50)],
                ..Default::default()
            },
        );
        assert_eq!(held(&control), [(5, 50)]);
    }
}
