//! The few `bpf(2)` queries aya does not expose.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};

/// What a link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The interface, or 0 once the interface is gone (the kernel detaches the
    /// link when its device unregisters, e.g. with its network namespace).
    pub ifindex: u32,
    pub prog_id: u32,
}

impl LinkTarget {
    pub fn is_xdp(&self) -> bool {
        self.link_type == bpf_link_type::BPF_LINK_TYPE_XDP as u32
    }
    pub fn is_tcx(&self) -> bool {
        self.link_type == bpf_link_type::BPF_LINK_TYPE_TCX as u32
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link: its type, program and interface.
pub fn link_target(link: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    // The `info` member of `union bpf_attr`; the kernel accepts a shorter attr
    // as long as what it does not know about is absent.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: bpf_link_info is plain old data; all-zero is a valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<bpf_link_info>() as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr and info are valid for the duration of the call and sized as
    // declared; the kernel writes at most info_len bytes into info.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            size_of::<InfoAttr>() as libc::c_long,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union member read matches the link type checked first.
    let ifindex = unsafe {
        if info.type_ == bpf_link_type::BPF_LINK_TYPE_XDP as u32 {
            info.__bindgen_anon_1.xdp.ifindex
        } else if info.type_ == bpf_link_type::BPF_LINK_TYPE_TCX as u32 {
            info.__bindgen_anon_1.tcx.ifindex
        } else {
            0
        }
    };
    Ok(LinkTarget {
        link_type: info.type_,
        ifindex,
        prog_id: info.prog_id,
    })
}

/// Opens a pinned BPF object (`BPF_OBJ_GET`).
pub fn open_pin(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: attr points to a NUL-terminated path that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET as libc::c_long,
            &raw mut attr,
            size_of::<ObjAttr>() as libc::c_long,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What the link pinned at `path` is attached to.
pub fn pinned_link_target(path: &Path) -> io::Result<LinkTarget> {
    let fd = open_pin(path)?;
    link_target(fd.as_fd())
}

/// `CLOCK_MONOTONIC_COARSE` in nanoseconds: the clock behind
/// `bpf_ktime_get_coarse_ns`, which stamps flow entries.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
