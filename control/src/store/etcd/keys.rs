//! Where a [`Key`] lives in etcd's keyspace, and `etcd://` URLs.

use std::net::Ipv6Addr;

use super::EtcdError;
use crate::store::{Key, StoreError};

/// The sentinel's name under the prefix. It has no `/`, and every object key has two after the
/// prefix, so no object can be stored under it nor list it.
const SENTINEL: &[u8] = b"last-commit";
/// Where replicas register (see `replicas.rs`): one `/` after the prefix, so no object key is
/// below it either.
const REPLICAS: &[u8] = b"replicas/";
const SEP: u8 = b'/';
const ESCAPE: u8 = b'%';

/// The prefix every key of one store lives under, and the encoding below it:
/// `<prefix><kind>/<namespace>/<name>` with `%` and `/` in each part written `%25` and `%2F`.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    prefix: Vec<u8>,
}

impl Layout {
    pub(super) fn new(prefix: &str) -> Result<Self, EtcdError> {
        let reason = if prefix.is_empty() {
            Some("empty")
        } else if !prefix.ends_with('/') {
            Some("does not end with `/`")
        } else if prefix.contains('\0') {
            Some("contains a NUL byte")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(EtcdError::Prefix {
                prefix: prefix.to_owned(),
                reason,
            }),
            None => Ok(Self {
                prefix: prefix.as_bytes().to_vec(),
            }),
        }
    }

    pub(super) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The key every write transaction writes: see the module documentation.
    pub(super) fn sentinel(&self) -> Vec<u8> {
        let mut raw = self.prefix.clone();
        raw.extend_from_slice(SENTINEL);
        raw
    }

    /// The prefix of the replicas' registrations.
    pub(super) fn replicas(&self) -> Vec<u8> {
        [self.prefix.as_slice(), REPLICAS].concat()
    }

    pub(super) fn key(&self, key: &Key) -> Vec<u8> {
        let mut raw = self.prefix.clone();
        escape_into(&mut raw, &key.kind);
        raw.push(SEP);
        escape_into(&mut raw, &key.namespace);
        raw.push(SEP);
        escape_into(&mut raw, &key.name);
        raw
    }

    /// The etcd range `[start, end)` holding exactly the keys of `kind` (in `namespace`).
    pub(super) fn range(&self, kind: &str, namespace: Option<&str>) -> (Vec<u8>, Vec<u8>) {
        let mut start = self.prefix.clone();
        escape_into(&mut start, kind);
        start.push(SEP);
        if let Some(ns) = namespace {
            escape_into(&mut start, ns);
            start.push(SEP);
        }
        // The prefix ends with the separator, which escaped parts never contain: the next byte
        // up bounds exactly the keys below it.
        let mut end = start.clone();
        if let Some(last) = end.last_mut() {
            *last = SEP + 1;
        }
        (start, end)
    }

    /// The key stored under `raw`, an etcd key below this prefix.
    pub(super) fn decode(&self, raw: &[u8]) -> Result<Key, StoreError> {
        let corrupt = |reason| StoreError::CorruptKey {
            raw: raw.to_vec(),
            reason,
        };
        let rest = raw
            .strip_prefix(self.prefix.as_slice())
            .ok_or_else(|| corrupt("outside the store's prefix"))?;
        let mut parts = rest.split(|&b| b == SEP);
        let (Some(kind), Some(namespace), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(corrupt("not three `/`-separated parts"));
        };
        let part = |p| unescape(p).ok_or_else(|| corrupt("bad escape or not UTF-8"));
        let key = Key::new(part(kind)?, part(namespace)?, part(name)?);
        key.validate().map_err(|_| corrupt("not a valid key"))?;
        Ok(key)
    }
}

fn escape_into(out: &mut Vec<u8>, part: &str) {
    for &b in part.as_bytes() {
        match b {
            ESCAPE => out.extend_from_slice(b"%25"),
            SEP => out.extend_from_slice(b"%2F"),
            b => out.push(b),
        }
    }
}

