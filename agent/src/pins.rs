//! Where the pinned data plane lives in bpffs: the one place for those paths.
//!
//! ```text
//! <root>/ns-<netns cookie>/maps/<MAP_NAME>     every data-plane map
//! <root>/ns-<netns cookie>/links/<ifindex>-xdp  XDP link of an interface
//! <root>/ns-<netns cookie>/links/<ifindex>-tc   TCX link of an interface
//! ```
//! bpffs is shared by every network namespace of a mount namespace, so each
//! agent gets a directory named after its network namespace's cookie, which the
//! kernel never reuses within a boot (unlike the namespace's inode number): two
//! agents in different namespaces cannot collide, and a directory left by a
//! namespace that is gone can never be mistaken for ours.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Default bpffs directory holding one sub-directory per agent.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/sluice";

/// The hook a link attaches, as it appears in link pin names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkKind {
    Xdp,
    Tc,
}

impl LinkKind {
    fn suffix(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

/// A pinned link found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPin {
    pub ifindex: u32,
    pub kind: LinkKind,
    pub path: PathBuf,
}

#[derive(Clone, Debug)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// The directory of the network namespace with `cookie` under `root`.
    pub fn new(root: &Path, cookie: u64) -> Self {
        Self {
            dir: root.join(format!("ns-{cookie}")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn maps(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, ifindex: u32, kind: LinkKind) -> PathBuf {
        self.links().join(format!("{ifindex}-{}", kind.suffix()))
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    pub fn create(&self) -> io::Result<()> {
        fs::create_dir_all(self.maps())?;
        fs::create_dir_all(self.links())
    }

    /// Pinned links, sorted. Entries that do not follow our naming are ignored.
    pub fn link_pins(&self) -> io::Result<Vec<LinkPin>> {
        let mut pins = Vec::new();
        let entries = match fs::read_dir(self.links()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(pins),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if let Some(pin) = parse_link_name(&entry.file_name().to_string_lossy()) {
                pins.push(LinkPin {
                    path: entry.path(),
                    ..pin
                });
            }
        }
        pins.sort_by_key(|p| (p.ifindex, p.kind));
        Ok(pins)
    }

    /// Removes every pin and the directory itself. Unpinning a link detaches it
    /// (nothing else holds it); unpinning a map frees it once no program uses it.
    pub fn remove_all(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Sibling directories of other namespaces under the same root.
    pub fn siblings(&self) -> io::Result<Vec<PinDir>> {
        let Some(root) = self.dir.parent() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let entries = match fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            let is_ns_dir = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ns-"));
            if is_ns_dir && path != self.dir {
                out.push(PinDir { dir: path });
            }
        }
        Ok(out)
    }
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct we own.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &raw mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC
    }
}

fn parse_link_name(name: &str) -> Option<LinkPin> {
    let (ifindex, kind) = name.split_once('-')?;
    let kind = match kind {
        "xdp" => LinkKind::Xdp,
        "tc" => LinkKind::Tc,
        _ => return None,
    };
    Some(LinkPin {
        ifindex: ifindex.parse().ok()?,
        kind,
        path: PathBuf::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_per_namespace() {
        let pins = PinDir::new(Path::new("/sys/fs/bpf/sluice"), 42);
        assert_eq!(pins.path(), Path::new("/sys/fs/bpf/sluice/ns-42"));
        assert_eq!(
            pins.map("FLOWS_V4"),
            Path::new("/sys/fs/bpf/sluice/ns-42/maps/FLOWS_V4")
        );
        assert_eq!(
            pins.link(7, LinkKind::Xdp),
            Path::new("/sys/fs/bpf/sluice/ns-42/links/7-xdp")
        );
    }

    #[test]
    fn link_names_parse_back() {
        let pin = parse_link_name("12-tc").expect("valid name");
        assert_eq!((pin.ifindex, pin.kind), (12, LinkKind::Tc));
        assert!(parse_link_name("x-tc").is_none());
        assert!(parse_link_name("12-foo").is_none());
        assert!(parse_link_name("12").is_none());
    }
}
