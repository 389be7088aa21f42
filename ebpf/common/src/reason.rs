//! Indices of `OUTCOMES`, the per-CPU counters of what the data plane did with
//! each packet. Every packet the programs see ends in exactly one of them.
//!
//! The rule behind the verdicts: Sluice drops only traffic it owns. A packet not
//! addressed to a VIP and not a reply of a tracked flow is passed untouched, even
//! when malformed (the kernel then applies its own checks and counters). A packet
//! addressed to a VIP that cannot be balanced is dropped and counted here.

/// Passed untouched: not IPv4 (ARP, IPv6, VLAN-tagged, ...).
pub const PASS_NOT_IPV4: u32 = 0;
/// Passed untouched: shorter than an Ethernet header.
pub const PASS_MALFORMED_L2: u32 = 1;
/// Passed untouched: IPv4 header truncated or inconsistent (version, IHL, total length).
pub const PASS_MALFORMED_IPV4: u32 = 2;
/// Passed untouched: neither TCP nor UDP, not to a VIP.
pub const PASS_OTHER_PROTOCOL: u32 = 3;
/// Passed untouched: an IPv4 fragment not addressed to a VIP.
pub const PASS_FRAGMENT: u32 = 4;
/// Passed untouched: TCP/UDP header truncated, not addressed to a VIP.
pub const PASS_MALFORMED_L4: u32 = 5;
/// Passed untouched: TCP/UDP, neither to a VIP nor a reply of a tracked flow.
pub const PASS_NOT_SERVICE: u32 = 6;
/// XDP handed the packet, untouched, to the TC program: its L4 checksum is still
/// only the pseudo-header sum (checksum offload pending, `CHECKSUM_PARTIAL`),
/// which only the skb-aware helpers can update correctly.
pub const XDP_DEFER_PARTIAL_CSUM: u32 = 7;
/// NATed, then handed to the kernel stack because the next hop's neighbour entry
/// is not resolved yet; the kernel resolves it (ARP) and forwards the packet.
pub const STACK_NO_NEIGH: u32 = 8;
/// NATed, then handed to the kernel stack because the egress device cannot
/// receive XDP-redirected frames (for a veth: its peer has no NAPI).
pub const STACK_NO_XDP_EGRESS: u32 = 9;
/// NATed, then handed to the kernel stack: TTL expiring, fragmentation needed,
/// or a route the FIB helper does not forward (the kernel sends the ICMP).
pub const STACK_OTHER: u32 = 10;
/// NATed and redirected to the egress device from XDP.
pub const FWD_XDP: u32 = 11;
/// NATed and redirected to the egress device from TC.
pub const FWD_TC: u32 = 12;
/// Dropped: an IPv4 fragment addressed to a VIP (ports unknown; not reassembled).
pub const DROP_VIP_FRAGMENT: u32 = 13;
/// Dropped: TCP/UDP header truncated or invalid, addressed to a VIP.
pub const DROP_VIP_MALFORMED_L4: u32 = 14;
/// Dropped: a VIP address, but no service on that port and protocol.
pub const DROP_VIP_UNKNOWN_PORT: u32 = 15;
/// Dropped: a VIP address, but neither TCP nor UDP.
pub const DROP_VIP_PROTOCOL: u32 = 16;
/// Dropped: the service has no backend.
pub const DROP_NO_BACKEND: u32 = 17;
/// Dropped: a TCP RST for a flow Sluice does not know (creating a flow for it
/// would send a reset to an arbitrary backend).
pub const DROP_RST_NO_FLOW: u32 = 18;
/// Dropped: maps disagree (a slot names a free backend). Never expected; the
/// agent logs it loudly when it is not zero.
pub const DROP_INTERNAL: u32 = 19;
/// Dropped: a new flow could not be recorded (the connection table refused
/// the insert even after a retry: full, and nothing evictable at that instant).
/// The client's retransmission gets another chance.
pub const DROP_FLOW_TABLE_FULL: u32 = 20;
/// Dropped: a new flow that network policy does not allow (the destination
/// backend is selected by a policy and no rule admits the source).
pub const DROP_POLICY: u32 = 21;

pub const COUNT: u32 = 22;

/// Names for status and metrics, indexed by reason.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ipv4",
    "pass_malformed_l2",
    "pass_malformed_ipv4",
    "pass_other_protocol",
    "pass_fragment",
    "pass_malformed_l4",
    "pass_not_service",
    "xdp_defer_partial_csum",
    "stack_no_neigh",
    "stack_no_xdp_egress",
    "stack_other",
    "fwd_xdp",
    "fwd_tc",
    "drop_vip_fragment",
    "drop_vip_malformed_l4",
    "drop_vip_unknown_port",
    "drop_vip_protocol",
    "drop_no_backend",
    "drop_rst_no_flow",
    "drop_internal",
    "drop_flow_table_full",
    "drop_policy",
];

/// The kind of verdict a reason belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Not Sluice's traffic; passed untouched.
    Pass,
    /// Handed on to the TC program or the kernel stack.
    Handoff,
    /// Balanced and forwarded.
    Forward,
    /// Dropped.
    Drop,
}

pub const fn kind(reason: u32) -> Kind {
    match reason {
        PASS_NOT_IPV4..=PASS_NOT_SERVICE => Kind::Pass,
        XDP_DEFER_PARTIAL_CSUM..=STACK_OTHER => Kind::Handoff,
        FWD_XDP | FWD_TC => Kind::Forward,
        _ => Kind::Drop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed_by_kind() {
        for (i, name) in NAMES.iter().enumerate() {
            assert!(!NAMES[..i].contains(name), "{name} twice");
            let prefix = match kind(i as u32) {
                Kind::Pass => "pass_",
                Kind::Handoff => "",
                Kind::Forward => "fwd_",
                Kind::Drop => "drop_",
            };
            assert!(name.starts_with(prefix), "{name} is not {prefix}*");
        }
    }
}
