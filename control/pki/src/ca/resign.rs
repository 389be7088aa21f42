//! The subject rewrite (rustls/rcgen#81): rcgen's `DistinguishedName` keeps
//! one value per attribute type, and a user certificate needs one O per
//! group. So the CA lets rcgen build the certificate, then replaces the
//! subject in the TBS and signs the TBS again with the same key.
//!
//! The DER is read and written with yasna, the DER library rcgen itself
//! writes certificates with (so it is in the build already). Neither crate
//! does the whole job: x509-parser only reads, and rcgen has no API that
//! takes a ready-made subject or re-signs a TBS. Only the shape of the
//! certificate is handled here — yasna does the tags and lengths — and the
//! issuer parses the result back and checks the identity.

use rcgen::{KeyPair, SigningKey};
use yasna::models::ObjectIdentifier;
use yasna::tags::TAG_SEQUENCE;
use yasna::{ASN1Error, ASN1ErrorKind, ASN1Result, BERReader, DERWriter, Tag, TagClass};

use super::rcgen_err;
use crate::PkiError;

/// id-at-commonName, 2.5.4.3 (RFC 5280 appendix A).
const OID_COMMON_NAME: &[u64] = &[2, 5, 4, 3];
/// id-at-organizationName, 2.5.4.10.
const OID_ORGANIZATION: &[u64] = &[2, 5, 4, 10];
/// TBSCertificate's `[0] EXPLICIT Version`, present in every v3 certificate.
const TAG_VERSION: Tag = Tag {
    tag_class: TagClass::ContextSpecific,
    tag_number: 0,
};

/// `Name` (RFC 5280 §4.1.2.4) with CN = `common_name` and one O per
/// organization, each its own RDN, values as UTF8String.
pub(super) fn encode_subject(common_name: &str, organizations: &[&str]) -> Vec<u8> {
    yasna::construct_der(|w| {
        w.write_sequence_of(|w| {
            write_rdn(w.next(), OID_COMMON_NAME, common_name);
            for o in organizations {
                write_rdn(w.next(), OID_ORGANIZATION, o);
            }
        });
    })
}

/// `SET { SEQUENCE { type, UTF8String value } }`: one attribute per RDN.
fn write_rdn(w: DERWriter<'_>, oid: &[u64], value: &str) {
    w.write_set(|w| {
        w.next().write_sequence(|w| {
            w.next().write_oid(&ObjectIdentifier::from_slice(oid));
            w.next().write_utf8_string(value);
        });
    });
}

/// Replaces the subject of `cert_der` with `subject` (a DER `Name`) and signs
/// the new TBS with `ca_key` (the key that signed the original, so the
/// signature algorithm fields stay right).
pub(super) fn resign_with_subject(
    cert_der: &[u8],
    subject: &[u8],
    ca_key: &KeyPair,
) -> Result<Vec<u8>, PkiError> {
    let malformed = |_| PkiError::Der {
        what: "rewriting the certificate subject",
    };
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    let (tbs, signature_algorithm) = yasna::parse_der(cert_der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_der()?;
            let algorithm = r.next().read_der()?;
            r.next().read_bitvec_bytes()?;
            Ok((tbs, algorithm))
        })
    })
    .map_err(malformed)?;
    let new_tbs = yasna::parse_der(&tbs, |r| replace_subject(r, subject)).map_err(malformed)?;
    let signature = ca_key
        .sign(&new_tbs)
        .map_err(rcgen_err("sign the certificate"))?;
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&new_tbs);
            w.next().write_der(&signature_algorithm);
            w.next().write_bitvec_bytes(&signature, signature.len() * 8);
        });
    }))
}

/// Reads a TBSCertificate and writes it again with `subject` in place of its
/// subject; every other field is copied as it is.
///
/// TBSCertificate ::= SEQUENCE { [0] version OPTIONAL, serialNumber,
/// signature, issuer, validity, subject, subjectPublicKeyInfo, ... }
fn replace_subject(r: BERReader<'_, '_>, subject: &[u8]) -> ASN1Result<Vec<u8>> {
    let mut fields = r.read_sequence(|r| {
        let mut fields = Vec::new();
        while let Some(field) = r.read_optional(|r| r.read_der())? {
            fields.push(field);
        }
        Ok(fields)
    })?;
    let versioned = match fields.first() {
        Some(first) => tag_of(first)? == TAG_VERSION,
        None => false,
    };
    let at = if versioned { 5 } else { 4 };
    let old = fields.get_mut(at).ok_or_else(invalid)?;
    if tag_of(old)? != TAG_SEQUENCE {
        return Err(invalid());
    }
    *old = subject.to_vec();
    Ok(yasna::construct_der(|w| {
        w.write_sequence(|w| {
            for field in &fields {
                w.next().write_der(field);
            }
        });
    }))
}

/// The tag of one DER element.
fn tag_of(der: &[u8]) -> ASN1Result<Tag> {
    yasna::parse_der(der, |r| {
        let tag = r.lookahead_tag()?;
        r.read_der()?;
        Ok(tag)
    })
}

fn invalid() -> ASN1Error {
    ASN1Error::new(ASN1ErrorKind::Invalid)
}

#[cfg(test)]
mod tests;
