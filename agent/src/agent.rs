//! `sluice-agent run` and `join`: bring the data plane up, keep it equal to
//! the desired state.
//!
//! The desired state comes from one of two sources ([`Source`]): a manifest
//! file (standalone), or the node's view streamed by the control service
//! (`sluice-control`) to a joined node. Start-up order is chosen so that bad
//! input changes nothing: the manifest is parsed and validated (or the node's
//! identity and saved view loaded), and every interface checked, before
//! anything is loaded or attached, or a join token spent. Then the pinned data
//! plane (if any) is checked and reused, programs are loaded against it and
//! swapped into the pinned links, and the maps are reconciled. From then on
//! the agent follows its source, expires idle flows, and keeps the XDP egress
//! set in step with what each device accepts. Stopping the agent leaves the
//! data plane forwarding; `sluice-agent down` removes it.
//!
//! Forwarding never waits on the control service: the maps keep the last view
//! applied while it is unreachable, and an agent restarting meanwhile programs
//! the view it saved.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sluice_api::v1;
use sluice_common::types::{AgentMeta, FlowEvent, FrontendKeyV4};
use sluice_model::error_chain;
use sluice_model::manifest::{self, ManifestError};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::SignalKind,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    alloc::SlotRange,
    apply::{self, ApplyError},
    controlplane::{
        self, ControlClient, ControlError, Credentials, NodeState, SavedView, View, ViewEvent,
    },
    dataplane::{self, Dataplane, DataplaneError, HookChoice, LoadOptions, Mode},
    drain::Drains,
    health::{self, Health},
    metrics,
    netdev::{self, NetdevError},
    pins::{self, PinDir},
    policy::{CompiledPolicy, PolicyError, PolicyWriter, revoke},
    reaper::{self, Timeouts},
    reconcile::{self, Allocator, Desired, PlanError, State},
    status, sys,
};

/// Slot ranges a frontend stopped pointing to wait this long before reuse:
/// far longer than any packet takes through the programs.
const SLOT_GRACE: Duration = Duration::from_secs(2);

/// Where the desired state comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A YAML manifest file, followed as it changes.
    Manifest(PathBuf),
    /// The node's view from the control service, with the identity and the
    /// last view kept in `state`. With `join`, the node joins first (unless
    /// `state` already holds the same identity).
    Control {
        state: NodeState,
        join: Option<JoinSpec>,
    },
}

/// What `sluice-agent join` needs to join a cluster once.
#[derive(Clone)]
pub struct JoinSpec {
    pub control: String,
    pub token: String,
    pub ca_hash: String,
    pub node: String,
    pub zone: String,
}

impl std::fmt::Debug for JoinSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinSpec")
            .field("control", &self.control)
            .field("token", &"[elided]")
            .field("ca_hash", &self.ca_hash)
            .field("node", &self.node)
            .field("zone", &self.zone)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: Source,
    pub interfaces: Vec<String>,
    pub mode: Mode,
    pub bpffs_root: PathBuf,
    pub flow_capacity: u32,
    pub timeouts: Timeouts,
    pub sweep_interval: Duration,
    /// Pin directories of other namespaces are collected only past this age.
    pub stale_pin_age: Duration,
    /// One flow in this many goes to the flow log (0: only policy refusals).
    pub flow_log_sample: u32,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often a joined agent reports its applied version and counters,
    /// besides right after each update (`--report-interval`, 1 s by default
    /// so that the control service's dashboard shows live rates).
    pub report_interval: Duration,
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
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "{file}: the manifest is empty; the services stay as they are (a file caught while \
         being rewritten looks like this). To remove every service, leave only a comment in it"
    )]
    EmptyManifest { file: String },
}

/// What one reconcile did, for the log.
struct Applied {
    steps: usize,
    udp_flows_purged: usize,
    flows_purged: usize,
    micros: u64,
}

