//! `sluice-agent`: the node agent's command line. The work is in the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use sluice_agent::{
    agent::{self, JoinSpec, RunOptions, Source},
    controlplane::NodeState,
    dataplane::{self, Mode},
    netdev,
    pins::{DEFAULT_ROOT, PinDir},
    reaper::Timeouts,
    status,
};
use sluice_common::layout::DEFAULT_FLOW_CAPACITY;

#[derive(Parser)]
#[command(
    name = "sluice-agent",
    version,
    about = "Sluice node agent: load-balances service VIPs in the kernel (XDP/TC)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data plane on the interfaces and follow the desired state: a
    /// manifest file (--manifest), or, on a joined node, the control service.
    Run(RunArgs),
    /// Join a cluster with a token from `sluicectl token create`, then run
    /// following the control service. Re-running it on a joined node reuses
    /// the node's identity (the token is spent on first use).
    Join(JoinArgs),
    /// Show hooks, services, backends and counters, read from the pinned maps.
    Status {
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        #[arg(long, default_value = DEFAULT_ROOT)]
        bpffs_root: PathBuf,
    },
    /// Detach and unpin this network namespace's data plane (drops its flows).
    Down {
        #[arg(long, default_value = DEFAULT_ROOT)]
        bpffs_root: PathBuf,
    },
}

/// Where a joined node keeps its identity (key 0600) and its last view.
const DEFAULT_STATE_DIR: &str = "/var/lib/sluice-agent";

#[derive(clap::Args)]
struct RunArgs {
    /// YAML manifest of services (one document per service); re-applied when
    /// it changes. Without it the node follows the control service it joined.
    #[arg(long, short, conflicts_with = "state_dir")]
    manifest: Option<PathBuf>,
    /// State directory of a joined node [default: /var/lib/sluice-agent].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    dataplane: DataplaneArgs,
}

#[derive(clap::Args)]
struct JoinArgs {
    /// The control service, as `sluicectl token create` prints it
    /// (https://HOST:PORT); repeat it (or separate with commas) for the
    /// replicas of a replicated control plane: the node fails over among them.
    #[arg(long, required = true, value_delimiter = ',')]
    control: Vec<String>,
    /// Single-use join token.
    #[arg(long, env = "SLUICE_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Pin of the cluster CA (sha256:HEX): the token goes to no other server.
    #[arg(long)]
    ca_hash: String,
    /// The node's name in the cluster [default: the host name].
    #[arg(long)]
    node: Option<String>,
    /// The node's zone, for topology-aware routing.
    #[arg(long, default_value = "")]
    zone: String,
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    dataplane: DataplaneArgs,
}

