//! Dashboard tokens: short-lived bearer secrets that stand for the admin who
//! asked for one (`sluicectl dashboard`).
//!
//! A token carries no permission of its own: it names its caller, and every
//! dashboard request is authorized against that caller's grants as they are
//! at that moment, so revoking a grant takes effect on the next request (or
//! the next second of a live stream). Tokens live in memory only: a restart
//! of the control service ends every dashboard session, which is the safe
//! side for a bearer secret. Only their SHA-256 is kept, so the map never
//! holds a usable secret and a lookup compares digests, not the secret.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use sha2::{Digest as _, Sha256};

use crate::rbac::Caller;

/// Lifetime of a token when the caller gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest lifetime: a dashboard URL is a bearer secret that may end up in a
/// browser's history; a working day is the most it should outlive.
pub const MAX_TTL: Duration = Duration::from_secs(12 * 3600);
/// Tokens held at once; issuing beyond it first drops the expired ones and
/// then refuses, so a client looping on the RPC cannot grow the map forever.
pub const MAX_TOKENS: usize = 10_000;

/// Why a request's token was refused (the 401's message).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    #[error(
        "no dashboard token: run `sluicectl dashboard` and open the URL it prints \
         (the token travels in its #token=… part)"
    )]
    Missing,
    #[error(
        "unknown dashboard token (the control service restarted, or it was mistyped): run `sluicectl dashboard` for a new one"
    )]
    Unknown,
    #[error("the dashboard token expired: run `sluicectl dashboard` for a new one")]
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("ttl: at most {max_secs} s (12 h), got {got_secs} s")]
    TooLong { max_secs: u64, got_secs: u64 },
    #[error("too many dashboard tokens in use ({MAX_TOKENS}); try again when some expire")]
    Full,
    #[error("generating a random token")]
    Random(#[source] std::io::Error),
}

struct Entry {
    caller: Caller,
    expires: Instant,
}

/// The tokens issued and not yet expired, by the digest of their secret.
#[derive(Default)]
pub struct Tokens {
    by_digest: Mutex<HashMap<[u8; 32], Entry>>,
}

/// A token just issued.
#[derive(Debug)]
pub struct Issued {
    /// 64 hex digits: 256 random bits.
    pub token: String,
    pub expires: SystemTime,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    /// A new token for `caller`, valid for `ttl` (zero: [`DEFAULT_TTL`]).
    pub fn issue(&self, caller: Caller, ttl: Duration) -> Result<Issued, IssueError> {
        self.issue_at(caller, ttl, Instant::now())
    }

    fn issue_at(&self, caller: Caller, ttl: Duration, now: Instant) -> Result<Issued, IssueError> {
        let ttl = if ttl.is_zero() { DEFAULT_TTL } else { ttl };
        if ttl > MAX_TTL {
            return Err(IssueError::TooLong {
                max_secs: MAX_TTL.as_secs(),
                got_secs: ttl.as_secs(),
            });
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| {
            // getrandom's error is no std::error::Error without its "std"
            // feature: carry the OS error (as sluice_pki does).
            IssueError::Random(e.raw_os_error().map_or_else(
                || std::io::Error::other(e.to_string()),
                std::io::Error::from_raw_os_error,
            ))
        })?;
        let token = hex::encode(secret);
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TOKENS {
            map.retain(|_, e| e.expires > now);
            if map.len() >= MAX_TOKENS {
                return Err(IssueError::Full);
            }
        }
        map.insert(
            digest(&token),
            Entry {
                caller,
                expires: now + ttl,
            },
        );
        Ok(Issued {
            token,
            expires: SystemTime::now() + ttl,
        })
    }

    /// The caller `token` stands for, if it is known and not expired. An
    /// expired token is forgotten on the way.
    pub fn resolve(&self, token: Option<&str>) -> Result<Caller, TokenRefused> {
        self.resolve_at(token, Instant::now())
    }

    fn resolve_at(&self, token: Option<&str>, now: Instant) -> Result<Caller, TokenRefused> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(TokenRefused::Missing)?;
        let key = digest(token);
        let mut map = self.by_digest.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&key) {
            None => Err(TokenRefused::Unknown),
            Some(e) if e.expires <= now => {
                map.remove(&key);
                Err(TokenRefused::Expired)
            }
            Some(e) => Ok(e.caller.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Caller {
        Caller {
            name: "alice".into(),
            groups: vec!["dev".into()],
        }
    }

    #[test]
    fn a_token_stands_for_its_caller_until_it_expires() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let issued = tokens
            .issue_at(alice(), Duration::from_secs(60), t0)
            .expect("issue");
        assert_eq!(issued.token.len(), 64, "256 bits in hex");
        assert_eq!(tokens.resolve_at(Some(&issued.token), t0), Ok(alice()));
        assert_eq!(
            tokens.resolve_at(Some(&issued.token), t0 + Duration::from_secs(59)),
            Ok(alice())
        );
        assert_eq!(
            tokens.resolve_at(Some(&issued.token), t0 + Duration::from_secs(60)),
            Err(TokenRefused::Expired)
        );
        // Expired tokens are forgotten: the same secret is now unknown.
        assert_eq!(
            tokens.resolve_at(Some(&issued.token), t0 + Duration::from_secs(61)),
            Err(TokenRefused::Unknown)
        );
    }

    #[test]
    fn missing_wrong_and_too_long_are_refused() {
        let tokens = Tokens::default();
        let issued = tokens.issue(alice(), Duration::ZERO).expect("issue");
        assert_eq!(tokens.resolve(None), Err(TokenRefused::Missing));
        assert_eq!(tokens.resolve(Some("")), Err(TokenRefused::Missing));
        let mut wrong = issued.token.clone();
        wrong.replace_range(0..1, if wrong.starts_with('0') { "1" } else { "0" });
        assert_eq!(tokens.resolve(Some(&wrong)), Err(TokenRefused::Unknown));
        assert!(matches!(
            tokens.issue(alice(), MAX_TTL + Duration::from_secs(1)),
            Err(IssueError::TooLong { .. })
        ));
        // The default lifetime is 15 minutes.
        let left = issued
            .expires
            .duration_since(SystemTime::now())
            .expect("in the future");
        assert!(left > Duration::from_secs(14 * 60) && left <= DEFAULT_TTL);
        // Two tokens never collide.
        let other = tokens.issue(alice(), Duration::ZERO).expect("issue");
        assert_ne!(issued.token, other.token);
    }
}