/// What is programmed, and what to do with it.
struct Reconciler {
    state: State,
    alloc: Allocator,
    /// Slot ranges waiting out their grace period.
    retiring: Vec<(SlotRange, Instant)>,
    /// Identifies the input last applied (a manifest's content hash, or a
    /// view's version), so that an unchanged manifest costs nothing.
    last_applied: Option<u64>,
    /// Content hash of the last manifest rejected, to log each bad one once.
    last_rejected: Option<u64>,
    /// The last desired state applied, before health checks had their say:
    /// a change of health applies it again.
    input: Desired,
    health: Health,
    drains: Drains,
    /// This node's zone (joined nodes; empty: none): which of a
    /// topology-aware frontend's zone weights apply.
    zone: String,
    /// This node's name (joined nodes): which backends it probes.
    node: String,
    /// The network policy in the maps, as the view last gave it.
    installed_policy: Option<v1::PolicyView>,
    /// For `/metrics`.
    stats: metrics::AgentStats,
}

impl Reconciler {
    fn new(dp: &Dataplane) -> Result<Self, AgentError> {
        let state = apply::read_state(&dp.maps)?;
        let alloc = Allocator::for_state(&state);
        Ok(Self {
            state,
            alloc,
            retiring: Vec::new(),
            last_applied: None,
            last_rejected: None,
            input: Desired::new(),
            health: Health::default(),
            drains: Drains::default(),
            zone: String::new(),
            node: String::new(),
            installed_policy: None,
            stats: metrics::AgentStats::default(),
        })
    }

    /// Parses the manifest `text` and makes the maps match it. Returns
    /// whether anything was applied (an unchanged manifest is skipped).
    fn apply_manifest(
        &mut self,
        dp: &mut Dataplane,
        source: &str,
        text: &str,
    ) -> Result<bool, AgentError> {
        let hash = fnv1a(text.as_bytes());
        if self.last_applied == Some(hash) {
            return Ok(false);
        }
        if text.trim().is_empty() {
            return Err(AgentError::EmptyManifest {
                file: source.to_owned(),
            });
        }
        let manifest = manifest::parse(source, text)?;
        let desired = reconcile::desired(&manifest);
        let done = self.apply_desired(dp, desired, hash)?;
        info!(
            services = manifest.services.len(),
            steps = done.steps,
            udp_flows_purged = done.udp_flows_purged,
            flows_purged = done.flows_purged,
            micros = done.micros,
            "applied manifest"
        );
        Ok(true)
    }

    /// Makes the maps match the node's view.
    fn apply_view(&mut self, dp: &mut Dataplane, view: &View) -> Result<(), AgentError> {
        let (desired, skipped) =
            reconcile::desired_from_view(view.frontends(), &self.zone, &self.node);
        for frontend in &skipped {
            // The control service validates what it stores; a frontend this
            // agent cannot read means a newer control service. Program the rest.
            warn!(%frontend, "skipping a frontend of the view this agent cannot program");
        }
        let frontends = desired.len();
        let done = self.apply_desired(dp, desired, fnv1a(&view.version().to_le_bytes()))?;
        self.apply_policy(dp, view.policy())?;
        info!(
            version = view.version(),
            frontends,
            steps = done.steps,
            udp_flows_purged = done.udp_flows_purged,
            flows_purged = done.flows_purged,
            micros = done.micros,
            "applied view version {}",
            view.version()
        );
        Ok(())
    }

    /// Makes the maps match `desired`. On any error the maps keep their
    /// previous content (validation and planning precede every write), or,
    /// if a write failed midway, a consistent mix that the next change
    /// completes.
    fn apply_desired(
        &mut self,
        dp: &mut Dataplane,
        desired: Desired,
        input: u64,
    ) -> Result<Applied, AgentError> {
        let planning = Instant::now();
        let result = self.plan_and_apply(dp, desired, input);
        match &result {
            Ok(_) => self
                .stats
                .reconciles
                .observe(planning.elapsed().as_secs_f64()),
            Err(_) => self.stats.reconcile_errors += 1,
        }
        result
    }

