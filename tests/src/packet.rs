//! Crafted frames for `BPF_PROG_TEST_RUN`, and a strict reader of what the
//! programs give back (checksums verified from scratch, not trusted).

use std::net::Ipv4Addr;

use sluice_common::csum;

pub const ETH_HLEN: usize = 14;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        flags: u8,
    },
    /// `checksum: false` sends no checksum (zero), as UDP over IPv4 allows.
    Udp {
        checksum: bool,
    },
    /// Any other protocol number, with the payload as its body.
    Other {
        proto: u8,
    },
}

/// Everything a test may want to vary in a frame.
#[derive(Clone, Debug)]
pub struct Spec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ethertype: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (padded with EOL to a multiple of 4).
    pub ip_options: Vec<u8>,
    /// (more fragments, fragment offset in 8-byte units).
    pub fragment: (bool, u16),
    /// Leave the L4 checksum as the pseudo-header sum only, as a local socket
    /// does when checksum offload is pending (`CHECKSUM_PARTIAL`).
    pub partial_checksum: bool,
}

impl Spec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            ethertype: 0x0800,
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            ttl: 64,
            l4: L4::Tcp { flags },
            payload: Vec::new(),
            ip_options: Vec::new(),
            fragment: (false, 0),
            partial_checksum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            l4: L4::Udp { checksum: true },
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// The frame's bytes, with correct lengths and checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut options = self.ip_options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let ihl = 20 + options.len();
        let l4 = self.l4_bytes();
        let total = ihl + l4.len();

        let mut frame = Vec::with_capacity(ETH_HLEN + total);
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&self.ethertype.to_be_bytes());
        let proto = match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Other { proto } => proto,
        };
        let flags_frag = ((self.fragment.0 as u16) << 13) | (self.fragment.1 & 0x1fff);
        let mut ip = vec![
            0x40 | (ihl / 4) as u8,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            (flags_frag >> 8) as u8,
            flags_frag as u8,
            self.ttl,
            proto,
            0,
            0,
        ];
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&options);
        let ip_check = csum::checksum(&ip, 0);
        ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
        frame.extend_from_slice(&ip);

        let mut l4 = l4;
        let check_at = match self.l4 {
            L4::Tcp { .. } => Some(16),
            L4::Udp { checksum: true } => Some(6),
            _ => None,
        };
        if let Some(at) = check_at {
            let pseudo = csum::pseudo_header_v4(
                u32::from_ne_bytes(self.src.octets()),
                u32::from_ne_bytes(self.dst.octets()),
                proto,
                l4.len() as u16,
            );
            let value = if self.partial_checksum {
                pseudo
            } else {
                let c = csum::checksum(&l4, pseudo as u32);
                if c == 0 && at == 6 { 0xffff } else { c }
            };
            l4[at..at + 2].copy_from_slice(&value.to_ne_bytes());
        }
        frame.extend_from_slice(&l4);
        frame
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { flags } => {
                out.extend_from_slice(&self.sport.to_be_bytes());
                out.extend_from_slice(&self.dport.to_be_bytes());
                out.extend_from_slice(&1000u32.to_be_bytes()); // seq
                out.extend_from_slice(&0u32.to_be_bytes()); // ack
                out.push(5 << 4);
                out.push(flags);
                out.extend_from_slice(&65535u16.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
            }
            L4::Udp { .. } => {
                out.extend_from_slice(&self.sport.to_be_bytes());
                out.extend_from_slice(&self.dport.to_be_bytes());
                out.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            L4::Other { .. } => {}
        }
        out.extend_from_slice(&self.payload);
        out
    }
}

/// What a frame says, with its checksums checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub proto: u8,
    pub tcp_flags: u8,
    /// The IPv4 header checksum verifies.
    pub ip_checksum_ok: bool,
    /// The TCP/UDP checksum verifies (a zero UDP checksum counts as "none").
    pub l4_checksum_ok: bool,
    pub udp_checksum_zero: bool,
    pub payload: Vec<u8>,
}

/// Reads an Ethernet/IPv4/TCP-or-UDP frame. Panics on anything else: the
/// tests only read back frames they expect to be well formed.
pub fn read(frame: &[u8]) -> Seen {
    assert!(frame.len() >= ETH_HLEN + 20, "frame too short: {frame:?}");
    let ip = &frame[ETH_HLEN..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let l4 = &ip[ihl..total];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let pseudo = csum::pseudo_header_v4(
        u32::from_ne_bytes(src.octets()),
        u32::from_ne_bytes(dst.octets()),
        proto,
        l4.len() as u16,
    );
    let verifies =
        |data: &[u8], initial: u32| csum::fold_wide(csum::sum_words(data, initial)) == 0xffff;
    let (payload_at, udp_zero) = match proto {
        6 => ((((l4[12] >> 4) as usize) * 4), false),
        17 => (8, l4[6] == 0 && l4[7] == 0),
        _ => (0, false),
    };
    Seen {
        dst_mac: frame[0..6].try_into().expect("6 bytes"),
        src_mac: frame[6..12].try_into().expect("6 bytes"),
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ttl: ip[8],
        proto,
        tcp_flags: if proto == 6 { l4[13] } else { 0 },
        ip_checksum_ok: verifies(&ip[..ihl], 0),
        l4_checksum_ok: udp_zero || verifies(l4, pseudo as u32),
        udp_checksum_zero: udp_zero,
        payload: l4[payload_at..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn built_frames_read_back_with_valid_checksums() {
        for spec in [
            Spec::tcp((a("198.18.1.2"), 40000), (a("198.18.0.10"), 80), TCP_SYN),
            Spec::udp((a("198.18.1.2"), 40000), (a("198.18.0.10"), 53), b"hello"),
            Spec {
                ip_options: vec![1, 1, 1],
                ..Spec::tcp((a("10.0.0.1"), 1), (a("10.0.0.2"), 2), TCP_ACK)
            },
        ] {
            let seen = read(&spec.build());
            assert!(seen.ip_checksum_ok && seen.l4_checksum_ok, "{seen:?}");
            assert_eq!((seen.src, seen.dst), (spec.src, spec.dst));
            assert_eq!((seen.sport, seen.dport), (spec.sport, spec.dport));
        }
    }

    #[test]
    fn partial_checksum_does_not_verify_but_equals_the_pseudo_sum() {
        let spec = Spec {
            partial_checksum: true,
            ..Spec::tcp((a("198.18.1.2"), 40000), (a("198.18.0.10"), 80), TCP_SYN)
        };
        let frame = spec.build();
        assert!(!read(&frame).l4_checksum_ok);
    }

    #[test]
    fn udp_without_checksum_stays_zero() {
        let spec = Spec {
            l4: L4::Udp { checksum: false },
            ..Spec::udp((a("198.18.1.2"), 1), (a("198.18.0.10"), 53), b"x")
        };
        let seen = read(&spec.build());
        assert!(seen.udp_checksum_zero && seen.l4_checksum_ok);
    }
}
