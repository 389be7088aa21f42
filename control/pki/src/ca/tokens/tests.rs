#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use super::*;

// ---- Tokens ----

#[test]
fn tokens_have_the_documented_form_and_verify() {
    let mut ids = HashSet::new();
    for _ in 0..200 {
        let t = new_join_token().unwrap();
        let (id, secret) = t.token.split_once('.').unwrap();
        assert_eq!(id, t.id);
        assert_eq!(id.len(), 6);
        assert_eq!(secret.len(), 16);
        assert!(
            t.token
                .bytes()
                .all(|b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_eq!(
            t.secret_hash,
            hex::encode(Sha256::digest(secret.as_bytes()))
        );
        assert!(!t.secret_hash.contains(secret));
        assert!(verify_token_secret(&t.token, &t.id, &t.secret_hash));
        assert_eq!(
            parse_token(&t.token).unwrap(),
            (id.to_owned(), secret.to_owned())
        );
        assert!(!format!("{t:?}").contains(secret), "Debug hides the secret");
        ids.insert(t.id);
    }
    assert!(ids.len() > 190, "ids are random");
}

#[test]
fn token_characters_are_uniform_enough() {
    // 36 symbols, 36,000 draws: each should appear ~1000 times. The
    // bounds are > 6 sigma wide, so this does not flake.
    let s = random_token_chars(36_000).unwrap();
    for c in TOKEN_ALPHABET {
        let n = s.bytes().filter(|b| b == c).count();
        assert!(
            (800..1200).contains(&n),
            "{} appears {n} times",
            char::from(*c)
        );
    }
}

#[test]
fn wrong_or_malformed_tokens_do_not_verify() {
    let t = new_join_token().unwrap();
    let other = new_join_token().unwrap();
    let (id, secret) = parse_token(&t.token).unwrap();
    // Wrong secret, wrong id, wrong stored hash.
    assert!(!verify_token_secret(
        &format!("{id}.{}", parse_token(&other.token).unwrap().1),
        &id,
        &t.secret_hash
    ));
    assert!(!verify_token_secret(&t.token, &other.id, &t.secret_hash));
    assert!(!verify_token_secret(&t.token, &t.id, &other.secret_hash));
    assert!(!verify_token_secret(&t.token, &t.id, ""));
    assert!(!verify_token_secret(
        &t.token,
        &t.id,
        &t.secret_hash.to_uppercase()
    ));
    for bad in [
        String::new(),
        ".".into(),
        id.clone(),
        format!("{id}{secret}"),
        format!("{id}.{secret}x"),
        format!("{id}x.{secret}"),
        format!(
            "{}.{secret}",
            id.to_uppercase().replace(|c: char| c.is_ascii_digit(), "A")
        ),
        format!("{id}.{}", &secret[..15]),
        format!("{id}.{}-", &secret[..15]),
        format!("{id}.{secret}.{secret}"),
        format!(" {id}.{secret}"),
    ] {
        assert!(!verify_token_secret(&bad, &t.id, &t.secret_hash), "{bad:?}");
        if bad != t.token {
            let err = parse_token(&bad).unwrap_err();
            assert!(matches!(err, PkiError::MalformedToken { .. }), "{bad:?}");
            assert!(
                bad.len() < 6 || !err.to_string().contains(&bad),
                "errors do not echo tokens"
            );
        }
    }
}

#[test]
fn constant_time_eq_is_equality() {
    assert!(constant_time_eq(b"", b""));
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"xbc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(!constant_time_eq(b"", b"a"));
    let a = [0u8; 64];
    for i in 0..64 {
        for bit in 0..8 {
            let mut b = a;
            b[i] ^= 1 << bit;
            assert!(!constant_time_eq(&a, &b));
        }
    }
}
