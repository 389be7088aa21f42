//! A joined node's link to the control service while it runs: the view as
//! applied, and the background tasks that follow it, report status, keep the
//! certificate fresh and save the view. Reports are the edge where the
//! agent's counters, probe verdicts and flow-log events become messages.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sluice_api::v1;
use sluice_model::error_chain;
use sluice_model::observe::{
    BackendCounters, BackendRef, FlowEvent, FrontendCounters, PolicyCounter, TrafficCounts,
};
use sluice_model::view::{FrontendKey, View};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{ControlClient, NodeState, ViewEvent, delta};
use crate::status::{self, ServiceReport};

/// How long flow-log events wait for company before they are reported.
const FLOW_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Flow-log events per report at most (the rest follow in the next).
const FLOW_BATCH_MAX: usize = 2_000;

/// What the link does with the view it follows.
pub trait Programmer {
    /// Programs `view`; an error leaves the maps as they were.
    fn program(&mut self, view: &View) -> Result<(), String>;
    /// Takes the control service's health verdicts.
    fn verdicts(&mut self, unhealthy: Vec<BackendRef>);
}

pub struct ControlLink {
    view: View,
    /// The version applied to the maps; where a reconnect resumes.
    applied: Arc<AtomicU64>,
    reports: watch::Sender<Option<v1::ReportStatusRequest>>,
    /// The last counters read, sent with each report.
    counters: Vec<FrontendCounters>,
    /// What this node's probes find unhealthy, sent with each report.
    unhealthy: Vec<BackendRef>,
    /// Network-policy verdict counters, sent with each report.
    policy_counters: Vec<PolicyCounter>,
    /// Flow-log events on their way to the control service (bounded: a
    /// flood loses events, never blocks the loop).
    flows: mpsc::Sender<FlowEvent>,
    saves: watch::Sender<Option<View>>,
    /// The view changed since it was last handed to the saver.
    unsaved: bool,
    /// Whether the last watch attempt connected; `None` before the first.
    connected: Option<bool>,
    /// Aborted when the link is dropped.
    tasks: Vec<JoinHandle<()>>,
    /// The one writer of the saved view; [`ControlLink::finish`] lets it end.
    saver: Option<JoinHandle<()>>,
}

impl ControlLink {
    pub fn start(state: NodeState, view: View) -> (Self, mpsc::Receiver<ViewEvent>) {
        let applied = Arc::new(AtomicU64::new(view.version));
        let (events_tx, events) = mpsc::channel(64);
        let (reports, reports_rx) = watch::channel(None);
        let (flows, flows_rx) = mpsc::channel(16_384);
        let (saves, saves_rx) = watch::channel(None);
        let tasks = vec![
            tokio::spawn(super::follow(state.clone(), applied.clone(), events_tx)),
            tokio::spawn(super::keep_certificate_fresh(state.clone())),
            tokio::spawn(report_status(state.clone(), reports_rx, flows_rx)),
        ];
        let saver = Some(tokio::spawn(save_views(state, saves_rx)));
        let link = ControlLink {
            view,
            applied,
            reports,
            counters: Vec::new(),
            unhealthy: Vec::new(),
            policy_counters: Vec::new(),
            flows,
            saves,
            unsaved: false,
            connected: None,
            tasks,
            saver,
        };
        (link, events)
    }

