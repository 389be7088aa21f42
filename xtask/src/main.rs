//! `cargo xtask`: Sluice's developer entry points. Every command bootstraps
//! the machine first (see bootstrap.rs), so a fresh clone needs nothing else.

mod bootstrap;
mod cmd;
mod run;

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Sluice's developer tasks; every command runs `bootstrap` first"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian packages, bpffs); quick when all is there
    Bootstrap {
        /// Rebuild bpf-linker even when a working one is on PATH.
        #[arg(long, hide = true)]
        force_bpf_linker: bool,
    },
    /// Build the agent, whose build script builds the eBPF programs
    BuildEbpf,
    /// Run fmt, clippy (user space and eBPF), the build and every test (unit, kernel, end-to-end), with a timed summary
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
        args: Vec<String>,
    },
    /// Build the release binaries and run the demo (sluice-demo)
    Demo {
        /// Arguments for sluice-demo.
        #[arg(last = true, value_name = "DEMO_ARGS")]
        args: Vec<String>,
    },
    /// Build the release binaries and run the benchmarks (sluice-bench)
    Bench {
        /// Arguments for sluice-bench.
        #[arg(last = true, value_name = "BENCH_ARGS")]
        args: Vec<String>,
    },
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> &'static Path {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            // The cause chain, without the backtrace anyhow's Debug adds under
            // RUST_BACKTRACE=1: the step and the failing command say enough.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let force_bpf_linker = matches!(
        cli.command,
        Command::Bootstrap {
            force_bpf_linker: true
        }
    );
    let sh = bootstrap::bootstrap(workspace_root(), &bootstrap::Options { force_bpf_linker })?;
    match cli.command {
        Command::Bootstrap { .. } => Ok(ExitCode::SUCCESS),
        Command::BuildEbpf => run::build_ebpf(&sh).map(|()| ExitCode::SUCCESS),
        Command::Test { args } => Ok(run::test(&sh, &args)),
        Command::Demo { args } => run::release_bin(&sh, "sluice-demo", &args),
        Command::Bench { args } => run::release_bin(&sh, "sluice-bench", &args),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_args_after_double_dash_pass_through() {
        let cli = Cli::try_parse_from(["xtask", "test", "--", "vip_", "--", "--nocapture"])
            .expect("valid command line");
        let Command::Test { args } = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args, ["vip_", "--", "--nocapture"]);
    }
}