    fn plan_and_apply(
        &mut self,
        dp: &mut Dataplane,
        desired: Desired,
        input: u64,
    ) -> Result<Applied, AgentError> {
        let effective = health::overlay(&desired, |service, t| self.health.is_healthy(service, t));
        let plan = reconcile::plan(&effective, &self.state, &self.alloc)?;
        let started = Instant::now();
        match apply::apply(&mut dp.maps, &plan.steps) {
            Ok(applied) => {
                self.state = plan.next;
                self.alloc = plan.alloc;
                self.drains.track(&self.state, &effective, Instant::now());
                self.health.track(&desired);
                self.input = desired;
                let due = Instant::now() + SLOT_GRACE;
                self.retiring
                    .extend(plan.retired_ranges.into_iter().map(|r| (r, due)));
                self.last_applied = Some(input);
                let meta = AgentMeta {
                    manifest_hash: input,
                    applied_at: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    ..dp.maps.agent_meta.get(&0, 0).unwrap_or_default()
                };
                if let Err(e) = dp.maps.agent_meta.set(0, meta, 0) {
                    warn!("recording the applied state: {e}");
                }
                Ok(Applied {
                    steps: applied.steps,
                    udp_flows_purged: applied.udp_flows_purged,
                    flows_purged: applied.flows_purged,
                    micros: started.elapsed().as_micros() as u64,
                })
            }
            Err(e) => {
                // Part of the plan is in the maps; each step left them
                // consistent. Re-read where we stand; the next change retries.
                self.resync(dp);
                Err(e.into())
            }
        }
    }

    /// Installs the view's network policy if it changed (atomically, see
    /// `policy`), then ends the established flows it now denies.
    fn apply_policy(
        &mut self,
        dp: &mut Dataplane,
        policy: &v1::PolicyView,
    ) -> Result<(), AgentError> {
        if self.installed_policy.as_ref() == Some(policy) {
            return Ok(());
        }
        let compiled =
            CompiledPolicy::from_view(policy).map_err(|reason| PolicyError::View { reason })?;
        let generation = PolicyWriter.install(&mut dp.maps, &compiled)?;
        let revoked = revoke(&mut dp.maps, &compiled)?;
        info!(
            generation,
            identities = compiled.identities.len(),
            rules = compiled.rules.len(),
            enforcing = compiled.enforces(),
            flows_revoked = revoked,
            "network policy installed"
        );
        self.installed_policy = Some(policy.clone());
        Ok(())
    }

    /// Applies the last input again after a backend's health changed.
    fn apply_health(&mut self, dp: &mut Dataplane) {
        let Some(input) = self.last_applied else {
            return;
        };
        match self.apply_desired(dp, self.input.clone(), input) {
            Ok(done) => info!(
                steps = done.steps,
                micros = done.micros,
                "applied a change of backend health"
            ),
            Err(e) => error!("applying a change of backend health: {}", error_chain(&e)),
        }
    }

