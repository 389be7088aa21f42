//! Slot tables: how (weighted) round-robin becomes one atomic increment per new flow.
//!
//! User space expands the backends' weights into a table of backend positions; the
//! kernel keeps one shared counter per frontend and picks
//! `table[counter++ % len]`. Exact proportions over every full turn of the table,
//! no floating point and no loop on the packet path.

use std::vec::Vec;

/// Reduces `weights` by their greatest common divisor, then, if they still sum to
/// more than `max_total`, scales them down proportionally (largest remainder,
/// every weight kept ≥ 1). Returns the weights the table will realise.
///
/// # Panics
/// If `weights.len() > max_total` or any weight is zero: callers validate both.
pub fn effective_weights(weights: &[u32], max_total: u32) -> Vec<u32> {
    assert!(weights.iter().all(|&w| w > 0), "zero weight");
    assert!(
        weights.len() as u64 <= max_total as u64,
        "more backends than slots"
    );
    let divisor = weights.iter().copied().fold(0, gcd);
    let mut reduced: Vec<u32> = weights.iter().map(|w| w / divisor.max(1)).collect();
    let total: u64 = reduced.iter().map(|&w| w as u64).sum();
    if total <= max_total as u64 {
        return reduced;
    }
    // Every backend keeps one slot; the rest is shared in proportion to weight.
    let spare = (max_total as u64) - reduced.len() as u64;
    let mut shares: Vec<(u64, u64, usize)> = reduced
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let exact = w as u64 * spare;
            (exact / total, exact % total, i)
        })
        .collect();
    let mut left = spare - shares.iter().map(|s| s.0).sum::<u64>();
    // Largest remainder first; ties go to the earlier backend.
    shares.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)));
    for share in &mut shares {
        if left == 0 {
            break;
        }
        share.0 += 1;
        left -= 1;
    }
    for (whole, _, i) in shares {
        reduced[i] = 1 + whole as u32;
    }
    reduced
}

/// Expands `weights` into a slot table of indices into `weights`. Backend `i`
/// appears `weights[i]` times; its k-th appearance sits at its ideal time
/// `(k + ½) / weights[i]` of the turn, so shares are smooth over any window.
/// Ties go to the lower index. Weights are used as given: reduce them with
/// [`effective_weights`] first.
pub fn weighted_table(weights: &[u32]) -> Vec<u32> {
    let mut entries: Vec<(u64, u64, u32)> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        for k in 0..w as u64 {
            // Ideal time (2k+1) / (2w): kept as a fraction to compare exactly.
            entries.push((2 * k + 1, 2 * w as u64, i as u32));
        }
    }
    entries.sort_by(|a, b| (a.0 * b.1).cmp(&(b.0 * a.1)).then(a.2.cmp(&b.2)));
    entries.into_iter().map(|(_, _, i)| i).collect()
}

/// Round-robin: every backend once, in order.
pub fn round_robin_table(backends: usize) -> Vec<u32> {
    (0..backends as u32).collect()
}

pub(crate) const fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = std::vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn one_one_two_interleaves() {
        let w = effective_weights(&[1, 1, 2], 65_536);
        let t = weighted_table(&w);
        assert_eq!(t, [2, 0, 1, 2]);
    }

    #[test]
    fn gcd_reduces_table_size() {
        assert_eq!(effective_weights(&[2, 6], 100), [1, 3]);
        assert_eq!(effective_weights(&[5], 100), [1]);
    }

    #[test]
    fn one_percent_canary_is_exact() {
        let w = effective_weights(&[99, 1], 65_536);
        let t = weighted_table(&w);
        assert_eq!(t.len(), 100);
        assert_eq!(counts(&t, 2), [99, 1]);
        // The canary sits in the middle of the turn, not at its start.
        assert_eq!(t.iter().position(|&i| i == 1), Some(50));
    }

    #[test]
    fn counts_equal_weights_and_windows_stay_close() {
        let weights = [3u32, 5, 7, 11, 1];
        let t = weighted_table(&weights);
        let total: u32 = weights.iter().sum();
        assert_eq!(counts(&t, 5), [3, 5, 7, 11, 1]);
        // Any prefix is within one slot of the ideal share per backend.
        for end in 1..=t.len() {
            let c = counts(&t[..end], 5);
            for (i, &w) in weights.iter().enumerate() {
                let ideal = w as f64 * end as f64 / total as f64;
                assert!((c[i] as f64 - ideal).abs() <= 1.0, "prefix {end}: {c:?}");
            }
        }
    }

    #[test]
    fn oversized_weights_scale_down_keeping_everyone() {
        let w = effective_weights(&[100_000, 1, 50_000], 1_000);
        assert_eq!(w.iter().sum::<u32>(), 1_000);
        assert!(w.iter().all(|&x| x >= 1));
        assert!(w[0] > w[2] && w[2] > w[1]);
        let ratio = w[0] as f64 / w[2] as f64;
        assert!((ratio - 2.0).abs() < 0.01, "{w:?}");
    }

    #[test]
    fn round_robin_is_identity() {
        assert_eq!(round_robin_table(3), [0, 1, 2]);
    }
}
