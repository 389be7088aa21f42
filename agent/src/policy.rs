//! Network policy in the data plane: the generation swap that installs a
//! compiled policy ([`sluice_model::policy::compiled`]) atomically, and the
//! revocation of established flows a new policy denies.
//!
//! The kernel checks every new flow against the compiled tables (an LPM trie
//! of identities, a hash of allow rules; `ebpf/programs/src/policy.rs`,
//! `admit`); established flows are not looked up again, so a policy change
//! that denies them must end them: [`revoke`], which evaluates each tracked
//! flow with the same reference evaluation the kernel is tested against.
//!
//! Atomic updates: every entry carries a generation. [`PolicyWriter::install`]
//! writes the new generation beside the one in force, switches
//! `POLICY_STATE` in one array update, then deletes the old entries. A packet
//! sees one generation or the other, never a mix, so traffic both allow is
//! never dropped and traffic both deny never passes.

use std::net::Ipv4Addr;

use aya::maps::{MapError, lpm_trie::Key};
use sluice_common::types::{
    IDENTITY_EGRESS_ENFORCED, IDENTITY_ENFORCED, PolicyIdentity, PolicyRule, PolicyRuleKey,
    PolicyState, RULE_EGRESS, RULE_INGRESS, policy_identity_key,
};
use sluice_model::policy::compiled::{CompiledPolicy, Endpoint};

use crate::{
    apply::{self, ApplyError},
    maps::Maps,
};

/// Network order, as the kernel reads addresses out of packets.
fn wire(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
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
            32 + u32::from(e.prefix.prefix_len()),
            policy_identity_key(generation, wire(e.prefix.addr())),
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
        let at = |a: u32, port: u16| Endpoint {
            addr: addr(a),
            port: u16::from_be(port),
        };
        !compiled
            .evaluate_flow(
                addr(key.src),
                at(key.dst, key.dport),
                at(flow.backend_addr, flow.backend_port),
                key.proto,
            )
            .is_allowed()
    })
    .map_err(PolicyError::Revoke)
}
