//! What the agent must know about a network interface before it attaches anything to it:
//! name, ifindex, driver, flags, MAC, IPv4 forwarding and, above all, the device's **XDP
//! features** — plus a monitor that says when those features change.
//!
//! # Why
//!
//! Native XDP on an interface is only half of the question. A program that `bpf_redirect`s a
//! frame into a target device gets `XDP_REDIRECT` back even when the target cannot take the
//! frame. A veth only delivers redirected frames when its *peer* has NAPI (an XDP program
//! attached, or GRO on); otherwise `veth_xdp_xmit` refuses them and every frame is dropped
//! silently — the drops show only as `rx_queue_0_drops` on the device that ran XDP (see the
//! "Traps" in DESIGN.md). Since Linux 6.3 the kernel publishes exactly this fact as the
//! `NDO_XMIT` bit of the device's XDP feature mask, which is what this module reads:
//!
//! - `include/uapi/linux/netdev.h` and `Documentation/netlink/specs/netdev.yaml`: the
//!   generic-netlink family `netdev`, `NETDEV_CMD_DEV_GET`, `enum netdev_xdp_act`, the `mgmt`
//!   multicast group.
//! - `net/core/netdev-genl.c` (commit d3d854fd6a1d, "netdev-genl: create a simple family for
//!   netdev stuff", v6.3): `netdev_nl_dev_fill` answers dev-get; `netdev_genl_netdevice_event`
//!   sends dev-add/dev-del/dev-change notifications on `NETDEV_REGISTER`, `NETDEV_UNREGISTER`
//!   and `NETDEV_XDP_FEAT_CHANGE`, in the device's own network namespace.
//! - `net/core/xdp.c` `xdp_set_features_flag`: raises `NETDEV_XDP_FEAT_CHANGE` whenever a driver
//!   changes the mask.
//! - `drivers/net/veth.c` `veth_set_xdp_features` / `veth_set_features`, commits fccca038f300
//!   ("veth: take into account device reconfiguration for xdp_features flag") and 8267fc71abb2
//!   ("veth: take into account peer device for NETDEV_XDP_ACT_NDO_XMIT xdp_features flag"): a
//!   veth advertises `NDO_XMIT | NDO_XMIT_SG` exactly when its peer runs an XDP program or has
//!   GRO on (toggling GRO only counts while the device is up).
//!
//! The agent uses native XDP where [`XdpFeatures::native`] holds, redirects only into devices
//! where [`XdpFeatures::accepts_redirect`] holds, and decides again when [`FeatureMonitor`]
//! reports a change (GRO toggled on a peer, a program attached or removed elsewhere).
//!
//! # Namespaces
//!
//! Every function works in the network namespace of the **calling thread**: sockets are created
//! there and `/proc/sys/net` resolves against it. A [`FeatureMonitor`] stays bound to the
//! namespace it was created in, whichever thread later calls [`FeatureMonitor::wait`].
//!
//! # Why by hand
//!
//! Two generic-netlink requests, one multicast subscription and four ioctls are less code than
//! a netlink crate and its dependency tree. Replies are parsed defensively: every length is
//! checked, and a malformed reply is an error, never a panic or an out-of-bounds read.

use std::ffi::c_int;
use std::fmt;
use std::io;
use std::mem;
use std::ops::BitOr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// XDP features

/// Bitmask of `NETDEV_XDP_ACT_*` flags (`enum netdev_xdp_act`, include/uapi/linux/netdev.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// XDP_ABORTED, XDP_DROP, XDP_PASS and XDP_TX: native XDP works on the device.
    pub const BASIC: Self = Self(1);
    /// The device's own XDP programs may return XDP_REDIRECT.
    pub const REDIRECT: Self = Self(1 << 1);
    /// The device accepts frames redirected *into* it (`ndo_xdp_xmit`).
    pub const NDO_XMIT: Self = Self(1 << 2);
    /// AF_XDP zero-copy.
    pub const XSK_ZEROCOPY: Self = Self(1 << 3);
    /// XDP offloaded to the NIC.
    pub const HW_OFFLOAD: Self = Self(1 << 4);
    /// Multi-buffer (non-linear) frames on receive.
    pub const RX_SG: Self = Self(1 << 5);
    /// Multi-buffer frames through `ndo_xdp_xmit`.
    pub const NDO_XMIT_SG: Self = Self(1 << 6);

    /// Names as spelled in Documentation/netlink/specs/netdev.yaml (`xdp-act`).
    const NAMES: [(Self, &'static str); 7] = [
        (Self::BASIC, "basic"),
        (Self::REDIRECT, "redirect"),
        (Self::NDO_XMIT, "ndo-xmit"),
        (Self::XSK_ZEROCOPY, "xsk-zerocopy"),
        (Self::HW_OFFLOAD, "hw-offload"),
        (Self::RX_SG, "rx-sg"),
        (Self::NDO_XMIT_SG, "ndo-xmit-sg"),
    ];
    const KNOWN: u64 = 0x7f;

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Native (driver-mode) XDP is supported.
    pub fn native(self) -> bool {
        self.contains(Self::BASIC)
    }

    /// Frames redirected into this device are delivered rather than silently dropped.
    pub fn accepts_redirect(self) -> bool {
        self.contains(Self::NDO_XMIT)
    }

    /// Names of the known flags that are set, lowest bit first.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect()
    }
}

