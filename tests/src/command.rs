//! Running external tools (`ip`, `ethtool`, the agent's CLI) with errors that
//! carry everything needed to understand a failure.

use std::{
    fs::{self, OpenOptions},
    io::Write as _,
    path::Path,
    process::{Child, Command, ExitStatus, Output},
};

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

/// Starts `cmd` with stdout and stderr appended to `log` (created if need
/// be), after a marker line naming the command; every start of a restarted
/// process lands in the same file. Panics if the log or the process cannot be
/// opened or started.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
    // A marker between starts; it never contains a line tests wait for.
    let _ = writeln!(file, "=== sluice-tests: {}", describe(cmd));
    let stdout = file
        .try_clone()
        .unwrap_or_else(|e| panic!("duplicating {}: {e}", log.display()));
    cmd.stdout(stdout).stderr(file);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", describe(cmd)))
}

/// A log file's whole text so far (empty if it does not exist yet).
pub fn read_log(log: &Path) -> String {
    fs::read(log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
