//! Running external tools (`ip`, `ethtool`, the agent's CLI) with errors that
//! carry everything needed to understand a failure.

use std::process::{Command, ExitStatus, Output};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error("cannot start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

/// `program arg1 arg2 ...`, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output, CommandError> {
    cmd.output().map_err(|source| CommandError::Spawn {
        command: describe(cmd),
        source,
    })
}

/// Runs `cmd` to completion; a non-zero exit status is an error.
pub fn run(cmd: &mut Command) -> Result<Output, CommandError> {
    let out = output(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(CommandError::Failed {
            command: describe(cmd),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