impl BitOr for XdpFeatures {
    type Output = Self;

    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for XdpFeatures {
    /// Comma-separated names, then any bits this build does not know in hex; `none` if empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let mut parts: Vec<String> = self.names().into_iter().map(String::from).collect();
        let unknown = self.0 & !Self::KNOWN;
        if unknown != 0 {
            parts.push(format!("{unknown:#x}"));
        }
        f.write_str(&parts.join(","))
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// What can go wrong while reading interface facts.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("no network interface named {name:?} in this network namespace")]
    NoSuchInterface { name: String },
    #[error("no network interface with index {ifindex} in this network namespace")]
    NoSuchIfindex { ifindex: u32 },
    /// The name pointed at another device by the end of the read (a rename race); read again.
    #[error("interface {name:?} was renamed or replaced while it was being read")]
    InterfaceChanged { name: String },
    /// Linux before 6.3: XDP features cannot be known.
    #[error("the kernel has no \"netdev\" generic-netlink family (Linux 6.3+)")]
    NoNetdevFamily,
    #[error("netlink {op} failed")]
    Netlink {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{op} on interface {name:?} failed")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("reading {} failed", path.display())]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed kernel data: {what}")]
    Malformed { what: &'static str },
    /// The notification socket overflowed: some changes were not seen. Re-read every interface.
    #[error("netdev notifications were lost (receive buffer overrun)")]
    NotificationsLost,
}

// ---------------------------------------------------------------------------------------------
// Interfaces

/// A snapshot of one interface, read in the calling thread's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    pub name: String,
    pub ifindex: u32,
    /// Driver name from ethtool `ETHTOOL_GDRVINFO`; empty when the device has none (e.g. `lo`).
    pub driver: String,
    /// `IFF_LOOPBACK`.
    pub loopback: bool,
    /// Administratively up (`IFF_UP`); the carrier may still be down.
    pub up: bool,
    /// `/proc/sys/net/ipv4/conf/<name>/forwarding` is non-zero (the kernel's `IN_DEV_FORWARD`);
    /// false when the device has no IPv4 configuration at all (e.g. an MTU below 68).
    pub ipv4_forwarding: bool,
    /// Empty when the kernel cannot report features (before 6.3): the safe answer, as it steers
    /// the agent away from native XDP.
    pub xdp_features: XdpFeatures,
    /// The Ethernet address; all zeros for devices that are not Ethernet (`ARPHRD_ETHER`).
    pub mac: [u8; 6],
}

/// How often a read is retried when a rename race is detected.
const READ_ATTEMPTS: usize = 3;

/// Reads the interface called `name`.
pub fn interface(name: &str) -> Result<InterfaceInfo, NetdevError> {
    if !valid_name(name) {
        // No device can have this name; also keeps the sysctl path below inside its directory.
        return Err(NetdevError::NoSuchInterface {
            name: name.to_owned(),
        });
    }
    let sock = CtlSocket::open()?;
    for _ in 0..READ_ATTEMPTS {
        if let Some(info) = read_interface(&sock, name)? {
            return Ok(info);
        }
    }
    Err(NetdevError::InterfaceChanged {
        name: name.to_owned(),
    })
}

/// Reads the interface with index `ifindex`.
pub fn interface_by_index(ifindex: u32) -> Result<InterfaceInfo, NetdevError> {
    let sock = CtlSocket::open()?;
    let mut name = String::new();
    for _ in 0..READ_ATTEMPTS {
        name = sock.name_of(ifindex)?;
        match read_interface(&sock, &name) {
            Ok(Some(info)) if info.ifindex == ifindex => return Ok(info),
            // Renamed between the two lookups: look the name up again.
            Ok(_) | Err(NetdevError::NoSuchInterface { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Err(NetdevError::InterfaceChanged { name })
}

/// One read of `name`; `None` when the name no longer maps to the same ifindex at the end.
fn read_interface(sock: &CtlSocket, name: &str) -> Result<Option<InterfaceInfo>, NetdevError> {
    let ifindex = sock.ifindex(name)?;
    let flags = sock.flags(name)?;
    let mac = sock.mac(name)?;
    let driver = sock.driver(name)?;
    let ipv4_forwarding = ipv4_forwarding(name)?;
    let xdp_features = match xdp_features(ifindex) {
        Ok(features) => features,
        Err(NetdevError::NoSuchIfindex { .. }) => return Ok(None),
        Err(NetdevError::NoNetdevFamily) => {
            tracing::warn!(
                interface = name,
                "kernel cannot report XDP features (needs Linux 6.3+); assuming none"
            );
            XdpFeatures::default()
        }
        Err(e) => return Err(e),
    };
    if sock.ifindex(name)? != ifindex {
        return Ok(None);
    }
    Ok(Some(InterfaceInfo {
        name: name.to_owned(),
        ifindex,
        driver,
        loopback: flags & libc::IFF_LOOPBACK != 0,
        up: flags & libc::IFF_UP != 0,
        ipv4_forwarding,
        xdp_features,
        mac,
    }))
}

/// `dev_valid_name()` in net/core/dev.c.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| {
            matches!(
                b,
                b'/' | b':' | 0 | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'
            )
        })
}

fn ipv4_forwarding(name: &str) -> Result<bool, NetdevError> {
    const CONF: &str = "/proc/sys/net/ipv4/conf";
    let path = PathBuf::from(format!("{CONF}/{name}/forwarding"));
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<i64>()
            .map(|value| value != 0)
            .map_err(|_| NetdevError::Malformed {
                what: "forwarding sysctl is not an integer",
            }),
        // The device has no IPv4 configuration (no in_device), so it does not forward IPv4 —
        // unless the whole directory is missing, which says nothing about the device.
        Err(e) if e.kind() == io::ErrorKind::NotFound && Path::new(CONF).is_dir() => Ok(false),
        Err(source) => Err(NetdevError::Sysctl { path, source }),
    }
}

/// `ETHTOOL_GDRVINFO` (include/uapi/linux/ethtool.h).
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
#[derive(Default)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}
const _: () = assert!(mem::size_of::<EthtoolDrvinfo>() == 196);

/// A datagram socket used only as a handle for the `SIOCGIF*` and `SIOCETHTOOL` ioctls, which
/// any socket family serves (net/socket.c `sock_do_ioctl` falls back to `dev_ioctl`).
struct CtlSocket(OwnedFd);

