//! Everything the kernel programs and user space must agree on, in one place.
//!
//! * [`layout`]: map names, capacities and the layout version pinned maps carry.
//! * [`types`]: `#[repr(C)]` keys and values, explicit padding, sizes asserted.
//! * [`reason`]: indices of the per-CPU outcome counters, with their names.
//! * [`csum`]: Internet checksum arithmetic (RFC 1071, RFC 1624).
//! * [`slots`] (feature `user`): the slot tables behind (weighted) round-robin.
//! * [`maglev`]: the flow hash (kernel) and Maglev lookup tables (feature `user`).
//! * [`flowlog`]: which flows the flow log samples.
//!
//! All integers that travel in packets (addresses, ports) are stored in network
//! byte order exactly as they appear on the wire, so the kernel never swaps bytes.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod csum;
pub mod flowlog;
pub mod layout;
pub mod maglev;
pub mod reason;
#[cfg(feature = "user")]
pub mod slots;
pub mod types;
