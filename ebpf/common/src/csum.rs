//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624).
//!
//! Every function works on values exactly as they sit in the packet (network byte
//! order, read as native integers). Ones'-complement addition commutes with byte
//! swapping, so sums of raw words give the raw checksum without any swap: the
//! kernel programs read and write checksum fields as-is.

/// Folds a 32-bit accumulator of 16-bit words to 16 bits (end-around carry),
/// without complementing. Two rounds suffice for any accumulator below 2^31.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum `check` after a 16-bit word of the covered data changes from
/// `old` to `new` (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// As [`replace16`] for a 32-bit field (an IPv4 address), as two words.
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let old_lo = old as u16;
    let old_hi = (old >> 16) as u16;
    !fold(!check as u32 + !old_lo as u32 + !old_hi as u32 + (new & 0xffff) + (new >> 16))
}

/// The IPv4 pseudo-header sum (RFC 793 §3.1, RFC 768), folded, not complemented.
/// `src` and `dst` are raw (network order); `l4_len` is in host order.
///
/// A TCP/UDP packet whose checksum offload is still pending (`CHECKSUM_PARTIAL`:
/// sent by a local socket on a device with TX checksum offload, such as a veth)
/// carries exactly this value in its checksum field (see `tcp_v4_send_check` and
/// `udp4_hwcsum` in the kernel). A complete checksum equals it only when the
/// segment's data sums to a single specific value: for about 1 packet in 65,536.
#[inline(always)]
pub const fn pseudo_header_v4(src: u32, dst: u32, proto: u8, l4_len: u16) -> u16 {
    fold(
        (src & 0xffff)
            + (src >> 16)
            + (dst & 0xffff)
            + (dst >> 16)
            + (proto as u16).to_be() as u32
            + l4_len.to_be() as u32,
    )
}

/// Ones'-complement sum of `data` as raw 16-bit words (an odd last byte is padded
/// with zero), added to `initial`. Not used on the packet path; for tests and tools.
pub fn sum_words(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += u16::from_ne_bytes([*last, 0]) as u64;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// The complete checksum of `data` (with its checksum field zeroed) plus `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    !fold_wide(sum_words(data, initial))
}

/// [`fold`] for accumulators that may use all 32 bits.
pub const fn fold_wide(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, good enough to vary test packets.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    fn word(data: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([data[off], data[off + 1]])
    }
    fn dword(data: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // Example header from RFC 1071 discussions / Wikipedia: checksum 0xb861.
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(u16::from_be(checksum(&hdr, 0)), 0xb861);
    }

    #[test]
    fn incremental_updates_match_full_recomputation() {
        let mut rng = Rng(0x5eed);
        for _ in 0..20_000 {
            let len = 8 + (rng.next() % 60) as usize * 2;
            let mut data: std::vec::Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let check = checksum(&data, 0);

            // Replace a 32-bit field at an even offset.
            let off = (rng.next() as usize % (len / 2 - 1)) * 2;
            let old = dword(&data, off);
            let new = rng.next() as u32;
            data[off..off + 4].copy_from_slice(&new.to_ne_bytes());
            let want = checksum(&data, 0);
            let got = replace32(check, old, new);
            // 0x0000 and 0xffff are both ones'-complement zero.
            assert!(got == want || (got ^ want) == 0xffff && (got == 0 || got == 0xffff));

            // Then a 16-bit field.
            let off = (rng.next() as usize % (len / 2)) * 2;
            let old = word(&data, off);
            let new = rng.next() as u16;
            data[off..off + 2].copy_from_slice(&new.to_ne_bytes());
            let want2 = checksum(&data, 0);
            let got2 = replace16(want, old, new);
            assert!(got2 == want2 || (got2 ^ want2) == 0xffff && (got2 == 0 || got2 == 0xffff));
        }
    }

    #[test]
    fn pseudo_header_matches_byte_layout() {
        let src = u32::from_ne_bytes([198, 18, 1, 2]);
        let dst = u32::from_ne_bytes([198, 18, 0, 10]);
        let mut ph = [0u8; 12];
        ph[0..4].copy_from_slice(&src.to_ne_bytes());
        ph[4..8].copy_from_slice(&dst.to_ne_bytes());
        ph[9] = 6;
        ph[10..12].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            pseudo_header_v4(src, dst, 6, 40),
            fold_wide(sum_words(&ph, 0))
        );
    }

    #[test]
    fn odd_length_is_zero_padded() {
        assert_eq!(sum_words(&[0x12], 0), sum_words(&[0x12, 0x00], 0));
    }
}
