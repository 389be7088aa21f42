//! Flow events: the flows the nodes' data planes refused, as their agents
//! report them, kept in memory (the most recent [`KEPT`]) and streamed to
//! `sluicectl flows`.

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
        let now = super::state::rfc3339(std::time::SystemTime::now());
        for mut event in events {
            event.node = node.to_owned();
            event.time = now.clone();
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

fn wanted(verdict: &str, event: &v1::FlowEvent) -> bool {
    verdict.is_empty() || event.verdict == verdict
}

impl Control {
    /// The recent events matching the request, then (with `follow`) each new
    /// one. Flows are cluster-wide: the caller needs `list nodes`.
    pub fn watch_flows(
        &self,
        caller: &Caller,
        request: v1::WatchFlowsRequest,
    ) -> Result<ReceiverStream<Result<v1::FlowEvent, Status>>, ApiError> {
        rbac::check(
            caller,
            Verb::List,
            Resource::Nodes,
            None,
            &self.state().grants(),
        )?;
        let v1::WatchFlowsRequest { verdict, follow } = request;
        if !matches!(verdict.as_str(), "" | "denied") {
            return Err(ApiError::Invalid {
                message: format!(
                    "verdict: {verdict:?}: only denied flows are recorded as events (allowed flows \
                     are counted: sluicectl describe service, sluice-agent status)"
                ),
            });
        }
        // Subscribe before reading the recent ones: an event in between may
        // come twice, never not at all.
        let mut live = self.flows.live.subscribe();
        let recent: Vec<Arc<v1::FlowEvent>> = self
            .flows
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| wanted(&verdict, e))
            .cloned()
            .collect();
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
                        Ok(event) if wanted(&verdict, &event) => {
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
