//! Atomics for BPF. `core::sync::atomic` offers no read-modify-write on bpfel
//! (the target declares no compare-and-swap), so these use the intrinsics, which
//! lower to BPF_ATOMIC instructions with the v3 CPU (see build.rs).
//!
//! SeqCst is deliberate: with a weaker ordering LLVM emits the add without
//! BPF_FETCH and the "old value" returned is the addend, so every new flow would
//! pick the same backend, silently.

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

/// Adds `value` to `*target`, returning the previous value.
#[inline(always)]
pub fn fetch_add(target: *mut u64, value: u64) -> u64 {
    // SAFETY: callers pass a pointer to a map value returned by a lookup, valid
    // and 8-byte aligned for the duration of the program.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(target, value) }
}

/// Stores `value` in `*target`, returning the previous value.
#[inline(always)]
pub fn swap(target: *mut u32, value: u32) -> u32 {
    // SAFETY: as for `fetch_add`; u32 fields of map values are 4-byte aligned.
    unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(target, value) }
}
