//! `cargo xtask bootstrap`: everything a fresh machine (Debian 12, root, stable
//! and `nightly` toolchains) lacks to build and test Sluice — see
//! docs/architecture.md ("Toolchain") for the recipe these steps follow. Every step
//! checks first and is quick when there is nothing to do; every other command
//! runs this first.

use std::{
    env,
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{Shell, output, probe, run};

/// The bpf-linker release the README documents; 0.13.0 builds against the
/// nightly's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What the tests and the demo call: `ip`, `ethtool`, `curl`, `bpftool`,
/// `sysctl` (procps), `nsenter` (util-linux), the iptables / nftables
/// baselines of `cargo xtask bench`, the dashboard test's headless
/// browser (`chromium`, `chromedriver`) and `openssl` (the CA's key pin),
/// and the etcd store's: `etcd` 3.4 (`/usr/bin/etcd`, the clusters its tests
/// start), and `protoc` with the well-known types' `.proto` files
/// (libprotobuf-dev), which the `etcd-client` crate's build script runs on
/// etcd's protos (it has no protoc-free mode).
const PACKAGES: [&str; 15] = [
    "iproute2",
    "ethtool",
    "curl",
    "bpftool",
    "iptables",
    "nftables",
    // `conntrack -F` between the packet-rate bench's iptables/nftables runs.
    "conntrack",
    "procps",
    "util-linux",
    "chromium",
    "chromium-driver",
    "openssl",
    "etcd-server",
    "protobuf-compiler",
    "libprotobuf-dev",
];

/// Where the agent pins its maps and links.
const BPFFS: &str = "/sys/fs/bpf";

pub struct Options {
    /// Rebuild bpf-linker even when a working one is on PATH.
    pub force_bpf_linker: bool,
}

/// Runs every step and returns the shell (PATH included) later commands use.
pub fn bootstrap(root: &Path, options: &Options) -> Result<Shell> {
    step("root", require_root)?;
    let cargo_home = cargo_home()?;
    let sh = Shell::new(root.to_owned(), path_with(&cargo_home.join("bin"))?);
    step("rust-src", || rust_src(&sh))?;
    step("bpf-linker", || {
        bpf_linker(&sh, &cargo_home, options.force_bpf_linker)
    })?;
    step("packages", || packages(&sh))?;
    step("bpffs", || bpffs(&sh, Path::new(BPFFS)))?;
    Ok(sh)
}

/// Prints what a step found or did, or names it in the error.
fn step(name: &str, f: impl FnOnce() -> Result<String>) -> Result<()> {
    let done = f().with_context(|| format!("bootstrap step `{name}` failed"))?;
    println!("bootstrap: {name}: {done}");
    Ok(())
}

fn require_root() -> Result<String> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = effective_uid(&status).context("no Uid line in /proc/self/status")?;
    if euid != 0 {
        bail!(
            "running as uid {euid}; Sluice needs root: the data plane needs CAP_BPF and \
             CAP_NET_ADMIN, the tests create network namespaces, and bootstrap installs \
             Debian packages and mounts bpffs. Run it again as root."
        );
    }
    Ok("running as root".into())
}

/// The effective uid: the second field of the `Uid:` line (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn home() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// `$CARGO_HOME`, `~/.cargo` by default (the rustup proxy sets it for us).
fn cargo_home() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => Ok(home()?.join(".cargo")),
    }
}

/// PATH with `bin` in front when it is not on it already, so that children
/// (aya-build's cargo, rustc linking with bpf-linker) find what we install there.
fn path_with(bin: &Path) -> Result<OsString> {
    // Debian's default for root (/etc/profile) when PATH is unset or empty.
    let current = env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.iter().any(|d| d == bin) {
        dirs.insert(0, bin.to_owned());
    }
    env::join_paths(dirs).context("joining PATH")
}

