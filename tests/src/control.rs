//! A handle on the real `sluice-control` binary in a namespace, and on
//! `sluicectl` talking to it.
//!
//! The CLI contract it relies on: `sluice-control --listen ADDR --data-dir DIR
//! --admin-config FILE --vip-cidr CIDR --advertise HOST [--node-cert-ttl SECS]`
//! logs "control service ready" once it serves, and writes FILE (the first
//! admin's sluicectl config); `sluicectl --config FILE [-o json] ...`.
//! sluicectl runs in the control service's namespace: nothing reaches the
//! cluster from the root namespace.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{agent, command, netns::Netns, scratch::ScratchDir};

/// Set to use that `sluice-control` binary.
pub const CONTROL_BIN_ENV: &str = "SLUICE_CONTROL_BIN";
/// Set to use that `sluicectl` binary.
pub const SLUICECTL_BIN_ENV: &str = "SLUICECTL_BIN";
/// Logged once per start, when the API serves.
pub const READY_LINE: &str = "control service ready";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

pub fn control_bin() -> PathBuf {
    agent::workspace_bin("sluice-control", CONTROL_BIN_ENV)
}

pub fn sluicectl_bin() -> PathBuf {
    agent::workspace_bin("sluicectl", SLUICECTL_BIN_ENV)
}

/// A running `sluice-control` in `ns`. Dropping it SIGKILLs it and removes
/// its data directory (kept with `SLUICE_KEEP_LOGS`).
#[derive(Debug)]
pub struct ControlService {
    ns: String,
    listen: SocketAddrV4,
    args: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
    ready_lines: usize,
    scratch: ScratchDir,
}

impl ControlService {
    /// Starts `sluice-control` listening on `listen` (an address of `ns`),
    /// allocating VIPs from `vip_cidr`, plus `extra_args`; waits for it to
    /// serve.
    pub fn start(ns: &Netns, listen: SocketAddrV4, vip_cidr: &str, extra_args: &[&str]) -> Self {
        let scratch = ScratchDir::new();
        let mut args: Vec<String> = [
            "--listen",
            &listen.to_string(),
            "--data-dir",
            &scratch.join("data").display().to_string(),
            "--admin-config",
            &scratch.join("admin.conf").display().to_string(),
            "--vip-cidr",
            vip_cidr,
            "--advertise",
            &listen.ip().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut control = ControlService {
            ns: ns.name().to_owned(),
            listen,
            args,
            log_path: scratch.join("control.log"),
            child: None,
            ready_lines: 0,
            scratch,
        };
        control.spawn();
        control.wait_ready();
        control
    }

    /// The control service's pid (of the latest start), if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `https://<listen>`, the URL agents join.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// The first admin's sluicectl config, written by the control service.
    pub fn admin_conf(&self) -> PathBuf {
        self.scratch.join("admin.conf")
    }

    pub fn scratch(&self) -> &ScratchDir {
        &self.scratch
    }

    /// The cluster CA's certificate, from the admin's config (its `ca`, the
    /// first certificate in it), written to a PEM file for tools to trust.
    pub fn ca_pem_file(&self) -> PathBuf {
        let conf = std::fs::read_to_string(self.admin_conf()).expect("admin.conf");
        let begin = conf
            .find("-----BEGIN CERTIFICATE-----")
            .expect("a CA in admin.conf");
        let end = conf[begin..]
            .find("-----END CERTIFICATE-----")
            .map(|e| begin + e + "-----END CERTIFICATE-----".len())
            .expect("the end of the CA");
        let pem: String = conf[begin..end]
            .lines()
            .map(|l| format!("{}\n", l.trim()))
            .collect();
        self.scratch.write("ca.pem", pem)
    }

    pub fn log(&self) -> String {
        command::read_log(&self.log_path)
    }

    /// The current view version: what every node should have applied.
    pub fn view_version(&self) -> u64 {
        let nodes = self.sluicectl_json(&["get", "nodes"]);
        nodes
            .as_array()
            .and_then(|n| n.iter().filter_map(|n| n["desiredVersion"].as_u64()).max())
            .unwrap_or(0)
    }

    /// SIGKILLs the control service (no shutdown path runs) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same data directory and waits until it serves.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
        self.wait_ready();
    }

