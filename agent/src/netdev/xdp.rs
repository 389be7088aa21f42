//! XDP features of a device over the kernel's generic-netlink family `netdev`: one
//! `NETDEV_CMD_DEV_GET` request per read, and [`FeatureMonitor`], a subscription to the family's
//! `mgmt` multicast group. The family's messages are typed here on `netlink-packet-core`'s
//! attribute parsing; the plumbing is in `genl.rs`.

use std::ffi::c_int;
use std::fmt;
use std::io;
use std::ops::BitOr;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, ErrorContext, NetlinkPayload, Nla, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized, parse_u32, parse_u64,
};
use netlink_packet_generic::ctrl::nlas::{GenlCtrlAttrs, McastGrpAttrs};
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader};
use netlink_sys::Socket;

use super::NetdevError;
use super::genl::{
    Datagram, FamilyReply, GenlSocket, RECV_BUF_LEN, netlink_socket, parse_genl, recv,
    split_messages,
};

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
// The `netdev` family (include/uapi/linux/netdev.h). Neither libc nor the netlink crates export
// these: they are the generated uapi header's values, stable kernel ABI since 6.3.

const NETDEV_FAMILY_NAME: &str = "netdev";
const NETDEV_FAMILY_VERSION: u8 = 1;
const NETDEV_MCGRP_MGMT: &str = "mgmt";
pub(super) const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_CMD_DEV_ADD_NTF: u8 = 2;
const NETDEV_CMD_DEV_DEL_NTF: u8 = 3;
pub(super) const NETDEV_CMD_DEV_CHANGE_NTF: u8 = 4;
pub(super) const NETDEV_A_DEV_IFINDEX: u16 = 1;
pub(super) const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// A message of the `netdev` family: a dev-get request or reply, or a dev-*-ntf notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NetdevMessage {
    pub(super) cmd: u8,
    pub(super) attrs: Vec<DevAttr>,
}

/// One attribute of the `dev` attribute set; the ones this module does not read are kept raw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum DevAttr {
    Ifindex(u32),
    XdpFeatures(XdpFeatures),
    Other(DefaultNla),
}

impl GenlFamily for NetdevMessage {
    fn family_name() -> &'static str {
        NETDEV_FAMILY_NAME
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        NETDEV_FAMILY_VERSION
    }
}

impl Emitable for NetdevMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| DevAttr::parse(&nla)))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            cmd: header.cmd,
            attrs,
        })
    }
}