fn rust_src(sh: &Shell) -> Result<String> {
    let toolchains = output(sh.cmd("rustup").args(["toolchain", "list"]))?;
    if !has_nightly(&toolchains) {
        run(sh.cmd("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok("installed the nightly toolchain with rust-src".into());
    }
    let components = output(sh.cmd("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if has_rust_src(&components) {
        return Ok("present for nightly".into());
    }
    run(sh
        .cmd("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    Ok("installed for nightly".into())
}

/// Whether `rustup toolchain list` shows the undated `nightly-<host>` toolchain.
fn has_nightly(toolchains: &str) -> bool {
    toolchains
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| name.strip_prefix("nightly-"))
        .any(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn has_rust_src(components: &str) -> bool {
    components
        .lines()
        .map(str::trim)
        .any(|c| c == "rust-src" || c.starts_with("rust-src-"))
}

fn bpf_linker(sh: &Shell, cargo_home: &Path, force: bool) -> Result<String> {
    // "Present" means it runs: a nightly update removes the libLLVM it was
    // linked against, and then it must be rebuilt.
    if !force && let Some(version) = probe(sh.cmd("bpf-linker").arg("--version")) {
        return Ok(format!("present ({})", version.trim()));
    }
    let nightly = Nightly::parse(&output(sh.cmd("rustc").args(["+nightly", "-vV"]))?)?;
    let sysroot = output(sh.cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let prefix = home()?
        .join(".cache/sluice")
        .join(format!("llvm-{}-{}", nightly.llvm_major, nightly.commit));
    link_libllvm(&Path::new(sysroot.trim()).join("lib"), &prefix.join("lib"))?;

    println!(
        "bootstrap: bpf-linker: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        prefix.display()
    );
    // --force: a broken copy from an older nightly is still recorded as
    // installed and would otherwise be kept.
    run(sh
        .cargo(["+nightly", "install", "bpf-linker", "--locked", "--force"])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{}", nightly.llvm_major)])
        .arg("--root")
        .arg(cargo_home)
        .env("LLVM_PREFIX", &prefix))?;

    let installed = cargo_home.join("bin/bpf-linker");
    let version = output(sh.cmd(&installed).arg("--version"))
        .context("the bpf-linker just built does not run")?;
    if probe(sh.cmd("bpf-linker").arg("--version")).is_none() {
        bail!(
            "built {}, but `bpf-linker` on PATH still fails: another copy earlier on PATH?",
            installed.display()
        );
    }
    Ok(format!(
        "installed {} at {}",
        version.trim(),
        installed.display()
    ))
}

/// What names the nightly's LLVM: its major version (the bpf-linker feature)
/// and the compiler commit (a new nightly gets a new prefix).
#[derive(Debug, PartialEq, Eq)]
struct Nightly {
    llvm_major: String,
    commit: String,
}

impl Nightly {
    /// Parses `rustc -vV`.
    fn parse(verbose_version: &str) -> Result<Self> {
        let field = |name: &str| {
            verbose_version
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .with_context(|| format!("no `{name}` in `rustc +nightly -vV`"))
        };
        let llvm = field("LLVM version")?;
        let llvm_major = llvm.split('.').next().unwrap_or_default();
        if llvm_major.is_empty() || !llvm_major.bytes().all(|b| b.is_ascii_digit()) {
            bail!("unexpected LLVM version `{llvm}` in `rustc +nightly -vV`");
        }
        let commit: String = field("commit-hash")?.chars().take(9).collect();
        Ok(Self {
            llvm_major: llvm_major.to_owned(),
            commit,
        })
    }
}

/// The LLVM prefix bpf-linker is built against: `lib/` holds the sysroot's libLLVM under its
/// SONAME file name (what the bpf-linker binary asks for, found through the
/// rpath llvm-sys sets to this lasting directory) and as `libLLVM.so` (what
/// the link step looks for).
fn link_libllvm(sysroot_lib: &Path, prefix_lib: &Path) -> Result<()> {
    let mut libs = Vec::new();
    for entry in
        fs::read_dir(sysroot_lib).with_context(|| format!("reading {}", sysroot_lib.display()))?
    {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            libs.push(name);
        }
    }
    let [soname] = libs.as_slice() else {
        bail!(
            "expected one libLLVM.so.* in {}, found {libs:?}",
            sysroot_lib.display()
        );
    };
    fs::create_dir_all(prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    let target = sysroot_lib.join(soname);
    for link in [prefix_lib.join(soname), prefix_lib.join("libLLVM.so")] {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    }
    Ok(())
}

fn packages(sh: &Shell) -> Result<String> {
    let missing: Vec<&str> = PACKAGES
        .into_iter()
        .filter(|pkg| {
            let status = probe(sh.cmd("dpkg-query").args(["-W", "-f=${Status}", pkg]));
            !status.is_some_and(|s| dpkg_installed(&s))
        })
        .collect();
    if missing.is_empty() {
        return Ok(format!("present ({})", PACKAGES.join(" ")));
    }
    println!("bootstrap: packages: installing {}", missing.join(" "));
    run(sh
        .cmd("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(sh
        .cmd("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(format!("installed {}", missing.join(" ")))
}

/// `dpkg-query -W -f='${Status}'` prints "want flag state": "install ok installed".
fn dpkg_installed(status: &str) -> bool {
    status.split_whitespace().nth(2) == Some("installed")
}

fn bpffs(sh: &Shell, mountpoint: &Path) -> Result<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if is_bpf_mount(&mounts, mountpoint) {
        return Ok(format!("already mounted at {}", mountpoint.display()));
    }
    run(sh.cmd("mount").args(["-t", "bpf", "bpf"]).arg(mountpoint))?;
    Ok(format!("mounted bpffs at {}", mountpoint.display()))
}

/// Whether `mounts` (/proc/self/mounts) has a `bpf` filesystem at `mountpoint`.
fn is_bpf_mount(mounts: &str, mountpoint: &Path) -> bool {
    let Some(mountpoint) = mountpoint.to_str() else {
        return false;
    };
    let escaped = escape_mount_path(mountpoint);
    mounts.lines().any(|line| {
        let mut fields = line.split(' ').skip(1);
        fields.next() == Some(escaped.as_str()) && fields.next() == Some("bpf")
    })
}

/// The kernel writes space, tab, newline and backslash in mount paths as octal
/// escapes (`show_mountinfo` → `mangle`, fs/proc_namespace.c).
fn escape_mount_path(path: &str) -> String {
    path.chars()
        .map(|c| match c {
            ' ' => r"\040".to_owned(),
            '\t' => r"\011".to_owned(),
            '\n' => r"\012".to_owned(),
            '\\' => r"\134".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tcat\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tcat\n"), None);
    }

    #[test]
    fn nightly_parses_llvm_major_and_short_commit() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\n\
                  commit-date: 2026-05-19\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        let nightly = Nightly::parse(vv).expect("valid rustc -vV");
        assert_eq!(
            nightly,
            Nightly {
                llvm_major: "22".into(),
                commit: "e50aa6fba".into()
            }
        );
        assert!(Nightly::parse("rustc 1.97.0-nightly\n").is_err());
    }

    #[test]
    fn nightly_toolchain_is_found_but_not_a_dated_one() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly(
            "stable-x86_64-unknown-linux-gnu\nnightly-2026-05-01-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn rust_src_is_recognised() {
        assert!(has_rust_src("cargo-x86_64-unknown-linux-gnu\nrust-src\n"));
        assert!(!has_rust_src(
            "cargo-x86_64-unknown-linux-gnu\nrust-std-x86_64-unknown-linux-gnu\n"
        ));
    }

    #[test]
    fn dpkg_status_installed() {
        assert!(dpkg_installed("install ok installed"));
        assert!(dpkg_installed("hold ok installed"));
        assert!(!dpkg_installed("deinstall ok config-files"));
        assert!(!dpkg_installed(""));
    }

    #[test]
    fn bpf_mount_detection() {
        let mounts = "sysfs /sys sysfs rw,relatime 0 0\n\
                      bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0\n\
                      bpf /tmp/a\\040b bpf rw 0 0\n\
                      tmpfs /tmp/other tmpfs rw 0 0\n";
        assert!(is_bpf_mount(mounts, Path::new("/sys/fs/bpf")));
        assert!(is_bpf_mount(mounts, Path::new("/tmp/a b")));
        assert!(!is_bpf_mount(mounts, Path::new("/tmp/other")));
        assert!(!is_bpf_mount(mounts, Path::new("/sys/fs")));
        assert!(!is_bpf_mount(
            "sysfs /sys sysfs rw 0 0\n",
            Path::new("/sys/fs/bpf")
        ));
    }

    /// Mounts and unmounts bpffs on a scratch directory: changes the host's
    /// mount table, so only on request (`cargo test -p xtask -- --ignored`).
    #[test]
    #[ignore = "needs root; mounts bpffs on a scratch directory"]
    fn bpffs_mounts_once() {
        let dir = env::temp_dir().join(format!("xtask-bpffs-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("creating the scratch mountpoint");
        let sh = Shell::new(dir.clone(), env::var_os("PATH").unwrap_or_default());
        let first = bpffs(&sh, &dir);
        let second = bpffs(&sh, &dir);
        let mounts = fs::read_to_string("/proc/self/mounts").expect("reading mounts");
        let mounted = is_bpf_mount(&mounts, &dir);
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = fs::remove_dir(&dir);
        assert!(
            first
                .expect("first call mounts")
                .starts_with("mounted bpffs")
        );
        assert!(
            second
                .expect("second call finds it")
                .starts_with("already mounted at")
        );
        assert!(mounted);
    }
}