impl CtlSocket {
    fn open() -> Result<Self, NetdevError> {
        socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)
            .map(Self)
            .map_err(|source| NetdevError::Socket {
                op: "socket(AF_UNIX)",
                source,
            })
    }

    fn ioctl(&self, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: `req` is a valid, exclusively borrowed ifreq for the whole call; the kernel
        // copies at most size_of::<ifreq>() bytes in and out. For SIOCETHTOOL, callers point
        // ifr_data at a live, exclusively owned buffer of the size the command expects.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, &raw mut *req) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Runs a `SIOCGIF*` request on `name` and returns the filled ifreq.
    fn get(
        &self,
        op: &'static str,
        request: libc::Ioctl,
        name: &str,
    ) -> Result<libc::ifreq, NetdevError> {
        let mut req = ifreq(name);
        self.ioctl(request, &mut req)
            .map_err(|source| ioctl_error(op, name, source))?;
        Ok(req)
    }

    fn ifindex(&self, name: &str) -> Result<u32, NetdevError> {
        let req = self.get("SIOCGIFINDEX", libc::SIOCGIFINDEX, name)?;
        // SAFETY: SIOCGIFINDEX succeeded, so the kernel wrote ifr_ifindex; every bit pattern is
        // a valid c_int anyway.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
        u32::try_from(ifindex).map_err(|_| NetdevError::Malformed {
            what: "negative ifindex",
        })
    }

    fn flags(&self, name: &str) -> Result<c_int, NetdevError> {
        let req = self.get("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, name)?;
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote ifr_flags (a plain integer).
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        // ifr_flags is a C short holding the low 16 IFF_* bits; keep them as they are.
        Ok(c_int::from(flags as u16))
    }

    fn mac(&self, name: &str) -> Result<[u8; 6], NetdevError> {
        let req = self.get("SIOCGIFHWADDR", libc::SIOCGIFHWADDR, name)?;
        // SAFETY: SIOCGIFHWADDR succeeded, so the kernel wrote ifr_hwaddr (plain integers).
        let hwaddr = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0; 6];
        if hwaddr.sa_family == libc::ARPHRD_ETHER {
            for (dst, src) in mac.iter_mut().zip(hwaddr.sa_data) {
                *dst = src as u8;
            }
        }
        Ok(mac)
    }

    fn driver(&self, name: &str) -> Result<String, NetdevError> {
        let mut info = EthtoolDrvinfo {
            cmd: ETHTOOL_GDRVINFO,
            ..EthtoolDrvinfo::default()
        };
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_data = (&raw mut info).cast();
        match self.ioctl(libc::SIOCETHTOOL, &mut req) {
            Ok(()) => Ok(String::from_utf8_lossy(until_nul(&info.driver)).into_owned()),
            // No get_drvinfo and no parent device (net/ethtool/ioctl.c ethtool_get_drvinfo).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(String::new()),
            Err(source) => Err(ioctl_error("SIOCETHTOOL(ETHTOOL_GDRVINFO)", name, source)),
        }
    }

    fn name_of(&self, ifindex: u32) -> Result<String, NetdevError> {
        let missing = NetdevError::NoSuchIfindex { ifindex };
        let Ok(index) = c_int::try_from(ifindex) else {
            return Err(missing);
        };
        let mut req = ifreq("");
        req.ifr_ifru.ifru_ifindex = index;
        match self.ioctl(libc::SIOCGIFNAME, &mut req) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Err(missing),
            Err(source) => return Err(ioctl_error("SIOCGIFNAME", &format!("#{ifindex}"), source)),
        }
        let raw = req.ifr_name.map(|c| c as u8);
        let Some(len) = raw.iter().position(|&b| b == 0) else {
            return Err(NetdevError::Malformed {
                what: "interface name without NUL",
            });
        };
        let name = raw.get(..len).unwrap_or_default();
        String::from_utf8(name.to_vec()).map_err(|_| NetdevError::Malformed {
            what: "interface name is not UTF-8",
        })
    }
}

/// An ifreq naming `name`, which must be shorter than IFNAMSIZ (checked by `valid_name`, or
/// coming from the kernel) so that the NUL terminator survives.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of integers, sockaddrs and a
    // raw pointer); all-zero bytes are a valid value of each.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .take(libc::IFNAMSIZ - 1)
        .zip(name.bytes())
    {
        *dst = src as libc::c_char;
    }
    req
}

fn ioctl_error(op: &'static str, name: &str, source: io::Error) -> NetdevError {
    if source.raw_os_error() == Some(libc::ENODEV) {
        NetdevError::NoSuchInterface {
            name: name.to_owned(),
        }
    } else {
        NetdevError::Ioctl {
            op,
            name: name.to_owned(),
            source,
        }
    }
}

fn until_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Network-namespace cookie

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h, Linux 5.14).
const SO_NETNS_COOKIE: c_int = 71;

/// The cookie of the calling thread's network namespace: unique for the boot, never reused.
pub fn netns_cookie() -> Result<u64, NetdevError> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0).map_err(|source| NetdevError::Socket {
        op: "socket(AF_UNIX)",
        source,
    })?;
    let mut cookie = 0_u64;
    let mut len = socklen::<u64>();
    // SAFETY: `cookie` and `len` describe a writable u64 that outlives the call; the kernel
    // writes at most `len` bytes and stores the length it wrote back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        let source = io::Error::last_os_error();
        return Err(NetdevError::Socket {
            op: "getsockopt(SO_NETNS_COOKIE)",
            source,
        });
    }
    if len != socklen::<u64>() {
        return Err(NetdevError::Malformed {
            what: "SO_NETNS_COOKIE is not 8 bytes",
        });
    }
    Ok(cookie)
}

// ---------------------------------------------------------------------------------------------
// Generic netlink: wire constants (include/uapi/linux/{netlink,genetlink,netdev}.h)

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_VERSION: u8 = 2;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const NETDEV_FAMILY_NAME: &[u8] = b"netdev\0";
const NETDEV_FAMILY_VERSION: u8 = 1;
const NETDEV_MCGRP_MGMT: &[u8] = b"mgmt";
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_CMD_DEV_ADD_NTF: u8 = 2;
const NETDEV_CMD_DEV_DEL_NTF: u8 = 3;
const NETDEV_CMD_DEV_CHANGE_NTF: u8 = 4;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// Kernel netlink messages are at most NLMSG_GOODSIZE (about a page); dev-get answers and
/// notifications are under 100 bytes.
const RECV_BUF_LEN: usize = 64 * 1024;
/// A kernel that does not answer a request within this time never will.
const REPLY_TIMEOUT_SECS: libc::time_t = 5;

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn ne_bytes<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Builds one generic-netlink request. Attribute values are a few bytes (an ifindex, a family
/// name), far below the 64 KiB an attribute length can express.
fn genl_request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![cmd, version, 0, 0];
    for &(kind, value) in attrs {
        let len = NLA_HDRLEN + value.len();
        debug_assert!(len <= usize::from(u16::MAX));
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(value);
        body.resize(align4(body.len()), 0);
    }
    let len = NLMSG_HDRLEN + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0_u32.to_ne_bytes()); // port id: the kernel fills in ours
    msg.extend_from_slice(&body);
    msg
}

