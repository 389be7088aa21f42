//! The data-plane maps. Names, capacities and value types come from
//! `sluice_common`; the agent pins every map here under its name.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use sluice_common::{
    layout::{
        AFFINITY_CAPACITY, DEFAULT_FLOW_CAPACITY, FLOW_EVENTS_BYTES, MAX_BACKENDS, MAX_FRONTENDS,
        MAX_INTERFACES, MAX_VIPS, POLICY_IDENTITY_CAPACITY, POLICY_RULE_CAPACITY,
        POLICY_STATS_SLOTS, SLOT_CAPACITY,
    },
    reason,
    types::{
        AffinityKeyV4, AffinityV4, AgentMeta, Backend, FlowKeyV4, FlowLogConfig, FlowV4, Frontend,
        FrontendKeyV4, FrontendMeta, IfaceMeta, NextHop, PolicyIdentity, PolicyRule, PolicyRuleKey,
        PolicyState, PolicyStats, ReplyV4, TrafficStats,
    },
};

/// Service ports. `BPF_F_NO_PREALLOC`: an update swaps in a new element and the
/// old one is freed after an RCU grace period, so a packet never reads a value
/// that is half old, half new.
#[map]
pub static FRONTENDS_V4: HashMap<FrontendKeyV4, Frontend> =
    HashMap::with_max_entries(MAX_FRONTENDS, BPF_F_NO_PREALLOC);

/// VIP addresses (value: number of service ports on it). Tells "a VIP on a port
/// with no service" (dropped) from traffic that is not Sluice's (passed).
#[map]
pub static VIPS_V4: HashMap<u32, u32> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);

/// Connection table, client → VIP direction.
#[map]
pub static FLOWS_V4: LruHashMap<FlowKeyV4, FlowV4> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Reverse NAT, backend → client direction, keyed by the reply's own 5-tuple.
#[map]
pub static REPLIES_V4: LruHashMap<FlowKeyV4, ReplyV4> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// Client-IP session affinity: the backend each client's last new flow to a
/// service port went to. LRU: a client evicted under pressure is balanced
/// afresh, which is all affinity can promise anyway.
#[map]
pub static AFFINITY_V4: LruHashMap<AffinityKeyV4, AffinityV4> =
    LruHashMap::with_max_entries(AFFINITY_CAPACITY, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Open connections per backend (atomic). Memory-mappable so the agent can return
/// the counts of flows it expires with an atomic subtraction of its own.
#[map]
pub static BACKEND_CONNS: Array<u64> = Array::with_max_entries(MAX_BACKENDS, BPF_F_MMAPABLE);

/// The cached route towards each backend, shared by all its flows.
#[map]
pub static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(MAX_BACKENDS, 0);

/// All frontends' slot tables, back to back: backend ids.
#[map]
pub static SLOTS: Array<u32> = Array::with_max_entries(SLOT_CAPACITY, 0);

/// Per-frontend round-robin cursor, shared by all CPUs (atomic), so that
/// round-robin is exact whichever CPU a new flow lands on.
#[map]
pub static RR_CURSORS: Array<u64> = Array::with_max_entries(MAX_FRONTENDS, 0);

#[map]
pub static FRONTEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_FRONTENDS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static OUTCOMES: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Egress devices that accept XDP-redirected frames (the agent keeps it in step
/// with each device's `NDO_XMIT` feature). XDP forwards only to these.
#[map]
pub static XDP_EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);

// Read by the agent only; declared here so that they are created, pinned and
// dropped together with the maps they describe.

#[map]
pub static FRONTEND_META: Array<FrontendMeta> = Array::with_max_entries(MAX_FRONTENDS, 0);

#[map]
pub static IFACE_META: Array<IfaceMeta> = Array::with_max_entries(MAX_INTERFACES, 0);

#[map]
pub static AGENT_META: Array<AgentMeta> = Array::with_max_entries(1, 0);

/// Network policy: address prefix → identity, keyed with the generation
/// first (see `policy_identity_key`).
#[map]
pub static POLICY_IDENTITIES_V4: LpmTrie<[u32; 2], PolicyIdentity> =
    LpmTrie::with_max_entries(POLICY_IDENTITY_CAPACITY, BPF_F_NO_PREALLOC);

/// Network policy: what is allowed, per generation.
#[map]
pub static POLICY_RULES: HashMap<PolicyRuleKey, PolicyRule> =
    HashMap::with_max_entries(POLICY_RULE_CAPACITY, BPF_F_NO_PREALLOC);

/// The generation in force.
#[map]
pub static POLICY_STATE: Array<PolicyState> = Array::with_max_entries(1, 0);

/// Flows allowed (per policy) and denied (per enforced destination).
#[map]
pub static POLICY_STATS: PerCpuArray<PolicyStats> =
    PerCpuArray::with_max_entries(POLICY_STATS_SLOTS, 0);

/// The flow log, for `sluicectl flows` (through the agent).
#[map]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Which flows go to the flow log (set by the agent).
#[map]
pub static FLOW_LOG: Array<FlowLogConfig> = Array::with_max_entries(1, 0);

/// Flow-log events lost to a full ring.
#[map]
pub static FLOW_EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