#[derive(clap::Args)]
struct DataplaneArgs {
    /// Interface to serve (client- and backend-facing); repeat for each.
    #[arg(long = "interface", short = 'i', required = true)]
    interfaces: Vec<String>,
    /// Hook per interface: auto picks native XDP where the interface takes
    /// XDP-redirected frames, TC elsewhere.
    #[arg(long, value_enum, default_value = "auto")]
    mode: Mode,
    /// bpffs directory for pins; each network namespace gets its own sub-directory.
    #[arg(long, default_value = DEFAULT_ROOT)]
    bpffs_root: PathBuf,
    /// Connection-table entries (each direction). Applies when the data plane is created.
    #[arg(long, default_value_t = DEFAULT_FLOW_CAPACITY)]
    flow_capacity: u32,
    /// Seconds an open TCP flow may stay silent before it is forgotten.
    #[arg(long, default_value_t = 3600)]
    tcp_idle_timeout: u64,
    /// Seconds a closed TCP flow is kept for its last segments.
    #[arg(long, default_value_t = 10)]
    tcp_closed_timeout: u64,
    /// Seconds a UDP flow may stay silent before it is forgotten.
    #[arg(long, default_value_t = 60)]
    udp_idle_timeout: u64,
    /// Seconds between sweeps of the connection table.
    #[arg(long, default_value_t = 5)]
    sweep_interval: u64,
    /// Age in seconds past which pins of other namespaces that serve no live
    /// interface are removed (younger ones may belong to an agent starting up).
    #[arg(long, default_value_t = 600, hide = true)]
    stale_pin_age: u64,
    /// One flow in N goes to the flow log (`sluicectl flows`): its opening,
    /// closing and drops, chosen by its 5-tuple. 1: every flow; 0: none
    /// (refusals by network policy are always logged).
    #[arg(long, default_value_t = 1, value_name = "N")]
    flow_log_sample: u32,
    /// Address for the Prometheus metrics (`GET /metrics`, plain HTTP);
    /// `off` serves none.
    #[arg(long, default_value = "127.0.0.1:9464", value_name = "ADDR|off")]
    metrics_listen: String,
    /// Seconds between status reports to the control service (the counters
    /// its dashboard and `sluicectl describe` show); joined agents only.
    #[arg(long, default_value_t = 1)]
    report_interval: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "sluice-agent: error: {}",
                sluice_model::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Run(args) => {
            let source = match args.manifest {
                Some(manifest) => Source::Manifest(manifest),
                None => Source::Control {
                    state: NodeState::new(
                        args.state_dir
                            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
                    ),
                    join: None,
                },
            };
            run_agent(source, args.dataplane)?;
        }
        Command::Join(args) => {
            let node = match args.node {
                Some(node) => node,
                None => hostname()?,
            };
            let source = Source::Control {
                state: NodeState::new(args.state_dir),
                join: Some(JoinSpec {
                    control: args.control.join(","),
                    token: args.token,
                    ca_hash: args.ca_hash,
                    node,
                    zone: args.zone,
                }),
            };
            run_agent(source, args.dataplane)?;
        }
        Command::Status { output, bpffs_root } => {
            agent::ensure_bpffs(&bpffs_root)?;
            let pins = PinDir::new(&bpffs_root, netdev::netns_cookie()?);
            let report = status::report(&pins)?;
            match output {
                Output::Table => print!("{}", status::render(&report)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        }
        Command::Down { bpffs_root } => {
            agent::ensure_bpffs(&bpffs_root)?;
            let pins = PinDir::new(&bpffs_root, netdev::netns_cookie()?);
            if dataplane::down(&pins)? {
                eprintln!(
                    "sluice-agent: detached and unpinned {}",
                    pins.path().display()
                );
            } else {
                eprintln!(
                    "sluice-agent: nothing to remove ({} does not exist)",
                    pins.path().display()
                );
            }
        }
    }
    Ok(())
}

fn run_agent(source: Source, args: DataplaneArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.flow_capacity == 0 {
        return Err("--flow-capacity must be at least 1".into());
    }
    if args.sweep_interval == 0 {
        return Err("--sweep-interval must be at least 1 second".into());
    }
    let metrics_listen = match args.metrics_listen.as_str() {
        "off" => None,
        addr => Some(addr.parse().map_err(|e| {
            format!("--metrics-listen {addr:?}: expected ADDRESS:PORT or off ({e})")
        })?),
    };
    if args.report_interval == 0 {
        return Err("--report-interval must be at least 1 second".into());
    }
    let options = RunOptions {
        source,
        flow_log_sample: args.flow_log_sample,
        metrics_listen,
        interfaces: args.interfaces,
        mode: args.mode,
        bpffs_root: args.bpffs_root,
        flow_capacity: args.flow_capacity,
        timeouts: Timeouts {
            tcp_open: Duration::from_secs(args.tcp_idle_timeout),
            tcp_closed: Duration::from_secs(args.tcp_closed_timeout),
            udp: Duration::from_secs(args.udp_idle_timeout),
        },
        sweep_interval: Duration::from_secs(args.sweep_interval),
        stale_pin_age: Duration::from_secs(args.stale_pin_age),
        report_interval: Duration::from_secs(args.report_interval),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(options))?;
    Ok(())
}

/// The kernel's host name: the default node name, as kubelet's.
fn hostname() -> Result<String, Box<dyn std::error::Error>> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| format!("reading the host name for the node name (pass --node): {e}"))?;
    Ok(name.trim().to_owned())
}
