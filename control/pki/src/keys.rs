//! Keys and certificate signing requests, CA pins, and PEM in and out.
//!
//! PEM is read with rustls-pki-types' `PemObject` and written with the `pem`
//! crate, configured as rcgen configures it, so a certificate we write is the
//! same text rcgen would write for it.

use std::fmt;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::PkiError;

/// The prefix of a CA pin; the rest is the lowercase hex SHA-256 of the CA DER.
pub const PIN_PREFIX: &str = "sha256:";

/// A fresh private key and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 PEM ("PRIVATE KEY"); never leaves the machine that made it.
    pub key_pem: String,
    /// PEM ("CERTIFICATE REQUEST").
    pub csr_pem: String,
}

impl fmt::Debug for KeyAndCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAndCsr")
            .field("key_pem", &"[elided]")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
}

/// Generates an ECDSA P-256 key and a CSR with subject CN = `common_name`. The
/// CA decides the certificate's identity itself; the CN is informational.
pub fn new_key_and_csr(common_name: &str) -> Result<KeyAndCsr, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Rcgen {
        op: "generate a key pair",
        source,
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| PkiError::Rcgen {
            op: "build a certificate signing request",
            source,
        })?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem,
    })
}

/// The pin of a CA certificate given as PEM (its first certificate).
pub fn ca_pin(ca_pem: &str) -> Result<String, PkiError> {
    Ok(ca_pin_der(&first_cert_der(ca_pem)?))
}

/// The pin of a DER CA certificate: `"sha256:" + hex(SHA-256(der))`.
pub fn ca_pin_der(der: &[u8]) -> String {
    format!("{PIN_PREFIX}{}", hex::encode(Sha256::digest(der)))
}

/// Checks a pin's form and returns it normalized (lowercase hex).
pub fn normalize_pin(pin: &str) -> Result<String, PkiError> {
    let invalid = || PkiError::InvalidPin {
        pin: pin.to_owned(),
    };
    let digest = pin.strip_prefix(PIN_PREFIX).ok_or_else(invalid)?;
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid());
    }
    Ok(format!("{PIN_PREFIX}{}", digest.to_ascii_lowercase()))
}

/// Every certificate of a PEM document, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Pem {
            what: "certificates",
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what: "certificates",
            source: rustls_pki_types::pem::Error::NoItemsFound,
        });
    }
    Ok(certs)
}

/// The private key of a PEM document (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem {
        what: "a private key",
        source,
    })
}

pub(crate) fn first_cert_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|source| PkiError::Pem {
        what: "a certificate",
        source,
    })
}

/// PEM ("CERTIFICATE") for a DER certificate, formatted as rcgen formats it
/// (64-column base64, LF line ends).
pub fn cert_der_to_pem(der: &[u8]) -> String {
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), PEM_CONFIG)
}

/// rcgen's configuration on Unix (it writes CRLF on Windows only).
const PEM_CONFIG: pem::EncodeConfig = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);

#[cfg(test)]
mod tests;
