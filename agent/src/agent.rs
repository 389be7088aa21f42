//! `sluice-agent run`: bring the data plane up, keep it equal to the manifest.
//!
//! Start-up order is chosen so that bad input changes nothing: the manifest is
//! parsed and validated, and every interface checked, before anything is
//! loaded or attached. Then the pinned data plane (if any) is checked and
//! reused, programs are loaded against it and swapped into the pinned links,
//! and the maps are reconciled to the manifest. From then on the agent follows
//! the manifest file, expires idle flows, and keeps the XDP egress set in step
//! with what each device accepts. Stopping the agent leaves the data plane
//! forwarding; `sluice-agent down` removes it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sluice_common::types::AgentMeta;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc};
use tracing::{debug, error, info, warn};

use crate::{
    alloc::SlotRange,
    apply::{self, ApplyError},
    dataplane::{self, Dataplane, DataplaneError, HookChoice, LoadOptions, Mode},
    manifest::{self, ManifestError},
    netdev::{self, NetdevError},
    pins::{self, PinDir},
    reaper::{self, Timeouts},
    reconcile::{self, Allocator, PlanError, State},
    sys,
};

/// Slot ranges a frontend stopped pointing to wait this long before reuse:
/// far longer than any packet takes through the programs.
const SLOT_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub manifest: PathBuf,
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub bpffs_root: PathBuf,
    pub flow_capacity: u32,
    pub timeouts: Timeouts,
    pub sweep_interval: Duration,
    /// Pin directories of other namespaces are collected only past this age.
    pub stale_pin_age: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("applying the manifest to the kernel maps")]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    #[error("bpffs: {reason}")]
    Bpffs { reason: String },
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("watching the manifest")]
    Watch(#[source] notify::Error),
}

/// What is programmed, and what to do with it.
struct Reconciler {
    state: State,
    alloc: Allocator,
    /// Slot ranges waiting out their grace period.
    retiring: Vec<(SlotRange, Instant)>,
    source: String,
    last_hash: Option<u64>,
    /// Content hash of the last manifest rejected, to log each bad one once.
    last_rejected: Option<u64>,
}

impl Reconciler {
    fn new(dp: &Dataplane, source: String) -> Result<Self, AgentError> {
        let state = apply::read_state(&dp.maps)?;
        let alloc = Allocator::for_state(&state);
        Ok(Self {
            state,
            alloc,
            retiring: Vec::new(),
            source,
            last_hash: None,
            last_rejected: None,
        })
    }

    /// Parses `text` and makes the maps match it. On any error the maps keep
    /// their previous content (validation and planning precede every write).
    fn apply_text(&mut self, dp: &mut Dataplane, text: &str) -> Result<bool, AgentError> {
        let hash = fnv1a(text.as_bytes());
        if self.last_hash == Some(hash) {
            return Ok(false);
        }
        let manifest = manifest::parse(&self.source, text)?;
        let desired = reconcile::desired(&manifest);
        let plan = reconcile::plan(&desired, &self.state, &self.alloc)?;
        let started = Instant::now();
        match apply::apply(&mut dp.maps, &plan.steps) {
            Ok(applied) => {
                self.state = plan.next;
                self.alloc = plan.alloc;
                let due = Instant::now() + SLOT_GRACE;
                self.retiring
                    .extend(plan.retired_ranges.into_iter().map(|r| (r, due)));
                self.last_hash = Some(hash);
                let meta = AgentMeta {
                    manifest_hash: hash,
                    applied_at: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    ..dp.maps.agent_meta.get(&0, 0).unwrap_or_default()
                };
                if let Err(e) = dp.maps.agent_meta.set(0, meta, 0) {
                    warn!("recording the applied manifest: {e}");
                }
                info!(
                    services = manifest.services.len(),
                    steps = applied.steps,
                    udp_flows_purged = applied.udp_flows_purged,
                    flows_purged = applied.flows_purged,
                    micros = started.elapsed().as_micros() as u64,
                    "applied manifest"
                );
                Ok(true)
            }
            Err(e) => {
                // Part of the plan is in the maps; each step left them
                // consistent. Re-read where we stand; the next change retries.
                self.resync(dp);
                Err(e.into())
            }
        }
    }

