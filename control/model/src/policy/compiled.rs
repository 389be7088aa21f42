//! Network policy as the data plane enforces it, and a plain reference
//! evaluation of it that the kernel must agree with.
//!
//! Compiled policy is two tables. *Identities* map address prefixes to
//! numeric identities (an endpoint's /32, a protected service's VIP, or a
//! CIDR a rule names; the longest prefix wins, so a CIDR's `except` is a
//! longer prefix with an identity no rule allows); an identity marked
//! *enforced* is a destination selected by some policy, default-deny for
//! ingress, and one marked *egress-enforced* a source whose new flows some
//! policy restricts. *Rules* allow (destination identity, source identity or
//! any, target port or any, protocol) and name the counter slot of the
//! policy that allowed it. *Slots* say what each counter counts, as data
//! ([`Slot`]); programs turn them into text when they show them.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sluice_common::types::{IDENTITY_ANY, IDENTITY_WORLD};

use crate::kind::Labels;
use crate::view::ServiceRef;

/// One prefix → identity entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEntry {
    pub prefix: Ipv4Net,
    pub identity: u32,
    /// A destination some policy selects: default-deny for ingress.
    pub enforced: bool,
    /// Counts flows denied to it (enforced destinations).
    pub stats_slot: u32,
    /// A source some policy restricts: default-deny for egress.
    pub egress_enforced: bool,
    /// Counts flows it was denied (egress-enforced sources).
    pub egress_slot: u32,
}

/// One allow rule: an ingress rule of destination `dst` (any source:
/// `src` = [`IDENTITY_ANY`]), or an egress rule of source `src` (any
/// destination: `dst` = [`IDENTITY_ANY`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleEntry {
    pub egress: bool,
    pub dst: u32,
    pub src: u32,
    /// Target port; 0: every port (then `protocol` is 0 too).
    pub port: u16,
    /// IP protocol number; 0 with port 0.
    pub protocol: u8,
    /// Counts the flows this rule's policy allows.
    pub stats_slot: u32,
}

/// What a counter slot counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// Slot 0, and any slot no policy uses.
    #[default]
    Unused,
    /// New flows the policy's rules admitted.
    AllowedBy(PolicyRef),
    /// New flows refused to the endpoints of this label set.
    DeniedTo(LabelSet),
    /// New flows refused from the endpoints of this label set (egress).
    EgressDeniedFrom(LabelSet),
    /// New flows refused to this service's VIP.
    DeniedToService(ServiceRef),
}

/// A network policy, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

/// The endpoints that share one identity: a namespace and a label set.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSet {
    pub namespace: String,
    pub labels: Labels,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `shop:{app=web,tier=front}`.
impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{{", self.namespace)?;
        for (i, (key, value)) in self.labels.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(f, "{comma}{key}={value}")?;
        }
        f.write_str("}")
    }
}

/// How `sluicectl`, the dashboard and the metrics pages name a counter:
/// "allowed by shop/web-ingress", "denied to shop:{app=web}", "egress denied
/// from shop:{app=client}", "denied to service shop/web"; empty when unused.
impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unused => Ok(()),
            Self::AllowedBy(policy) => write!(f, "allowed by {policy}"),
            Self::DeniedTo(set) => write!(f, "denied to {set}"),
            Self::EgressDeniedFrom(set) => write!(f, "egress denied from {set}"),
            Self::DeniedToService(service) => write!(f, "denied to service {service}"),
        }
    }
}

/// The cluster's network policy, compiled (the same for every node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub identities: Vec<IdentityEntry>,
    pub rules: Vec<RuleEntry>,
    /// What each counter slot counts, by index.
    pub slots: Vec<Slot>,
}

/// The verdict on a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by the rule counted in `slot`; `None`: not enforced.
    Allowed {
        slot: Option<u32>,
    },
    Denied {
        slot: u32,
    },
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, Self::Allowed { .. })
    }
}

