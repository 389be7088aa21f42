//! The per-CPU outcome counters (`OUTCOMES`, indexed by `sluice_common::reason`).

use crate::maps::OUTCOMES;

#[inline(always)]
pub fn count(reason: u32) {
    if let Some(counter) = OUTCOMES.get_ptr_mut(reason) {
        // SAFETY: this CPU's slot of a per-CPU array; no one else writes it now.
        unsafe { *counter += 1 };
    }
}
