//! The flow log: the flows the nodes' data planes opened, closed and dropped
//! (sampled by each agent; every policy refusal), as their agents report
//! them, kept in memory (the most recent [`KEPT`]) and streamed to
//! `sluicectl flows` and the dashboard.

use std::{collections::VecDeque, sync::Arc};

use sluice_api::v1;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::Control;
use crate::{
    error::ApiError,
    rbac::{self, Caller, Resource, Verb},
};

/// Recent events kept for a `sluicectl flows` without `--follow`.
pub const KEPT: usize = 10_000;

/// The recent events and the live feed.
pub struct Flows {
    recent: std::sync::Mutex<VecDeque<Arc<v1::FlowEvent>>>,
    live: tokio::sync::broadcast::Sender<Arc<v1::FlowEvent>>,
}

impl Default for Flows {
    fn default() -> Self {
        Self {
            recent: std::sync::Mutex::new(VecDeque::new()),
            live: tokio::sync::broadcast::channel(4096).0,
        }
    }
}

impl Flows {
    /// Records what `node` reported.
    pub fn record(&self, node: &str, events: Vec<v1::FlowEvent>) {
        if events.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        for mut event in events {
            event.node = node.to_owned();
            let observed = match event.observed_unix_ms {
                0 => now,
                ms => std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            };
            event.time = rfc3339_ms(observed);
            let event = Arc::new(event);
            if recent.len() == KEPT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
            // No receiver: nobody follows.
            let _ = self.live.send(event);
        }
    }
}

fn rfc3339_ms(t: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// What a flow-log request asks for; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    pub verdict: String,
    pub service: String,
    pub kind: String,
}

impl FlowFilter {
    pub fn matches(&self, event: &v1::FlowEvent) -> bool {
        (self.verdict.is_empty() || event.verdict == self.verdict)
            && (self.service.is_empty() || event.service == self.service)
            && (self.kind.is_empty() || event.kind == self.kind)
    }
}

impl Flows {
    /// The recent events `filter` matches, oldest first, at most `limit`
    /// (the newest ones).
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> Vec<Arc<v1::FlowEvent>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = recent
            .iter()
            .rev()
            .filter(|e| filter.matches(e))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Every event from now on (a slow reader skips what it lagged behind).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<v1::FlowEvent>> {
        self.live.subscribe()
    }
}

impl Control {
    /// The recent events matching the request, then (with `follow`) each new
    /// one. The whole flow log is cluster-wide: the caller needs `list
    /// nodes`; one service's flows need `get` on that service.
    pub fn watch_flows(
        &self,
        caller: &Caller,
        request: v1::WatchFlowsRequest,
    ) -> Result<ReceiverStream<Result<v1::FlowEvent, Status>>, ApiError> {
        let v1::WatchFlowsRequest {
            verdict,
            follow,
            service,
            kind,
        } = request;
        let invalid = |message: String| ApiError::Invalid { message };
        if !matches!(verdict.as_str(), "" | "forwarded" | "denied" | "dropped") {
            return Err(invalid(format!(
                "verdict: {verdict:?}: expected forwarded, denied or dropped"
            )));
        }
        if !matches!(kind.as_str(), "" | "new" | "close" | "drop") {
            return Err(invalid(format!(
                "kind: {kind:?}: expected new, close or drop"
            )));
        }
        let grants = self.state().grants();
        if service.is_empty() {
            rbac::check(caller, Verb::List, Resource::Nodes, None, &grants)?;
        } else {
            let Some((namespace, _name)) = service.split_once('/') else {
                return Err(invalid(format!(
                    "service: {service:?}: expected NAMESPACE/NAME"
                )));
            };
            rbac::check(
                caller,
                Verb::Get,
                Resource::Services,
                Some(namespace),
                &grants,
            )?;
        }
        let filter = FlowFilter {
            verdict,
            service,
            kind,
        };
        // Subscribe before reading the recent ones: an event in between may
        // come twice, never not at all.
        let mut live = self.flows.subscribe();
        let recent = self.flows.recent(&filter, KEPT);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            for event in recent {
                if tx.send(Ok((*event).clone())).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                tokio::select! {
                    event = live.recv() => match event {
                        Ok(event) if filter.matches(&event) => {
                            if tx.send(Ok((*event).clone())).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}
