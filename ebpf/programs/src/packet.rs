//! Header parsing with bounds checks the verifier accepts.
//!
//! Every read goes through [`ptr_at`], which checks `start + off + size <= end`
//! for the whole window that is read. Fields are read with unaligned loads:
//! after a 14-byte Ethernet header nothing is naturally aligned.

use core::mem::size_of;

use sluice_common::{
    reason,
    types::{IPPROTO_TCP, IPPROTO_UDP},
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Largest IPv4 header (IHL = 15).
pub const MAX_IPV4_HLEN: usize = 60;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Headers the programs read: Ethernet, the largest IPv4 header, a TCP header.
pub const MAX_HEADERS: usize = ETH_HLEN + MAX_IPV4_HLEN + TCP_HLEN;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A pointer to `T` at `start + off`, if the packet holds all of it.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<usize> {
    if start + off + size_of::<T>() > end {
        None
    } else {
        Some(start + off)
    }
}

/// Reads a `T` at `addr`, which a [`ptr_at`] window covering it has checked.
#[inline(always)]
pub fn load<T: Copy>(addr: usize) -> T {
    // SAFETY: callers pass addresses inside a window checked by `ptr_at`; the
    // read is unaligned-safe.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Writes a `T` at `addr`, which a [`ptr_at`] window covering it has checked.
#[inline(always)]
pub fn store<T: Copy>(addr: usize, value: T) {
    // SAFETY: as for `load`; packet memory is writable for XDP programs.
    unsafe { core::ptr::write_unaligned(addr as *mut T, value) }
}

/// The IPv4 header fields the balancer uses. Addresses are raw (network order).
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub ttl: u8,
    pub tos: u8,
    /// Header length in bytes, 20..=60.
    pub hlen: usize,
    /// Total length, host order.
    pub tot_len: u16,
    /// More-fragments set or a non-zero offset.
    pub fragment: bool,
}

/// Parses Ethernet and IPv4. `pkt_len` is the whole packet's length, which for
/// an skb may exceed the linear data the window can see. On failure returns the
/// pass reason: whatever Sluice cannot parse up to L3 is not Sluice's traffic.
#[inline(always)]
pub fn parse_ipv4(start: usize, end: usize, pkt_len: usize) -> Result<Ipv4, u32> {
    let eth = ptr_at::<[u8; ETH_HLEN]>(start, end, 0).ok_or(reason::PASS_MALFORMED_L2)?;
    if u16::from_be(load::<u16>(eth + 12)) != ETH_P_IP {
        return Err(reason::PASS_NOT_IPV4);
    }
    let ip = ptr_at::<[u8; 20]>(start, end, ETH_HLEN).ok_or(reason::PASS_MALFORMED_IPV4)?;
    let version_ihl = load::<u8>(ip);
    let hlen = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || hlen < 20 {
        return Err(reason::PASS_MALFORMED_IPV4);
    }
    let tot_len = u16::from_be(load::<u16>(ip + 2));
    if (tot_len as usize) < hlen || ETH_HLEN + tot_len as usize > pkt_len {
        return Err(reason::PASS_MALFORMED_IPV4);
    }
    Ok(Ipv4 {
        src: load::<u32>(ip + 12),
        dst: load::<u32>(ip + 16),
        proto: load::<u8>(ip + 9),
        ttl: load::<u8>(ip + 8),
        tos: load::<u8>(ip + 1),
        hlen,
        tot_len,
        // MF flag or fragment offset.
        fragment: u16::from_be(load::<u16>(ip + 6)) & 0x3fff != 0,
    })
}

/// The TCP/UDP header fields the balancer uses. Ports and checksum are raw.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Offset of the TCP/UDP header from the start of the frame.
    pub off: usize,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags; zero for UDP.
    pub flags: u8,
    pub check: u16,
}

/// Parses the TCP or UDP header that follows `ip` (which must not be a fragment).
/// `None` when it is truncated or invalid.
#[inline(always)]
pub fn parse_l4(start: usize, end: usize, ip: &Ipv4) -> Option<L4> {
    // Re-establish the bound for the verifier: the value came through the stack.
    let hlen = ip.hlen;
    if !(20..=MAX_IPV4_HLEN).contains(&hlen) {
        return None;
    }
    let off = ETH_HLEN + hlen;
    let segment = (ip.tot_len as usize) - hlen;
    if ip.proto == IPPROTO_TCP {
        let tcp = ptr_at::<[u8; TCP_HLEN]>(start, end, off)?;
        let data_offset = ((load::<u8>(tcp + 12) >> 4) as usize) * 4;
        if segment < TCP_HLEN || data_offset < TCP_HLEN || data_offset > segment {
            return None;
        }
        Some(L4 {
            off,
            sport: load::<u16>(tcp),
            dport: load::<u16>(tcp + 2),
            flags: load::<u8>(tcp + 13),
            check: load::<u16>(tcp + 16),
        })
    } else if ip.proto == IPPROTO_UDP {
        let udp = ptr_at::<[u8; UDP_HLEN]>(start, end, off)?;
        if segment < UDP_HLEN {
            return None;
        }
        Some(L4 {
            off,
            sport: load::<u16>(udp),
            dport: load::<u16>(udp + 2),
            flags: 0,
            check: load::<u16>(udp + 6),
        })
    } else {
        None
    }
}
