//! Sluice's control service as a library; `sluice-control` and `sluicectl`
//! (src/bin) are thin shells around it.

pub mod pki;
pub mod store;
pub mod vip;
