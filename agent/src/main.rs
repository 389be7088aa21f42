//! `sluice-agent`: the node agent's command line. The work is in the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use sluice_agent::{
    agent::{self, RunOptions},
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
    /// Load the data plane on the interfaces, apply the manifest and follow its changes.
    Run(RunArgs),
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

#[derive(clap::Args)]
struct RunArgs {
    /// YAML manifest of services (one document per service); re-applied when it changes.
    #[arg(long, short)]
    manifest: PathBuf,
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
            eprintln!("sluice-agent: error: {}", agent::chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Run(args) => {
            if args.flow_capacity == 0 {
                return Err("--flow-capacity must be at least 1".into());
            }
            if args.sweep_interval == 0 {
                return Err("--sweep-interval must be at least 1 second".into());
            }
            let options = RunOptions {
                manifest: args.manifest,
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
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(options))?;
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
