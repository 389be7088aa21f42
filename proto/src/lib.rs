//! Sluice's API contract.
//!
//! * [`v1`]: the protobuf messages and gRPC services (generated from
//!   proto/sluice/v1/*.proto), the one contract between the control service,
//!   the agents and `sluicectl`.

/// The largest gRPC message either side accepts. A cluster of 10,000
/// services with 100,000 endpoints is a ~20 MB apply and a ~3 MB view
/// snapshot; tonic's default of 4 MB would refuse the first.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Generated from proto/sluice/v1.
#[allow(clippy::all, missing_docs, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("sluice.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
}