/// A flow's addresses, host order, as the reference evaluation reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl CompiledPolicy {
    /// Whether any identity is enforced (otherwise the kernel skips every
    /// lookup).
    pub fn enforces(&self) -> bool {
        self.identities
            .iter()
            .any(|i| i.enforced || i.egress_enforced)
    }

    /// What slot `index` counts.
    pub fn slot(&self, index: u32) -> &Slot {
        const UNUSED: &Slot = &Slot::Unused;
        usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get(i))
            .unwrap_or(UNUSED)
    }

    /// The longest prefix covering `addr`.
    fn identity_of(&self, addr: Ipv4Addr) -> Option<&IdentityEntry> {
        self.identities
            .iter()
            .filter(|e| e.prefix.contains(&addr))
            .max_by_key(|e| e.prefix.prefix_len())
    }

    /// The verdict on a new flow from `src` through service `vip` to backend
    /// `dst`, the plain way: what the kernel must agree with. The client's
    /// egress decides first (if a policy restricts it), then the VIP (if a
    /// policy protects the service), then the backend (if a policy selects
    /// it).
    pub fn evaluate_flow(
        &self,
        src: Ipv4Addr,
        vip: Endpoint,
        dst: Endpoint,
        protocol: u8,
    ) -> Verdict {
        if let Some(source) = self.identity_of(src).filter(|s| s.egress_enforced) {
            let target = self
                .identity_of(dst.addr)
                .map_or(IDENTITY_WORLD, |t| t.identity);
            let allowed = [target, IDENTITY_ANY].into_iter().any(|d| {
                self.allowing_rule(true, d, source.identity, dst.port, protocol)
                    .is_some()
            });
            if !allowed {
                return Verdict::Denied {
                    slot: source.egress_slot,
                };
            }
        }
        let at_vip = self.evaluate(src, vip.addr, vip.port, protocol);
        if !at_vip.is_allowed() {
            return at_vip;
        }
        match self.evaluate(src, dst.addr, dst.port, protocol) {
            Verdict::Allowed { slot: None } => at_vip,
            at_backend => at_backend,
        }
    }

    /// The verdict of one destination (a VIP or a backend) on `src`.
    pub fn evaluate(&self, src: Ipv4Addr, dst: Ipv4Addr, port: u16, protocol: u8) -> Verdict {
        let Some(target) = self.identity_of(dst).filter(|t| t.enforced) else {
            return Verdict::Allowed { slot: None };
        };
        let source = self.identity_of(src).map_or(IDENTITY_WORLD, |i| i.identity);
        [source, IDENTITY_ANY]
            .into_iter()
            .find_map(|src| self.allowing_rule(false, target.identity, src, port, protocol))
            .map_or(
                Verdict::Denied {
                    slot: target.stats_slot,
                },
                |r| Verdict::Allowed {
                    slot: Some(r.stats_slot),
                },
            )
    }

    /// The rule of this direction, destination and source that allows the
    /// port, the specific one before the any-port one (as the kernel looks
    /// them up).
    fn allowing_rule(
        &self,
        egress: bool,
        dst: u32,
        src: u32,
        port: u16,
        protocol: u8,
    ) -> Option<&RuleEntry> {
        [(port, protocol), (0, 0)]
            .into_iter()
            .find_map(|(p, proto)| {
                self.rules.iter().find(|r| {
                    r.egress == egress
                        && r.dst == dst
                        && r.src == src
                        && r.port == p
                        && r.protocol == proto
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use sluice_common::types::IPPROTO_TCP;

    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn policy() -> CompiledPolicy {
        let identity = |prefix: &str, identity, enforced| IdentityEntry {
            prefix: prefix.parse().expect("test prefix"),
            identity,
            enforced,
            stats_slot: identity,
            egress_enforced: Default::default(),
            egress_slot: Default::default(),
        };
        CompiledPolicy {
            identities: vec![
                identity("198.19.1.2/32", 100, true),
                identity("198.19.2.2/32", 101, false),
                identity("198.18.1.0/24", 200, false),
                // The except of a CIDR rule: a longer prefix no rule allows.
                identity("198.18.1.128/25", 201, false),
            ],
            rules: vec![RuleEntry {
                dst: 100,
                src: 200,
                port: 8080,
                protocol: IPPROTO_TCP,
                stats_slot: 7,
                egress: Default::default(),
            }],
            slots: Vec::new(),
        }
    }

    #[test]
    fn reference_evaluation_follows_longest_prefix_and_rules() {
        let p = policy();
        let tcp = IPPROTO_TCP;
        assert_eq!(
            p.evaluate(ip("198.18.1.5"), ip("198.19.1.2"), 8080, tcp),
            Verdict::Allowed { slot: Some(7) }
        );
        // The except, another port, an unknown source: denied, counted on
        // the destination.
        for (src, port) in [
            ("198.18.1.200", 8080),
            ("198.18.1.5", 9090),
            ("10.0.0.1", 8080),
        ] {
            assert_eq!(
                p.evaluate(ip(src), ip("198.19.1.2"), port, tcp),
                Verdict::Denied { slot: 100 },
                "{src}:{port}"
            );
        }
        // Destinations no policy selects are open.
        assert_eq!(
            p.evaluate(ip("10.0.0.1"), ip("198.19.2.2"), 80, tcp),
            Verdict::Allowed { slot: None }
        );
        assert_eq!(
            p.evaluate(ip("10.0.0.1"), ip("198.19.3.2"), 80, tcp),
            Verdict::Allowed { slot: None }
        );
        // An any-source, any-port rule opens the destination to all.
        let mut open = policy();
        open.rules.push(RuleEntry {
            dst: 100,
            src: IDENTITY_ANY,
            port: 0,
            protocol: 0,
            stats_slot: 8,
            egress: Default::default(),
        });
        assert_eq!(
            open.evaluate(ip("10.0.0.1"), ip("198.19.1.2"), 9, 17),
            Verdict::Allowed { slot: Some(8) }
        );
    }

    #[test]
    fn slots_read_as_they_always_did() {
        let set = LabelSet {
            namespace: "shop".into(),
            labels: [
                ("app".into(), "web".into()),
                ("tier".into(), "front".into()),
            ]
            .into(),
        };
        let cases = [
            (Slot::Unused, ""),
            (
                Slot::AllowedBy(PolicyRef {
                    namespace: "shop".into(),
                    name: "web-ingress".into(),
                }),
                "allowed by shop/web-ingress",
            ),
            (
                Slot::DeniedTo(set.clone()),
                "denied to shop:{app=web,tier=front}",
            ),
            (
                Slot::EgressDeniedFrom(set),
                "egress denied from shop:{app=web,tier=front}",
            ),
            (
                Slot::DeniedToService(ServiceRef {
                    namespace: "shop".into(),
                    name: "web".into(),
                }),
                "denied to service shop/web",
            ),
        ];
        for (slot, text) in cases {
            assert_eq!(slot.to_string(), text);
        }
        let empty = LabelSet {
            namespace: "open".into(),
            labels: Labels::new(),
        };
        assert_eq!(Slot::DeniedTo(empty).to_string(), "denied to open:{}");
    }
}
