//! A handle on the real `sluice-agent` binary, run in the node namespace.
//!
//! The CLI contract it relies on:
//! `run --manifest FILE --interface IF [--interface IF ...] [--mode auto|xdp|tc] [--bpffs-root DIR]`,
//! `status [--output table|json] [--bpffs-root DIR]`, `down [--bpffs-root DIR]`;
//! log lines (tracing fmt) contain "data plane ready" once per start after the
//! first reconcile, "applied manifest" after each successful (re)apply and
//! "manifest rejected" when a changed manifest is invalid.
//!
//! Each agent gets a private bpffs instance, mounted in its scratch directory
//! and passed as `--bpffs-root` (unless the test passes its own), because
//! `ip netns exec` gives each command a fresh `/sys` without `/sys/fs/bpf`: pins
//! made there would vanish with the process, so a restarted agent could not
//! find them, and agents of parallel tests would share one default root.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::{command, netns::Netns, scratch::ScratchDir};

/// Set to the agent binary's path to use that one.
pub const AGENT_BIN_ENV: &str = "SLUICE_AGENT_BIN";
/// Printed once per start, after the first reconcile.
pub const READY_LINE: &str = "data plane ready";
/// Printed after each successful manifest (re)apply.
pub const APPLIED_LINE: &str = "applied manifest";
/// Printed when a changed manifest is invalid (the old state stays).
pub const REJECTED_LINE: &str = "manifest rejected";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Lines of the log shown in panic messages.
const TAIL_LINES: usize = 60;

/// The agent binary: `$SLUICE_AGENT_BIN`, else `sluice-agent` built next to
/// the tests (see [`workspace_bin`]).
pub fn agent_bin() -> PathBuf {
    workspace_bin("sluice-agent", AGENT_BIN_ENV)
}

/// A binary of the workspace: `$<env>` if set, else `<name>` next to the
/// test binary's directory (test binaries live in `target/<profile>/deps/`),
/// else in it. Panics if there is none.
pub fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(bin) = env::var_os(env) {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "{env}={} is not a file", bin.display());
        return bin;
    }
    let exe = env::current_exe().unwrap_or_else(|e| panic!("cannot find the test binary: {e}"));
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates: Vec<PathBuf> = dir
        .parent()
        .map(|up| up.join(name))
        .into_iter()
        .chain([dir.join(name)])
        .collect();
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (looked at {candidates:?}): build it first: \
                 cargo build --workspace --exclude sluice-ebpf --bins (cargo xtask test does this)"
            )
        })
}

/// The agent exited before printing "data plane ready".
#[derive(Debug, Error)]
#[error(
    "sluice-agent exited before it was ready ({status}); log tail:\n{}",
    tail(log, TAIL_LINES)
)]
pub struct StartFailure {
    pub status: ExitStatus,
    /// The whole log of the agent (stdout and stderr).
    pub log: String,
}

/// A running `sluice-agent run ...` in the node namespace. Dropping it
/// SIGKILLs the agent, runs `sluice-agent down`, unmounts its bpffs and
/// removes its scratch directory (kept if `SLUICE_KEEP_LOGS` is set).
///
/// Drop it before the topology (declare it after): `down` runs in the node
/// namespace.
#[derive(Debug)]
pub struct Agent {
    node: String,
    bin: PathBuf,
    run_args: Vec<String>,
    bpffs_root: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    pid: u32,
    /// "data plane ready" lines seen when the agent last became ready.
    ready_lines: usize,
    // Last: dropped after `Drop::drop` has stopped the agent.
    scratch: ScratchDir,
}

impl Agent {
    /// Starts the agent and waits (at most 30 s) for "data plane ready".
    /// Panics, showing the log's tail, if it exits or hangs before that.
    pub fn start(
        node: &Netns,
        manifest: &Path,
        interfaces: &[String],
        extra_args: &[&str],
    ) -> Self {
        Self::try_start(node, manifest, interfaces, extra_args).unwrap_or_else(|f| panic!("{f}"))
    }

    /// Like [`Agent::start`], but an agent that exits before it is ready
    /// (a bad manifest, say) is an `Err` carrying its exit status and log. An
    /// agent that neither gets ready nor exits within 30 s still panics.
    pub fn try_start(
        node: &Netns,
        manifest: &Path,
        interfaces: &[String],
        extra_args: &[&str],
    ) -> Result<Self, StartFailure> {
        Self::try_start_with_bin(&agent_bin(), node, manifest, interfaces, extra_args)
    }

    /// [`Agent::try_start`] with an explicit binary (one that keeps the same
    /// CLI contract) instead of [`agent_bin`].
    pub fn try_start_with_bin(
        bin: &Path,
        node: &Netns,
        manifest: &Path,
        interfaces: &[String],
        extra_args: &[&str],
    ) -> Result<Self, StartFailure> {
        let mut args = vec![
            "run".to_owned(),
            "--manifest".to_owned(),
            manifest.display().to_string(),
        ];
        for interface in interfaces {
            args.extend(["--interface".to_owned(), interface.clone()]);
        }
        args.extend(extra_args.iter().map(|&a| a.to_owned()));
        Self::try_launch(bin, node, args)
    }

