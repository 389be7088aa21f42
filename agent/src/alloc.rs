//! Allocation of frontend ids, backend ids and slot-table ranges.
//!
//! Ids index per-CPU counter arrays and are copied into flow entries, so a
//! recycled id would inherit the history of its predecessor. Allocation
//! therefore rotates: it continues after the last id handed out and wraps,
//! which leaves freed ids unused for as long as possible.
//!
//! Slot ranges are never reused at once: a packet that read a frontend's old
//! value may still index its old range for a moment after the swap, so freed
//! ranges wait out a grace period first (the caller owns the clock).

use std::collections::{BTreeMap, BTreeSet};

/// Hands out ids in `0..capacity`, rotating.
#[derive(Clone, Debug)]
pub struct Ids {
    capacity: u32,
    next: u32,
}

impl Ids {
    pub fn new(capacity: u32) -> Self {
        Self { capacity, next: 0 }
    }

    /// Continues after the highest id in use (after a restart).
    pub fn resume_after(&mut self, highest: Option<u32>) {
        self.next = highest.map_or(0, |h| (h + 1) % self.capacity);
    }

    /// The next id not in `used`, or `None` when all are taken.
    pub fn allocate(&mut self, used: &BTreeSet<u32>) -> Option<u32> {
        if used.len() as u64 >= self.capacity as u64 {
            return None;
        }
        let mut id = self.next;
        for _ in 0..self.capacity {
            if !used.contains(&id) {
                self.next = (id + 1) % self.capacity;
                return Some(id);
            }
            id = (id + 1) % self.capacity;
        }
        None
    }
}

/// A contiguous range of the shared slot array.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotRange {
    pub base: u32,
    pub len: u32,
}

/// The slot array's occupancy: first fit over ranges in use.
#[derive(Clone, Debug)]
pub struct SlotSpace {
    capacity: u32,
    used: BTreeMap<u32, u32>,
}

impl SlotSpace {
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            used: BTreeMap::new(),
        }
    }

    /// Marks a range found in the maps as used.
    pub fn mark_used(&mut self, range: SlotRange) {
        if range.len > 0 {
            self.used.insert(range.base, range.len);
        }
    }

    /// The first free range of `len` slots.
    pub fn allocate(&mut self, len: u32) -> Option<SlotRange> {
        if len == 0 {
            return Some(SlotRange { base: 0, len: 0 });
        }
        let mut start = 0u32;
        for (&base, &used_len) in &self.used {
            if base - start >= len {
                break;
            }
            start = base + used_len;
        }
        if self.capacity - start < len {
            return None;
        }
        self.used.insert(start, len);
        Some(SlotRange { base: start, len })
    }

    pub fn release(&mut self, range: SlotRange) {
        if range.len > 0 && self.used.get(&range.base) == Some(&range.len) {
            self.used.remove(&range.base);
        }
    }

    pub fn free(&self) -> u32 {
        self.capacity - self.used.values().sum::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_rotate_past_freed_ones() {
        let mut ids = Ids::new(4);
        let mut used = BTreeSet::new();
        let a = ids.allocate(&used).expect("free id");
        used.insert(a);
        let b = ids.allocate(&used).expect("free id");
        used.insert(b);
        used.remove(&a);
        // `a` is free again but the allocator moves on first.
        assert_eq!(ids.allocate(&used), Some(2));
        assert_eq!((a, b), (0, 1));
    }

    #[test]
    fn ids_run_out() {
        let mut ids = Ids::new(2);
        let used: BTreeSet<u32> = [0, 1].into();
        assert_eq!(ids.allocate(&used), None);
    }

    #[test]
    fn ids_resume_after_highest() {
        let mut ids = Ids::new(10);
        ids.resume_after(Some(9));
        assert_eq!(ids.allocate(&BTreeSet::new()), Some(0));
        ids.resume_after(Some(3));
        assert_eq!(ids.allocate(&BTreeSet::new()), Some(4));
    }

    #[test]
    fn slots_first_fit_and_release() {
        let mut space = SlotSpace::new(10);
        let a = space.allocate(4).expect("room");
        let b = space.allocate(3).expect("room");
        assert_eq!((a.base, b.base), (0, 4));
        assert_eq!(space.allocate(4), None);
        space.release(a);
        let c = space.allocate(2).expect("room in the hole");
        assert_eq!(c.base, 0);
        assert_eq!(space.free(), 5);
        assert_eq!(space.allocate(0), Some(SlotRange { base: 0, len: 0 }));
    }

    #[test]
    fn marked_ranges_are_avoided() {
        let mut space = SlotSpace::new(8);
        space.mark_used(SlotRange { base: 2, len: 2 });
        assert_eq!(space.allocate(2).map(|r| r.base), Some(0));
        assert_eq!(space.allocate(3).map(|r| r.base), Some(4));
    }
}
