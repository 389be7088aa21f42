//! Join tokens: `"<id>.<secret>"`, made from the system's random number
//! generator, of which the control service stores the id and a hash of the
//! secret only, and checks in constant time.

use std::fmt;

use sha2::{Digest, Sha256};

use super::random_error;
use crate::PkiError;

/// A join token's id: 6 characters of [a-z0-9].
pub const TOKEN_ID_LEN: usize = 6;
/// A join token's secret: 16 characters of [a-z0-9] (about 83 bits).
pub const TOKEN_SECRET_LEN: usize = 16;
const TOKEN_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new join token. Show `token` to the admin once; store `id` and
/// `secret_hash` only.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `"<id>.<secret>"`.
    pub token: String,
    pub id: String,
    /// Lowercase hex SHA-256 of the secret.
    pub secret_hash: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"[elided]")
            .field("id", &self.id)
            .field("secret_hash", &self.secret_hash)
            .finish()
    }
}

/// Makes a join token from the system's random number generator.
pub fn new_join_token() -> Result<JoinToken, PkiError> {
    let id = random_token_chars(TOKEN_ID_LEN)?;
    let secret = random_token_chars(TOKEN_SECRET_LEN)?;
    Ok(JoinToken {
        token: format!("{id}.{secret}"),
        secret_hash: hash_token_secret(&secret),
        id,
    })
}

/// `n` characters of [a-z0-9], uniformly: bytes of 252 and above are drawn
/// again (252 = 7 × 36), so no character is likelier than another.
fn random_token_chars(n: usize) -> Result<String, PkiError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 32];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(random_error)?;
        for &b in buf.iter().filter(|&&b| b < 252) {
            if out.len() == n {
                break;
            }
            out.push(char::from(TOKEN_ALPHABET[usize::from(b % 36)]));
        }
    }
    Ok(out)
}

/// Splits `"<id>.<secret>"` and checks both parts' form. Errors never
/// contain the token.
pub fn parse_token(token: &str) -> Result<(String, String), PkiError> {
    let malformed = |reason| PkiError::MalformedToken { reason };
    let (id, secret) = token
        .split_once('.')
        .ok_or_else(|| malformed("expected <id>.<secret>"))?;
    let well_formed =
        |s: &str, len| s.len() == len && s.bytes().all(|b| TOKEN_ALPHABET.contains(&b));
    if !well_formed(id, TOKEN_ID_LEN) {
        return Err(malformed("the id must be 6 characters of [a-z0-9]"));
    }
    if !well_formed(secret, TOKEN_SECRET_LEN) {
        return Err(malformed("the secret must be 16 characters of [a-z0-9]"));
    }
    Ok((id.to_owned(), secret.to_owned()))
}

/// Lowercase hex SHA-256 of a token secret, as stored. The secret is random
/// with ~83 bits of entropy, so a fast hash is enough.
pub fn hash_token_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `token` is well formed, has id `id`, and its secret hashes to
/// `stored_hash`; the hashes are compared in constant time.
pub fn verify_token_secret(token: &str, id: &str, stored_hash: &str) -> bool {
    let Ok((token_id, secret)) = parse_token(token) else {
        return false;
    };
    let id_ok = constant_time_eq(token_id.as_bytes(), id.as_bytes());
    let hash_ok = constant_time_eq(
        hash_token_secret(&secret).as_bytes(),
        stored_hash.as_bytes(),
    );
    id_ok & hash_ok
}

/// Byte-slice equality whose time depends on the lengths only, not on where
/// the slices differ. Lengths are public here (hex digests, token ids).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    // black_box keeps the optimizer from turning the fold into an early exit.
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

#[cfg(test)]
mod tests;
