//! Running child processes: one PATH for all of them (bootstrap may have to
//! add `$CARGO_HOME/bin`), the command line quoted in every error, and the
//! variables `cargo run` set for xtask itself kept away from the children.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Where commands run (the workspace root) and with which PATH.
pub struct Shell {
    root: PathBuf,
    path: OsString,
}

impl Shell {
    pub fn new(root: PathBuf, path: OsString) -> Self {
        Self { root, path }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A command run in the workspace root with the bootstrap PATH. Rust
    /// resolves `program` with the PATH given here, not xtask's own.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        for (key, _) in env::vars_os() {
            if is_cargo_run_var(&key) {
                cmd.env_remove(key);
            }
        }
        cmd
    }

    /// `cargo <args>` with the toolchain rustup picks (stable, unless `+nightly`).
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd("cargo");
        cmd.args(args);
        cmd
    }
}

/// Variables cargo sets for the binary it runs (xtask), which would describe
/// the wrong package to a child (a demo binary reading CARGO_MANIFEST_DIR).
/// <https://doc.rust-lang.org/cargo/reference/environment-variables.html#environment-variables-cargo-sets-for-crates>
fn is_cargo_run_var(key: &OsStr) -> bool {
    let Some(key) = key.to_str() else {
        return false;
    };
    matches!(
        key,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
    ) || key.starts_with("CARGO_PKG_")
}

/// The command as a shell line: variables set on it (PATH aside), program,
/// arguments, and the directory when it is not the workspace root.
pub fn display(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter(|(key, _)| *key != "PATH")
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), quote(value?))))
        .collect();
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    let line = words.join(" ");
    match cmd.get_current_dir() {
        Some(dir) if !is_root(dir) => format!("{line}  (in {})", dir.display()),
        _ => line,
    }
}

fn is_root(dir: &Path) -> bool {
    dir == crate::workspace_root()
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    if word.is_empty() || word.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
        format!("'{}'", word.replace('\'', r"'\''"))
    } else {
        word.into_owned()
    }
}

/// Runs `cmd` with inherited stdio; an error unless it exits with success.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns how it ended.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` and returns its stdout; an error (with its stderr) unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// Stdout of `cmd` if it starts and succeeds; `None` otherwise (a presence probe).
pub fn probe(cmd: &mut Command) -> Option<String> {
    output(cmd).ok()
}
