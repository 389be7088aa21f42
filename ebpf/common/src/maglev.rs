//! Maglev consistent hashing (Eisenbud et al., NSDI 2016).
//!
//! User space fills a lookup table of a prime size `M` with backend positions
//! ([`table`], feature `user`); the kernel picks `table[flow_hash(5-tuple) % M]`
//! ([`flow_hash`]). Both are deterministic functions of their inputs, with no
//! seed: every node computes the same table for the same backends and the same
//! hash for the same flow, so a client is sent to the same backend whichever
//! node its packets reach. When one of `N` backends goes away only the slots it
//! held (about `M/N`) change owner, plus a few more.

/// The hash of a flow, as the kernel computes it: the five-tuple in wire byte
/// order, mixed by a 64-bit finalizer (splitmix64). Cheap, branch-free, and
/// good enough to spread flows evenly over a table.
#[inline(always)]
pub fn flow_hash(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let a = ((src as u64) << 32) | dst as u64;
    let b = ((sport as u64) << 32) | ((dport as u64) << 16) | proto as u64;
    let mut x = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x ^ (x >> 32)) as u32
}

/// Whether `n` is prime (table sizes must be, for every skip to visit every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(feature = "user")]
pub use user::table;

#[cfg(feature = "user")]
mod user {
    use std::{vec, vec::Vec};

    fn mix(mut x: u64) -> u64 {
        x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// The lookup table: for each of `size` slots (a prime), the position in
    /// `backends` of its owner. `backends` are (identity, weight): the identity
    /// (say address and port) fixes each backend's preference order, so the
    /// table does not depend on the order backends are given in. A backend
    /// takes `weight` slots per round (weights reduced by their gcd), so
    /// shares follow weights.
    ///
    /// # Panics
    /// If `size` is not prime, or is smaller than the sum of reduced weights,
    /// or a weight is zero: callers validate these.
    pub fn table(backends: &[(u64, u32)], size: u32) -> Vec<u32> {
        assert!(super::is_prime(size), "table size {size} is not prime");
        if backends.is_empty() {
            return Vec::new();
        }
        assert!(backends.iter().all(|b| b.1 > 0), "zero weight");
        let divisor = backends.iter().map(|b| b.1).fold(0, crate::slots::gcd);
        let turns: Vec<u32> = backends.iter().map(|b| b.1 / divisor).collect();
        assert!(
            turns.iter().map(|&t| t as u64).sum::<u64>() <= size as u64,
            "more weight than slots"
        );
        let m = size as u64;
        // Filled in identity order, so that the order backends are given in
        // does not matter.
        let mut order: Vec<usize> = (0..backends.len()).collect();
        order.sort_by_key(|&i| backends[i].0);
        let turns: Vec<u32> = order.iter().map(|&i| turns[i]).collect();
        let prefs: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| backends[i].0)
            .map(|identity| {
                let offset = mix(identity ^ 0x5157_4d41_474c_4556) % m;
                let skip = mix(identity.rotate_left(17) ^ 0x736b_6970) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; backends.len()];
        let mut owner = vec![u32::MAX; size as usize];
        let mut filled = 0u32;
        'fill: loop {
            for (i, &(offset, skip)) in prefs.iter().enumerate() {
                for _ in 0..turns[i] {
                    // The backend's next preferred slot that is still free.
                    let mut slot = (offset + next[i] * skip) % m;
                    while owner[slot as usize] != u32::MAX {
                        next[i] += 1;
                        slot = (offset + next[i] * skip) % m;
                    }
                    owner[slot as usize] = order[i] as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        owner
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    fn backends(n: u64) -> Vec<(u64, u32)> {
        (1..=n)
            .map(|i| ((0xc613_0000 + i) << 16 | 8080, 1))
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut out = vec![0; n];
        for &b in table {
            out[b as usize] += 1;
        }
        out
    }

    #[test]
    fn primes() {
        let found: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(found, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(16_381) && is_prime(65_521) && !is_prime(65_535));
    }

    #[test]
    fn every_backend_gets_its_share() {
        let table = table(&backends(10), 16_381);
        for share in shares(&table, 10) {
            // M/N = 1638.1; Maglev keeps every share within a slot or two of it.
            assert!((1636..=1640).contains(&share), "{share}");
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let table = table(&[(1, 1), (2, 3)], 16_381);
        let s = shares(&table, 2);
        assert!((4094..=4097).contains(&s[0]), "{s:?}");
    }

    #[test]
    fn order_of_backends_does_not_matter() {
        let b = backends(5);
        let mut reversed = b.clone();
        reversed.reverse();
        let t1 = table(&b, 251);
        let t2 = table(&reversed, 251);
        // Same owner identity per slot.
        let id = |t: &[u32], list: &[(u64, u32)]| -> Vec<u64> {
            t.iter().map(|&i| list[i as usize].0).collect()
        };
        assert_eq!(id(&t1, &b), id(&t2, &reversed));
    }

    /// Removing the first backend by identity (the worst case: every later
    /// backend's turn in the fill shifts). Measured: 1.00/N at N=3, 1.04/N at
    /// 10, 1.12/N at 20 (M=16,381); disruption grows as N approaches M/1000
    /// (1.23/N at N=50, M=65,521), hence the advice M ≥ 1000·N.
    #[test]
    fn removing_one_of_n_moves_about_one_nth() {
        for (n, size) in [
            (3u64, 16_381),
            (5, 16_381),
            (10, 16_381),
            (16, 16_381),
            (20, 16_381),
        ] {
            let all = backends(n);
            let before = table(&all, size);
            let kept: Vec<(u64, u32)> = all[1..].to_vec();
            let after = table(&kept, size);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| all[b as usize].0 != kept[a as usize].0)
                .count();
            let fraction = moved as f64 / size as f64;
            assert!(
                fraction <= 1.2 / n as f64,
                "n={n}: {moved} slots moved ({fraction:.4} > 1.2/n)"
            );
        }
    }

    #[test]
    fn flows_spread_evenly_over_the_table() {
        let mut buckets = vec![0u32; 16];
        for sport in 0..16_000u16 {
            let h = flow_hash(0xc612_0102, 0xc612_640a, sport.to_be(), 80u16.to_be(), 6);
            buckets[(h % 16) as usize] += 1;
        }
        for b in buckets {
            assert!((850..=1150).contains(&b), "{b}");
        }
    }
}
