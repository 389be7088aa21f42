//! Sluice's API contract.
//!
//! * [`v1`]: the protobuf messages and gRPC services (generated from
//!   proto/sluice/v1/*.proto), the one contract between the control service,
//!   the agents and `sluicectl`.
//! * [`manifest`]: the YAML manifests admins write (kind: Service, Endpoint,
//!   Grant) and their validation, shared by every program that reads them.

/// The largest gRPC message either side accepts. A cluster of 10,000
/// services with 100,000 endpoints is a ~20 MB apply and a ~3 MB view
/// snapshot; tonic's default of 4 MB would refuse the first.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// An error and its causes on one line (`error: cause: cause`), as the
/// programs print and log them. A cause whose text the message already
/// carries (many errors repeat their source) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

pub mod convert;
pub mod manifest;
pub mod pki;

/// Generated from proto/sluice/v1.
#[allow(clippy::all, missing_docs, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("sluice.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
}
