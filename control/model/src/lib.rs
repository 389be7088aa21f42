//! Sluice's domain model.
//!
//! * [`manifest`]: the YAML manifests admins write and the validated objects they
//!   become.
//! * [`convert`]: the conversions to and from the API's messages ([`sluice_api::v1`]),
//!   used only at the edges (gRPC handlers, the store codec, the watch stream,
//!   `sluicectl`'s client).

pub mod convert;
pub mod manifest;

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
