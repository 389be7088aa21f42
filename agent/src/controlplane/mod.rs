//! The agent's side of the control service (`sluice-control`): joining the
//! cluster, keeping the node's identity, and following the node's view.
//!
//! # Lifecycle
//!
//! 1. **Join, once** ([`join`]). An admin hands the node a single-use join
//!    token and the cluster CA's pin (`sluicectl token create`). The agent
//!    makes a fresh key and a CSR, opens a TLS channel that accepts the server
//!    only if its chain ends in the pinned CA (so the token is never sent
//!    anywhere else), and calls `NodeAgent.Join`. The certificate it gets back,
//!    the key (mode 0600 from the moment the file exists), the CA learned in
//!    the handshake, the URL and the node's name go into the state directory
//!    ([`NodeState`], mode 0700). The token is not kept.
//! 2. **mTLS from then on** ([`ControlClient`]). Every later call presents the
//!    node certificate; the server names the node by it.
//! 3. **Watch and report** ([`follow`], [`ControlClient::report`]). The view
//!    arrives as a stream: a snapshot (or the changes since the version the
//!    agent last applied), then each change. The caller applies updates,
//!    records the applied version (the `since` counter [`follow`] reads at each
//!    reconnect), saves the view ([`NodeState::save_view`]) and reports.
//! 4. **Renew** ([`keep_certificate_fresh`]). At two thirds of its lifetime
//!    the certificate is replaced (new key, `RenewCertificate`), swapped on
//!    disk without a moment where key and certificate do not match. New
//!    connections use it; an open watch keeps going, since TLS checks the
//!    client certificate at the handshake only.
//! 5. **Reconnect with backoff** ([`follow`], [`backoff_delay`]). Any failure
//!    (control service down, restarted, network gone) ends in a reconnect
//!    after 0.2 s doubling to 10 s, with jitter so that a restarted control
//!    service is not met by every node at once. Only a refusal that retrying
//!    cannot fix ends the loop: a removed node, a revoked or unknown
//!    certificate ([`ViewEvent::Refused`]).
//!
//! Forwarding never depends on the control service being up: the kernel maps
//! keep what was last programmed, an agent that restarts while the control
//! service is down programs the saved view ([`NodeState::load_view`]), and a
//! reconnect resumes from the applied version instead of starting over.
//!
//! Nothing here logs a secret: the token and the private key never appear in
//! a log line or in a `Debug` output ([`Credentials`] elides the key).

mod client;
mod delta;
mod follow;
pub mod link;
mod state;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use sluice_pki::{self as pki, PkiError};

pub use client::{ControlClient, join};
pub use follow::{
    BACKOFF_MAX, BACKOFF_START, CERT_CHECK_INTERVAL, ViewEvent, backoff_delay, follow,
    keep_certificate_fresh, renew_if_due, renewal_time,
};
pub use link::ControlLink;
pub use state::{Credentials, NodeState};

/// What talking to the control service, or keeping the node's state, can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The control service could not be reached (TCP or TLS): worth retrying.
    #[error("cannot reach the control service at {endpoint} ({op})")]
    Transport {
        op: &'static str,
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The control service answered with an error; `status.message()` is its
    /// explanation, meant for the operator.
    #[error("cannot {op}: {} [{:?}]", status.message(), status.code())]
    Status {
        op: &'static str,
        status: tonic::Status,
    },
    #[error(
        "{dir} already holds a joined node identity; to join again, remove the node from the \
         cluster (sluicectl node remove <name>), delete {dir} and join with a new token"
    )]
    AlreadyJoined { dir: PathBuf },
    #[error(
        "this node has not joined a cluster ({dir} holds no identity): join it first \
         (sluice-agent join --control URL --token TOKEN --ca-hash HASH, as `sluicectl token \
         create` prints it), pass the --state-dir it joined with, or run standalone with \
         --manifest FILE"
    )]
    NotJoined { dir: PathBuf },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The control service signed a certificate for someone else.
    #[error("the control service issued a certificate for {found}, not for node {expected:?}")]
    WrongIdentity { expected: String, found: String },
}

impl ControlError {
    /// Whether retrying cannot help: the control service refused the node
    /// itself (removed, revoked, unknown certificate), or the local identity is
    /// missing or unreadable. Everything else (unreachable, restarting,
    /// timeouts) may pass.
    pub fn is_refusal(&self) -> bool {
        match self {
            ControlError::Status { status, .. } => {
                matches!(
                    status.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) || self.certificate_rejected().is_some()
            }
            ControlError::Transport { .. } => self.certificate_rejected().is_some(),
            ControlError::NotJoined { .. }
            | ControlError::Corrupt { .. }
            | ControlError::WrongIdentity { .. } => true,
            ControlError::Io { .. } | ControlError::Pki(_) | ControlError::AlreadyJoined { .. } => {
                false
            }
        }
    }

    /// The TLS alert with which the control service rejected the node's
    /// certificate in the handshake (expired, unknown CA...), if it did.
    pub fn certificate_rejected(&self) -> Option<String> {
        match self {
            // The status keeps the transport error as its source.
            ControlError::Status { status, .. } => pki::certificate_rejection(status),
            other => pki::certificate_rejection(other),
        }
    }

    /// This error for the operator: a rejected certificate says what it
    /// means and what to do.
    pub fn explain(&self) -> String {
        let text = sluice_model::error_chain(self);
        let Some(alert) = self.certificate_rejected() else {
            return text;
        };
        let meaning = match alert.as_str() {
            "CertificateExpired" => {
                "it has expired (the agent was stopped or cut off past its renewal time)"
            }
            "UnknownCA" => "it was not issued by this cluster's CA",
            "DecryptError" => "it does not verify against this cluster's CA",
            "CertificateRevoked" => "it has been revoked",
            _ => "it is not accepted",
        };
        format!(
            "the control service rejected this node's certificate: {meaning}. Remove the node \
             (sluicectl node remove NAME), delete the agent's state directory and join again \
             with a new token [TLS alert {alert}; {text}]"
        )
    }

    /// A connection failure from `sluice_pki` becomes [`ControlError::Transport`];
    /// any other PKI error stays what it is.
    fn connecting(op: &'static str) -> impl FnOnce(PkiError) -> ControlError {
        move |error| match error {
            PkiError::Connect { endpoint, source } => ControlError::Transport {
                op,
                endpoint,
                source,
            },
            other => ControlError::Pki(other),
        }
    }
}
