#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

use super::*;

// ---- DER ----

#[test]
fn der_lengths_round_trip() {
    // Short and long-form lengths (1 to 3 length bytes) come back as written.
    for len in [0, 1, 127, 128, 255, 256, 65_535, 70_000] {
        let value = "o".repeat(len);
        let der = encode_subject("x", &[&value]);
        let (rest, name) = X509Name::from_der(&der).unwrap();
        assert!(rest.is_empty(), "{len}");
        assert_eq!(name.as_raw(), der.as_slice(), "{len}");
        let orgs: Vec<&str> = name
            .iter_organization()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(orgs, vec![value.as_str()], "{len}");
    }
    // The exact bytes: one RDN per attribute, values as UTF8String.
    assert_eq!(
        encode_subject("x", &["o"]),
        [
            &[0x30, 0x18][..],
            &[
                0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'x'
            ],
            &[
                0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'o'
            ],
        ]
        .concat()
    );
    // Truncated or indefinite input is refused, not misread.
    let key = KeyPair::generate().unwrap();
    for bad in [
        &[0x30, 0x05, 1, 2][..],
        &[0x30, 0x80],
        &[0x30],
        &[0x1f, 0x01, 0x00],
    ] {
        assert!(
            matches!(
                resign_with_subject(bad, &encode_subject("x", &[]), &key),
                Err(PkiError::Der { .. })
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        resign_with_subject(
            b"\x30\x00",
            &encode_subject("x", &[]),
            &KeyPair::generate().unwrap()
        ),
        Err(PkiError::Der { .. })
    ));
    // A certificate whose TBS ends before the subject.
    let short = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next().write_tagged(TAG_VERSION, |w| w.write_i64(2));
                w.next().write_i64(1);
            });
            w.next().write_sequence(|_| {});
            w.next().write_bitvec_bytes(&[], 0);
        });
    });
    assert!(matches!(
        resign_with_subject(&short, &encode_subject("x", &[]), &key),
        Err(PkiError::Der { .. })
    ));
}