    /// The view version applied to the maps.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Handles what the view follower says. Updates go to the maps at once;
    /// the version is recorded (for resume and report) only once applied.
    pub fn handle(&mut self, event: ViewEvent, programmer: &mut impl Programmer) {
        match event {
            ViewEvent::Connected => {
                self.connected = Some(true);
                info!(since = self.applied(), "watching the node's view");
                // A restarted control service knows nothing of this node's
                // progress until told.
                self.report();
            }
            ViewEvent::Update(update) => {
                if update.snapshot {
                    // Rare after the first: a resume too old for the history.
                    info!(version = update.version, "took the whole view");
                }
                self.view.apply(update);
                match programmer.program(&self.view) {
                    Ok(()) => {
                        self.applied.store(self.view.version, Ordering::Release);
                        self.unsaved = true;
                        self.report();
                    }
                    // The maps keep the previous view; the next update, or a
                    // resume from the applied version, tries again.
                    Err(why) => tracing::error!(
                        version = self.view.version,
                        "view rejected, keeping the previous state: {why}"
                    ),
                }
            }
            ViewEvent::Unreadable { version, why } => {
                tracing::error!(version, "view rejected, keeping the previous state: {why}")
            }
            ViewEvent::Health(unhealthy) => programmer.verdicts(unhealthy),
            ViewEvent::Disconnected(why) => match self.connected.replace(false) {
                Some(true) => warn!(
                    version = self.view.version,
                    "lost the control service, forwarding with the last view: {why}"
                ),
                None => warn!(
                    version = self.view.version,
                    "cannot reach the control service yet, forwarding with the saved view: {why}"
                ),
                Some(false) => debug!("control service still unreachable: {why}"),
            },
            ViewEvent::Refused(why) => {
                tracing::error!(
                    version = self.view.version,
                    "the control service refused this node; forwarding continues with the last view, which no longer changes: {why}"
                );
            }
        }
    }

    /// Takes the counters just read and reports them.
    pub fn refresh_counters(
        &mut self,
        services: &[ServiceReport],
        service_of: impl Fn(&FrontendKey) -> Option<sluice_model::view::ServiceRef>,
        policy_counters: Vec<PolicyCounter>,
    ) {
        self.counters = to_counters(services, service_of);
        self.policy_counters = policy_counters;
        self.report();
    }

    fn report(&self) {
        self.reports.send_replace(Some(v1::ReportStatusRequest {
            applied_version: self.applied(),
            counters: self
                .counters
                .iter()
                .map(v1::FrontendCounters::from)
                .collect(),
            unhealthy: self.unhealthy.iter().map(v1::BackendRef::from).collect(),
            flows: Vec::new(),
            policy_counters: self
                .policy_counters
                .iter()
                .map(v1::PolicyCounter::from)
                .collect(),
            flows_only: false,
            // Complete here; the reporter sends what changed.
            counters_changed_only: false,
            counters_gone: Vec::new(),
        }));
    }

    /// Passes flow-log events on to the control service.
    /// Returns how many were lost (the queue to the control service full).
    pub fn report_flows(&self, events: Vec<FlowEvent>) -> u64 {
        let mut lost = 0;
        for event in events {
            if self.flows.try_send(event).is_err() {
                lost += 1;
            }
        }
        if lost > 0 {
            debug!(lost, "flow events arrive faster than they are reported");
        }
        lost
    }

    /// Reports this node's probe verdicts at once when they changed: the
    /// other nodes wait for them.
    pub fn report_health(&mut self, unhealthy: Vec<BackendRef>) {
        if unhealthy != self.unhealthy {
            self.unhealthy = unhealthy;
            self.report();
        }
    }

    /// Hands the view to the saver if it changed (at most once per call, so
    /// a burst of updates is written once).
    pub fn save_if_changed(&mut self) {
        if std::mem::take(&mut self.unsaved) {
            self.saves.send_replace(Some(self.view.clone()));
        }
    }

