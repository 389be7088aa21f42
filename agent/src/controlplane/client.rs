//! Calls to the control service's `NodeAgent` API: the one-time join, then
//! mTLS with the node certificate.

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use sluice_api::{
    MAX_MESSAGE_BYTES,
    v1::{self, node_agent_client::NodeAgentClient},
};
use sluice_pki::{self as pki, Identity, KeyAndCsr};
use tonic::{Response, Status, Streaming, transport::Channel};
use tracing::{debug, info};

use super::{ControlError, Credentials, NodeState};

/// Bound on a unary call, and on a watch's first answer (the stream itself
/// has no deadline; HTTP/2 keepalives end it if the peer goes silent).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Joins the cluster with a single-use `token`, once: makes a key and a CSR
/// (CN = `node`), connects over TLS accepting only a server whose CA matches
/// `ca_hash` (`sha256:<hex>`, as `sluicectl token create` prints it) so the
/// token goes to no one else, calls `NodeAgent.Join`, and saves the key
/// (0600), the certificate, the CA seen in the handshake, the URL and the
/// name in `state`.
///
/// Refuses before any network traffic if `state` already holds an identity:
/// a token is spent by a successful join, and a second identity would orphan
/// the first.
pub async fn join(
    state: &NodeState,
    control: &str,
    token: &str,
    ca_hash: &str,
    node: &str,
    zone: &str,
) -> Result<Credentials, ControlError> {
    if state.is_joined() {
        return Err(ControlError::AlreadyJoined {
            dir: state.dir().to_owned(),
        });
    }
    pki::validate_name("node", node)?;
    // A token is spent by a successful Join: make sure the result can be kept first.
    state.prepare()?;
    let KeyAndCsr { key_pem, csr_pem } = pki::new_key_and_csr(node)?;
    // The CA kept is the one the pin verified, not the copy in the answer.
    // The first replica that answers takes the join (the token is spent by
    // a Join that succeeds, not by a connection).
    let mut last = None;
    let mut joined = None;
    for url in pki::endpoint_list(control) {
        match pki::pinned_join_channel(url, ca_hash).await {
            Ok(found) => {
                joined = Some(found);
                break;
            }
            Err(e) => {
                debug!(%url, "joining: {e}");
                last = Some(e);
            }
        }
    }
    let (channel, ca_pem) = match (joined, last) {
        (Some(found), _) => found,
        (None, Some(e)) => return Err(ControlError::connecting("joining")(e)),
        (None, None) => {
            return Err(ControlError::connecting("joining")(
                pki::PkiError::InvalidEndpoint {
                    endpoint: control.to_owned(),
                    reason: "no control service address",
                },
            ));
        }
    };
    let request = v1::JoinRequest {
        token: token.to_owned(),
        node_name: node.to_owned(),
        zone: zone.to_owned(),
        csr_pem,
    };
    let mut client = NodeAgentClient::new(channel);
    let v1::JoinResponse {
        certificate_pem,
        ca_pem: _,
    } = call("join the cluster", client.join(request)).await?;
    let cert = check_identity(&certificate_pem, node)?;
    let creds = Credentials {
        control: control.to_owned(),
        node: node.to_owned(),
        zone: zone.to_owned(),
        ca_pem,
        cert_pem: certificate_pem,
        key_pem,
    };
    state.save_credentials(&creds)?;
    info!(%node, %control, serial = %cert.serial, dir = %state.dir().display(), "joined the cluster");
    Ok(creds)
}

/// Which address of the control service answered last (index into the
/// list): where the next connection goes first.
static LAST_ANSWERED: AtomicUsize = AtomicUsize::new(0);

/// A connection to the control service, authenticated with the node certificate.
#[derive(Clone, Debug)]
pub struct ControlClient {
    client: NodeAgentClient<Channel>,
    node: String,
}