/// One netlink message out of a datagram.
struct NlMsg<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into netlink messages, checking every length.
fn split_messages(mut buf: &[u8]) -> Result<Vec<NlMsg<'_>>, NetdevError> {
    let malformed = |what| NetdevError::Malformed { what };
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = ne_bytes(buf, 0)
            .map(u32::from_ne_bytes)
            .ok_or(malformed("truncated netlink header"))?;
        let len = usize::try_from(len).map_err(|_| malformed("netlink length overflows"))?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed("netlink message length out of bounds"));
        }
        let kind = ne_bytes(buf, 4)
            .map(u16::from_ne_bytes)
            .ok_or(malformed("truncated netlink header"))?;
        let seq = ne_bytes(buf, 8)
            .map(u32::from_ne_bytes)
            .ok_or(malformed("truncated netlink header"))?;
        let payload = buf
            .get(NLMSG_HDRLEN..len)
            .ok_or(malformed("netlink message length out of bounds"))?;
        out.push(NlMsg { kind, seq, payload });
        buf = buf.get(align4(len)..).unwrap_or_default();
    }
    Ok(out)
}

/// Splits a generic-netlink payload into its command and its attributes.
fn genl_body(payload: &[u8]) -> Result<(u8, &[u8]), NetdevError> {
    match (payload.first(), payload.get(GENL_HDRLEN..)) {
        (Some(&cmd), Some(attrs)) => Ok((cmd, attrs)),
        _ => Err(NetdevError::Malformed {
            what: "truncated generic-netlink header",
        }),
    }
}

/// Iterates over netlink attributes as (type without flag bits, value); stops after an error.
struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), NetdevError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = (
            ne_bytes(self.rest, 0).map(u16::from_ne_bytes),
            ne_bytes(self.rest, 2).map(u16::from_ne_bytes),
        );
        let (Some(len), Some(kind)) = header else {
            self.rest = &[];
            return Some(Err(NetdevError::Malformed {
                what: "truncated attribute header",
            }));
        };
        let len = usize::from(len);
        let Some(value) = self.rest.get(NLA_HDRLEN..len).filter(|_| len >= NLA_HDRLEN) else {
            self.rest = &[];
            return Some(Err(NetdevError::Malformed {
                what: "attribute length out of bounds",
            }));
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or_default();
        Some(Ok((kind & NLA_TYPE_MASK, value)))
    }
}

fn attributes(buf: &[u8]) -> Attributes<'_> {
    Attributes { rest: buf }
}

fn attr_u16(value: &[u8], what: &'static str) -> Result<u16, NetdevError> {
    value
        .try_into()
        .map(u16::from_ne_bytes)
        .map_err(|_| NetdevError::Malformed { what })
}

fn attr_u32(value: &[u8], what: &'static str) -> Result<u32, NetdevError> {
    value
        .try_into()
        .map(u32::from_ne_bytes)
        .map_err(|_| NetdevError::Malformed { what })
}

/// A u64 attribute; 4-byte values are accepted too (the `uint` type of newer netlink specs).
fn attr_uint(value: &[u8], what: &'static str) -> Result<u64, NetdevError> {
    match value.len() {
        4 => attr_u32(value, what).map(u64::from),
        _ => value
            .try_into()
            .map(u64::from_ne_bytes)
            .map_err(|_| NetdevError::Malformed { what }),
    }
}

/// The payload of an NLMSG_ERROR message: `Ok` for an ACK, the errno otherwise.
fn ack_result(payload: &[u8], op: &'static str) -> Result<(), NetdevError> {
    let code = ne_bytes(payload, 0)
        .map(i32::from_ne_bytes)
        .ok_or(NetdevError::Malformed {
            what: "NLMSG_ERROR without an error code",
        })?;
    match code {
        0 => Ok(()),
        code if code < 0 => Err(NetdevError::Netlink {
            op,
            source: io::Error::from_raw_os_error(code.saturating_neg()),
        }),
        _ => Err(NetdevError::Malformed {
            what: "positive error code in NLMSG_ERROR",
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Generic netlink: sockets

fn socket(domain: c_int, kind: c_int, protocol: c_int) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call without pointer arguments.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2): it is open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn socklen<T>() -> libc::socklen_t {
    // Socket option and address types are a few bytes; the cast cannot truncate.
    mem::size_of::<T>() as libc::socklen_t
}

fn set_option<T>(fd: &OwnedFd, level: c_int, name: c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised T for the whole call and the kernel reads at most
    // size_of::<T>() bytes from it (it rejects lengths that do not fit the option).
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const *value).cast(),
            socklen::<T>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `msg` is valid for reads of msg.len() bytes for the whole call. With no
        // address, a netlink socket sends to the kernel (port id 0).
        let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        match usize::try_from(sent) {
            Ok(sent) if sent == msg.len() => return Ok(()),
            // Netlink datagrams are all or nothing; a short send would be a kernel bug.
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// One received netlink datagram.
enum Datagram {
    /// From the kernel; this many bytes are in the buffer.
    Kernel(usize),
    /// From a user-space socket (anyone may unicast to our port id): ignored.
    Foreign,
    /// Larger than the buffer: its tail is lost.
    Truncated,
}

fn recv(fd: &OwnedFd, buf: &mut [u8], flags: c_int) -> io::Result<Datagram> {
    loop {
        // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut addr_len = socklen::<libc::sockaddr_nl>();
        // SAFETY: `buf` is valid for writes of buf.len() bytes and `addr`/`addr_len` describe a
        // writable sockaddr_nl, all for the whole call; the kernel writes within those sizes.
        // MSG_TRUNC makes netlink return the datagram's full length, so truncation is visible.
        let received = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_TRUNC,
                (&raw mut addr).cast(),
                &raw mut addr_len,
            )
        };
        let Ok(len) = usize::try_from(received) else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        return Ok(if len > buf.len() {
            Datagram::Truncated
        } else if addr_len < socklen::<libc::sockaddr_nl>() || addr.nl_pid != 0 {
            Datagram::Foreign
        } else {
            Datagram::Kernel(len)
        });
    }
}

fn bind_netlink(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain integers; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `addr` is a valid sockaddr_nl of the length passed, alive for the whole call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            socklen::<libc::sockaddr_nl>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn netlink_socket() -> Result<OwnedFd, NetdevError> {
    socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_GENERIC).map_err(|source| {
        NetdevError::Netlink {
            op: "socket(NETLINK_GENERIC)",
            source,
        }
    })
}

/// A NETLINK_GENERIC socket for request/response exchanges.
struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl GenlSocket {
    fn open() -> Result<Self, NetdevError> {
        let fd = netlink_socket()?;
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT_SECS,
            tv_usec: 0,
        };
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout).map_err(|source| {
            NetdevError::Netlink {
                op: "setsockopt(SO_RCVTIMEO)",
                source,
            }
        })?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Sends one request with NLM_F_ACK and returns the generic-netlink payloads of the replies.
    /// The ACK (or NLMSG_DONE) ends the exchange, whether the reply was one message or several.
    fn request(
        &mut self,
        op: &'static str,
        family: u16,
        cmd: u8,
        version: u8,
        attrs: &[(u16, &[u8])],
    ) -> Result<Vec<Vec<u8>>, NetdevError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        send(&self.fd, &genl_request(family, cmd, version, seq, attrs))
            .map_err(|source| NetdevError::Netlink { op, source })?;
        let mut replies = Vec::new();
        loop {
            let len = match recv(&self.fd, &mut self.buf, 0) {
                Ok(Datagram::Kernel(len)) => len,
                Ok(Datagram::Foreign) => continue,
                Ok(Datagram::Truncated) => {
                    return Err(NetdevError::Malformed {
                        what: "netlink reply larger than the receive buffer",
                    });
                }
                Err(source) => return Err(NetdevError::Netlink { op, source }),
            };
            let datagram = self.buf.get(..len).unwrap_or_default();
            for msg in split_messages(datagram)? {
                if msg.seq != seq {
                    continue; // not ours (cannot happen on a fresh socket; cheap to be sure)
                }
                match msg.kind {
                    NLMSG_ERROR => {
                        ack_result(msg.payload, op)?;
                        return Ok(replies);
                    }
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_NOOP => {}
                    _ => replies.push(msg.payload.to_vec()),
                }
            }
        }
    }
}

