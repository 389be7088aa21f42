//! Map names and capacities. Kernel and agent both take them from here.

/// Bumped whenever a pinned map's key, value or type changes, or a map is added
/// or removed. The agent refuses to reuse pinned maps of another layout instead
/// of misreading them (5: affinity timeout in `Frontend`, `AFFINITY_V4`;
/// 6: the policy maps, `FLOW_EVENTS`, `drop_policy` among the outcomes;
/// 7: the flow log: 40-byte `FlowEvent`s, `FLOW_LOG`, `FLOW_EVENTS_LOST`).
pub const LAYOUT_VERSION: u32 = 7;

/// Service ports `(VIP, port, protocol)`; each has an id indexing per-frontend arrays.
pub const MAX_FRONTENDS: u32 = 16_384;
/// Backend ids are per frontend: one backend address serving two ports is two ids.
/// Sized for 10,000 services of 10 endpoints each with room to spare; the
/// per-CPU statistics cost 24 bytes × this × CPUs of kernel memory.
pub const MAX_BACKENDS: u32 = 131_072;
/// Total capacity of the slot array that all frontends' slot tables share.
pub const SLOT_CAPACITY: u32 = 1 << 20;
/// A slot table never exceeds this; weights are scaled down proportionally to fit.
/// 1% canary shares need ≥ 100 slots, so this leaves ample precision.
pub const MAX_SLOTS_PER_FRONTEND: u32 = 65_536;
/// Maglev lookup table size when a service gives none: prime, and large
/// against the backend count (disruption and imbalance shrink as M/N grows).
pub const MAGLEV_DEFAULT_TABLE_SIZE: u32 = 16_381;
/// The largest prime a slot table can hold.
pub const MAGLEV_MAX_TABLE_SIZE: u32 = 65_521;
/// Least-connections scans at most this many backends per new flow (a rotating
/// window); with fewer backends the choice is exact.
pub const LC_SCAN_WINDOW: u32 = 64;
/// Default connection-table size (forward and reply tables each).
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
/// Client-IP affinity entries, one per (service port, client) of services
/// with session affinity (not one per connection, hence smaller than the flow
/// table). When full, the least recently used client loses its affinity: its
/// next flow is balanced afresh, never dropped. About 5 MiB of kernel memory
/// (preallocated, ~72 bytes an entry).
pub const AFFINITY_CAPACITY: u32 = 65_536;
/// Network policy: (prefix → identity) entries, per generation. Two
/// generations coexist while one replaces the other.
pub const POLICY_IDENTITY_CAPACITY: u32 = 131_072;
/// Network policy: (destination, source, port, protocol) → allow entries, per
/// generation, two generations at a time.
pub const POLICY_RULE_CAPACITY: u32 = 262_144;
/// Bytes of the flow-log ring (40-byte events plus an 8-byte header each:
/// about 21,000 events between two reads). A flood beyond that loses events
/// (counted in `FLOW_EVENTS_LOST`), never packets; the counters stay exact.
pub const FLOW_EVENTS_BYTES: u32 = 1024 * 1024;
/// Counter slots: one per policy (allowed flows) and one per enforced
/// destination identity (denied flows).
pub const POLICY_STATS_SLOTS: u32 = 16_384;
/// A flow's cached next hop is looked up again when older than this.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// Distinct VIP addresses.
pub const MAX_VIPS: u32 = 16_384;
/// Interfaces one agent can manage.
pub const MAX_INTERFACES: u32 = 64;

/// Map names: the kernel declares maps under these names, the agent pins them
/// under the same names.
pub mod map {
    pub const FRONTENDS_V4: &str = "FRONTENDS_V4";
    pub const VIPS_V4: &str = "VIPS_V4";
    pub const FLOWS_V4: &str = "FLOWS_V4";
    pub const REPLIES_V4: &str = "REPLIES_V4";
    pub const AFFINITY_V4: &str = "AFFINITY_V4";
    pub const BACKENDS: &str = "BACKENDS";
    pub const BACKEND_CONNS: &str = "BACKEND_CONNS";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const SLOTS: &str = "SLOTS";
    pub const RR_CURSORS: &str = "RR_CURSORS";
    pub const FRONTEND_STATS: &str = "FRONTEND_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const OUTCOMES: &str = "OUTCOMES";
    pub const XDP_EGRESS: &str = "XDP_EGRESS";
    pub const FRONTEND_META: &str = "FRONTEND_META";
    pub const IFACE_META: &str = "IFACE_META";
    pub const AGENT_META: &str = "AGENT_META";
    pub const POLICY_IDENTITIES_V4: &str = "POLICY_IDENTITIES_V4";
    pub const POLICY_RULES: &str = "POLICY_RULES";
    pub const POLICY_STATE: &str = "POLICY_STATE";
    pub const POLICY_STATS: &str = "POLICY_STATS";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const FLOW_LOG: &str = "FLOW_LOG";
    pub const FLOW_EVENTS_LOST: &str = "FLOW_EVENTS_LOST";

    /// Every map the agent pins, in the order it checks them.
    pub const PINNED: [&str; 24] = [
        FRONTENDS_V4,
        VIPS_V4,
        FLOWS_V4,
        REPLIES_V4,
        AFFINITY_V4,
        BACKENDS,
        BACKEND_CONNS,
        NEXT_HOPS,
        SLOTS,
        RR_CURSORS,
        FRONTEND_STATS,
        BACKEND_STATS,
        OUTCOMES,
        XDP_EGRESS,
        FRONTEND_META,
        IFACE_META,
        AGENT_META,
        POLICY_IDENTITIES_V4,
        POLICY_RULES,
        POLICY_STATE,
        POLICY_STATS,
        FLOW_EVENTS,
        FLOW_LOG,
        FLOW_EVENTS_LOST,
    ];
}

/// XDP metadata mark on a packet XDP hands to the TC companion untouched
/// ("sluice defer"): the companion acts on marked packets only.
pub const XDP_DEFER_MARK: u32 = 0x5c1d_defe;

/// Program names in the object file.
pub mod program {
    pub const XDP: &str = "sluice_xdp";
    pub const TC: &str = "sluice_tc";
    pub const TC_COMPANION: &str = "sluice_tc_companion";
}
