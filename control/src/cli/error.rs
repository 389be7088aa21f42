//! What a `sluicectl` command can fail with, and its exit status.

use std::io;
use std::path::PathBuf;

use sluice_model::manifest::ManifestError;
use sluice_pki::PkiError;
use tonic::Code;

use crate::client_config::ConfigError;

/// Exit statuses besides 0, 1 and clap's 2 (usage), for scripts.
pub mod exit {
    pub const FAILURE: u8 = 1;
    pub const NOT_FOUND: u8 = 3;
    pub const DENIED: u8 = 4;
    pub const CONFLICT: u8 = 5;
    pub const UNREACHABLE: u8 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "no config file found (tried {}); pass --config FILE or set SLUICECTL_CONFIG",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoConfig { tried: Vec<PathBuf> },
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Printed as is: it names the file, document, object, line and field.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("connecting with {config}")]
    Connect {
        config: PathBuf,
        #[source]
        source: PkiError,
    },
    /// The control service's message is complete (object, version, permission);
    /// it is shown as is. Boxed: a `Status` is large.
    #[error("{}", api_message(status, server))]
    Api {
        server: String,
        status: Box<tonic::Status>,
    },
    /// An object or report that does not read (a newer server, or a bug).
    #[error("the control service sent an invalid {what}")]
    BadResponse {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the control service sent a response without its {what}")]
    IncompleteResponse { what: &'static str },
    #[error("{}: exists already; not overwriting it", path.display())]
    OutputExists { path: PathBuf },
    #[error("cannot {op}")]
    Pki {
        op: &'static str,
        #[source]
        source: PkiError,
    },
    #[error("cannot print the result as YAML")]
    Yaml {
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("cannot print the result as JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("{service}: {problem}")]
    Rollout { service: String, problem: String },
    #[error("{failed} of {total} deletions failed")]
    DeletesFailed { failed: usize, total: usize },
    #[error("writing to stdout")]
    Stdout {
        #[source]
        source: io::Error,
    },
}

fn api_message(status: &tonic::Status, server: &str) -> String {
    match status.code() {
        Code::Unavailable => format!(
            "the control service at {server} is unavailable: {}",
            status.message()
        ),
        _ => status.message().to_owned(),
    }
}

impl CliError {
    /// The failure of a call to the control service at `server`.
    pub fn api(server: &str, status: tonic::Status) -> Self {
        Self::Api {
            server: server.to_owned(),
            status: Box::new(status),
        }
    }

    /// The gRPC code of an API error.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Api { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// The process's exit status (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { status, .. } => match status.code() {
                Code::NotFound => exit::NOT_FOUND,
                Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
                Code::Aborted | Code::AlreadyExists => exit::CONFLICT,
                Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
                _ => exit::FAILURE,
            },
            Self::Connect {
                source: PkiError::Connect { .. },
                ..
            } => exit::UNREACHABLE,
            _ => exit::FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_messages_are_shown_as_is_with_distinct_exit_codes() {
        let conflict = "conflict: Service \"shop/web\" is at resource version 13, the request \
                        expected 12; read it again and retry";
        let cases = [
            (Code::Aborted, conflict, exit::CONFLICT),
            (
                Code::NotFound,
                "Service \"shop/web\" not found",
                exit::NOT_FOUND,
            ),
            (
                Code::PermissionDenied,
                "user \"bob\" lacks ...",
                exit::DENIED,
            ),
            (
                Code::InvalidArgument,
                "Service \"shop/web\": vip: ...",
                exit::FAILURE,
            ),
        ];
        for (code, message, exit_code) in cases {
            let error = CliError::api("https://c:7443", tonic::Status::new(code, message));
            assert_eq!(sluice_model::error_chain(&error), message);
            assert_eq!(error.exit_code(), exit_code, "{code:?}");
        }
        let down = CliError::api(
            "https://c:7443",
            tonic::Status::unavailable("connection reset"),
        );
        assert_eq!(
            sluice_model::error_chain(&down),
            "the control service at https://c:7443 is unavailable: connection reset"
        );
        assert_eq!(down.exit_code(), exit::UNREACHABLE);
    }
}