    /// Starts `sluice-agent <args>` (a `run` or a `join` command line) and
    /// waits for "data plane ready", like [`Agent::try_start`]. The agent gets
    /// its own bpffs unless `args` has `--bpffs-root`. [`Agent::restart`]
    /// runs the same command line again.
    pub fn try_launch(bin: &Path, node: &Netns, args: Vec<String>) -> Result<Self, StartFailure> {
        let bin = bin.to_owned();
        let mut scratch = ScratchDir::new();
        let mut run_args = args;
        let given: Vec<&str> = run_args.iter().map(String::as_str).collect();
        let bpffs_root = match bpffs_root_arg(&given).map(str::to_owned) {
            Some(root) => PathBuf::from(root),
            None => {
                let root = scratch.mount_bpffs("bpffs");
                run_args.extend(["--bpffs-root".to_owned(), root.display().to_string()]);
                root
            }
        };
        let mut agent = Self {
            node: node.name().to_owned(),
            bin,
            run_args,
            bpffs_root,
            log_path: scratch.join("agent.log"),
            child: None,
            pid: 0,
            ready_lines: 0,
            scratch,
        };
        agent.spawn();
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Starts the agent again with the same arguments (SIGKILLing it first if
    /// it still runs) and waits for a new "data plane ready" line. Panics,
    /// showing the log's tail, if it does not get ready.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|f| panic!("{f}"));
    }

    /// Like [`Agent::restart`], but an exit before ready is an `Err`.
    pub fn try_restart(&mut self) -> Result<(), StartFailure> {
        self.kill9();
        self.spawn();
        self.wait_ready()
    }

    /// SIGKILLs the agent and reaps it; the pinned data plane stays. Does
    /// nothing if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it has exited already, which is fine.
            let _ = child.kill();
            if let Err(e) = child.wait() {
                eprintln!("sluice-tests: reaping sluice-agent {}: {e}", self.pid);
            }
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        if self.child.is_some() {
            crate::netns::kill(self.pid, signal);
        }
    }

    /// Waits (at most `timeout`) for the agent to exit and reaps it. `None`
    /// if it is still running then (or was never reaped by this handle).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => return None,
                Err(e) => panic!("waiting for sluice-agent {}: {e}", self.pid),
            }
        }
    }

    /// Whether the agent process is still running.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none() && self.child.is_some()
    }

    /// The namespace the agent runs in.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The pid of the agent (of the latest start).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The whole log so far (stdout and stderr of every start, appended).
    pub fn log(&self) -> String {
        command::read_log(&self.log_path)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The bpffs directory the agent pins under.
    pub fn bpffs_root(&self) -> &Path {
        &self.bpffs_root
    }

    /// This agent's scratch directory (a place for manifests, say).
    pub fn scratch(&self) -> &ScratchDir {
        &self.scratch
    }

    /// Waits (at most `timeout`) until `needle` occurs at least `occurrences`
    /// times in the whole log (all starts counted).
    pub fn wait_for_log(&self, needle: &str, occurrences: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().matches(needle).count() >= occurrences {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(POLL);
        }
    }

    /// `sluice-agent <args>` in the node namespace, whatever its exit status.
    /// `--bpffs-root <this agent's root>` is appended to `run`, `status` and
    /// `down` unless `args` has one.
    pub fn run_cli(&self, args: &[&str]) -> Output {
        command::output(&mut self.cli(args)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `sluice-agent status --output json`, parsed. Panics, showing the
    /// output, if the command fails or does not print JSON.
    pub fn status_json(&self) -> serde_json::Value {
        let mut cli = self.cli(&["status", "--output", "json"]);
        let out = command::run(&mut cli).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}` did not print JSON ({e}):\n{}",
                command::describe(&cli),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node])
            .arg(&self.bin)
            .args(args);
        let takes_root = matches!(args.first(), Some(&("run" | "status" | "down")));
        if takes_root && bpffs_root_arg(args).is_none() {
            cmd.arg("--bpffs-root").arg(&self.bpffs_root);
        }
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&mut self) {
        let args: Vec<&str> = self.run_args.iter().map(String::as_str).collect();
        let child = command::spawn_logged(&mut self.cli(&args), &self.log_path);
        self.pid = child.id();
        self.child = Some(child);
    }

    /// Waits for one more "data plane ready" line than at the last start.
    fn wait_ready(&mut self) -> Result<(), StartFailure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready_lines = self.log().matches(READY_LINE).count();
            if ready_lines > self.ready_lines {
                self.ready_lines = ready_lines;
                return Ok(());
            }
            if let Some(status) = self.wait_exit(Duration::ZERO) {
                return Err(StartFailure {
                    status,
                    log: self.log(),
                });
            }
            if self.child.is_none() {
                panic!("sluice-agent is not running (was it killed?)");
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "sluice-agent did not print {READY_LINE:?} within {READY_TIMEOUT:?}; \
                     log tail:\n{}",
                    tail(&self.log(), TAIL_LINES)
                );
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- sluice-agent log tail ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log(), TAIL_LINES)
            );
        }
        self.kill9();
        if let Err(e) = command::run(&mut self.cli(&["down"])) {
            eprintln!("sluice-tests: sluice-agent down: {e}");
        }
    }
}

/// The value of `--bpffs-root` in `args`, if there is one.
fn bpffs_root_arg<'a>(args: &[&'a str]) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, &arg)| {
        if arg == "--bpffs-root" {
            args.get(i + 1).copied()
        } else {
            arg.strip_prefix("--bpffs-root=")
        }
    })
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_bpffs_root_in_both_spellings() {
        assert_eq!(bpffs_root_arg(&["--mode", "tc"]), None);
        assert_eq!(bpffs_root_arg(&["--bpffs-root", "/x"]), Some("/x"));
        assert_eq!(
            bpffs_root_arg(&["--mode=xdp", "--bpffs-root=/y"]),
            Some("/y")
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
