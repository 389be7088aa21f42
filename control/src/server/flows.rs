//! The flow log: the flows the nodes' data planes opened, closed and dropped
//! (sampled by each agent; every policy refusal), as their agents report
//! them, kept in memory (the most recent [`KEPT`]) and streamed to
//! `sluicectl flows` and the dashboard.

use std::{collections::VecDeque, sync::Arc};

use sluice_api::v1;
use sluice_model::observe::{FlowEvent, FlowFilter};
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
    recent: std::sync::Mutex<VecDeque<Arc<FlowEvent>>>,
    live: tokio::sync::broadcast::Sender<Arc<FlowEvent>>,
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
    /// Records what `node` reported: each event named after the node and,
    /// from an agent that does not say when it saw it, timed now.
    pub fn record(&self, node: &str, events: Vec<FlowEvent>) {
        if events.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for mut event in events {
            event.node = node.to_owned();
            if event.observed_unix_ms == 0 {
                event.observed_unix_ms = now_ms;
            }
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

impl Flows {
    /// The recent events `filter` matches, oldest first, at most `limit`
    /// (the newest ones).
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> Vec<Arc<FlowEvent>> {
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
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<FlowEvent>> {
        self.live.subscribe()
    }
}

impl Control {
    /// The recent events matching the request, then (with `follow`) each new
    /// one, on the wire.
    pub fn watch_flows(
        &self,
        caller: &Caller,
        request: v1::WatchFlowsRequest,
    ) -> Result<ReceiverStream<Result<v1::FlowEvent, Status>>, ApiError> {
        let filter = FlowFilter::of_request(&request).map_err(|e| ApiError::Invalid {
            message: e.to_string(),
        })?;
        let mut events = self.follow_flows(caller, filter, request.follow)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if tx.send(Ok(v1::FlowEvent::from(&*event))).await.is_err() {
                    return;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// The recent events `filter` matches, then (with `follow`) each new
    /// one. The whole flow log is cluster-wide: the caller needs `list
    /// nodes`; one service's flows need `get` on that service.
    pub fn follow_flows(
        &self,
        caller: &Caller,
        filter: FlowFilter,
        follow: bool,
    ) -> Result<mpsc::Receiver<Arc<FlowEvent>>, ApiError> {
        let state = self.state();
        let grants = state.grants();
        match &filter.service {
            None => rbac::check(caller, Verb::List, Resource::Nodes, None, &grants)?,
            Some(service) => rbac::check(
                caller,
                Verb::Get,
                Resource::Services,
                Some(&service.namespace),
                &grants,
            )?,
        }
        // Subscribe before reading the recent ones: an event in between may
        // come twice, never not at all.
        let mut live = self.flows.subscribe();
        let recent = self.flows.recent(&filter, KEPT);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            for event in recent {
                if tx.send(event).await.is_err() {
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
                            if tx.send(event).await.is_err() {
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
        Ok(rx)
    }
}
