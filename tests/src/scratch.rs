//! Per-test scratch directories (logs, manifests, a private bpffs), removed
//! on drop.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    ptr,
};

use crate::netns::pid_alive;

/// Scratch directories are `$TMPDIR/sluice-tests-<pid>-<n>`.
const SCRATCH_PREFIX: &str = "sluice-tests-";

/// Set (to anything) to keep scratch directories, agent logs included.
pub const KEEP_LOGS_ENV: &str = "SLUICE_KEEP_LOGS";

/// A directory of its own for one test (or one agent), removed on drop
/// unless `SLUICE_KEEP_LOGS` is set. bpffs instances mounted in it with
/// [`ScratchDir::mount_bpffs`] are always unmounted on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    mounts: Vec<PathBuf>,
}

impl ScratchDir {
    /// Creates `$TMPDIR/sluice-tests-<pid>-<n>`. Panics if it cannot.
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "{SCRATCH_PREFIX}{}-{}",
            std::process::id(),
            crate::next_id()
        ));
        // Our pid is in the name: anything already there is stale.
        if path.exists() {
            let _ = fs::remove_dir_all(&path);
        }
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating scratch directory {}: {e}", path.display()));
        Self {
            path,
            mounts: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `<dir>/<name>` (a manifest, say) and returns the
    /// file's path. Panics if it cannot.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.join(name);
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Mounts a fresh bpffs instance at `<dir>/<name>` and returns its path;
    /// it is unmounted on drop, which also frees whatever is still pinned in
    /// it. Each mount of bpffs is a separate instance, so tests in parallel
    /// cannot see each other's pins. It is mounted in this process's mount
    /// namespace, which `ip netns exec` copies: every command run in a test
    /// namespace sees it, and pins outlive the process that made them.
    pub fn mount_bpffs(&mut self, name: &str) -> PathBuf {
        let target = self.join(name);
        fs::create_dir_all(&target)
            .unwrap_or_else(|e| panic!("creating {}: {e}", target.display()));
        mount_bpffs(&target)
            .unwrap_or_else(|e| panic!("mounting bpffs at {}: {e}", target.display()));
        self.mounts.push(target.clone());
        target
    }
}

impl Default for ScratchDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let mut unmounted = true;
        for mount in self.mounts.drain(..).rev() {
            if let Err(e) = unmount(&mount) {
                eprintln!("sluice-tests: unmounting {}: {e}", mount.display());
                unmounted = false;
            }
        }
        if keep_logs() {
            eprintln!("sluice-tests: kept {}", self.path.display());
        } else if unmounted && let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("sluice-tests: removing {}: {e}", self.path.display());
        }
    }
}

fn keep_logs() -> bool {
    std::env::var_os(KEEP_LOGS_ENV).is_some()
}

fn c_path(path: &Path) -> io::Result<CString> {
    Ok(CString::new(path.as_os_str().as_bytes())?)
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: source, target and fstype are NUL-terminated strings that
    // outlive the call; bpffs takes no mount data, so a null pointer is valid.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lazy unmount: copies of the mount in the namespaces of commands still
/// running go away with them.
fn unmount(target: &Path) -> io::Result<()> {
    let target = c_path(target)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What [`cleanup_stale`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleScratch {
    pub unmounted: Vec<PathBuf>,
    /// Removed directories (none when `SLUICE_KEEP_LOGS` is set).
    pub removed: Vec<PathBuf>,
}

/// The pid in a scratch directory's name (`sluice-tests-<pid>-<n>`).
fn scratch_owner(dir_name: &str) -> Option<u32> {
    let (pid, n) = dir_name.strip_prefix(SCRATCH_PREFIX)?.split_once('-')?;
    let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (decimal(pid) && decimal(n)).then(|| pid.parse().ok())?
}

/// Unmounts the bpffs instances in scratch directories of processes that are
/// gone and removes those directories (unless `SLUICE_KEEP_LOGS` is set).
pub fn cleanup_stale() -> StaleScratch {
    let tmp = std::env::temp_dir();
    let stale = |path: &Path| {
        path.strip_prefix(&tmp)
            .ok()
            .and_then(|rest| rest.components().next())
            .and_then(|first| scratch_owner(&first.as_os_str().to_string_lossy()))
            .is_some_and(|pid| !pid_alive(pid))
    };

    let mut report = StaleScratch::default();
    let mut failed = false;
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // Deepest first, in case mounts are nested.
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(PathBuf::from)
        .filter(|p| stale(p))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        match unmount(&point) {
            Ok(()) => report.unmounted.push(point),
            Err(e) => {
                eprintln!("sluice-tests: unmounting {}: {e}", point.display());
                failed = true;
            }
        }
    }
    if failed || keep_logs() {
        return report;
    }
    let Ok(entries) = fs::read_dir(&tmp) else {
        return report;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if stale(&path) {
            match fs::remove_dir_all(&path) {
                Ok(()) => report.removed.push(path),
                Err(e) => eprintln!("sluice-tests: removing {}: {e}", path.display()),
            }
        }
    }
    report.removed.sort();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_give_their_owner() {
        assert_eq!(scratch_owner("sluice-tests-123-4"), Some(123));
        for foreign in [
            "sluice-tests-123",
            "sluice-tests-123-",
            "sluice-tests--4",
            "sluice-tests-x-4",
            "sluice-tests-12-4x",
            "sluice-123-4",
        ] {
            assert_eq!(scratch_owner(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn scratch_dir_is_removed_on_drop() {
        let dir = ScratchDir::new();
        let file = dir.write("manifest.yaml", "services: []\n");
        assert!(file.exists());
        let path = dir.path().to_owned();
        drop(dir);
        assert_eq!(path.exists(), keep_logs());
    }
}
