//! The client side's TLS channels to the control service: mTLS with a
//! certificate ([`mtls_channel`]), the pinned channel a joining node uses
//! ([`pinned_join_channel`]), the connector under both that waits for the
//! server's verdict on the client certificate, and [`certificate_rejection`],
//! which tells such a verdict from a network failure.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::PkiError;
use crate::keys::{ca_pin_der, cert_der_to_pem, certs_from_pem, key_from_pem, normalize_pin};

/// If `error` (or one of its causes) is the TLS peer rejecting the
/// certificate this side presented, the alert it sent: `CertificateExpired`,
/// `UnknownCA`, `BadCertificate`, `CertificateRevoked`, `DecryptError` (the
/// proof of key possession did not verify)... The control service answers a
/// client certificate it does not accept this way, during the handshake,
/// before any gRPC status can be sent.
pub fn certificate_rejection(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    const ABOUT_OUR_CERTIFICATE: &[&str] = &[
        "CertificateExpired",
        "CertificateRevoked",
        "CertificateUnknown",
        "BadCertificate",
        "UnsupportedCertificate",
        "UnknownCA",
        "AccessDenied",
        "CertificateRequired",
        "DecryptError",
    ];
    // The transport stack keeps only rustls's message ("received fatal alert:
    // UnknownCA") by the time it reaches us, not the rustls::Error.
    const ALERT: &str = "received fatal alert: ";
    let mut next = Some(error);
    while let Some(e) = next {
        // io::Error::source() skips the error it wraps: look inside.
        let inner = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        let texts = [Some(e.to_string()), inner.map(|i| i.to_string())];
        for text in texts.into_iter().flatten() {
            if let Some(at) = text.find(ALERT) {
                let alert: String = text[at + ALERT.len()..]
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect();
                if ABOUT_OUR_CERTIFICATE.contains(&alert.as_str()) {
                    return Some(alert);
                }
            }
        }
        next = e.source();
    }
    None
}

/// Bound on connecting to the control service: TCP and the TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle mTLS channels, so a watch on a dead peer ends.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const ALPN_H2: &[u8] = b"h2";

/// The ring crypto provider, which every TLS configuration here uses.
pub fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default rustls provider, for code that builds
/// configurations from the default (tonic's server TLS). Idempotent: an
/// already installed default (ours or another) is left in place.
pub fn install_crypto_provider() {
    // Err means a default is installed already; that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The addresses in `endpoints`: one, or several (the replicas of a
/// control plane), comma-separated.
pub fn endpoint_list(endpoints: &str) -> Vec<&str> {
    endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

/// [`mtls_channel`] to the first of `endpoints` ([`endpoint_list`]) that
/// answers, trying them in turn from index `first`; also that address's
/// index. A replica that is gone costs one bounded connection attempt.
pub async fn mtls_channel_any(
    endpoints: &str,
    first: usize,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(usize, Channel), PkiError> {
    let list = endpoint_list(endpoints);
    let mut failed = None;
    for i in 0..list.len() {
        let index = (first + i) % list.len();
        match mtls_channel(list[index], ca_pem, cert_pem, key_pem).await {
            Ok(channel) => return Ok((index, channel)),
            Err(e) => failed = Some(e),
        }
    }
    Err(failed.unwrap_or_else(|| PkiError::InvalidEndpoint {
        endpoint: endpoints.to_owned(),
        reason: "no address",
    }))
}

/// An mTLS channel to the control service: the server is verified against
/// `ca_pem` and must be valid for the endpoint's host; `cert_pem` (which may
/// hold a chain) and `key_pem` are presented. TLS 1.3 only: both ends are ours.
pub async fn mtls_channel(
    endpoint: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Channel, PkiError> {
    let target = Target::parse(endpoint)?;
    let provider = ring_provider();
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(ca_pem)? {
        roots
            .add(ca)
            .map_err(|source| PkiError::TlsConfig { source })?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| PkiError::TlsConfig {
            source: rustls::Error::General(e.to_string()),
        })?;
    let config = client_config_builder(provider)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)
        .map_err(|source| PkiError::TlsConfig { source })?;
    let endpoint_cfg = target
        .endpoint()?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    endpoint_cfg
        .connect_with_connector(tls_connector(&target, config))
        .await
        .map_err(|source| PkiError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })
}

/// A TLS channel for `NodeAgent.Join`: no client certificate, and the server is
/// accepted only if the last certificate of its chain is a CA whose pin equals
/// `ca_pin` and its own certificate verifies against that CA for the
/// endpoint's host. Returns the channel and the CA certificate (PEM) the
/// server presented, for the agent to keep.
///
/// Meant for the single Join call: afterwards the agent drops it and talks
/// over [`mtls_channel`] with the certificate it got. A pin mismatch is
/// reported as [`PkiError::PinMismatch`] (with both pins), a server that sends
/// no CA after its certificate as [`PkiError::NoCaPresented`].
pub async fn pinned_join_channel(
    endpoint: &str,
    ca_pin: &str,
) -> Result<(Channel, String), PkiError> {
    let target = Target::parse(endpoint)?;
    let provider = ring_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: normalize_pin(ca_pin)?,
        provider: provider.clone(),
        outcome: Arc::default(),
    });
    let outcome = verifier.outcome.clone();
    let config = client_config_builder(provider)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let connected = target
        .endpoint()?
        .connect_with_connector(tls_connector(&target, config))
        .await;
    let outcome = outcome
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    match (connected, outcome) {
        (Ok(channel), PinOutcome::Verified { ca_der }) => Ok((channel, cert_der_to_pem(&ca_der))),
        (
            _,
            PinOutcome::Mismatch {
                expected,
                presented,
            },
        ) => Err(PkiError::PinMismatch {
            expected,
            presented,
        }),
        (_, PinOutcome::NoCa) => Err(PkiError::NoCaPresented),
        (Err(source), _) => Err(PkiError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        }),
        // Connected without the verifier accepting a chain: cannot happen
        // with rustls; refuse rather than hand out an unverified channel.
        (Ok(_), PinOutcome::Pending) => Err(PkiError::NoCaPresented),
    }
}