fn unescape(part: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(part.len());
    let mut bytes = part.iter();
    while let Some(&b) = bytes.next() {
        if b == ESCAPE {
            match (bytes.next(), bytes.next()) {
                (Some(b'2'), Some(b'5')) => out.push(ESCAPE),
                (Some(b'2'), Some(b'F')) => out.push(SEP),
                _ => return None,
            }
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// What is wrong with an `etcd://` URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EtcdUrlError {
    #[error("{url:?} is not an etcd URL: it must start with etcd://")]
    Scheme { url: String },
    #[error(
        "{url:?} has a path, query or fragment; an etcd URL is etcd://HOST:PORT[,HOST:PORT...]"
    )]
    Path { url: String },
    #[error("{url:?}: endpoint {index} is empty (a stray comma?)")]
    EmptyEndpoint { url: String, index: usize },
    #[error("etcd endpoint {endpoint:?} has no port: write HOST:PORT")]
    NoPort { endpoint: String },
    #[error("etcd endpoint {endpoint:?}: port {port:?} is not a number from 1 to 65535")]
    Port { endpoint: String, port: String },
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Host {
        endpoint: String,
        reason: &'static str,
    },
    #[error("{url:?} names endpoint {endpoint:?} twice")]
    Duplicate { url: String, endpoint: String },
}

/// The endpoints (`HOST:PORT`) of an `etcd://HOST:PORT[,HOST:PORT...]` URL. Hosts are names,
/// IPv4 addresses or bracketed IPv6 addresses (`[::1]:2379`); the scheme (plain or TLS) is
/// chosen by whether the store is given TLS settings, not by the URL.
pub fn parse_etcd_url(url: &str) -> Result<Vec<String>, EtcdUrlError> {
    let rest = url
        .strip_prefix("etcd://")
        .ok_or_else(|| EtcdUrlError::Scheme {
            url: url.to_owned(),
        })?;
    if rest.contains(['/', '?', '#']) {
        return Err(EtcdUrlError::Path {
            url: url.to_owned(),
        });
    }
    let mut endpoints: Vec<String> = Vec::new();
    for (index, endpoint) in rest.split(',').enumerate() {
        if endpoint.is_empty() {
            return Err(EtcdUrlError::EmptyEndpoint {
                url: url.to_owned(),
                index: index + 1,
            });
        }
        check_endpoint(endpoint)?;
        if endpoints.iter().any(|e| e == endpoint) {
            return Err(EtcdUrlError::Duplicate {
                url: url.to_owned(),
                endpoint: endpoint.to_owned(),
            });
        }
        endpoints.push(endpoint.to_owned());
    }
    Ok(endpoints)
}

