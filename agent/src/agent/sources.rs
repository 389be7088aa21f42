//! The steady state: a list of sources feeding one reconciler.
//!
//! [`Sources::next`] waits on all of them at once and says which spoke
//! ([`Event`]); [`Loop::handle`] acts on it. The sources: signals, the
//! desired state's source (the manifest file, or the control service's view
//! stream), timers (manifest poll, counter reports, the flow sweep,
//! housekeeping), probe results, device feature changes, the data plane's
//! flow log and program log, and metrics scrapes.

use std::{path::PathBuf, time::Duration};

use sluice_common::types as t;
use sluice_model::error_chain;
use sluice_model::observe::BackendRef;
use sluice_model::view::{FrontendKey, View};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, error, info, warn};

use super::{AgentError, Reconciler, RunOptions, fnv1a, read_manifest, sync_egress};
use crate::{
    controlplane::{ControlLink, NodeState, ViewEvent, link::Programmer},
    dataplane::Dataplane,
    flowlog,
    health::Health,
    metrics, netdev, reaper, reconcile, status, sys,
};

/// Where the desired state comes from, while the loop runs.
pub enum Input {
    Manifest {
        path: PathBuf,
        source: String,
        changed: mpsc::Receiver<()>,
        _watcher: notify::RecommendedWatcher,
    },
    Control {
        link: Box<ControlLink>,
        events: mpsc::Receiver<ViewEvent>,
    },
}

impl Input {
    pub fn manifest(path: PathBuf, source: String) -> Result<Self, AgentError> {
        let (tx, changed) = mpsc::channel::<()>(16);
        let watcher = watch_manifest(&path, tx)?;
        Ok(Input::Manifest {
            path,
            source,
            changed,
            _watcher: watcher,
        })
    }

    pub fn control(state: NodeState, view: View) -> Self {
        let (link, events) = ControlLink::start(state, view);
        Input::Control {
            link: Box::new(link),
            events,
        }
    }
}

/// What one source said.
enum Event {
    Stop,
    /// Read the manifest again (a joined node ignores it: its view is pushed).
    Reload,
    /// The manifest file changed: read it once the editor is done.
    ManifestChanged,
    View(ViewEvent),
    Report,
    Sweep,
    /// A probe changed a backend's health.
    HealthChanged,
    Housekeeping,
    DeviceFeatures,
    FlowRecords(Vec<t::FlowEvent>),
    Scrape(metrics::Scrape),
    /// Nothing to do (the program log was flushed, a stale probe result).
    Idle,
}

/// Everything the loop waits on.
struct Sources {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    poll: tokio::time::Interval,
    report: tokio::time::Interval,
    sweep: tokio::time::Interval,
    housekeeping: tokio::time::Interval,
    features: mpsc::Receiver<()>,
    flow_events: Option<AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>>,
    logger: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    scrapes: Option<mpsc::Receiver<metrics::Scrape>>,
}

/// Waits for a value from an optional source; never, without one.
async fn maybe<T>(source: Option<&mut mpsc::Receiver<T>>) -> Option<T> {
    match source {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Sources {
    async fn next(&mut self, input: &mut Input, health: &mut Health) -> Event {
        let (manifest, view) = match input {
            Input::Manifest { changed, .. } => (Some(changed), None),
            Input::Control { events, .. } => (None, Some(events)),
        };
        tokio::select! {
            _ = self.terminate.recv() => Event::Stop,
            _ = self.interrupt.recv() => Event::Stop,
            _ = self.hangup.recv() => Event::Reload,
            Some(()) = maybe(manifest) => Event::ManifestChanged,
            Some(event) = maybe(view) => Event::View(event),
            _ = self.poll.tick() => Event::Reload,
            _ = self.report.tick() => Event::Report,
            _ = self.sweep.tick() => Event::Sweep,
            changed = health.next_change() => if changed { Event::HealthChanged } else { Event::Idle },
            _ = self.housekeeping.tick() => Event::Housekeeping,
            Some(()) = self.features.recv() => Event::DeviceFeatures,
            Ok(mut guard) = async {
                match self.flow_events.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let records = flowlog::drain(guard.get_inner_mut());
                guard.clear_ready();
                Event::FlowRecords(records)
            }
            Some(reply) = maybe(self.scrapes.as_mut()) => Event::Scrape(reply),
            Ok(mut guard) = async {
                match self.logger.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
                Event::Idle
            }
        }
    }
}

/// The run loop's state: the data plane, the reconciler, the source.
pub struct Loop<'o> {
    options: &'o RunOptions,
    dp: Dataplane,
    reconciler: Reconciler,
    input: Input,
    /// The interfaces served: (ifindex, name).
    managed: Vec<(u32, String)>,
    sources: Sources,
}

/// The reconciler and the data plane, as the control link programs them.
struct Programming<'a> {
    dp: &'a mut Dataplane,
    reconciler: &'a mut Reconciler,
}