    fn resync(&mut self, dp: &Dataplane) {
        match apply::read_state(&dp.maps) {
            Ok(state) => {
                self.alloc = Allocator::for_state(&state);
                for (range, _) in &self.retiring {
                    self.alloc.slots.mark_used(*range);
                }
                self.state = state;
                self.last_hash = None;
            }
            Err(e) => error!("re-reading the maps after a failed update: {e}"),
        }
    }

    fn release_due_ranges(&mut self) {
        let now = Instant::now();
        let alloc = &mut self.alloc;
        self.retiring.retain(|(range, due)| {
            if *due <= now {
                alloc.slots.release(*range);
                false
            } else {
                true
            }
        });
    }
}

/// FNV-1a, 64 bits: identifies a manifest's content in status.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn read_manifest(path: &Path) -> Result<String, ManifestError> {
    std::fs::read_to_string(path).map_err(|cause| ManifestError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

/// Makes sure `root` lives on a bpffs. The agent never mounts one itself: in
/// a private mount namespace (`ip netns exec` makes one and remounts /sys) a
/// bpffs it mounted would vanish with the agent, taking the pins, and with them
/// the attached data plane, along: exactly what pinning is meant to prevent.
pub fn ensure_bpffs(root: &Path) -> Result<(), AgentError> {
    let probe = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if pins::is_bpffs(probe) {
        return Ok(());
    }
    Err(AgentError::Bpffs {
        reason: format!(
            "{} is not on a bpf filesystem, so pins could not outlive the agent. Mount one \
             (mount -t bpf bpf /sys/fs/bpf; `cargo xtask bootstrap` does) or pass --bpffs-root. \
             Started with `ip netns exec`? It remounts /sys and hides the host's bpffs: use \
             `nsenter --net=/run/netns/NAME sluice-agent ...` instead.",
            root.display()
        ),
    })
}

pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    // Input first: nothing is touched until the manifest and the interfaces
    // are known to be good.
    let source = options.manifest.display().to_string();
    let text = read_manifest(&options.manifest)?;
    manifest::parse(&source, &text)?;
    let choices = dataplane::choose_hooks(&options.interfaces, options.mode)?;
    for c in &choices {
        info!(
            interface = %c.interface.name,
            driver = %c.interface.driver,
            xdp_features = %c.interface.xdp_features,
            hook = c.hook.as_str(),
            why = %c.why,
            "hook chosen"
        );
    }

    ensure_bpffs(&options.bpffs_root)?;
    let pins = PinDir::new(&options.bpffs_root, netdev::netns_cookie()?);
    for removed in dataplane::collect_garbage(&pins, options.stale_pin_age) {
        info!(dir = %removed.display(), "removed the pinned data plane of a namespace that is gone");
    }
    let prepared = dataplane::prepare(&pins)?;
    info!(dir = %pins.path().display(), state = ?prepared, "pinned data plane");

    let mut dp = Dataplane::load(
        Some(&pins),
        &LoadOptions {
            flow_capacity: options.flow_capacity,
        },
    )?;
    dp.attach(&choices)?;
    let managed: Vec<(u32, String)> = choices
        .iter()
        .map(|c| (c.interface.ifindex, c.interface.name.clone()))
        .collect();
    sync_egress(&mut dp, &managed);

    let mut reconciler = Reconciler::new(&dp, source)?;
    reconciler.apply_text(&mut dp, &text)?;
    log_choices(&choices);
    info!("data plane ready");

    follow(&options, dp, reconciler, &managed).await
}

fn log_choices(choices: &[HookChoice]) {
    let summary: Vec<String> = choices
        .iter()
        .map(|c| format!("{}={}", c.interface.name, c.hook.as_str()))
        .collect();
    info!(interfaces = %summary.join(","), "serving");
}

