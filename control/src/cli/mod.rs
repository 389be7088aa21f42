//! `sluicectl`, the admin CLI: the command line ([`Cli`]) and what each command does.
//! The binary only parses arguments, runs [`run`] and prints the error.
//!
//! | module | what it does |
//! |---|---|
//! | `args` | the clap types: commands, kinds (plural, singular, short), flags |
//! | `config` | which config file to use |
//! | `client` | the gRPC calls, over mutual TLS |
//! | `model` | responses converted once into domain objects and printable shapes |
//! | `resources` | `apply`, `get`, `describe`, `delete` |
//! | `cluster` | `token create`, `user create`, `node remove`, `whoami` |
//! | `dashboard` | `dashboard`: the web dashboard's URL |
//! | `tables`, `output` | tables, YAML, JSON, stdout |
//! | `duration` | `30s`, `10m`, `2h`, `365d` |
//! | `error` | [`CliError`] and exit statuses |

mod args;
pub mod client;
mod cluster;
pub mod config;
mod dashboard;
mod duration;
mod error;
mod flows;
mod model;
mod output;
mod resources;
mod rollout;
mod tables;
mod top;

use std::path::PathBuf;

use clap::CommandFactory as _;

pub use args::Cli;
use args::{Command, Format, NodeCommand, TokenCommand, UserCommand};
use client::Client;
pub use error::{CliError, exit};

use crate::client_config::ClientConfig;

/// What every command gets: where the config is and how to print.
pub struct Context {
    config: Option<PathBuf>,
    format: Format,
}

impl Context {
    /// Reads the config file and connects to the server it names.
    async fn connect(&self) -> Result<Client, CliError> {
        let path = config::resolve_here(self.config.as_deref())?;
        let config = ClientConfig::load(&path)?;
        Client::connect(&path, &config).await
    }
}

/// Runs one command. Manifests are read before anything is sent, so a manifest
/// error changes nothing.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let Cli {
        config,
        output,
        command,
    } = cli;
    let cx = Context {
        config,
        format: output,
    };
    match command {
        Command::Apply(args) => resources::apply(&cx, args).await,
        Command::Get(args) => resources::get(&cx, args).await,
        Command::Describe(args) => resources::describe(&cx, args).await,
        Command::Delete(args) => resources::delete(&cx, args).await,
        Command::Rollout(args) => rollout::rollout(&cx, args).await,
        Command::Token {
            command: TokenCommand::Create { ttl },
        } => cluster::create_token(&cx, ttl).await,
        Command::User {
            command:
                UserCommand::Create {
                    name,
                    groups,
                    ttl,
                    out,
                },
        } => cluster::create_user(&cx, name, groups, ttl, out).await,
        Command::Node {
            command: NodeCommand::Remove { name },
        } => cluster::remove_node(&cx, &name).await,
        Command::Whoami => cluster::whoami(&cx).await,
        Command::Dashboard { ttl } => dashboard::dashboard(&cx, ttl).await,
        Command::Flows(args) => flows::flows(&cx, args).await,
        Command::Top(args) => top::top(&cx, args).await,
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "sluicectl", &mut script);
            output::print(&String::from_utf8_lossy(&script))
        }
    }
}
