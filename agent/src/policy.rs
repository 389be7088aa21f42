//! Network policy in the data plane: the compiled form the kernel enforces,
//! a plain reference evaluation of it, and the generation swap that installs
//! a new one atomically.
//!
//! Compiled policy is two tables. *Identities* map address prefixes to
//! numeric identities (an endpoint's /32, a protected service's VIP, or a
//! CIDR a rule names; the longest prefix wins, so a CIDR's `except` is a
//! longer prefix with an identity no rule allows); an identity marked
//! *enforced* is a destination selected by some policy, default-deny for
//! ingress. *Rules* allow (destination identity,
//! source identity or any, target port or any, protocol) and name the policy
//! counted for it. The kernel checks every new flow to an enforced backend
//! (`policy::admit` in ebpf/programs); established flows are not looked up again, so a
//! policy change that denies them must end them: [`revoke`].
//!
//! Atomic updates: every entry carries a generation. [`PolicyWriter::install`]
//! writes the new generation beside the one in force, switches
//! `POLICY_STATE` in one array update, then deletes the old entries. A packet
//! sees one generation or the other, never a mix, so traffic both allow is
//! never dropped and traffic both deny never passes.

use std::net::Ipv4Addr;

use aya::maps::{MapError, lpm_trie::Key};
use sluice_common::types::{
    IDENTITY_ANY, IDENTITY_EGRESS_ENFORCED, IDENTITY_ENFORCED, IDENTITY_WORLD, PolicyIdentity,
    PolicyRule, PolicyRuleKey, PolicyState, RULE_EGRESS, RULE_INGRESS, policy_identity_key,
};

use crate::{
    apply::{self, ApplyError},
    maps::Maps,
};

/// One prefix → identity entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityEntry {
    pub prefix: Ipv4Addr,
    pub len: u8,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    pub egress: bool,
    pub dst: u32,
    pub src: u32,
    /// Target port, host order; 0: every port (then `protocol` is 0 too).
    pub port: u16,
    pub protocol: u8,
    /// Counts the flows this rule's policy allows.
    pub stats_slot: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub identities: Vec<IdentityEntry>,
    pub rules: Vec<RuleEntry>,
}

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