fn client_config_builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, PkiError> {
    ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::TlsConfig { source })
}

/// Where to connect, parsed from `https://host[:port]`.
struct Target {
    /// The endpoint as given (normalized by `Uri`).
    uri: Uri,
    /// Host without IPv6 brackets, for dialing.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Target {
    fn parse(endpoint: &str) -> Result<Self, PkiError> {
        let invalid = |reason| PkiError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let uri: Uri = endpoint.parse().map_err(|_| invalid("not a URI"))?;
        if uri.scheme_str() != Some("https") {
            return Err(invalid("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| invalid("no host"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
        Ok(Target {
            port: uri.port_u16().unwrap_or(443),
            uri,
            host,
            server_name,
        })
    }

    /// The tonic endpoint. Our connector does TLS itself, so the URI tonic
    /// dials is `http://` (with `https://`, tonic insists on its own TLS
    /// layer); requests still carry the real `https` origin.
    fn endpoint(&self) -> Result<Endpoint, PkiError> {
        let authority = self.uri.authority().map_or("", |a| a.as_str());
        let endpoint = Endpoint::from_shared(format!("http://{authority}")).map_err(|_| {
            PkiError::InvalidEndpoint {
                endpoint: self.uri.to_string(),
                reason: "not a valid tonic endpoint",
            }
        })?;
        Ok(endpoint
            .origin(self.uri.clone())
            .connect_timeout(CONNECT_TIMEOUT))
    }
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
    >,
>;

/// How long [`await_verdict`] waits for the server's first word.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// A session store that only notes that the server sent a TLS 1.3 session
/// ticket: the server sends tickets once it has accepted the client's
/// Finished, i.e. after it has judged the client certificate. Sluice does not
/// resume sessions (every connection is long-lived), so nothing is kept.
#[derive(Debug, Default)]
struct TicketSignal {
    seen: std::sync::atomic::AtomicBool,
}

impl rustls::client::ClientSessionStore for TicketSignal {
    fn set_kx_hint(&self, _: ServerName<'static>, _: rustls::NamedGroup) {}
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        None
    }
    fn set_tls12_session(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls12ClientSessionValue,
    ) {
    }
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
        None
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {}
    fn insert_tls13_ticket(
        &self,
        _: ServerName<'static>,
        _: rustls::client::Tls13ClientSessionValue,
    ) {
        self.seen.store(true, std::sync::atomic::Ordering::Release);
    }
    fn take_tls13_ticket(
        &self,
        _: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        None
    }
}

/// TLS 1.3 lets the client finish its handshake before the server has judged
/// the client's certificate; a rejection (expired, unknown CA, revoked) comes
/// as an alert just after. If the client sent its request first, the server
/// may close before the alert is read and the client sees only "broken
/// pipe", which looks like a network failure and would be retried forever.
/// So wait, before handing the connection to HTTP/2, for the server's first
/// records: a session ticket or data means accepted, an alert is returned as
/// the error it is. Records read here stay buffered in the TLS session.
async fn await_verdict(
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    signal: &TicketSignal,
) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + VERDICT_TIMEOUT;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (tcp, session) = tls.get_mut();
        let accepted = signal.seen.load(std::sync::atomic::Ordering::Acquire)
            || session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                .plaintext_bytes_to_read()
                > 0;
        if accepted {
            return Ok(());
        }
        // No word in time: go ahead; the first call will tell.
        match tokio::time::timeout_at(deadline, tcp.readable()).await {
            Err(_elapsed) => return Ok(()),
            Ok(ready) => ready?,
        }
        let n = match tcp.try_read(&mut buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the server closed the connection after the TLS handshake",
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut fresh = &buf[..n];
        while !fresh.is_empty() {
            session.read_tls(&mut fresh)?;
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

/// A connector for `Endpoint::connect_with_connector`: TCP to the target, then
/// a TLS handshake with `config` (ALPN h2, required), then the server's
/// verdict on the client certificate ([`await_verdict`]), if one was sent.
fn tls_connector(
    target: &Target,
    mut config: ClientConfig,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = ConnectFuture,
> + Send
+ 'static {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let presents_certificate = config.client_auth_cert_resolver.has_certs();
    let config = Arc::new(config);
    let host = target.host.clone();
    let port = target.port;
    let server_name = target.server_name.clone();
    tower::service_fn(move |_uri: Uri| -> ConnectFuture {
        // A session store of its own per connection, to see its tickets.
        let signal = Arc::new(TicketSignal::default());
        let mut config = (*config).clone();
        config.resumption = rustls::client::Resumption::store(signal.clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let host = host.clone();
        let server_name = server_name.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let mut tls = connector.connect(server_name, tcp).await?;
            if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server did not negotiate HTTP/2 (ALPN h2)",
                ));
            }
            if presents_certificate {
                await_verdict(&mut tls, &signal).await?;
            }
            Ok(TokioIo::new(tls))
        })
    })
}

/// What the pinned verifier saw, for [`pinned_join_channel`] to report.
#[derive(Clone, Debug, Default)]
enum PinOutcome {
    #[default]
    Pending,
    NoCa,
    Mismatch {
        expected: String,
        presented: String,
    },
    Verified {
        ca_der: Vec<u8>,
    },
}

/// Accepts a server whose chain ends in the pinned CA and whose certificate
/// verifies against that CA (webpki: signature, validity, server-auth EKU,
/// name). Records what it saw in `outcome`.
#[derive(Debug)]
struct PinnedCaVerifier {
    /// Normalized `"sha256:<hex>"`.
    pin: String,
    provider: Arc<CryptoProvider>,
    outcome: Arc<Mutex<PinOutcome>>,
}

impl PinnedCaVerifier {
    fn record(&self, outcome: PinOutcome) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = outcome;
    }
}

fn rejected(error: PkiError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server sends [leaf, (intermediates...,) CA]: the CA is last.
        let Some((ca, intermediates)) = intermediates.split_last() else {
            self.record(PinOutcome::NoCa);
            return Err(rejected(PkiError::NoCaPresented));
        };
        let presented = ca_pin_der(ca);
        if presented != self.pin {
            self.record(PinOutcome::Mismatch {
                expected: self.pin.clone(),
                presented: presented.clone(),
            });
            return Err(rejected(PkiError::PinMismatch {
                expected: self.pin.clone(),
                presented,
            }));
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        self.record(PinOutcome::Verified {
            ca_der: ca.to_vec(),
        });
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests;
