//! `sluicectl`: the admin CLI. The work is in `sluice_control::cli`.

use std::process::ExitCode;

use clap::Parser as _;
use sluice_control::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    sluice_pki::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sluicectl: error: starting the runtime: {e}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluicectl: error: {}", sluice_model::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