/// Where the `netdev` family lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NetdevFamily {
    id: u16,
    mgmt_group: u32,
}

/// Generic-netlink family ids are global, not per namespace, and `netdev` is built into the
/// core (registered once at boot by net/core/netdev-genl.c): resolve it once per process.
static NETDEV_FAMILY: OnceLock<NetdevFamily> = OnceLock::new();

fn netdev_family() -> Result<NetdevFamily, NetdevError> {
    if let Some(family) = NETDEV_FAMILY.get() {
        return Ok(*family);
    }
    let replies = GenlSocket::open()?
        .request(
            "CTRL_CMD_GETFAMILY(netdev)",
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            CTRL_VERSION,
            &[(CTRL_ATTR_FAMILY_NAME, NETDEV_FAMILY_NAME)],
        )
        .map_err(|e| match e {
            NetdevError::Netlink { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                NetdevError::NoNetdevFamily
            }
            e => e,
        })?;
    let family = parse_family(&replies)?;
    Ok(*NETDEV_FAMILY.get_or_init(|| family))
}

fn parse_family(replies: &[Vec<u8>]) -> Result<NetdevFamily, NetdevError> {
    let [reply] = replies else {
        return Err(NetdevError::Malformed {
            what: "CTRL_CMD_GETFAMILY: not exactly one reply",
        });
    };
    let (_, attrs) = genl_body(reply)?;
    let (mut id, mut mgmt_group) = (None, None);
    for attr in attributes(attrs) {
        match attr? {
            (CTRL_ATTR_FAMILY_ID, value) => {
                id = Some(attr_u16(value, "CTRL_ATTR_FAMILY_ID is not a u16")?)
            }
            (CTRL_ATTR_MCAST_GROUPS, groups) => mgmt_group = find_group(groups, NETDEV_MCGRP_MGMT)?,
            _ => {}
        }
    }
    match (id, mgmt_group) {
        (Some(id), Some(mgmt_group)) => Ok(NetdevFamily { id, mgmt_group }),
        (None, _) => Err(NetdevError::Malformed {
            what: "CTRL_CMD_GETFAMILY reply without a family id",
        }),
        (_, None) => Err(NetdevError::Malformed {
            what: "netdev family without a \"mgmt\" group",
        }),
    }
}

/// Finds the id of multicast group `wanted` in a CTRL_ATTR_MCAST_GROUPS array.
fn find_group(groups: &[u8], wanted: &[u8]) -> Result<Option<u32>, NetdevError> {
    for group in attributes(groups) {
        let (_, group) = group?;
        let (mut name, mut id) = (None, None);
        for attr in attributes(group) {
            match attr? {
                (CTRL_ATTR_MCAST_GRP_NAME, value) => name = Some(until_nul(value)),
                (CTRL_ATTR_MCAST_GRP_ID, value) => {
                    id = Some(attr_u32(value, "CTRL_ATTR_MCAST_GRP_ID is not a u32")?)
                }
                _ => {}
            }
        }
        if name == Some(wanted) {
            return Ok(id);
        }
    }
    Ok(None)
}

/// The attributes of a dev-get reply or a dev-*-ntf notification that we use.
#[derive(Debug, Default, PartialEq, Eq)]
struct DevAttrs {
    ifindex: Option<u32>,
    xdp_features: Option<XdpFeatures>,
}

fn parse_dev(attrs: &[u8]) -> Result<DevAttrs, NetdevError> {
    let mut dev = DevAttrs::default();
    for attr in attributes(attrs) {
        match attr? {
            (NETDEV_A_DEV_IFINDEX, value) => {
                dev.ifindex = Some(attr_u32(value, "NETDEV_A_DEV_IFINDEX is not a u32")?)
            }
            (NETDEV_A_DEV_XDP_FEATURES, value) => {
                dev.xdp_features = Some(XdpFeatures(attr_uint(
                    value,
                    "NETDEV_A_DEV_XDP_FEATURES is not a u64",
                )?));
            }
            _ => {}
        }
    }
    Ok(dev)
}

/// The XDP features of device `ifindex` (one `NETDEV_CMD_DEV_GET` request).
pub fn xdp_features(ifindex: u32) -> Result<XdpFeatures, NetdevError> {
    if ifindex == 0 {
        return Err(NetdevError::NoSuchIfindex { ifindex });
    }
    let family = netdev_family()?;
    let replies = GenlSocket::open()?
        .request(
            "NETDEV_CMD_DEV_GET",
            family.id,
            NETDEV_CMD_DEV_GET,
            NETDEV_FAMILY_VERSION,
            &[(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes())],
        )
        .map_err(|e| match e {
            NetdevError::Netlink { source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
                NetdevError::NoSuchIfindex { ifindex }
            }
            e => e,
        })?;
    let [reply] = replies.as_slice() else {
        return Err(NetdevError::Malformed {
            what: "NETDEV_CMD_DEV_GET: not exactly one reply",
        });
    };
    let (_, attrs) = genl_body(reply)?;
    let dev = parse_dev(attrs)?;
    if dev.ifindex.is_some_and(|index| index != ifindex) {
        return Err(NetdevError::Malformed {
            what: "NETDEV_CMD_DEV_GET answered for another device",
        });
    }
    dev.xdp_features.ok_or(NetdevError::Malformed {
        what: "NETDEV_CMD_DEV_GET reply without xdp-features",
    })
}

