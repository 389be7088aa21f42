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

mod reconciler;
mod sources;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_model::manifest::{self, ManifestError};
use sluice_model::view::View;
use tracing::{info, warn};

pub use reconciler::{Reconciler, fnv1a};

use crate::{
    apply::ApplyError,
    controlplane::{self, ControlError, Credentials, NodeState},
    dataplane::{self, Dataplane, DataplaneError, HookChoice, LoadOptions, Mode},
    metrics,
    netdev::{self, NetdevError},
    pins::{self, PinDir},
    policy::PolicyError,
    reaper::Timeouts,
    reconcile::{Naming, Node, PlanError},
};
use sources::{Input, Loop};

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

pub(crate) fn read_manifest(path: &Path) -> Result<String, ManifestError> {
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

    let node = match identity {
        Some(creds) => Node {
            name: creds.node,
            zone: (!creds.zone.is_empty()).then_some(creds.zone),
            naming: Naming::Cluster,
        },
        None => Node::standalone(),
    };
    let mut reconciler = Reconciler::new(&dp, node)?;
    let input = match initial {
        Initial::Manifest { path, source, text } => {
            reconciler.apply_manifest(&mut dp, &source, &text)?;
            Input::manifest(path, source)?
        }
        Initial::Control { state, .. } => {
            if let Some(view) = &saved_view {
                reconciler.apply_view(&mut dp, view)?;
            }
            Input::control(state, saved_view.unwrap_or_default())
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

    Loop::new(&options, dp, reconciler, input, managed, scrapes)?
        .run()
        .await
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
    Ok((Some(creds), state.load_view()?))
}

fn log_choices(choices: &[HookChoice]) {
    let summary: Vec<String> = choices
        .iter()
        .map(|c| format!("{}={}", c.interface.name, c.hook.as_str()))
        .collect();
    info!(interfaces = %summary.join(","), "serving");
}

pub(crate) fn sync_egress(dp: &mut Dataplane, managed: &[(u32, String)]) {
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
