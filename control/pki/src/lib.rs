//! Sluice's cryptographic identities: keys and certificate signing requests,
//! certificates parsed into identities, CA pins, and the TLS channels to the
//! control service; with the `ca` feature (the control service's), also the
//! cluster CA that signs them, join tokens and the server's TLS.
//!
//! # Trust model
//!
//! The control service runs a private cluster CA (`ClusterCa`, `ca`
//! feature). Every call to it is over TLS, and the server always proves
//! itself with a chain `[server certificate, CA certificate]`. What is
//! verified, and where:
//!
//! * **Agents and `sluicectl` (clients) verify the server** against the CA
//!   certificate they hold ([`mtls_channel`]): webpki checks the chain, the
//!   validity period, the server-auth EKU and that the certificate names the
//!   host in the endpoint. They present their own certificate, issued by the CA.
//! * **The server verifies clients** in the TLS handshake against the same CA
//!   (webpki: chain, validity, client-auth EKU), then decides per call who the
//!   caller is with [`identity_from_chain`] on `Request::peer_certs()` and what
//!   it may do (RBAC). Client certificates are optional at the TLS layer only
//!   because one call needs none (below); every other handler rejects a call
//!   without one.
//! * **A joining node has no certificate yet** — getting one is the point of
//!   `NodeAgent.Join` — and it does not have the CA certificate either. It has a
//!   join token and the CA's pin (`"sha256:" + hex(SHA-256(CA DER))`), both
//!   handed over out of band by an admin. [`pinned_join_channel`] accepts the
//!   server only if the last certificate of its chain hashes to that pin and
//!   the server certificate verifies against that CA for the endpoint's host,
//!   so the token secret is only ever sent to the real control service. The
//!   token then proves the node to the server; the CA certificate learned
//!   during the handshake is what the agent stores for [`mtls_channel`] later.
//!
//! # Identities
//!
//! Who a certificate belongs to is decided by its SAN URI, `sluice://node/<name>`
//! or `sluice://user/<name>`, never by the common name alone: the URI names the
//! *kind* of principal as well as its name, so a user called like a node cannot
//! pass for it, and a certificate without one of the two forms is rejected
//! ([`PkiError::UnknownIdentity`]) rather than guessed at. The CN repeats the
//! name for humans reading `openssl x509 -text`. A user's groups are the
//! subject's O entries (one per group, as Kubernetes does); nodes carry
//! O = `sluice:nodes`, a prefix users cannot be given.
//!
//! Keys are ECDSA P-256. Every TLS configuration here uses rustls' *ring*
//! provider explicitly; [`install_crypto_provider`] also makes it the process
//! default for code that asks for the default (tonic's server TLS does).
//!
//! # Modules
//!
//! | module | what |
//! |---|---|
//! | `identity` | [`Identity`], [`CertInfo`], certificate parsing, name rules |
//! | `keys` | keys and CSRs, CA pins, PEM |
//! | `channel` | the client TLS channels (mTLS, pinned join), rejection alerts |
//! | `ca` (feature `ca`) | the cluster CA, signing, the server certificate and TLS, join tokens |
//!
//! Everything is re-exported here, so callers write `sluice_pki::parse_cert`.

mod channel;
mod error;
mod identity;
mod keys;
#[cfg(test)]
mod testing;

#[cfg(feature = "ca")]
mod ca;

pub use channel::{
    certificate_rejection, endpoint_list, install_crypto_provider, mtls_channel, mtls_channel_any,
    pinned_join_channel, ring_provider,
};
pub use error::PkiError;
pub use identity::{
    BACKDATE, CertInfo, Identity, MAX_GROUP_LEN, MAX_NAME_LEN, NODE_URI_PREFIX, NODES_ORGANIZATION,
    REPLICAS_GROUP, RESERVED_GROUP_PREFIX, USER_URI_PREFIX, identity_from_chain, issued_at,
    parse_cert, parse_cert_der, validate_group, validate_name,
};
pub use keys::{
    KeyAndCsr, PIN_PREFIX, ca_pin, ca_pin_der, cert_der_to_pem, certs_from_pem, key_from_pem,
    new_key_and_csr, normalize_pin,
};

#[cfg(feature = "ca")]
pub use ca::{
    CA_COMMON_NAME, CA_VALIDITY, ClusterCa, DEFAULT_NODE_VALIDITY, DEFAULT_USER_VALIDITY,
    IssuedCert, JoinToken, MAX_LEAF_VALIDITY, SERVER_COMMON_NAME, SERVER_VALIDITY, TOKEN_ID_LEN,
    TOKEN_SECRET_LEN, constant_time_eq, hash_token_secret, new_join_token, parse_token,
    server_tls_config, verify_chain, verify_token_secret,
};