impl Programmer for Programming<'_> {
    fn program(&mut self, view: &View) -> Result<(), String> {
        self.reconciler
            .apply_view(self.dp, view)
            .map_err(|e| error_chain(&e))
    }

    fn verdicts(&mut self, unhealthy: Vec<BackendRef>) {
        if self.reconciler.health.set_remote(unhealthy) {
            self.reconciler.apply_health(self.dp);
        }
    }
}

impl<'o> Loop<'o> {
    pub fn new(
        options: &'o RunOptions,
        mut dp: Dataplane,
        reconciler: Reconciler,
        input: Input,
        managed: Vec<(u32, String)>,
        scrapes: Option<mpsc::Receiver<metrics::Scrape>>,
    ) -> Result<Self, AgentError> {
        let logger = dp.logger.take().and_then(|logger| {
            // SAFETY: the logger owns its ring buffer's fd, which stays open and the
            // same for as long as the logger lives; the AsyncFd owns the logger.
            let registered =
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
            registered
                .inspect_err(|e| warn!("kernel program logs unavailable: {e}"))
                .ok()
        });
        let flow_events = dp.maps.flow_events.take().and_then(|ring| {
            // SAFETY: the ring buffer owns its map fd, which stays open and the
            // same for as long as it lives; the AsyncFd owns the ring buffer.
            let registered =
                unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
            registered
                .inspect_err(|e| warn!("flow events unavailable: {e}"))
                .ok()
        });
        let signal = |kind| {
            tokio::signal::unix::signal(kind).map_err(|source| AgentError::Io {
                op: "installing a signal handler",
                source,
            })
        };
        let sources = Sources {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            poll: tokio::time::interval(Duration::from_secs(2)),
            report: tokio::time::interval(options.report_interval),
            sweep: tokio::time::interval(options.sweep_interval),
            housekeeping: tokio::time::interval(Duration::from_secs(1)),
            features: spawn_feature_monitor(),
            flow_events,
            logger,
            scrapes,
        };
        Ok(Self {
            options,
            dp,
            reconciler,
            input,
            managed,
            sources,
        })
    }

    /// Follows the sources until asked to stop.
    pub async fn run(mut self) -> Result<(), AgentError> {
        loop {
            let event = self
                .sources
                .next(&mut self.input, &mut self.reconciler.health)
                .await;
            match event {
                Event::Stop => break,
                // Editors write in several steps: let them finish (a burst
                // of changes is read once).
                Event::ManifestChanged => tokio::time::sleep(Duration::from_millis(100)).await,
                _ => {}
            }
            self.handle(event);
        }
        if let Input::Control { link, .. } = self.input {
            link.finish().await;
        }
        info!("stopping; the data plane stays in place (`sluice-agent down` removes it)");
        Ok(())
    }

    fn handle(&mut self, event: Event) {
        let Self {
            dp,
            reconciler,
            input,
            managed,
            ..
        } = self;
        match event {
            Event::Stop | Event::Idle => {}
            Event::Reload | Event::ManifestChanged => {
                if let Input::Manifest {
                    path,
                    source,
                    changed,
                    ..
                } = input
                {
                    while changed.try_recv().is_ok() {}
                    reload(path, source, dp, reconciler);
                }
            }
            Event::View(event) => {
                if let Input::Control { link, .. } = input {
                    link.handle(event, &mut Programming { dp, reconciler });
                }
            }
            Event::Report => {
                if let Input::Control { link, .. } = input {
                    match status::services(&dp.maps, &reconciler.state) {
                        Ok(services) => link.refresh_counters(
                            &services,
                            |key| service_of(reconciler, key),
                            policy_counters(dp, reconciler),
                        ),
                        Err(e) => warn!("reading counters to report: {e}"),
                    }
                }
            }
            Event::Sweep => {
                let now = sys::coarse_now_ns();
                match reaper::sweep(
                    &mut dp.maps,
                    &mut reconciler.state,
                    &self.options.timeouts,
                    now,
                ) {
                    Ok(s)
                        if s.expired > 0
                            || !s.backends_freed.is_empty()
                            || s.orphan_replies > 0 =>
                    {
                        info!(flows = s.flows, expired = s.expired, orphan_replies = s.orphan_replies, backends_freed = ?s.backends_freed, "swept flows");
                    }
                    Ok(s) => debug!(flows = s.flows, "swept flows"),
                    Err(e) => warn!("sweeping flows: {e}"),
                }
            }
            Event::HealthChanged => {
                reconciler.apply_health(dp);
                if let Input::Control { link, .. } = input {
                    link.report_health(reconciler.health.local_unhealthy());
                }
            }
            Event::Housekeeping => {
                reconciler.release_due_ranges();
                reconciler.end_drained(dp);
                while self.sources.features.try_recv().is_ok() {}
                sync_egress(dp, managed);
                if let Input::Control { link, .. } = input {
                    link.save_if_changed();
                }
            }
            Event::DeviceFeatures => sync_egress(dp, managed),
            Event::FlowRecords(records) => {
                let policy = reconciler.installed_policy.as_ref();
                let service = |key: &t::FrontendKeyV4| reconciler.service_of(key).cloned();
                let events = flowlog::events(&records, policy, service);
                reconciler.stats.flow_events_read += events.len() as u64;
                match input {
                    Input::Control { link, .. } => {
                        reconciler.stats.flow_events_unsent += link.report_flows(events);
                    }
                    Input::Manifest { .. } => {
                        let naming = reconciler.node.naming;
                        flowlog::log(&events, |s| naming.name(s));
                    }
                }
            }
            Event::Scrape(reply) => {
                let applied = match input {
                    Input::Control { link, .. } => metrics::Applied::View(link.applied()),
                    Input::Manifest { .. } => metrics::Applied::Manifest(reconciler.last_applied),
                };
                let page = metrics::render(&metrics::Sources {
                    maps: &dp.maps,
                    state: &reconciler.state,
                    interfaces: dp
                        .pins()
                        .map(|p| status::interfaces(&dp.maps, p))
                        .unwrap_or_default(),
                    applied,
                    stats: &reconciler.stats,
                    flow_events_lost: dp.flow_events_lost(),
                    policy_counters: policy_counters(dp, reconciler),
                });
                let _ = reply.send(page);
            }
        }
    }
}

