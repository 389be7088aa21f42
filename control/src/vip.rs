//! VIP allocation from an IPv4 pool: pure functions, no I/O.
//!
//! The control service keeps every service's VIP in its store; to allocate it reads the VIPs in
//! use (inside the same write transaction that will store the new service, so two concurrent
//! creations cannot pick the same address) and asks [`VipPool::allocate`] for the lowest free
//! one. Lowest-first keeps allocation deterministic, which makes tests and audits readable;
//! reuse of a freed address is fine for a VIP because agents converge on the view the control
//! service sends, not on history.
//!
//! Usable addresses: for prefixes up to /30 the network and broadcast addresses are left out
//! (hosts on the segment may treat them specially); a /31 has no broadcast address and both of
//! its addresses are usable (RFC 3021); a /32 holds a single address and is refused, since a
//! pool of one is almost always a typo.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Why a pool could not be built or an address not handed out.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("VIP pool {cidr:?} is not an IPv4 CIDR (like 198.18.0.0/24)")]
    InvalidCidr {
        cidr: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("VIP pool {cidr:?} has host bits set; did you mean {network}?")]
    HostBitsSet { cidr: String, network: Ipv4Net },
    #[error("VIP pool {cidr} has {usable} usable address(es); a pool needs at least 2")]
    TooSmall { cidr: Ipv4Net, usable: u64 },
    #[error("all {size} addresses of VIP pool {cidr} are in use")]
    Exhausted { cidr: Ipv4Net, size: u64 },
    #[error("VIP {addr} is outside the pool {cidr}")]
    OutsidePool { addr: Ipv4Addr, cidr: Ipv4Net },
    #[error("VIP {addr} is the network or broadcast address of the pool {cidr}")]
    Reserved { addr: Ipv4Addr, cidr: Ipv4Net },
    #[error("VIP {addr} is already used by another service")]
    InUse { addr: Ipv4Addr },
}

/// An IPv4 range that VIPs are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipPool {
    net: Ipv4Net,
}

impl VipPool {
    /// Parses a pool such as `198.18.0.0/24`. The address must be the network address (no host
    /// bits) and the pool must leave at least 2 usable addresses (prefix /31 or shorter).
    pub fn new(cidr: &str) -> Result<Self, VipError> {
        let net: Ipv4Net = cidr
            .trim()
            .parse()
            .map_err(|source| VipError::InvalidCidr {
                cidr: cidr.to_owned(),
                source,
            })?;
        if net.addr() != net.network() {
            return Err(VipError::HostBitsSet {
                cidr: cidr.to_owned(),
                network: net.trunc(),
            });
        }
        let pool = Self { net };
        let usable = pool.size();
        if usable < 2 {
            return Err(VipError::TooSmall { cidr: net, usable });
        }
        Ok(pool)
    }

    /// The pool as configured.
    pub fn cidr(&self) -> Ipv4Net {
        self.net
    }

    /// The number of usable addresses.
    pub fn size(&self) -> u64 {
        let (first, last) = self.usable_range();
        u64::from(last) - u64::from(first) + 1
    }

