//! Which flows the flow log reports: kernel and user space agree on it (the
//! agent's tests predict the kernel's sample).

use crate::maglev::flow_hash;

/// Whether the flow `(src, dst, sport, dport, proto)` (client → VIP, network
/// order) is in a one-in-`every` sample. The choice depends on the 5-tuple
/// only, so a flow's opening, closing and drops are all reported or none.
#[inline(always)]
pub fn sampled(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, every: u32) -> bool {
    match every {
        0 => false,
        1 => true,
        // Rotated: Maglev indexes its table with the same hash, and a sample
        // that follows the backend choice would skew per-backend views.
        _ => flow_hash(src, dst, sport, dport, proto)
            .rotate_left(13)
            .is_multiple_of(every),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_in_n_is_about_one_in_n_and_stable() {
        let every = 16;
        let hits = (0..16_000u32)
            .filter(|i| sampled(0x0a00_0001 + i, 0x0a00_00ff, 1000, 80, 6, every))
            .count();
        assert!(
            (800..1200).contains(&hits),
            "{hits} of 16,000 sampled at 1/16"
        );
        for i in 0..100 {
            let a = sampled(i, 7, 1, 2, 17, every);
            assert_eq!(a, sampled(i, 7, 1, 2, 17, every), "same flow, same answer");
        }
        assert!(!sampled(1, 2, 3, 4, 6, 0), "0 turns the sample off");
        assert!(sampled(1, 2, 3, 4, 6, 1), "1 takes every flow");
    }
}
