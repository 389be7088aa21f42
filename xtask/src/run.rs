//! The commands that come after bootstrap: test, demo, bench, build-ebpf.

use std::{
    path::PathBuf,
    process::{Command, ExitCode, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::cmd::{Shell, display, output, run, status};

/// The kernel programs build only for bpfel-unknown-none on nightly; `--workspace`
/// would take them too (it ignores default-members), so the stable steps leave them out.
const EBPF_CRATE: &str = "sluice-ebpf";

/// `cargo xtask test`: every step runs even after a failure, so one log shows
/// everything; the exit code is 1 if any failed.
pub fn test(sh: &Shell, extra: &[String]) -> ExitCode {
    let mut clippy_ebpf = sh.cargo(["+nightly", "clippy", "-p", EBPF_CRATE]);
    clippy_ebpf
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"])
        .current_dir(sh.root().join("ebpf/programs"));
    let mut cargo_test = sh.cargo(["test", "--workspace", "--exclude", EBPF_CRATE]);
    cargo_test.arg("--no-fail-fast").args(extra);

    let steps = [
        (
            // Namespaces and links a crashed run left behind.
            "netns-gc",
            sh.cargo([
                "run",
                "-q",
                "-p",
                "sluice-tests",
                "--bin",
                "sluice-netns-gc",
            ]),
        ),
        ("fmt", sh.cargo(["fmt", "--all", "--", "--check"])),
        (
            "clippy",
            sh.cargo([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
        ("clippy-ebpf", clippy_ebpf),
        (
            // The sluice-agent binary the end-to-end tests spawn.
            "build",
            sh.cargo(["build", "--workspace", "--exclude", EBPF_CRATE, "--bins"]),
        ),
        ("test", cargo_test),
    ];

    let total = steps.len();
    let mut results = Vec::with_capacity(total);
    for (i, (name, mut cmd)) in steps.into_iter().enumerate() {
        let line = display(&cmd);
        println!("\n==> xtask test [{}/{total}] {name}: {line}", i + 1);
        let start = Instant::now();
        let outcome = status(&mut cmd);
        let elapsed = start.elapsed();
        let verdict = match &outcome {
            Ok(s) if s.success() => None,
            Ok(s) => Some(s.to_string()),
            Err(e) => Some(format!("{e:#}")),
        };
        println!(
            "<== {name}: {} in {}",
            verdict.as_deref().unwrap_or("ok"),
            secs(elapsed)
        );
        results.push((name, line, elapsed, verdict));
    }

    println!("\nxtask test summary:");
    for (name, line, elapsed, verdict) in &results {
        let mark = if verdict.is_some() { "FAILED" } else { "ok" };
        println!("  {mark:<6} {:>8}  {name:<12} {line}", secs(*elapsed));
        if let Some(why) = verdict {
            println!("  {:<6} {:>8}  {:<12} ({why})", "", "", "");
        }
    }
    let failed = results.iter().filter(|r| r.3.is_some()).count();
    if failed == 0 {
        println!("all {total} steps passed");
        ExitCode::SUCCESS
    } else {
        println!("{failed} of {total} steps failed");
        ExitCode::FAILURE
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `cargo xtask demo` / `bench`: build the release binaries, then run
/// `target/release/<bin>` and exit as it did.
pub fn release_bin(sh: &Shell, bin: &str, args: &[String]) -> Result<ExitCode> {
    run(&mut sh.cargo([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--bins",
    ]))
    .context("building the release binaries")?;
    let path = target_dir(sh)?.join("release").join(bin);
    let mut cmd: Command = sh.cmd(&path);
    cmd.args(args);
    println!("xtask: running {}", display(&cmd));
    let status = status(&mut cmd)?;
    Ok(exit_code(status))
}

/// `cargo xtask build-ebpf`: the agent's build script builds the kernel programs.
pub fn build_ebpf(sh: &Shell) -> Result<()> {
    run(&mut sh.cargo(["build", "-p", "sluice-agent"]))
}

/// The target directory cargo uses (honours CARGO_TARGET_DIR and `build.target-dir`).
fn target_dir(sh: &Shell) -> Result<PathBuf> {
    let metadata = output(&mut sh.cargo(["metadata", "--format-version", "1", "--no-deps"]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("parsing `cargo metadata`")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("`cargo metadata` has no target_directory")
}

/// The child's exit code; 128 + N when signal N ended it, as a shell reports it.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    #[test]
    fn exit_code_follows_the_child() {
        // Raw wait statuses: the exit code in the second byte, a fatal signal
        // in the low bits (2 = SIGINT).
        assert_eq!(exit_code(ExitStatus::from_raw(0)), ExitCode::SUCCESS);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(exit_code(ExitStatus::from_raw(2)), ExitCode::from(130));
    }
}