    /// `sluicectl --config <admin.conf> <args>` in the control namespace,
    /// whatever its exit status.
    pub fn sluicectl(&self, args: &[&str]) -> Output {
        self.sluicectl_as(&self.admin_conf(), args)
    }

    /// `sluicectl` with another user's config file.
    pub fn sluicectl_as(&self, config: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(sluicectl_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command::output(&mut cmd).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `sluicectl <args>` as the admin; panics, showing its output, if it
    /// fails. Returns stdout.
    pub fn sluicectl_ok(&self, args: &[&str]) -> String {
        let out = self.sluicectl(args);
        assert!(
            out.status.success(),
            "sluicectl {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sluicectl -o json <args>`, parsed.
    pub fn sluicectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.sluicectl_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("sluicectl {args:?}: not JSON ({e}):\n{out}"))
    }

    /// The command [`Self::apply`] runs, to spawn and wait for later (its
    /// output piped).
    pub fn apply_command(&self, name: &str, manifest: &str) -> Command {
        let path = self.scratch.write(name, manifest);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(sluicectl_bin())
            .arg("--config")
            .arg(self.admin_conf())
            .args(["apply", "-f"])
            .arg(path)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Whether its process runs (it was not killed, or was restarted).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `sluicectl apply -f <file>` with `manifest` as the file's content.
    pub fn apply(&self, name: &str, manifest: &str) -> Output {
        let path = self.scratch.write(name, manifest);
        self.sluicectl(&["apply", "-f", &path.display().to_string()])
    }

    /// A fresh join token and the CA pin, from `sluicectl token create`.
    pub fn join_token(&self, ttl: &str) -> (String, String) {
        let token = self.sluicectl_json(&["token", "create", "--ttl", ttl]);
        let field = |name: &str| {
            token[name]
                .as_str()
                .unwrap_or_else(|| panic!("token create: no {name} in {token}"))
                .to_owned()
        };
        (field("token"), field("caHash"))
    }

    /// Waits (at most `timeout`) until every node in `nodes` reports having
    /// applied the current view (`get nodes`: applied = desired version).
    /// Returns the nodes' JSON on success, `Err` with the last answer if not.
    pub fn wait_programmed(
        &self,
        nodes: &[&str],
        at_least: u64,
        timeout: Duration,
    ) -> Result<serde_json::Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let listed = self.sluicectl_json(&["get", "nodes"]);
            if nodes
                .iter()
                .all(|name| node_programmed(&listed, name, at_least))
            {
                return Ok(listed);
            }
            if Instant::now() >= deadline {
                return Err(listed.to_string());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(control_bin())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        self.child = Some(command::spawn_logged(&mut cmd, &self.log_path));
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let lines = self.log().matches(READY_LINE).count();
            if lines > self.ready_lines {
                self.ready_lines = lines;
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                panic!(
                    "sluice-control exited before it was ready ({status}):\n{}",
                    agent::tail(&self.log(), 60)
                );
            }
            if Instant::now() >= deadline {
                self.kill9();
                panic!(
                    "sluice-control was not ready within {READY_TIMEOUT:?}:\n{}",
                    agent::tail(&self.log(), 60)
                );
            }
            thread::sleep(POLL);
        }
    }
}

/// Whether `get nodes -o json` output shows `name` with its current view
/// (at least version `at_least`) applied.
fn node_programmed(listed: &serde_json::Value, name: &str, at_least: u64) -> bool {
    let nodes = listed.as_array().cloned().unwrap_or_default();
    nodes.iter().any(|n| {
        let applied = n["appliedVersion"].as_u64().unwrap_or(0);
        let desired = n["desiredVersion"].as_u64().unwrap_or(u64::MAX);
        n["name"] == name && applied >= desired && applied >= at_least
    })
}

impl Drop for ControlService {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- sluice-control log tail ({}) ---\n{}",
                self.log_path.display(),
                agent::tail(&self.log(), 60)
            );
        }
        self.kill9();
    }
}