    /// Whether `addr` is a usable address of the pool (inside it, and not its network or
    /// broadcast address).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let (first, last) = self.usable_range();
        (first..=last).contains(&u32::from(addr))
    }

    /// The lowest usable address not in `used`. Addresses of `used` outside the pool are ignored.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, VipError> {
        let (first, last) = self.usable_range();
        // `used` is sorted: walk its addresses inside the pool until the first gap. This costs
        // O(addresses in use), not O(pool size).
        let mut candidate = u64::from(first);
        for &addr in used.range(Ipv4Addr::from(first)..=Ipv4Addr::from(last)) {
            if u64::from(u32::from(addr)) != candidate {
                break;
            }
            candidate += 1;
        }
        match u32::try_from(candidate) {
            Ok(addr) if addr <= last => Ok(Ipv4Addr::from(addr)),
            // Past `last`, or past 255.255.255.255 when the pool ends there (a /31 at the top).
            _ => Err(VipError::Exhausted {
                cidr: self.net,
                size: self.size(),
            }),
        }
    }

    /// Checks an address a user asked for: usable in this pool and not in `used`, the set of
    /// VIPs held by OTHER services (so that re-applying a service with its own VIP succeeds).
    pub fn check_requested(
        &self,
        addr: Ipv4Addr,
        used: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), VipError> {
        if !self.net.contains(&addr) {
            return Err(VipError::OutsidePool {
                addr,
                cidr: self.net,
            });
        }
        if !self.contains(addr) {
            return Err(VipError::Reserved {
                addr,
                cidr: self.net,
            });
        }
        if used.contains(&addr) {
            return Err(VipError::InUse { addr });
        }
        Ok(())
    }

    /// First and last usable address, as integers (inclusive).
    fn usable_range(&self) -> (u32, u32) {
        let network = u32::from(self.net.network());
        let broadcast = u32::from(self.net.broadcast());
        if self.net.prefix_len() <= 30 {
            (network + 1, broadcast - 1)
        } else {
            // /31: both addresses (RFC 3021); /32: its one address (refused by `new`).
            (network, broadcast)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str) -> VipPool {
        VipPool::new(cidr).expect("valid pool")
    }

    fn addrs(list: &[&str]) -> BTreeSet<Ipv4Addr> {
        list.iter()
            .map(|a| a.parse().expect("valid address"))
            .collect()
    }

    fn ip(a: &str) -> Ipv4Addr {
        a.parse().expect("valid address")
    }

    #[test]
    fn rejects_bad_pools() {
        assert!(matches!(
            VipPool::new("198.18.0.0"),
            Err(VipError::InvalidCidr { .. })
        ));
        assert!(matches!(
            VipPool::new("2001:db8::/64"),
            Err(VipError::InvalidCidr { .. })
        ));
        assert!(matches!(
            VipPool::new("198.18.0.0/33"),
            Err(VipError::InvalidCidr { .. })
        ));
        match VipPool::new("198.18.0.5/24") {
            Err(VipError::HostBitsSet { network, .. }) => {
                assert_eq!(network, "198.18.0.0/24".parse::<Ipv4Net>().expect("net"));
            }
            other => panic!("expected HostBitsSet, got {other:?}"),
        }
        assert!(matches!(
            VipPool::new("198.18.0.1/32"),
            Err(VipError::TooSmall { usable: 1, .. })
        ));
    }

    #[test]
    fn sizes_leave_out_network_and_broadcast_up_to_slash_30() {
        assert_eq!(pool("198.18.0.0/24").size(), 254);
        assert_eq!(pool("198.18.0.0/30").size(), 2);
        assert_eq!(pool("198.18.0.0/31").size(), 2);
        assert_eq!(pool("198.18.0.0/15").size(), (1 << 17) - 2);
        assert_eq!(pool("0.0.0.0/0").size(), (1 << 32) - 2);
        assert_eq!(pool(" 198.18.0.0/24 ").cidr().to_string(), "198.18.0.0/24");
    }

    #[test]
    fn allocates_lowest_free_address() {
        let p = pool("198.18.0.0/24");
        assert_eq!(
            p.allocate(&BTreeSet::new()).expect("free"),
            ip("198.18.0.1")
        );
        assert_eq!(
            p.allocate(&addrs(&["198.18.0.1", "198.18.0.2", "198.18.0.4"]))
                .expect("free"),
            ip("198.18.0.3")
        );
        // Addresses outside the pool do not count.
        assert_eq!(
            p.allocate(&addrs(&[
                "10.0.0.1",
                "198.18.0.0",
                "198.18.1.1",
                "255.255.255.255"
            ]))
            .expect("free"),
            ip("198.18.0.1")
        );
    }

    #[test]
    fn slash_30_uses_the_two_middle_addresses() {
        let p = pool("198.18.0.0/30");
        let mut used = BTreeSet::new();
        let a = p.allocate(&used).expect("first");
        used.insert(a);
        let b = p.allocate(&used).expect("second");
        used.insert(b);
        assert_eq!((a, b), (ip("198.18.0.1"), ip("198.18.0.2")));
        assert!(matches!(
            p.allocate(&used),
            Err(VipError::Exhausted { size: 2, .. })
        ));
        assert!(matches!(
            p.check_requested(ip("198.18.0.0"), &BTreeSet::new()),
            Err(VipError::Reserved { .. })
        ));
        assert!(matches!(
            p.check_requested(ip("198.18.0.3"), &BTreeSet::new()),
            Err(VipError::Reserved { .. })
        ));
    }

    #[test]
    fn slash_31_uses_both_addresses() {
        let p = pool("198.18.0.6/31");
        let mut used = BTreeSet::new();
        let a = p.allocate(&used).expect("first");
        used.insert(a);
        let b = p.allocate(&used).expect("second");
        used.insert(b);
        assert_eq!((a, b), (ip("198.18.0.6"), ip("198.18.0.7")));
        assert!(matches!(
            p.allocate(&used),
            Err(VipError::Exhausted { size: 2, .. })
        ));
        p.check_requested(ip("198.18.0.6"), &BTreeSet::new())
            .expect("network address is usable in a /31");
    }

    #[test]
    fn slash_31_at_the_top_of_the_address_space_exhausts_cleanly() {
        let p = pool("255.255.255.254/31");
        let used = addrs(&["255.255.255.254", "255.255.255.255"]);
        assert!(matches!(p.allocate(&used), Err(VipError::Exhausted { .. })));
    }

    #[test]
    fn exhaustion_reports_pool_and_size() {
        let p = pool("198.18.0.0/29");
        let mut used = BTreeSet::new();
        for _ in 0..6 {
            let a = p.allocate(&used).expect("free address");
            assert!(used.insert(a));
        }
        match p.allocate(&used) {
            Err(VipError::Exhausted { cidr, size }) => {
                assert_eq!(cidr, p.cidr());
                assert_eq!(size, 6);
            }
            other => panic!("expected Exhausted, got {other:?}"),
        }
    }

    #[test]
    fn allocation_never_returns_a_used_address() {
        // Every subset of a /28 given by a bit pattern: the allocation, when there is one, is
        // usable, not used, and lower than every other free address.
        let p = pool("198.18.0.0/28");
        let base = u32::from(ip("198.18.0.0"));
        for mask in 0u32..(1 << 16) {
            let used: BTreeSet<Ipv4Addr> = (0..16)
                .filter(|bit| mask & (1 << bit) != 0)
                .map(|bit| Ipv4Addr::from(base + bit))
                .collect();
            let free: Vec<Ipv4Addr> = (1..15)
                .map(|offset| Ipv4Addr::from(base + offset))
                .filter(|a| !used.contains(a))
                .collect();
            match p.allocate(&used) {
                Ok(a) => {
                    assert!(!used.contains(&a), "mask {mask:#x}: {a} is used");
                    assert!(p.contains(a), "mask {mask:#x}: {a} not usable");
                    assert_eq!(Some(&a), free.first(), "mask {mask:#x}");
                }
                Err(VipError::Exhausted { .. }) => assert!(free.is_empty(), "mask {mask:#x}"),
                Err(other) => panic!("mask {mask:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn check_requested() {
        let p = pool("198.18.0.0/24");
        let used = addrs(&["198.18.0.10"]);
        p.check_requested(ip("198.18.0.11"), &used).expect("free");
        p.check_requested(ip("198.18.0.254"), &used)
            .expect("last usable");
        assert!(matches!(
            p.check_requested(ip("198.18.0.10"), &used),
            Err(VipError::InUse { addr }) if addr == ip("198.18.0.10")
        ));
        assert!(matches!(
            p.check_requested(ip("198.18.1.1"), &used),
            Err(VipError::OutsidePool { addr, cidr }) if addr == ip("198.18.1.1") && cidr == p.cidr()
        ));
        assert!(matches!(
            p.check_requested(ip("198.18.0.255"), &used),
            Err(VipError::Reserved { .. })
        ));
    }
}
