//! What can go wrong talking to etcd, and what each failure says about a request's fate.

use std::sync::Arc;
use std::time::Duration;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints}")]
    Request {
        endpoints: Arc<str>,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints} did not answer within {timeout:?}")]
    Timeout {
        endpoints: Arc<str>,
        timeout: Duration,
    },
    #[error("etcd at {endpoints} answered without {what}")]
    Malformed {
        endpoints: Arc<str>,
        what: &'static str,
    },
    #[error("etcd key prefix {prefix:?} {reason}")]
    Prefix {
        prefix: String,
        reason: &'static str,
    },
    #[error("no etcd endpoints given")]
    NoEndpoints,
    #[error("starting the etcd client's runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("the etcd client's runtime stopped")]
    RuntimeGone,
    #[error("following etcd at {endpoints} ended: {why}")]
    WatchEnded { endpoints: Arc<str>, why: String },
}

impl EtcdError {
    /// Whether no member answered the request (so a read may be sent again): it timed out, or
    /// the connection failed. A status made on this side from a transport error carries that
    /// error as its source; one a member sent has none.
    pub fn unanswered(&self) -> bool {
        match self {
            EtcdError::Timeout { .. } => true,
            EtcdError::Request { source, .. } => match source {
                etcd_client::Error::TransportError(_) => true,
                etcd_client::Error::GRpcStatus(status) => {
                    status.code() == tonic::Code::Unavailable
                        || std::error::Error::source(status).is_some()
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether the request never left: the connection to the member it was routed to could
    /// not be made. Such a commit certainly was not applied, and may be sent again.
    pub(super) fn unsent(&self) -> bool {
        // etcd-client's error has no `source`: start from what it wraps.
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self {
            EtcdError::Request {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => Some(status),
            EtcdError::Request {
                source: etcd_client::Error::TransportError(e),
                ..
            } => Some(e),
            _ => None,
        };
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::HostUnreachable
                        | std::io::ErrorKind::NetworkUnreachable
                        | std::io::ErrorKind::AddrNotAvailable
                )
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// Whether etcd refused a transaction for its size (`--max-txn-ops`, `--max-request-bytes`):
    /// the request, not etcd, has to change.
    pub fn too_large(&self) -> bool {
        let EtcdError::Request {
            source: etcd_client::Error::GRpcStatus(status),
            ..
        } = self
        else {
            return false;
        };
        let message = status.message();
        message.contains("too many operations") || message.contains("request is too large")
    }

    /// Whether etcd refused the request before proposing it, so it was certainly not applied:
    /// a definite answer from a member, not a lost one.
    pub(super) fn refused(&self) -> bool {
        let EtcdError::Request {
            source: etcd_client::Error::GRpcStatus(status),
            ..
        } = self
        else {
            return false;
        };
        use tonic::Code::*;
        matches!(
            status.code(),
            InvalidArgument
                | FailedPrecondition
                | OutOfRange
                | PermissionDenied
                | Unauthenticated
                | ResourceExhausted
        )
    }
}