impl Nla for DevAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Ifindex(_) => 4,
            Self::XdpFeatures(_) => 8,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Ifindex(_) => NETDEV_A_DEV_IFINDEX,
            Self::XdpFeatures(_) => NETDEV_A_DEV_XDP_FEATURES,
            Self::Other(nla) => nla.kind(),
        }
    }

    /// `buffer` is exactly `value_len()` bytes (the `Nla` contract).
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            Self::Ifindex(ifindex) => buffer.copy_from_slice(&ifindex.to_ne_bytes()),
            Self::XdpFeatures(features) => buffer.copy_from_slice(&features.0.to_ne_bytes()),
            Self::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&T>> for DevAttr {
    fn parse(buf: &NlaBuffer<&T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            NETDEV_A_DEV_IFINDEX => {
                Self::Ifindex(parse_u32(value).context("NETDEV_A_DEV_IFINDEX is not a u32")?)
            }
            // A u64 in the spec; 4-byte values are taken too (the `uint` type of newer specs).
            NETDEV_A_DEV_XDP_FEATURES => Self::XdpFeatures(XdpFeatures(
                match value.len() {
                    4 => parse_u32(value).map(u64::from),
                    _ => parse_u64(value),
                }
                .context("NETDEV_A_DEV_XDP_FEATURES is not a u64")?,
            )),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The attributes of a dev-get reply or a dev-*-ntf notification that we use.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct DevAttrs {
    pub(super) ifindex: Option<u32>,
    pub(super) xdp_features: Option<XdpFeatures>,
}

pub(super) fn dev_attrs(attrs: &[DevAttr]) -> DevAttrs {
    let mut dev = DevAttrs::default();
    for attr in attrs {
        match attr {
            DevAttr::Ifindex(ifindex) => dev.ifindex = Some(*ifindex),
            DevAttr::XdpFeatures(features) => dev.xdp_features = Some(*features),
            DevAttr::Other(_) => {}
        }
    }
    dev
}

/// The ifindexes named by the netdev dev-*-ntf notifications in one datagram.
pub(super) fn notified_ifindexes(datagram: &[u8], family: u16) -> Result<Vec<u32>, NetdevError> {
    let mut out = Vec::new();
    for msg in split_messages(datagram)? {
        if msg.kind != family {
            continue;
        }
        if let NetlinkPayload::InnerMessage(ntf) = parse_genl::<NetdevMessage>(&msg)?
            && matches!(
                ntf.payload.cmd,
                NETDEV_CMD_DEV_ADD_NTF | NETDEV_CMD_DEV_DEL_NTF | NETDEV_CMD_DEV_CHANGE_NTF
            )
        {
            out.extend(dev_attrs(&ntf.payload.attrs).ifindex);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Family resolution and dev-get

/// Where the `netdev` family lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NetdevFamily {
    pub(super) id: u16,
    pub(super) mgmt_group: u32,
}

/// Generic-netlink family ids are global, not per namespace, and `netdev` is built into the
/// core (registered once at boot by net/core/netdev-genl.c): resolve it once per process.
static NETDEV_FAMILY: OnceLock<NetdevFamily> = OnceLock::new();

fn netdev_family() -> Result<NetdevFamily, NetdevError> {
    if let Some(family) = NETDEV_FAMILY.get() {
        return Ok(*family);
    }
    let lookup = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(NETDEV_FAMILY_NAME.to_owned())],
    };
    let replies = GenlSocket::open()?
        // The control family's id is static; GenlCtrl reports it itself.
        .request("CTRL_CMD_GETFAMILY(netdev)", 0, lookup)
        .map_err(|e| match e {
            NetdevError::Netlink { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                NetdevError::NoNetdevFamily
            }
            e => e,
        })?;
    let family = parse_family(&replies)?;
    Ok(*NETDEV_FAMILY.get_or_init(|| family))
}

pub(super) fn parse_family(replies: &[FamilyReply]) -> Result<NetdevFamily, NetdevError> {
    let [FamilyReply(attrs)] = replies else {
        return Err(NetdevError::Malformed {
            what: "CTRL_CMD_GETFAMILY: not exactly one reply",
        });
    };
    let (mut id, mut mgmt_group) = (None, None);
    for attr in attrs {
        match attr {
            GenlCtrlAttrs::FamilyId(value) => id = Some(*value),
            GenlCtrlAttrs::McastGroups(groups) => {
                mgmt_group = find_group(groups, NETDEV_MCGRP_MGMT)
            }
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

/// The id of multicast group `wanted`; `None` when it is missing or has no id.
fn find_group(groups: &[Vec<McastGrpAttrs>], wanted: &str) -> Option<u32> {
    let group = groups.iter().find(|group| {
        group
            .iter()
            .any(|attr| matches!(attr, McastGrpAttrs::Name(name) if name == wanted))
    })?;
    group.iter().find_map(|attr| match attr {
        McastGrpAttrs::Id(id) => Some(*id),
        McastGrpAttrs::Name(_) => None,
    })
}

/// The XDP features of device `ifindex` (one `NETDEV_CMD_DEV_GET` request).
pub fn xdp_features(ifindex: u32) -> Result<XdpFeatures, NetdevError> {
    if ifindex == 0 {
        return Err(NetdevError::NoSuchIfindex { ifindex });
    }
    let family = netdev_family()?;
    let get = NetdevMessage {
        cmd: NETDEV_CMD_DEV_GET,
        attrs: vec![DevAttr::Ifindex(ifindex)],
    };
    let replies: Vec<NetdevMessage> = GenlSocket::open()?
        .request("NETDEV_CMD_DEV_GET", family.id, get)
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
    let dev = dev_attrs(&reply.attrs);
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
    sock: Socket,
    family: u16,
    buf: Vec<u8>,
}

impl FeatureMonitor {
    pub fn new() -> Result<Self, NetdevError> {
        let family = netdev_family()?;
        let mut sock = netlink_socket()?;
        // Bind first: an unbound socket keeps port id 0, the kernel's own, and
        // net/netlink/af_netlink.c do_one_broadcast skips the sender's port id — so it would
        // be subscribed yet never receive anything. Binding to port 0 picks a unique id.
        sock.bind_auto().map_err(|source| NetdevError::Netlink {
            op: "bind(NETLINK_GENERIC)",
            source,
        })?;
        sock.add_membership(family.mgmt_group)
            .map_err(|source| NetdevError::Netlink {
                op: "join the netdev mgmt group",
                source,
            })?;
        Ok(Self {
            sock,
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
            fd: self.sock.as_raw_fd(),
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
            let len = match recv(&self.sock, &mut self.buf, libc::MSG_DONTWAIT) {
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