// ---------------------------------------------------------------------------------------------
// Change notifications

/// Subscription to the `netdev` family's `mgmt` group in the namespace it was created in:
/// device added, removed, or its XDP features changed.
pub struct FeatureMonitor {
    fd: OwnedFd,
    family: u16,
    buf: Vec<u8>,
}

impl FeatureMonitor {
    pub fn new() -> Result<Self, NetdevError> {
        let family = netdev_family()?;
        let fd = netlink_socket()?;
        // Bind first: an unbound socket keeps port id 0, the kernel's own, and
        // net/netlink/af_netlink.c do_one_broadcast skips the sender's port id — so it would
        // be subscribed yet never receive anything. bind(2) with nl_pid 0 picks a unique id.
        bind_netlink(&fd).map_err(|source| NetdevError::Netlink {
            op: "bind(NETLINK_GENERIC)",
            source,
        })?;
        set_option(
            &fd,
            libc::SOL_NETLINK,
            libc::NETLINK_ADD_MEMBERSHIP,
            &family.mgmt_group,
        )
        .map_err(|source| NetdevError::Netlink {
            op: "join the netdev mgmt group",
            source,
        })?;
        Ok(Self {
            fd,
            family: family.id,
            buf: vec![0; RECV_BUF_LEN],
        })
    }