/// The service a frontend of the maps belongs to.
fn service_of(
    reconciler: &Reconciler,
    key: &FrontendKey,
) -> Option<sluice_model::view::ServiceRef> {
    reconciler.service_of(&reconcile::kernel_key(key)).cloned()
}

/// The network-policy counters of the slots the installed policy uses,
/// summed over CPUs; slots that counted nothing are left out.
fn policy_counters(
    dp: &Dataplane,
    reconciler: &Reconciler,
) -> Vec<sluice_model::observe::PolicyCounter> {
    let Some(policy) = reconciler.installed_policy.as_ref() else {
        return Vec::new();
    };
    policy
        .slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| **slot != sluice_model::policy::compiled::Slot::Unused)
        .filter_map(|(slot, counts)| {
            let per_cpu = dp.maps.policy_stats.get(&(slot as u32), 0).ok()?;
            let (allowed, denied) = per_cpu
                .iter()
                .fold((0, 0), |(a, d), s| (a + s.allowed, d + s.denied));
            (allowed + denied > 0).then(|| sluice_model::observe::PolicyCounter {
                counts: counts.clone(),
                allowed,
                denied,
            })
        })
        .collect()
}

/// Re-reads the manifest and applies it if it changed.
fn reload(path: &std::path::Path, source: &str, dp: &mut Dataplane, reconciler: &mut Reconciler) {
    // The content judged is the content remembered: re-reading the file to
    // identify it could see a newer version and silence its errors.
    let (result, hash) = match read_manifest(path) {
        Ok(text) => (
            reconciler.apply_manifest(dp, source, &text),
            Some(fnv1a(text.as_bytes())),
        ),
        Err(e) => (Err(AgentError::from(e)), None),
    };
    if let Err(e) = result {
        // Only log a given bad content once; the poll would repeat it.
        if hash.is_none() || hash != reconciler.last_rejected {
            error!(
                "manifest rejected, keeping the previous state: {}",
                error_chain(&e)
            );
        }
        reconciler.last_rejected = hash;
    }
}

/// Watches the manifest's directory (editors replace files by renaming, which
/// a watch on the file itself would miss).
fn watch_manifest(
    path: &std::path::Path,
    changed: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, AgentError> {
    use notify::Watcher as _;
    let file = path.file_name().map(|n| n.to_os_string());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == file)
        {
            let _ = changed.try_send(());
        }
    })
    .map_err(AgentError::Watch)?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(AgentError::Watch)?;
    Ok(watcher)
}

/// Device XDP-feature changes (a veth peer turning GRO on or off), from the
/// kernel's netdev notifications, on a thread of their own.
fn spawn_feature_monitor() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("xdp-features".into())
        .spawn(move || {
            let mut monitor = match netdev::FeatureMonitor::new() {
                Ok(m) => m,
                Err(e) => {
                    warn!("device feature notifications unavailable, polling instead: {e}");
                    return;
                }
            };
            loop {
                match monitor.wait(Duration::from_secs(1)) {
                    Ok(changed) if !changed.is_empty() => {
                        if tx.blocking_send(()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {
                        if tx.is_closed() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!("device feature notifications stopped, polling instead: {e}");
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!("device feature notifications unavailable, polling instead: {e}");
    }
    rx
}