fn sync_egress(dp: &mut Dataplane, managed: &[(u32, String)]) {
    match dp.sync_xdp_egress(managed) {
        Ok(changes) => {
            for (name, accepts) in changes {
                if accepts {
                    info!(interface = %name, "XDP may redirect into this interface");
                } else {
                    info!(interface = %name, "XDP hands packets for this interface to the kernel (it does not take redirected frames)");
                }
            }
        }
        Err(e) => warn!("refreshing the XDP egress set: {e}"),
    }
}

/// The steady state: react to manifest changes, device changes, timers and
/// signals until asked to stop.
async fn follow(
    options: &RunOptions,
    mut dp: Dataplane,
    mut reconciler: Reconciler,
    managed: &[(u32, String)],
) -> Result<(), AgentError> {
    let (changed_tx, mut changed_rx) = mpsc::channel::<()>(16);
    let _watcher = watch_manifest(&options.manifest, changed_tx.clone())?;
    let mut features_rx = spawn_feature_monitor();
    let mut logger = dp.logger.take().and_then(|logger| {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and the
        // same for as long as the logger lives; the AsyncFd owns the logger.
        let registered =
            unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
        registered
            .inspect_err(|e| warn!("kernel program logs unavailable: {e}"))
            .ok()
    });

    let mut sweep = tokio::time::interval(options.sweep_interval);
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let signal = |kind| {
        tokio::signal::unix::signal(kind).map_err(|source| AgentError::Io {
            op: "installing a signal handler",
            source,
        })
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload(options, &mut dp, &mut reconciler),
            Some(()) = changed_rx.recv() => {
                // Editors write in several steps: let them finish.
                tokio::time::sleep(Duration::from_millis(100)).await;
                while changed_rx.try_recv().is_ok() {}
                reload(options, &mut dp, &mut reconciler);
            }
            _ = poll.tick() => reload(options, &mut dp, &mut reconciler),
            _ = sweep.tick() => {
                match reaper::sweep(&mut dp.maps, &mut reconciler.state, &options.timeouts, sys::coarse_now_ns()) {
                    Ok(s) => {
                        if s.expired > 0 || !s.backends_freed.is_empty() || s.orphan_replies > 0 {
                            info!(flows = s.flows, expired = s.expired, orphan_replies = s.orphan_replies, backends_freed = ?s.backends_freed, "swept flows");
                        } else {
                            debug!(flows = s.flows, "swept flows");
                        }
                    }
                    Err(e) => warn!("sweeping flows: {e}"),
                }
            }
            _ = housekeeping.tick() => {
                reconciler.release_due_ranges();
                while features_rx.try_recv().is_ok() {}
                sync_egress(&mut dp, managed);
            }
            Some(()) = features_rx.recv() => sync_egress(&mut dp, managed),
            Ok(mut guard) = async {
                match logger.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        }
    }
    info!("stopping; the data plane stays in place (`sluice-agent down` removes it)");
    Ok(())
}

fn reload(options: &RunOptions, dp: &mut Dataplane, reconciler: &mut Reconciler) {
    let result = read_manifest(&options.manifest)
        .map_err(AgentError::from)
        .and_then(|text| reconciler.apply_text(dp, &text));
    if let Err(e) = result {
        // Only log a given bad content once; the poll would repeat it.
        let hash = read_manifest(&options.manifest)
            .ok()
            .map(|t| fnv1a(t.as_bytes()));
        if hash.is_none() || hash != reconciler.rejected_hash() {
            error!(
                "manifest rejected, keeping the previous state: {}",
                chain(&e)
            );
        }
        reconciler.set_rejected(hash);
    }
}

impl Reconciler {
    fn rejected_hash(&self) -> Option<u64> {
        self.last_rejected
    }
    fn set_rejected(&mut self, hash: Option<u64>) {
        self.last_rejected = hash;
    }
}

/// An error and its causes on one line. A cause whose text the message
/// already carries (as manifest errors do) is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Watches the manifest's directory (editors replace files by renaming, which
/// a watch on the file itself would miss).
fn watch_manifest(
    path: &Path,
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