impl ControlClient {
    /// Connects (TCP and the TLS handshake, bounded): the server is verified
    /// against the cluster CA, the node certificate presented.
    ///
    /// With several addresses (replicas), the one that answered last is
    /// tried first, then the others in turn: a replica that is gone costs
    /// one bounded connection attempt, and the backoff of the caller
    /// applies only when none answers.
    pub async fn connect(creds: &Credentials) -> Result<Self, ControlError> {
        let first = LAST_ANSWERED.load(Ordering::Relaxed);
        let (index, channel) = pki::mtls_channel_any(
            &creds.control,
            first,
            &creds.ca_pem,
            &creds.cert_pem,
            &creds.key_pem,
        )
        .await
        .map_err(ControlError::connecting(
            "connecting with the node certificate",
        ))?;
        if index != first {
            info!(url = %pki::endpoint_list(&creds.control)[index], "connected to another control service replica");
        }
        LAST_ANSWERED.store(index, Ordering::Relaxed);
        Ok(ControlClient {
            client: NodeAgentClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            node: creds.node.clone(),
        })
    }

    /// The node's view from `since` (the version last applied; 0 for a
    /// snapshot): the changes after it, or a snapshot if it is too old, then
    /// each change as it happens.
    pub async fn watch(&mut self, since: u64) -> Result<Streaming<v1::ViewUpdate>, ControlError> {
        let request = v1::WatchViewRequest {
            since_version: since,
        };
        call("watch the node's view", self.client.watch_view(request)).await
    }

    /// The probers' verdicts: the complete set of unhealthy backends, now and
    /// on every change.
    pub async fn watch_health(&mut self) -> Result<Streaming<v1::HealthUpdate>, ControlError> {
        call(
            "watch backend health",
            self.client.watch_health(v1::WatchHealthRequest {}),
        )
        .await
    }

    /// Tells the control service what this node has applied, with its
    /// counters and the verdicts of its health probes.
    pub async fn report(&mut self, request: v1::ReportStatusRequest) -> Result<(), ControlError> {
        let v1::ReportStatusResponse {} =
            call("report status", self.client.report_status(request)).await?;
        Ok(())
    }

    /// Replaces the node's key and certificate: a new key and CSR,
    /// `RenewCertificate`, then both saved in `state` (key 0600) so that a
    /// crash leaves the old pair or the new. Returns the new credentials.
    /// This connection keeps using the old certificate, which stays valid
    /// until it expires or the next renewal.
    pub async fn renew(&mut self, state: &NodeState) -> Result<Credentials, ControlError> {
        let KeyAndCsr { key_pem, csr_pem } = pki::new_key_and_csr(&self.node)?;
        let request = v1::RenewCertificateRequest { csr_pem };
        let v1::RenewCertificateResponse { certificate_pem } = call(
            "renew the node certificate",
            self.client.renew_certificate(request),
        )
        .await?;
        let cert = check_identity(&certificate_pem, &self.node)?;
        state.save_identity(&key_pem, &certificate_pem)?;
        info!(node = %self.node, serial = %cert.serial, "renewed the node certificate");
        state.load()
    }
}

/// Awaits a call within [`CALL_TIMEOUT`]; a refusal keeps the server's status.
async fn call<T>(
    op: &'static str,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, ControlError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(ControlError::Status { op, status }),
        Err(_elapsed) => Err(ControlError::Status {
            op,
            status: Status::deadline_exceeded(format!(
                "no answer from the control service within {CALL_TIMEOUT:?}"
            )),
        }),
    }
}

/// The certificate the control service issued, if it names this node.
fn check_identity(cert_pem: &str, node: &str) -> Result<pki::CertInfo, ControlError> {
    let info = pki::parse_cert(cert_pem)?;
    match &info.identity {
        Identity::Node { name } if name == node => Ok(info),
        other => Err(ControlError::WrongIdentity {
            expected: node.to_owned(),
            found: other.to_string(),
        }),
    }
}
