//! Client-IP session affinity (a service's `sessionAffinity.clientIP`, as in
//! Kubernetes): a client's new flows to a frontend go to the backend its last
//! new flow went to, while that was within the timeout and the backend is
//! still in rotation.
//!
//! Separate from the algorithms because it overrides them rather than being
//! one: the frontend's algorithm still places a client's first flow, and any
//! flow once the client's entry lapses. The table (`AFFINITY_V4`) is an LRU
//! hash, so affinity is best effort by construction: a client evicted under
//! pressure is balanced afresh, which is all affinity can promise anyway.

use sluice_common::types::{AffinityKeyV4, AffinityV4, Frontend};

use crate::maps::{AFFINITY_V4, BACKENDS};

/// Whether the frontend's service asks for affinity.
#[inline(always)]
pub fn enabled(frontend: &Frontend) -> bool {
    frontend.affinity_timeout_s != 0
}

/// The backend `client`'s last new flow to this frontend went to, if that was
/// within the frontend's affinity timeout and the backend is still in
/// rotation; the timeout then restarts. Otherwise `None`: balance as usual.
#[inline(always)]
pub fn backend(frontend: &Frontend, client: u32, now: u64) -> Option<u32> {
    let key = AffinityKeyV4 {
        frontend_id: frontend.id,
        client,
    };
    let entry = AFFINITY_V4.get_ptr_mut(key)?;
    // SAFETY: LRU map values stay valid for the program run.
    let AffinityV4 {
        backend_id,
        last_seen_ns,
        ..
    } = unsafe { *entry };
    // Saturating: another CPU may have stored a time a little later than ours.
    let idle = now.saturating_sub(last_seen_ns);
    if idle > u64::from(frontend.affinity_timeout_s) * 1_000_000_000 {
        return None;
    }
    // The entry may predate a drain, a removal or a rollout step: user space
    // reflects all of them in the backend entry, so no slot table walk.
    if !BACKENDS.get(backend_id)?.in_rotation(frontend.id) {
        return None;
    }
    // SAFETY: as above. Racing stores from other CPUs all write "just now".
    unsafe { (*entry).last_seen_ns = now };
    Some(backend_id)
}

/// Remembers that `client`'s new flow to frontend `frontend_id` went to
/// `backend_id`, as of `now`.
#[inline(always)]
pub fn remember(frontend_id: u32, client: u32, backend_id: u32, now: u64) {
    // Best effort: a client that cannot be remembered (the LRU refused a
    // node right now) is balanced afresh next time, nothing worse.
    let _ = AFFINITY_V4.insert(
        AffinityKeyV4 {
            frontend_id,
            client,
        },
        AffinityV4 {
            backend_id,
            _pad: 0,
            last_seen_ns: now,
        },
        0,
    );
}