    /// A clean stop leaves the newest view for the next start: hands it to
    /// the saver, closes the channel and waits for the saver to write it.
    pub async fn finish(mut self) {
        self.save_if_changed();
        let saver = self.saver.take();
        drop(self);
        if let Some(saver) = saver
            && let Err(e) = saver.await
        {
            warn!("saving the view for restarts: {e}");
        }
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The counters an agent reports, each frontend named by the service the
/// view gave it (frontends the view no longer has are left out).
pub fn to_counters(
    services: &[ServiceReport],
    service_of: impl Fn(&FrontendKey) -> Option<sluice_model::view::ServiceRef>,
) -> Vec<FrontendCounters> {
    let counts = |t: &status::Traffic, active: u64| TrafficCounts {
        packets: t.packets,
        bytes: t.bytes,
        new_flows: t.new_flows,
        active_connections: active,
    };
    services
        .iter()
        .filter_map(|s| {
            let key = FrontendKey {
                vip: s.vip,
                port: s.port,
                protocol: s.protocol.parse().ok()?,
            };
            Some(FrontendCounters {
                service: service_of(&key)?,
                key,
                counts: counts(
                    &s.stats,
                    s.backends.iter().map(|b| b.active_connections).sum(),
                ),
                backends: s
                    .backends
                    .iter()
                    .map(|b| BackendCounters {
                        address: b.address.into(),
                        port: b.port,
                        counts: counts(&b.stats, b.active_connections),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// Sends each status the follow loop publishes, on a connection of its own
/// (re-made after a failure, with the current certificate). A report that
/// fails is not retried: the next one carries newer numbers.
async fn report_status(
    state: NodeState,
    mut reports: watch::Receiver<Option<v1::ReportStatusRequest>>,
    mut flows: mpsc::Receiver<FlowEvent>,
) {
    let mut client: Option<ControlClient> = None;
    let mut last: Option<v1::ReportStatusRequest> = None;
    // What the control service holds of this node's counters, through the
    // current connection.
    let mut acknowledged = delta::Acknowledged::default();
    loop {
        // A new status (with the flow-log events waiting), or flow-log
        // events alone, passed on at once.
        let mut events = Vec::new();
        let status_changed = tokio::select! {
            changed = reports.changed() => {
                if changed.is_err() {
                    return;
                }
                last = reports.borrow_and_update().clone();
                true
            }
            Some(event) = flows.recv() => {
                events.push(event);
                // A busy node's flow log goes in batches, not a report per flow.
                tokio::time::sleep(FLOW_BATCH_DELAY).await;
                false
            }
        };
        while events.len() < FLOW_BATCH_MAX
            && let Ok(event) = flows.try_recv()
        {
            events.push(event);
        }
        let events = events.iter().map(v1::FlowEvent::from).collect();
        let report = if status_changed {
            let Some(mut report) = last.clone() else {
                continue;
            };
            report.flows = events;
            report
        } else {
            // Not the status again: its report time would read as a fresh
            // reading of counters that are as old as before.
            v1::ReportStatusRequest {
                applied_version: 0,
                counters: Vec::new(),
                unhealthy: Vec::new(),
                flows: events,
                policy_counters: Vec::new(),
                flows_only: true,
                counters_changed_only: false,
                counters_gone: Vec::new(),
            }
        };
        // A connection that failed (the control service restarted) is made
        // again at once, for one more try.
        for _attempt in 0..2 {
            if client.is_none() {
                acknowledged.forget();
                client = match state.load() {
                    Ok(creds) => ControlClient::connect(&creds)
                        .await
                        .inspect_err(|e| debug!("reporting status: {}", error_chain(e)))
                        .ok(),
                    Err(e) => {
                        debug!("reporting status: {}", error_chain(&e));
                        None
                    }
                };
            }
            let Some(c) = client.as_mut() else { break };
            let mut sent = report.clone();
            if status_changed {
                acknowledged.reduce(&mut sent);
            }
            match c.report(sent).await {
                Ok(()) => {
                    if status_changed {
                        acknowledged.took(&report.counters);
                    }
                    break;
                }
                Err(e) => {
                    debug!("reporting status: {}", error_chain(&e));
                    client = None;
                }
            }
        }
    }
}

/// Writes the views handed over, off the follow loop (a large view takes a
/// while to encode and sync); a newer one replaces any still waiting.
async fn save_views(state: NodeState, mut saves: watch::Receiver<Option<View>>) {
    while saves.changed().await.is_ok() {
        let Some(view) = saves.borrow_and_update().clone() else {
            continue;
        };
        let state = state.clone();
        let version = view.version;
        let saved = tokio::task::spawn_blocking(move || state.save_view(&view)).await;
        match saved {
            Ok(Ok(())) => debug!(version, "saved the view"),
            Ok(Err(e)) => warn!(version, "saving the view for restarts: {}", error_chain(&e)),
            Err(e) => warn!(version, "saving the view for restarts: {e}"),
        }
    }
}
