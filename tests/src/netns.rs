//! A network namespace that lives as long as its guard.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::Duration,
};

use crate::{
    command::{self, CommandError},
    scratch,
};

/// Every namespace the harness creates is named `slt-<pid>-<n>-<role>`.
pub const NETNS_PREFIX: &str = "slt";

/// Where `ip netns` keeps its namespace files.
const NETNS_DIR: &str = "/run/netns";

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `slt-<pid>-<n>-<role>`. Panics if `ip netns add` fails.
    pub fn new(role: &str) -> Self {
        Self::try_new(role)
            .unwrap_or_else(|e| panic!("creating the network namespace for {role:?}: {e}"))
    }

    pub fn try_new(role: &str) -> Result<Self, CommandError> {
        let name = netns_name(std::process::id(), crate::next_id(), role);
        // The name holds our pid, so a namespace already there was left by a
        // dead process that had the same pid: it is stale.
        if Path::new(NETNS_DIR).join(&name).exists() {
            eprintln!("sluice-tests: deleting stale network namespace {name}");
            delete_netns(&name);
        }
        let add = || command::run(Command::new("ip").args(["netns", "add", &name]));
        if let Err(first) = add() {
            // Concurrent `ip netns add` calls can race while setting up the
            // shared /run/netns mount; one retry is enough.
            thread::sleep(Duration::from_millis(50));
            add().map_err(|_| first)?;
        }
        // From here on, dropping `ns` deletes the namespace.
        let ns = Self { name };
        command::run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file `setns()` opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec <name> argv...`, ready to be configured and run.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` in the namespace and returns its output, whatever its
    /// exit status. Panics only if `ip` cannot be started.
    pub fn exec(&self, argv: &[&str]) -> Output {
        command::output(&mut self.command(argv)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `argv` in the namespace; a non-zero exit status is an error.
    pub fn try_exec(&self, argv: &[&str]) -> Result<Output, CommandError> {
        command::run(&mut self.command(argv))
    }

    /// Runs `argv` in the namespace and panics, showing stdout and stderr,
    /// if it fails.
    pub fn exec_ok(&self, argv: &[&str]) -> Output {
        self.try_exec(argv)
            .unwrap_or_else(|e| panic!("in {}: {e}", self.name))
    }

    /// `ip -n <name> args...` (no fork of a shell, faster than `exec`);
    /// panics, showing the output, if it fails.
    pub fn ip_ok(&self, args: &[&str]) -> Output {
        command::run(Command::new("ip").args(["-n", &self.name]).args(args))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `argv` in the namespace with the given stdout and stderr (files,
    /// `Stdio::null()`, ...). The caller owns the child: kill and reap it.
    pub fn spawn(
        &self,
        argv: &[&str],
        stdout: impl Into<Stdio>,
        stderr: impl Into<Stdio>,
    ) -> Child {
        let mut cmd = self.command(argv);
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot start `{}`: {e}", command::describe(&cmd)))
    }

    /// Runs `f` on a fresh thread that first moves into this namespace, and
    /// returns its result (a panic in `f` is resumed on the caller). Sockets
    /// created in `f` belong to this namespace for their whole life, whatever
    /// thread uses them later; threads spawned in `f` start in it too.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|scope| {
            let thread = thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, move || {
                    enter_current_thread(&path)
                        .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
                    f()
                })
                .unwrap_or_else(|e| panic!("cannot spawn a thread: {e}"));
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter_current_thread(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: `file` is an open descriptor of a namespace file and outlives the
    // call; CLONE_NEWNET changes the network namespace of this thread only,
    // which the kernel allows in a multi-threaded process.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Kills whatever still runs in the namespace (never this process) and deletes
/// it. Logs failures, never panics: it runs in `Drop`.
fn delete_netns(name: &str) {
    for pid in netns_pids(name) {
        if pid != std::process::id() {
            eprintln!("sluice-tests: killing process {pid} left in network namespace {name}");
            kill(pid, libc::SIGKILL);
        }
    }
    if let Err(e) = command::run(Command::new("ip").args(["netns", "delete", name])) {
        eprintln!("sluice-tests: deleting network namespace {name}: {e}");
    }
}

/// Processes whose network namespace is `name` (`ip netns pids`).
fn netns_pids(name: &str) -> Vec<u32> {
    match command::run(Command::new("ip").args(["netns", "pids", name])) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect(),
        Err(e) => {
            eprintln!("sluice-tests: listing processes in {name}: {e}");
            Vec::new()
        }
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn kill(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 0 (it came
    // from a u32 that fits pid_t and is never 0 for a process) targets one
    // process, never a group.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            eprintln!("sluice-tests: kill({pid}, {signal}): {e}");
        }
    }
}

fn netns_name(pid: u32, n: u64, role: &str) -> String {
    let role: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{NETNS_PREFIX}-{pid}-{n}-{role}")
}

/// The pid of the test process that created namespace `name`, if `name`
/// follows the harness's naming (`slt-<pid>-<n>-<role>`); `None` for every
/// other namespace, which must never be touched.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next().filter(|p| is_decimal(p))?.parse().ok()?;
    parts.next().filter(|n| is_decimal(n))?;
    let role = parts.next().filter(|r| !r.is_empty())?;
    role.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        .then_some(pid)
}

fn is_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Namespaces deleted (processes still in them were killed first).
    pub namespaces: Vec<String>,
    /// bpffs instances unmounted and scratch directories removed.
    pub scratch: scratch::StaleScratch,
}

/// Deletes what test processes that are gone left behind: namespaces named
/// `slt-<pid>-...` (killing processes still inside, such as an orphaned
/// agent) and their scratch directories and bpffs mounts. Namespaces of live
/// processes and namespaces not named by the harness are never touched.
/// Failures are logged and skipped.
pub fn cleanup_stale() -> CleanupReport {
    let mut namespaces = Vec::new();
    match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                    delete_netns(&name);
                    namespaces.push(name);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => eprintln!("sluice-tests: reading {NETNS_DIR}: {e}"),
    }
    namespaces.sort();
    CleanupReport {
        namespaces,
        scratch: scratch::cleanup_stale(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_to_their_owner() {
        let name = netns_name(4242, 7, "backend3");
        assert_eq!(name, "slt-4242-7-backend3");
        assert_eq!(owner_pid(&name), Some(4242));
    }

    #[test]
    fn roles_are_sanitized_and_may_contain_dashes() {
        let name = netns_name(1, 0, "my role/x");
        assert_eq!(name, "slt-1-0-my_role_x");
        assert_eq!(owner_pid(&name), Some(1));
        assert_eq!(owner_pid("slt-12-3-node-a"), Some(12));
    }

    #[test]
    fn foreign_names_are_never_claimed() {
        for name in [
            "slt",
            "slt-",
            "slt-12",
            "slt-12-3",
            "slt-12-3-",
            "slt-x-3-node",
            "slt-12-y-node",
            "slt--3-node",
            "slt-+12-3-node",
            "slt-12-3-no de",
            "sltx-12-3-node",
            "other-12-3-node",
            "SLT-12-3-node",
            "slt-99999999999-3-node",
        ] {
            assert_eq!(owner_pid(name), None, "{name}");
        }
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