fn check_endpoint(endpoint: &str) -> Result<(), EtcdUrlError> {
    let host_error = |reason| EtcdUrlError::Host {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let (host, port) = if let Some(bracketed) = endpoint.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| host_error("unclosed `[` of an IPv6 address"))?;
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(host_error("not an IPv6 address between `[` and `]`"));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| EtcdUrlError::NoPort {
                endpoint: endpoint.to_owned(),
            })?;
        (None, port)
    } else {
        let (host, port) = endpoint
            .rsplit_once(':')
            .ok_or_else(|| EtcdUrlError::NoPort {
                endpoint: endpoint.to_owned(),
            })?;
        (Some(host), port)
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err(host_error("empty host"));
        }
        if host.contains(':') {
            return Err(host_error("an IPv6 address must be written in brackets"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(host_error(
                "a host is a DNS name or an IP address (letters, digits, `-`, `.`)",
            ));
        }
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(EtcdUrlError::Port {
            endpoint: endpoint.to_owned(),
            port: port.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/sluice/").expect("valid prefix")
    }

    #[test]
    fn keys_are_readable_escaped_and_round_trip() {
        let l = layout();
        assert_eq!(
            l.key(&Key::new("service", "default", "web")),
            b"/sluice/service/default/web"
        );
        assert_eq!(l.key(&Key::cluster("node", "n1")), b"/sluice/node//n1");
        assert_eq!(
            l.key(&Key::new("a/b", "c%d", "e/%f")),
            b"/sluice/a%2Fb/c%25d/e%2F%25f"
        );
        for key in [
            Key::new("service", "default", "web"),
            Key::cluster("node", "n1"),
            Key::new("a/b", "c%d", "e/%f"),
            Key::new("k", "%2F", "/"),
            Key::new("k", "ünï", "cödé"),
        ] {
            assert_eq!(l.decode(&l.key(&key)).expect("decodes"), key);
        }
    }

    #[test]
    fn slashes_in_parts_cannot_collide_or_leak_into_a_range() {
        let l = layout();
        let keys = [
            Key::new("a/b", "c", "d"),
            Key::new("a", "b/c", "d"),
            Key::new("a", "b", "c/d"),
            Key::new("a", "", "b/c/d"),
        ];
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!(l.key(x), l.key(y), "{x:?} and {y:?}");
            }
        }
        let in_range = |kind: &str, ns: Option<&str>, key: &Key| {
            let (start, end) = l.range(kind, ns);
            let raw = l.key(key);
            start <= raw && raw < end
        };
        assert!(in_range("a", None, &keys[1]));
        assert!(!in_range("a", None, &keys[0]));
        assert!(in_range("a", Some("b"), &keys[2]));
        assert!(!in_range("a", Some("b"), &keys[1]));
        assert!(in_range("a", Some(""), &keys[3]));
        assert!(!in_range("a", Some(""), &keys[2]));
        // Nor does the sentinel belong to any kind.
        let sentinel = l.sentinel();
        let (start, end) = l.range("last-commit", None);
        assert!(!(start <= sentinel && sentinel < end));
        assert!(l.decode(&sentinel).is_err());
    }

    #[test]
    fn foreign_or_mangled_keys_are_corrupt() {
        let l = layout();
        for raw in [
            &b"/other/service/ns/name"[..],
            b"/sluice/service/ns",
            b"/sluice/service/ns/name/extra",
            b"/sluice/service/ns/na%2",
            b"/sluice/service/ns/na%41",
            b"/sluice/service/ns/\xff",
            b"/sluice//ns/name",
            b"/sluice/service/ns/",
        ] {
            assert!(
                matches!(l.decode(raw), Err(StoreError::CorruptKey { .. })),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn prefixes_must_end_with_a_slash() {
        assert!(Layout::new("/sluice/").is_ok());
        assert!(Layout::new("/").is_ok());
        for bad in ["", "/sluice", "a\0/"] {
            assert!(matches!(Layout::new(bad), Err(EtcdError::Prefix { .. })));
        }
    }

    #[test]
    fn etcd_urls_parse_into_endpoints() {
        assert_eq!(
            parse_etcd_url("etcd://127.0.0.1:2379").expect("one"),
            ["127.0.0.1:2379"]
        );
        assert_eq!(
            parse_etcd_url("etcd://etcd-0.example:2379,etcd-1.example:2379,[::1]:2381")
                .expect("three"),
            ["etcd-0.example:2379", "etcd-1.example:2379", "[::1]:2381"]
        );
    }

    #[test]
    fn bad_etcd_urls_say_what_is_wrong() {
        let err = |url: &str| parse_etcd_url(url).expect_err(url);
        assert!(matches!(err("http://h:1"), EtcdUrlError::Scheme { .. }));
        assert!(matches!(err("h:1"), EtcdUrlError::Scheme { .. }));
        assert!(matches!(err("etcd://h:1/"), EtcdUrlError::Path { .. }));
        assert!(matches!(err("etcd://h:1?x"), EtcdUrlError::Path { .. }));
        assert!(matches!(
            err("etcd://"),
            EtcdUrlError::EmptyEndpoint { index: 1, .. }
        ));
        assert!(matches!(
            err("etcd://h:1,"),
            EtcdUrlError::EmptyEndpoint { index: 2, .. }
        ));
        assert!(matches!(err("etcd://h"), EtcdUrlError::NoPort { .. }));
        assert!(matches!(err("etcd://[::1]"), EtcdUrlError::NoPort { .. }));
        for port in [
            "etcd://h:",
            "etcd://h:0",
            "etcd://h:65536",
            "etcd://h:+1",
            "etcd://h:x",
        ] {
            assert!(matches!(err(port), EtcdUrlError::Port { .. }), "{port}");
        }
        for host in [
            "etcd://:1",
            "etcd://::1:2379",
            "etcd://[::1:2379",
            "etcd://[nope]:1",
            "etcd://user@h:1",
            "etcd://h_1:1",
        ] {
            assert!(matches!(err(host), EtcdUrlError::Host { .. }), "{host}");
        }
        assert!(matches!(
            err("etcd://h:1,h:1"),
            EtcdUrlError::Duplicate { .. }
        ));
        assert_eq!(
            err("etcd://h:99999").to_string(),
            "etcd endpoint \"h:99999\": port \"99999\" is not a number from 1 to 65535"
        );
    }
}
