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
//! "Kernel traps" in docs/architecture.md). Since Linux 6.3 the kernel publishes exactly this fact as the
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
//! # Crates, and what is still by hand
//!
//! Generic netlink (`genl.rs`, `xdp.rs`) is `netlink-packet-core` (message and attribute
//! buffers with checked lengths, NLMSG_ERROR/NLMSG_DONE, no dependencies of its own),
//! `netlink-packet-generic` (the genl header and the control family's `CTRL_CMD_GETFAMILY`
//! messages and multicast-group attributes) and `netlink-sys` (the socket, bind, multicast
//! membership). What remains ours is the `netdev` family's two message types on top of those
//! traits, the `NETDEV_*` numbers (include/uapi/linux/netdev.h: neither libc nor the crates
//! export them), the request/ACK loop and the mapping of the crates' errors to ours. Replies are
//! still parsed defensively: a malformed one is [`NetdevError::Malformed`], never a panic.
//!
//! `neli` 0.7 was tried for the same job (family and `mgmt` group lookup, one dev-get, one
//! subscription) and lost on measurement: as two otherwise equal release programs it added
//! 513,656 bytes over an empty one against 135,728 for the crates above, and 36 crates against
//! 14; in the agent it would add 16 crates to the normal dependency tree, the crates above add
//! 5 (zerocopy among them). Its synchronous `NlRouter` also starts a processing thread per
//! socket, and this module opens a socket per read.
//!
//! Still on libc, as ioctls on an AF_UNIX socket (`socket2`): `SIOCGIFINDEX`, `SIOCGIFFLAGS`,
//! `SIOCGIFHWADDR`, `SIOCGIFNAME` and ethtool's `ETHTOOL_GDRVINFO`, plus `SO_NETNS_COOKIE`.
//! The driver name has no netlink form (ethtool's netlink API has no driver-info message;
//! `ethtool -i` itself uses this ioctl), so the ioctl socket stays whatever else is used, and an
//! rtnetlink crate would only replace the four ioctls beside it. `ETHTOOL_GDRVINFO` and
//! `struct ethtool_drvinfo` are copied from include/uapi/linux/ethtool.h because libc has
//! neither; every other constant is libc's.

mod genl;
mod xdp;

pub use xdp::{FeatureMonitor, XdpFeatures, xdp_features};

use std::ffi::c_int;
use std::io;
use std::mem;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use socket2::{Domain, Socket, Type};

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
struct CtlSocket(Socket);

impl CtlSocket {
    fn open() -> Result<Self, NetdevError> {
        unix_socket().map(Self)
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

/// The cookie of the calling thread's network namespace: unique for the boot, never reused.
pub fn netns_cookie() -> Result<u64, NetdevError> {
    let fd = unix_socket()?;
    let mut cookie = 0_u64;
    let mut len = socklen::<u64>();
    // SAFETY: `cookie` and `len` describe a writable u64 that outlives the call; the kernel
    // writes at most `len` bytes and stores the length it wrote back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
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

/// A close-on-exec AF_UNIX datagram socket: the cheapest handle for ioctls and socket options
/// that any family serves.
fn unix_socket() -> Result<Socket, NetdevError> {
    Socket::new(Domain::UNIX, Type::DGRAM, None).map_err(|source| NetdevError::Socket {
        op: "socket(AF_UNIX)",
        source,
    })
}

fn socklen<T>() -> libc::socklen_t {
    // Socket option types are a few bytes; the cast cannot truncate.
    mem::size_of::<T>() as libc::socklen_t
}

#[cfg(test)]
mod tests;