    /// Blocks up to `timeout` and returns the ifindexes (sorted, no duplicates) of devices that
    /// appeared, disappeared or whose XDP features may have changed; empty on timeout.
    /// [`NetdevError::NotificationsLost`] means some were missed: re-read every interface.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<u32>, NetdevError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut changed = Vec::new();
        loop {
            let remaining = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if self.poll(remaining)? {
                self.drain(&mut changed)?;
            }
            if !changed.is_empty() {
                changed.sort_unstable();
                changed.dedup();
                return Ok(changed);
            }
            if remaining.is_zero() {
                return Ok(changed);
            }
        }
    }

    /// Waits until the socket is readable (true) or `timeout` passes (false). A signal counts
    /// as readable: the caller drains (finding nothing) and polls again for the rest.
    fn poll(&self, timeout: Duration) -> Result<bool, NetdevError> {
        let millis = c_int::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(c_int::MAX);
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pollfd` is one valid, writable pollfd for the whole call, matching nfds = 1.
        let ready = unsafe { libc::poll(&raw mut pollfd, 1, millis) };
        if ready >= 0 {
            return Ok(ready > 0);
        }
        let source = io::Error::last_os_error();
        if source.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        Err(NetdevError::Netlink {
            op: "poll netdev notifications",
            source,
        })
    }

    /// Reads every queued notification without blocking and appends their ifindexes.
    fn drain(&mut self, changed: &mut Vec<u32>) -> Result<(), NetdevError> {
        loop {
            let len = match recv(&self.fd, &mut self.buf, libc::MSG_DONTWAIT) {
                Ok(Datagram::Kernel(len)) => len,
                Ok(Datagram::Foreign) => continue,
                Ok(Datagram::Truncated) => return Err(NetdevError::NotificationsLost),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Err(NetdevError::NotificationsLost);
                }
                Err(source) => {
                    return Err(NetdevError::Netlink {
                        op: "receive netdev notifications",
                        source,
                    });
                }
            };
            let datagram = self.buf.get(..len).unwrap_or_default();
            changed.extend(notified_ifindexes(datagram, self.family)?);
        }
    }
}

/// The ifindexes named by the netdev dev-*-ntf notifications in one datagram.
fn notified_ifindexes(datagram: &[u8], family: u16) -> Result<Vec<u32>, NetdevError> {
    let mut out = Vec::new();
    for msg in split_messages(datagram)? {
        if msg.kind != family {
            continue;
        }
        let (cmd, attrs) = genl_body(msg.payload)?;
        if matches!(
            cmd,
            NETDEV_CMD_DEV_ADD_NTF | NETDEV_CMD_DEV_DEL_NTF | NETDEV_CMD_DEV_CHANGE_NTF
        ) {
            out.extend(parse_dev(attrs)?.ifindex);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    // ---- pure: names, framing and parsing

    #[test]
    fn features_names_and_display() {
        let veth = XdpFeatures::BASIC | XdpFeatures::REDIRECT | XdpFeatures::RX_SG;
        assert_eq!(veth, XdpFeatures(0x23));
        assert_eq!(veth.names(), ["basic", "redirect", "rx-sg"]);
        assert_eq!(veth.to_string(), "basic,redirect,rx-sg");
        assert!(veth.native() && !veth.accepts_redirect());
        let with_peer_napi = XdpFeatures(0x67);
        assert!(with_peer_napi.accepts_redirect());
        assert_eq!(
            with_peer_napi.to_string(),
            "basic,redirect,ndo-xmit,rx-sg,ndo-xmit-sg"
        );
        assert_eq!(XdpFeatures::default().to_string(), "none");
        assert!(XdpFeatures::default().names().is_empty());
        assert_eq!(XdpFeatures(0x101).to_string(), "basic,0x100");
    }

    #[test]
    fn valid_names_follow_the_kernel() {
        assert!(valid_name("eth0") && valid_name("a.b") && valid_name("x".repeat(15).as_str()));
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\tb", "a\0b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(!valid_name(&"x".repeat(16)));
    }

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&0_u16.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0_u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg.resize(align4(msg.len()), 0);
        msg
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut attr = Vec::new();
        attr.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
        attr.extend_from_slice(&kind.to_ne_bytes());
        attr.extend_from_slice(value);
        attr.resize(align4(attr.len()), 0);
        attr
    }

    fn genl(cmd: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![cmd, 1, 0, 0];
        for attr in attrs {
            payload.extend_from_slice(attr);
        }
        payload
    }

    fn is_malformed<T>(result: Result<T, NetdevError>) -> bool {
        matches!(result, Err(NetdevError::Malformed { .. }))
    }

    #[test]
    fn request_round_trips_through_the_parsers() {
        let msg = genl_request(
            0x20,
            NETDEV_CMD_DEV_GET,
            1,
            7,
            &[(NETDEV_A_DEV_IFINDEX, &5_u32.to_ne_bytes())],
        );
        assert_eq!(msg.len(), NLMSG_HDRLEN + GENL_HDRLEN + 8);
        let msgs = split_messages(&msg).expect("well-formed");
        let [only] = msgs.as_slice() else {
            panic!("one message expected")
        };
        assert_eq!((only.kind, only.seq), (0x20, 7));
        let (cmd, attrs) = genl_body(only.payload).expect("genl header");
        assert_eq!(cmd, NETDEV_CMD_DEV_GET);
        assert_eq!(
            parse_dev(attrs).expect("attrs"),
            DevAttrs {
                ifindex: Some(5),
                xdp_features: None
            }
        );
    }

    #[test]
    fn framing_errors_are_reported_not_panicked() {
        let good = nlmsg(
            0x20,
            1,
            &genl(
                NETDEV_CMD_DEV_CHANGE_NTF,
                &[nla(NETDEV_A_DEV_IFINDEX, &3_u32.to_ne_bytes())],
            ),
        );
        assert_eq!(split_messages(&good).expect("good").len(), 1);
        let mut two = good.clone();
        two.extend_from_slice(&good);
        assert_eq!(
            notified_ifindexes(&two, 0x20).expect("two notifications"),
            [3, 3]
        );
        assert!(
            notified_ifindexes(&two, 0x21)
                .expect("other family")
                .is_empty()
        );

        assert!(is_malformed(split_messages(&good[..10])), "short header");
        assert!(
            is_malformed(split_messages(&good[..good.len() - 4])),
            "length beyond the datagram"
        );
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&8_u32.to_ne_bytes());
        assert!(
            is_malformed(split_messages(&tiny)),
            "length below the header size"
        );
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(is_malformed(split_messages(&huge)), "absurd length");

        assert!(is_malformed(genl_body(&[1, 1])), "short genl header");
        let mut bad_attr = nla(NETDEV_A_DEV_IFINDEX, &3_u32.to_ne_bytes());
        bad_attr[..2].copy_from_slice(&2_u16.to_ne_bytes());
        assert!(
            is_malformed(parse_dev(&bad_attr)),
            "attribute shorter than its header"
        );
        bad_attr[..2].copy_from_slice(&64_u16.to_ne_bytes());
        assert!(
            is_malformed(parse_dev(&bad_attr)),
            "attribute beyond its container"
        );
        assert!(
            is_malformed(parse_dev(&[8, 0])),
            "truncated attribute header"
        );
        assert!(
            is_malformed(parse_dev(&nla(NETDEV_A_DEV_IFINDEX, &[1, 2]))),
            "ifindex of 2 bytes"
        );
        assert!(
            is_malformed(parse_dev(&nla(NETDEV_A_DEV_XDP_FEATURES, &[1, 2, 3]))),
            "features of 3 bytes"
        );
    }

    #[test]
    fn feature_attribute_is_u64_or_u32_and_flag_bits_are_ignored() {
        let mut attrs = nla(NETDEV_A_DEV_IFINDEX | 0x4000, &9_u32.to_ne_bytes());
        attrs.extend(nla(2, &[0; 4])); // NETDEV_A_DEV_PAD: skipped
        attrs.extend(nla(NETDEV_A_DEV_XDP_FEATURES, &0x67_u64.to_ne_bytes()));
        let dev = parse_dev(&attrs).expect("attrs");
        assert_eq!(
            dev,
            DevAttrs {
                ifindex: Some(9),
                xdp_features: Some(XdpFeatures(0x67))
            }
        );
        let short = nla(NETDEV_A_DEV_XDP_FEATURES, &0x23_u32.to_ne_bytes());
        assert_eq!(
            parse_dev(&short).expect("u32 form").xdp_features,
            Some(XdpFeatures(0x23))
        );
    }

    #[test]
    fn errors_and_acks() {
        assert!(ack_result(&0_i32.to_ne_bytes(), "t").is_ok());
        match ack_result(&(-libc::ENODEV).to_ne_bytes(), "t") {
            Err(NetdevError::Netlink { op: "t", source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENODEV))
            }
            other => panic!("expected ENODEV, got {other:?}"),
        }
        assert!(is_malformed(ack_result(&5_i32.to_ne_bytes(), "t")));
        assert!(is_malformed(ack_result(&[0, 0], "t")));
        assert!(ack_result(&i32::MIN.to_ne_bytes(), "t").is_err());
    }

    #[test]
    fn family_reply_yields_id_and_mgmt_group() {
        let group = |id: u32, name: &[u8]| {
            let mut g = nla(CTRL_ATTR_MCAST_GRP_ID, &id.to_ne_bytes());
            g.extend(nla(CTRL_ATTR_MCAST_GRP_NAME, name));
            g
        };
        let mut groups = nla(1, &group(30, b"page-pool\0"));
        groups.extend(nla(2, &group(29, b"mgmt\0")));
        let reply = genl(
            1,
            &[
                nla(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
                nla(CTRL_ATTR_FAMILY_ID, &0x1a_u16.to_ne_bytes()),
                nla(CTRL_ATTR_MCAST_GROUPS | 0x8000, &groups),
            ],
        );
        let family = parse_family(&[reply]).expect("family");
        assert_eq!(
            family,
            NetdevFamily {
                id: 0x1a,
                mgmt_group: 29
            }
        );

        let no_mgmt = genl(
            1,
            &[
                nla(CTRL_ATTR_FAMILY_ID, &0x1a_u16.to_ne_bytes()),
                nla(CTRL_ATTR_MCAST_GROUPS, &nla(1, &group(30, b"page-pool\0"))),
            ],
        );
        assert!(is_malformed(parse_family(&[no_mgmt])));
        assert!(is_malformed(parse_family(&[])));
    }

    // ---- kernel: each test works in its own private network namespace

    /// Runs `f` on a new thread that first moves into a fresh, unnamed network namespace. The
    /// namespace (and every device in it) disappears when the thread ends: nothing to clean up,
    /// even on panic. Child processes forked from that thread (`ip`, `ethtool`, `sysctl`)
    /// inherit its namespace, because fork copies the calling thread's nsproxy.
    fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        std::thread::spawn(move || {
            // SAFETY: unshare(2) only changes this thread's namespace membership.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET) (needs root): {}",
                io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A veth pair with names unique to this process and `tag`.
    fn veth_pair(tag: &str) -> (String, String) {
        let (a, b) = (
            format!("sl{}{tag}a", std::process::id()),
            format!("sl{}{tag}b", std::process::id()),
        );
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        (a, b)
    }

    /// (ifindex, MAC) of `dev` as iproute2 sees it.
    fn ip_link(dev: &str) -> (u32, [u8; 6]) {
        let out = run("ip", &["-o", "link", "show", "dev", dev]);
        let ifindex = out
            .split(':')
            .next()
            .and_then(|s| s.trim().parse().ok())
            .expect("ifindex in `ip link`");
        let mut words = out.split_whitespace().skip_while(|w| *w != "link/ether");
        let mac_text = words.nth(1).expect("MAC in `ip link`");
        let mut mac = [0; 6];
        for (byte, hex) in mac.iter_mut().zip(mac_text.split(':')) {
            *byte = u8::from_str_radix(hex, 16).expect("hex MAC byte");
        }
        (ifindex, mac)
    }

    #[test]
    fn interface_reads_veth_and_loopback() {
        in_netns(|| {
            let (a, b) = veth_pair("i");
            let info = interface(&a).expect("veth");
            let (ifindex, mac) = ip_link(&a);
            assert_eq!(info.name, a);
            assert_eq!((info.ifindex, info.mac), (ifindex, mac));
            assert_eq!(info.driver, "veth");
            assert!(!info.loopback && !info.up);
            assert_eq!(info.xdp_features, XdpFeatures(0x23));
            assert_eq!(interface_by_index(ifindex).expect("by index"), info);

            run("ip", &["link", "set", &a, "up"]);
            run("ip", &["link", "set", &b, "up"]);
            assert!(interface(&a).expect("veth").up);

            run(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{a}.forwarding=0")],
            );
            assert!(!interface(&a).expect("veth").ipv4_forwarding);
            run(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{a}.forwarding=1")],
            );
            assert!(interface(&a).expect("veth").ipv4_forwarding);
            assert!(
                !interface(&b).expect("peer").ipv4_forwarding,
                "forwarding is per device"
            );

            let lo = interface("lo").expect("lo");
            assert!(lo.loopback && !lo.up, "lo starts down in a new namespace");
            assert_eq!((lo.ifindex, lo.driver.as_str(), lo.mac), (1, "", [0; 6]));
            assert!(
                !lo.xdp_features.native(),
                "lo has no native XDP: {}",
                lo.xdp_features
            );
            run("ip", &["link", "set", "lo", "up"]);
            assert!(interface("lo").expect("lo").up);

            let missing = format!("sl{}none", std::process::id());
            match interface(&missing) {
                Err(NetdevError::NoSuchInterface { name }) => assert_eq!(name, missing),
                other => panic!("expected NoSuchInterface, got {other:?}"),
            }
            assert!(matches!(
                interface("../lo"),
                Err(NetdevError::NoSuchInterface { .. })
            ));
            assert!(matches!(
                interface_by_index(99_999),
                Err(NetdevError::NoSuchIfindex { ifindex: 99_999 })
            ));
            assert!(matches!(
                xdp_features(99_999),
                Err(NetdevError::NoSuchIfindex { ifindex: 99_999 })
            ));
        });
    }

    #[test]
    fn veth_accepts_redirect_only_when_its_peer_has_napi() {
        in_netns(|| {
            let (a, b) = veth_pair("x");
            run("ip", &["link", "set", &a, "up"]);
            run("ip", &["link", "set", &b, "up"]);
            let (ia, ib) = (ip_link(&a).0, ip_link(&b).0);
            assert_eq!(xdp_features(ia).expect("a"), XdpFeatures(0x23));
            assert!(!xdp_features(ia).expect("a").accepts_redirect());

            run("ethtool", &["-K", &b, "gro", "on"]);
            let a_features = xdp_features(ia).expect("a");
            assert_eq!(a_features, XdpFeatures(0x67), "{a_features}");
            assert!(a_features.accepts_redirect() && a_features.contains(XdpFeatures::NDO_XMIT_SG));
            assert_eq!(
                xdp_features(ib).expect("b"),
                XdpFeatures(0x23),
                "b's own GRO does not change b"
            );

            run("ethtool", &["-K", &b, "gro", "off"]);
            assert_eq!(xdp_features(ia).expect("a"), XdpFeatures(0x23));
        });
    }

    #[test]
    fn netns_cookie_is_stable_within_and_differs_between_namespaces() {
        let (first, again) = in_netns(|| {
            (
                netns_cookie().expect("cookie"),
                netns_cookie().expect("cookie"),
            )
        });
        assert_eq!(first, again);
        let other = in_netns(|| netns_cookie().expect("cookie"));
        assert_ne!(first, other);
        assert_ne!(netns_cookie().expect("cookie"), first);
    }

    #[test]
    fn monitor_reports_the_device_whose_peer_toggled_gro() {
        in_netns(|| {
            let (a, b) = veth_pair("m");
            run("ip", &["link", "set", &a, "up"]);
            run("ip", &["link", "set", &b, "up"]);
            let ia = ip_link(&a).0;
            let mut monitor = FeatureMonitor::new().expect("monitor");
            assert!(
                monitor
                    .wait(Duration::ZERO)
                    .expect("nothing queued")
                    .is_empty()
            );

            run("ethtool", &["-K", &b, "gro", "on"]);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut seen = Vec::new();
            while !seen.contains(&ia) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !remaining.is_zero(),
                    "no notification for {a} (#{ia}) within 5 s; saw {seen:?}"
                );
                seen.extend(monitor.wait(remaining).expect("wait"));
            }
            assert!(xdp_features(ia).expect("a").accepts_redirect());

            // A device created after subscribing is announced too.
            let (c, _) = veth_pair("n");
            let ic = ip_link(&c).0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !seen.contains(&ic) {
                let remaining = deadline.saturating_duration_since(Instant::now());
                assert!(
                    !remaining.is_zero(),
                    "no notification for new {c} within 5 s; saw {seen:?}"
                );
                seen.extend(monitor.wait(remaining).expect("wait"));
            }
        });
    }
}