impl CompiledPolicy {
    /// The compiled policy a control-plane view carries.
    pub fn from_view(view: &sluice_api::v1::PolicyView) -> Result<Self, String> {
        let identities = view
            .identities
            .iter()
            .map(|i| {
                let bad = || format!("identity {}: bad prefix {:?}", i.identity, i.prefix);
                let (addr, len) = i.prefix.split_once('/').ok_or_else(bad)?;
                Ok(IdentityEntry {
                    prefix: addr.parse().map_err(|_| bad())?,
                    len: len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?,
                    identity: i.identity,
                    enforced: i.enforced,
                    stats_slot: i.stats_slot,
                    egress_enforced: i.egress_enforced,
                    egress_slot: i.egress_slot,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let rules = view
            .rules
            .iter()
            .map(|r| {
                Ok(RuleEntry {
                    egress: r.egress,
                    dst: r.dst,
                    src: r.src,
                    port: u16::try_from(r.port).map_err(|_| format!("rule port {}", r.port))?,
                    protocol: u8::try_from(r.protocol)
                        .map_err(|_| format!("rule protocol {}", r.protocol))?,
                    stats_slot: r.stats_slot,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { identities, rules })
    }

    /// Whether any destination is enforced (otherwise the kernel skips every
    /// lookup).
    pub fn enforces(&self) -> bool {
        self.identities
            .iter()
            .any(|i| i.enforced || i.egress_enforced)
    }

    /// The longest prefix covering `addr`.
    fn identity_of(&self, addr: Ipv4Addr) -> Option<&IdentityEntry> {
        self.identities
            .iter()
            .filter(|e| covers(e.prefix, e.len, addr))
            .max_by_key(|e| e.len)
    }

    /// The verdict on a new flow from `src` through service `vip:vip_port` to
    /// backend `dst:port` (host order), the plain way: what the kernel must
    /// agree with. The VIP decides first (if a policy protects the service),
    /// then the backend (if a policy selects it).
    pub fn evaluate_flow(
        &self,
        src: Ipv4Addr,
        (vip, vip_port): (Ipv4Addr, u16),
        (dst, port): (Ipv4Addr, u16),
        protocol: u8,
    ) -> Verdict {
        let source = self.identity_of(src);
        if let Some(source) = source.filter(|s| s.egress_enforced) {
            let target = self.identity_of(dst).map_or(IDENTITY_WORLD, |t| t.identity);
            let allowed = [
                (target, true),
                (target, false),
                (IDENTITY_ANY, true),
                (IDENTITY_ANY, false),
            ]
            .into_iter()
            .find_map(|(d, specific)| {
                self.rules.iter().find(|r| {
                    r.egress
                        && r.src == source.identity
                        && r.dst == d
                        && if specific {
                            r.port == port && r.protocol == protocol
                        } else {
                            r.port == 0 && r.protocol == 0
                        }
                })
            });
            if allowed.is_none() {
                return Verdict::Denied {
                    slot: source.egress_slot,
                };
            }
        }
        let at_vip = self.evaluate(src, vip, vip_port, protocol);
        if !at_vip.is_allowed() {
            return at_vip;
        }
        match self.evaluate(src, dst, port, protocol) {
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
        let allows = |src: u32, specific: bool| {
            self.rules.iter().find(|r| {
                !r.egress
                    && r.dst == target.identity
                    && r.src == src
                    && if specific {
                        r.port == port && r.protocol == protocol
                    } else {
                        r.port == 0 && r.protocol == 0
                    }
            })
        };
        [
            (source, true),
            (source, false),
            (IDENTITY_ANY, true),
            (IDENTITY_ANY, false),
        ]
        .into_iter()
        .find_map(|(src, specific)| allows(src, specific))
        .map_or(
            Verdict::Denied {
                slot: target.stats_slot,
            },
            |r| Verdict::Allowed {
                slot: Some(r.stats_slot),
            },
        )
    }
}

fn covers(prefix: Ipv4Addr, len: u8, addr: Ipv4Addr) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(prefix) & mask == u32::from(addr) & mask
}

/// Network order, as the kernel reads addresses out of packets.
fn wire(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the view's network policy cannot be programmed: {reason}")]
    View { reason: String },
    #[error("writing the policy maps ({what})")]
    Map {
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("ending flows the new policy denies")]
    Revoke(#[source] ApplyError),
}

fn map_err(what: &'static str) -> impl FnOnce(MapError) -> PolicyError {
    move |source| PolicyError::Map { what, source }
}

/// Installs compiled policy generation by generation (see the module docs).
#[derive(Debug, Default)]
pub struct PolicyWriter;

impl PolicyWriter {
    /// Makes `compiled` the policy in force, atomically. On error the
    /// previous policy stays in force and the partial new generation is
    /// removed.
    pub fn install(
        &mut self,
        maps: &mut Maps,
        compiled: &CompiledPolicy,
    ) -> Result<u32, PolicyError> {
        let current = maps
            .policy_state
            .get(&0, 0)
            .map_err(map_err("reading the generation"))?;
        let next = current.generation.wrapping_add(1);
        if let Err(e) = write_generation(maps, compiled, next) {
            let _ = delete_generations(maps, |generation| generation == next);
            return Err(e);
        }
        let state = PolicyState {
            generation: next,
            enabled: u32::from(compiled.enforces()),
        };
        if let Err(e) = maps.policy_state.set(0, state, 0) {
            let _ = delete_generations(maps, |generation| generation == next);
            return Err(map_err("switching generations")(e));
        }
        // Packets already past the switch may still read the old entries for
        // a moment; they are RCU-protected map values, and deleting them only
        // makes later lookups miss, which no packet of the old generation
        // makes any more.
        delete_generations(maps, |generation| generation != next)?;
        Ok(next)
    }
}

fn write_generation(
    maps: &mut Maps,
    compiled: &CompiledPolicy,
    generation: u32,
) -> Result<(), PolicyError> {
    for e in &compiled.identities {
        let key = Key::new(
            32 + u32::from(e.len),
            policy_identity_key(generation, wire(e.prefix)),
        );
        let flags = if e.enforced { IDENTITY_ENFORCED } else { 0 }
            | if e.egress_enforced {
                IDENTITY_EGRESS_ENFORCED
            } else {
                0
            };
        let value = PolicyIdentity {
            identity: e.identity,
            flags,
            stats_slot: e.stats_slot,
            egress_slot: e.egress_slot,
        };
        maps.policy_identities
            .insert(&key, value, 0)
            .map_err(map_err("writing an identity"))?;
    }
    for r in &compiled.rules {
        let key = PolicyRuleKey {
            generation,
            dst: r.dst,
            src: r.src,
            port: r.port.to_be(),
            proto: r.protocol,
            direction: if r.egress { RULE_EGRESS } else { RULE_INGRESS },
        };
        let value = PolicyRule {
            stats_slot: r.stats_slot,
            _pad: 0,
        };
        maps.policy_rules
            .insert(key, value, 0)
            .map_err(map_err("writing a rule"))?;
    }
    Ok(())
}

/// Deletes the entries of the generations `doomed` selects.
fn delete_generations(maps: &mut Maps, doomed: impl Fn(u32) -> bool) -> Result<(), PolicyError> {
    let identities: Vec<Key<[u32; 2]>> = maps
        .policy_identities
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(u32::from_be(k.data()[0])))
        .collect();
    for key in identities {
        match maps.policy_identities.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("deleting an identity")(e)),
        }
    }
    let rules: Vec<PolicyRuleKey> = maps
        .policy_rules
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k.generation))
        .collect();
    for key in rules {
        match maps.policy_rules.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err("deleting a rule")(e)),
        }
    }
    Ok(())
}

/// Ends the established flows `compiled` denies (both directions): a policy
/// change revokes access at once rather than only for new connections.
/// Returns how many flows went.
pub fn revoke(maps: &mut Maps, compiled: &CompiledPolicy) -> Result<usize, PolicyError> {
    if !compiled.enforces() {
        return Ok(0);
    }
    apply::purge_flows(maps, |key, flow| {
        let addr = |a: u32| Ipv4Addr::from(a.to_ne_bytes());
        !compiled
            .evaluate_flow(
                addr(key.src),
                (addr(key.dst), u16::from_be(key.dport)),
                (addr(flow.backend_addr), u16::from_be(flow.backend_port)),
                key.proto,
            )
            .is_allowed()
    })
    .map_err(PolicyError::Revoke)
}

#[cfg(test)]
mod tests {
    use sluice_common::types::IPPROTO_TCP;

    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn policy() -> CompiledPolicy {
        let identity = |prefix: &str, len, identity, enforced| IdentityEntry {
            prefix: ip(prefix),
            len,
            identity,
            enforced,
            stats_slot: identity,
            egress_enforced: Default::default(),
            egress_slot: Default::default(),
        };
        CompiledPolicy {
            identities: vec![
                identity("198.19.1.2", 32, 100, true),
                identity("198.19.2.2", 32, 101, false),
                identity("198.18.1.0", 24, 200, false),
                // The except of a CIDR rule: a longer prefix no rule allows.
                identity("198.18.1.128", 25, 201, false),
            ],
            rules: vec![RuleEntry {
                dst: 100,
                src: 200,
                port: 8080,
                protocol: IPPROTO_TCP,
                stats_slot: 7,
                egress: Default::default(),
            }],
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
    fn prefixes_cover_what_they_should() {
        assert!(covers(ip("0.0.0.0"), 0, ip("255.1.2.3")));
        assert!(covers(ip("198.18.1.128"), 25, ip("198.18.1.255")));
        assert!(!covers(ip("198.18.1.128"), 25, ip("198.18.1.127")));
        assert!(covers(ip("198.19.1.2"), 32, ip("198.19.1.2")));
    }
}