    /// Ends the flows of backends whose drain timeout passed.
    fn end_drained(&mut self, dp: &mut Dataplane) {
        let due = self.drains.due(Instant::now());
        if due.is_empty() {
            return;
        }
        match apply::purge_flows(&mut dp.maps, |_, flow| due.contains(&flow.backend_id)) {
            Ok(flows) => info!(backends = ?due, flows, "drain timeout: ended the remaining flows"),
            Err(e) => warn!("ending drained flows: {e}"),
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
                self.last_applied = None;
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

/// The desired state to program first, read before anything is touched.
enum Initial {
    Manifest {
        path: PathBuf,
        source: String,
        text: String,
    },
    /// A joined node (joining first with `join`); its identity and saved
    /// view are read once the interfaces are checked, since a join spends
    /// its token.
    Control {
        state: NodeState,
        join: Option<JoinSpec>,
    },
}

pub async fn run(options: RunOptions) -> Result<(), AgentError> {
    // Input first: nothing is touched until the source and the interfaces
    // are known to be good.
    let initial = match &options.source {
        Source::Manifest(path) => {
            let source = path.display().to_string();
            let text = read_manifest(path)?;
            if text.trim().is_empty() {
                return Err(AgentError::EmptyManifest { file: source });
            }
            manifest::parse(&source, &text)?;
            Initial::Manifest {
                path: path.clone(),
                source,
                text,
            }
        }
        Source::Control { state, join } => Initial::Control {
            state: state.clone(),
            join: join.clone(),
        },
    };
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
    // The zone and saved view of a joined node; the view is `None` before
    // its first one (the maps then keep what they hold until the control
    // service speaks).
    let (identity, saved_view) = match &initial {
        Initial::Control { state, join } => load_identity(state, join).await?,
        Initial::Manifest { .. } => (None, None),
    };

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
    dp.set_flow_log_sample(options.flow_log_sample)?;
    dp.attach(&choices)?;
    let managed: Vec<(u32, String)> = choices
        .iter()
        .map(|c| (c.interface.ifindex, c.interface.name.clone()))
        .collect();
    sync_egress(&mut dp, &managed);

    let mut reconciler = Reconciler::new(&dp)?;
    if let Some(creds) = identity {
        reconciler.zone = creds.zone;
        reconciler.node = creds.node;
    }
    let (input, wakeup) = match initial {
        Initial::Manifest { path, source, text } => {
            reconciler.apply_manifest(&mut dp, &source, &text)?;
            let (input, changed) = Input::manifest(path, source)?;
            (input, Wakeup::Manifest(changed))
        }
        Initial::Control { state, .. } => {
            if let Some(view) = &saved_view {
                reconciler.apply_view(&mut dp, view)?;
            }
            let (link, events) = ControlLink::start(state, saved_view.unwrap_or_default());
            (Input::Control(link), Wakeup::View(events))
        }
    };
    let scrapes = match options.metrics_listen {
        Some(addr) => Some(
            metrics::start(addr)
                .await
                .map_err(|source| AgentError::Io {
                    op: "binding the metrics address (--metrics-listen; `off` serves none)",
                    source,
                })?,
        ),
        None => None,
    };
    log_choices(&choices);
    info!("data plane ready");

    follow(&options, dp, reconciler, input, wakeup, &managed, scrapes).await
}

/// Joins the cluster if asked to (and not joined yet), then loads the node's
/// identity and its saved view.
async fn load_identity(
    state: &NodeState,
    join: &Option<JoinSpec>,
) -> Result<(Option<Credentials>, Option<View>), AgentError> {
    let creds = match join {
        Some(spec) if !state.is_joined() => {
            controlplane::join(
                state,
                &spec.control,
                &spec.token,
                &spec.ca_hash,
                &spec.node,
                &spec.zone,
            )
            .await?
        }
        _ => state.load()?,
    };
    // Re-running the same `join` (a unit file, a restart) keeps the identity
    // (the token was spent by the first run); another node or cluster is
    // refused rather than silently ignored.
    if let Some(spec) = join
        && (creds.node != spec.node || creds.control != spec.control)
    {
        return Err(ControlError::AlreadyJoined {
            dir: state.dir().to_owned(),
        }
        .into());
    }
    info!(node = %creds.node, zone = %creds.zone, control = %creds.control, dir = %state.dir().display(), "node identity loaded");
    let view = state
        .load_view()?
        .map(|(version, frontends, policy)| View::from_saved(version, frontends, policy));
    Ok((Some(creds), view))
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

/// The source the follow loop listens to.
enum Input {
    Manifest {
        path: PathBuf,
        source: String,
        _watcher: notify::RecommendedWatcher,
    },
    Control(ControlLink),
}

/// What wakes the follow loop for its source.
enum Wakeup {
    /// The manifest file may have changed.
    Manifest(mpsc::Receiver<()>),
    View(mpsc::Receiver<ViewEvent>),
}

impl Input {
    fn manifest(path: PathBuf, source: String) -> Result<(Self, mpsc::Receiver<()>), AgentError> {
        let (tx, changed) = mpsc::channel::<()>(16);
        let watcher = watch_manifest(&path, tx)?;
        let input = Input::Manifest {
            path,
            source,
            _watcher: watcher,
        };
        Ok((input, changed))
    }
}

/// A joined node's link to the control service: the view as applied, and the
/// background tasks that follow it, report status, keep the certificate fresh
/// and save the view.
struct ControlLink {
    view: View,
    /// The version applied to the maps; where a reconnect resumes.
    applied: Arc<AtomicU64>,
    reports: watch::Sender<Option<v1::ReportStatusRequest>>,
    /// The last counters read, sent with each report.
    counters: Vec<v1::FrontendCounters>,
    /// What this node's probes find unhealthy, sent with each report.
    unhealthy: Vec<v1::BackendRef>,
    /// Network-policy verdict counters, sent with each report.
    policy_counters: Vec<v1::PolicyCounter>,
    /// Flow-log events on their way to the control service (bounded: a
    /// flood loses events, never blocks the loop).
    flows: mpsc::Sender<v1::FlowEvent>,
    saves: watch::Sender<Option<SavedView>>,
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
    fn start(state: NodeState, view: View) -> (Self, mpsc::Receiver<ViewEvent>) {
        let applied = Arc::new(AtomicU64::new(view.version()));
        let (events_tx, events) = mpsc::channel(64);
        let (reports, reports_rx) = watch::channel(None);
        let (flows, flows_rx) = mpsc::channel(16_384);
        let (saves, saves_rx) = watch::channel(None);
        let tasks = vec![
            tokio::spawn(controlplane::follow(
                state.clone(),
                applied.clone(),
                events_tx,
            )),
            tokio::spawn(controlplane::keep_certificate_fresh(state.clone())),
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

    /// Handles what the view follower says. Updates go to the maps at once;
    /// the version is recorded (for resume and report) only once applied.
    fn handle(&mut self, event: ViewEvent, dp: &mut Dataplane, reconciler: &mut Reconciler) {
        match event {
            ViewEvent::Connected => {
                self.connected = Some(true);
                info!(
                    since = self.applied.load(Ordering::Acquire),
                    "watching the node's view"
                );
                // A restarted control service knows nothing of this node's
                // progress until told.
                self.report();
            }
            ViewEvent::Update(update) => {
                self.view.apply(update);
                match reconciler.apply_view(dp, &self.view) {
                    Ok(()) => {
                        self.applied.store(self.view.version(), Ordering::Release);
                        self.unsaved = true;
                        self.report();
                    }
                    // The maps keep the previous view; the next update, or a
                    // resume from the applied version, tries again.
                    Err(e) => error!(
                        version = self.view.version(),
                        "view rejected, keeping the previous state: {}",
                        error_chain(&e)
                    ),
                }
            }
            ViewEvent::Health(unhealthy) => {
                let verdicts = unhealthy
                    .into_iter()
                    .filter_map(|b| Some((b.service, b.address.parse().ok()?)));
                if reconciler.health.set_remote(verdicts) {
                    reconciler.apply_health(dp);
                }
            }
            ViewEvent::Disconnected(why) => match self.connected.replace(false) {
                Some(true) => warn!(
                    version = self.view.version(),
                    "lost the control service, forwarding with the last view: {why}"
                ),
                None => warn!(
                    version = self.view.version(),
                    "cannot reach the control service yet, forwarding with the saved view: {why}"
                ),
                Some(false) => debug!("control service still unreachable: {why}"),
            },
            ViewEvent::Refused(why) => {
                error!(
                    version = self.view.version(),
                    "the control service refused this node; forwarding continues with the last view, which no longer changes: {why}"
                );
            }
        }
    }

    /// Reads the counters, then reports.
    fn refresh_counters(&mut self, dp: &Dataplane, reconciler: &Reconciler) {
        match status::services(&dp.maps, &reconciler.state) {
            Ok(services) => self.counters = status::to_counters(&services),
            Err(e) => warn!("reading counters to report: {e}"),
        }
        self.policy_counters = policy_counters(dp, reconciler.installed_policy.as_ref());
        self.report();
    }

    fn report(&self) {
        self.reports.send_replace(Some(v1::ReportStatusRequest {
            applied_version: self.applied.load(Ordering::Acquire),
            counters: self.counters.clone(),
            unhealthy: self.unhealthy.clone(),
            flows: Vec::new(),
            policy_counters: self.policy_counters.clone(),
            flows_only: false,
        }));
    }

    /// Passes flow-log events on to the control service.
    /// Returns how many were lost (the queue to the control service full).
    fn report_flows(&self, events: Vec<v1::FlowEvent>) -> u64 {
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
    fn report_health(&mut self, reconciler: &Reconciler) {
        let unhealthy: Vec<v1::BackendRef> = reconciler
            .health
            .local_unhealthy()
            .into_iter()
            .map(|(service, address)| v1::BackendRef {
                service,
                address: address.to_string(),
            })
            .collect();
        if unhealthy != self.unhealthy {
            self.unhealthy = unhealthy;
            self.report();
        }
    }

    /// Hands the view to the saver if it changed (at most once per call, so
    /// a burst of updates is written once).
    fn save_if_changed(&mut self) {
        if std::mem::take(&mut self.unsaved) {
            let frontends = self.view.frontends().cloned().collect();
            self.saves.send_replace(Some((
                self.applied.load(Ordering::Acquire),
                frontends,
                self.view.policy().clone(),
            )));
        }
    }
}

impl ControlLink {
    /// A clean stop leaves the newest view for the next start: hands it to
    /// the saver, closes the channel and waits for the saver to write it.
    async fn finish(mut self) {
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

/// How long flow-log events wait for company before they are reported.
const FLOW_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Flow-log events per report at most (the rest follow in the next).
const FLOW_BATCH_MAX: usize = 2_000;

/// Sends each status the follow loop publishes, on a connection of its own
/// (re-made after a failure, with the current certificate). A report that
/// fails is not retried: the next one carries newer numbers.
async fn report_status(
    state: NodeState,
    mut reports: watch::Receiver<Option<v1::ReportStatusRequest>>,
    mut flows: mpsc::Receiver<v1::FlowEvent>,
) {
    let mut client: Option<ControlClient> = None;
    let mut last: Option<v1::ReportStatusRequest> = None;
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
            }
        };
        // A connection that failed (the control service restarted) is made
        // again at once, for one more try.
        for _attempt in 0..2 {
            if client.is_none() {
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
            match c.report(report.clone()).await {
                Ok(()) => break,
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
async fn save_views(state: NodeState, mut saves: watch::Receiver<Option<SavedView>>) {
    while saves.changed().await.is_ok() {
        let Some((version, frontends, policy)) = saves.borrow_and_update().clone() else {
            continue;
        };
        let state = state.clone();
        let saved =
            tokio::task::spawn_blocking(move || state.save_view(version, &frontends, &policy))
                .await;
        match saved {
            Ok(Ok(())) => debug!(version, "saved the view"),
            Ok(Err(e)) => warn!(version, "saving the view for restarts: {}", error_chain(&e)),
            Err(e) => warn!(version, "saving the view for restarts: {e}"),
        }
    }
}

/// The network-policy counters of the slots the installed policy names,
/// summed over CPUs; slots that counted nothing are left out.
fn policy_counters(dp: &Dataplane, policy: Option<&v1::PolicyView>) -> Vec<v1::PolicyCounter> {
    let Some(policy) = policy else {
        return Vec::new();
    };
    policy
        .slots
        .iter()
        .enumerate()
        .filter(|(_, counts)| !counts.is_empty())
        .filter_map(|(slot, counts)| {
            let per_cpu = dp.maps.policy_stats.get(&(slot as u32), 0).ok()?;
            let (allowed, denied) = per_cpu
                .iter()
                .fold((0, 0), |(a, d), s| (a + s.allowed, d + s.denied));
            (allowed + denied > 0).then(|| v1::PolicyCounter {
                counts: counts.clone(),
                allowed,
                denied,
            })
        })
        .collect()
}

/// Drains the data plane's flow log: each record as the API carries it,
/// named after its service and policy counter, timed by the wall clock.
fn read_flow_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    policy: Option<&v1::PolicyView>,
    state: &reconcile::State,
) -> Vec<v1::FlowEvent> {
    // The kernel stamps records with the coarse monotonic clock.
    let wall_now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mono_now_ns = sys::coarse_now_ns();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<FlowEvent>() {
            continue;
        }
        // SAFETY: the kernel wrote a whole `FlowEvent` (checked length); read
        // unaligned, as ring buffer records carry no alignment promise.
        let e: FlowEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        let age_ms = mono_now_ns.saturating_sub(e.time_ns) / 1_000_000;
        out.push(flow_event_to_api(
            &e,
            policy,
            state,
            wall_now_ms.saturating_sub(age_ms),
        ));
    }
    out
}

fn flow_event_to_api(
    e: &FlowEvent,
    policy: Option<&v1::PolicyView>,
    state: &reconcile::State,
    observed_unix_ms: u64,
) -> v1::FlowEvent {
    use sluice_common::types as t;
    let at = |addr: u32, port: u16| {
        format!(
            "{}:{}",
            std::net::Ipv4Addr::from(addr.to_ne_bytes()),
            u16::from_be(port)
        )
    };
    let frontend = FrontendKeyV4 {
        vip: e.vip,
        port: e.vip_port,
        proto: e.proto,
        _pad: 0,
    };
    let service = state
        .frontends
        .get(&frontend)
        .map(|f| t::name_str(&f.meta.name).to_string())
        .unwrap_or_default();
    let (kind, verdict, reason) = match e.kind {
        t::FLOW_EVENT_CLOSE => (
            "close",
            "forwarded",
            if e.reason == t::CLOSE_RST {
                "rst"
            } else {
                "fin"
            },
        ),
        t::FLOW_EVENT_DROP => (
            "drop",
            if e.verdict == t::POLICY_DENIED {
                "denied"
            } else {
                "dropped"
            },
            sluice_common::reason::NAMES
                .get(usize::from(e.reason))
                .copied()
                .unwrap_or("unknown"),
        ),
        _ => ("new", "forwarded", ""),
    };
    let counted_as = match e.verdict {
        t::POLICY_ALLOWED | t::POLICY_DENIED => policy
            .and_then(|p| p.slots.get(e.stats_slot as usize))
            .cloned()
            .unwrap_or_default(),
        _ => String::new(),
    };
    v1::FlowEvent {
        time: String::new(),
        node: String::new(),
        verdict: verdict.to_owned(),
        reason: reason.to_owned(),
        client: at(e.client, e.client_port),
        service,
        backend: if e.backend == 0 {
            String::new()
        } else {
            at(e.backend, e.backend_port)
        },
        protocol: match e.proto {
            t::IPPROTO_UDP => v1::Protocol::Udp as i32,
            _ => v1::Protocol::Tcp as i32,
        },
        counted_as,
        kind: kind.to_owned(),
        vip: at(e.vip, e.vip_port),
        observed_unix_ms,
    }
}

/// The steady state: react to the source, device changes, timers and
/// signals until asked to stop.
async fn follow(
    options: &RunOptions,
    mut dp: Dataplane,
    mut reconciler: Reconciler,
    mut input: Input,
    mut wakeup: Wakeup,
    managed: &[(u32, String)],
    mut scrapes: Option<mpsc::Receiver<metrics::Scrape>>,
) -> Result<(), AgentError> {
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

    let mut flow_events = dp.maps.flow_events.take().and_then(|ring| {
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for as long as it lives; the AsyncFd owns the ring buffer.
        let registered =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        registered
            .inspect_err(|e| warn!("flow events unavailable: {e}"))
            .ok()
    });

    let mut sweep = tokio::time::interval(options.sweep_interval);
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut report = tokio::time::interval(options.report_interval);
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
            _ = hangup.recv() => reload(&input, &mut dp, &mut reconciler),
            Some(event) = async {
                match &mut wakeup {
                    Wakeup::Manifest(changed) => changed.recv().await.map(|()| None),
                    Wakeup::View(events) => events.recv().await.map(Some),
                }
            } => match (event, &mut wakeup, &mut input) {
                (Some(event), _, Input::Control(link)) => link.handle(event, &mut dp, &mut reconciler),
                (_, Wakeup::Manifest(changed), _) => {
                    // Editors write in several steps: let them finish.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while changed.try_recv().is_ok() {}
                    reload(&input, &mut dp, &mut reconciler);
                }
                _ => {}
            },
            _ = poll.tick() => reload(&input, &mut dp, &mut reconciler),
            _ = report.tick() => {
                if let Input::Control(link) = &mut input {
                    link.refresh_counters(&dp, &reconciler);
                }
            }
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
            true = reconciler.health.next_change() => {
                reconciler.apply_health(&mut dp);
                if let Input::Control(link) = &mut input {
                    link.report_health(&reconciler);
                }
            }
            _ = housekeeping.tick() => {
                reconciler.release_due_ranges();
                reconciler.end_drained(&mut dp);
                while features_rx.try_recv().is_ok() {}
                sync_egress(&mut dp, managed);
                if let Input::Control(link) = &mut input {
                    link.save_if_changed();
                }
            }
            Some(()) = features_rx.recv() => sync_egress(&mut dp, managed),
            Ok(mut guard) = async {
                match flow_events.as_mut() {
                    Some(fd) => fd.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let events = read_flow_events(guard.get_inner_mut(), reconciler.installed_policy.as_ref(), &reconciler.state);
                guard.clear_ready();
                reconciler.stats.flow_events_read += events.len() as u64;
                match &mut input {
                    Input::Control(link) => {
                        reconciler.stats.flow_events_unsent += link.report_flows(events);
                    }
                    Input::Manifest { .. } => {
                        // Without a control service the log is the flow log;
                        // refusals stand out at info level.
                        for e in events {
                            if e.verdict == "forwarded" {
                                debug!(kind = %e.kind, client = %e.client, service = %e.service, backend = %e.backend, reason = %e.reason, "flow");
                            } else {
                                info!(kind = %e.kind, verdict = %e.verdict, client = %e.client, vip = %e.vip, service = %e.service, backend = %e.backend, reason = %e.reason, "flow not forwarded");
                            }
                        }
                    }
                }
            }
            Some(reply) = async {
                match scrapes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let applied = match &input {
                    Input::Control(link) => metrics::Applied::View(link.applied.load(Ordering::Acquire)),
                    Input::Manifest { .. } => metrics::Applied::Manifest(reconciler.last_applied),
                };
                let page = metrics::render(&metrics::Sources {
                    maps: &dp.maps,
                    state: &reconciler.state,
                    interfaces: dp.pins().map(|p| status::interfaces(&dp.maps, p)).unwrap_or_default(),
                    applied,
                    stats: &reconciler.stats,
                    flow_events_lost: dp.flow_events_lost(),
                    policy_counters: policy_counters(&dp, reconciler.installed_policy.as_ref()),
                });
                let _ = reply.send(page);
            }
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
    if let Input::Control(link) = input {
        link.finish().await;
    }
    info!("stopping; the data plane stays in place (`sluice-agent down` removes it)");
    Ok(())
}

/// Re-reads the manifest (a no-op for a joined node, whose view is pushed).
fn reload(input: &Input, dp: &mut Dataplane, reconciler: &mut Reconciler) {
    let Input::Manifest { path, source, .. } = input else {
        return;
    };
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
