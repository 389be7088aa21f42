//! The kernel programs, built by `build.rs` (aya-build) and embedded here so
//! that `sluice-agent` is one self-contained binary.

use aya::include_bytes_aligned;

/// The data plane: `sluice_xdp`, `sluice_tc`, `sluice_tc_companion` and their maps.
pub static DATAPLANE: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice"));

/// Benchmark-only programs (floor and frame-restoring harness), for `cargo xtask bench`.
#[cfg(feature = "bench")]
pub static BENCH: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-bench"));
