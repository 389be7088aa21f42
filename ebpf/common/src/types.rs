//! Keys and values of the data-plane maps.
//!
//! Rules for every type here: `#[repr(C)]`, padding spelled out as `_pad` fields
//! (so a zeroed value has no uninitialised bytes and a hash key compares equal
//! byte for byte), no `bool`/enum/`Option`, and the size asserted at compile time.
//! Addresses and ports are in network byte order.
//!
//! Per-family maps (`*_V4`) are keyed by IPv4 addresses; IPv6 gets its own maps
//! with the same value types later. Tables shared by both families ([`Backend`],
//! counters) already carry 16-byte addresses.

/// IP protocol numbers used in keys.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Address families as stored in [`Backend::family`]. Zero marks an unused entry.
pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

macro_rules! pod {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: `#[repr(C)]`, only integer fields, padding is explicit, so every
        // bit pattern is valid and there are no uninitialised bytes.
        #[cfg(feature = "user")]
        unsafe impl aya::Pod for $t {}
    )*};
}

/// Key of `FRONTENDS_V4`: one service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKeyV4 {
    pub vip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FrontendKeyV4>() == 8);

/// Backend selection algorithms, as stored in [`Frontend::algorithm`].
pub mod algorithm {
    /// Walk the slot table (each backend once).
    pub const ROUND_ROBIN: u32 = 0;
    /// Walk the slot table (backends repeated by weight, smoothly interleaved).
    pub const WEIGHTED_ROUND_ROBIN: u32 = 1;
    /// Fewest active connections among the slot list.
    pub const LEAST_CONNECTIONS: u32 = 2;
    /// Fewest active connections per unit of weight.
    pub const WEIGHTED_LEAST_CONNECTIONS: u32 = 3;
    /// Consistent hashing: the slot table is a Maglev lookup table indexed by
    /// the flow's hash (`maglev::flow_hash`).
    pub const MAGLEV: u32 = 4;
}

/// Value of `FRONTENDS_V4`. Replaced as a whole (the map is `BPF_F_NO_PREALLOC`,
/// so a reader sees the old or the new value, never a mix): a new slot table is
/// written to a fresh range of `SLOTS` first, then this value is swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index into per-frontend arrays (`RR_CURSORS`, `FRONTEND_STATS`, `FRONTEND_META`).
    pub id: u32,
    /// One of [`algorithm`].
    pub algorithm: u32,
    /// First entry of this frontend's table in `SLOTS`.
    pub slot_base: u32,
    /// Entries in the table; zero means no backend (packets are dropped and counted).
    pub slot_count: u32,
    /// Client-IP session affinity: a client's new flows follow its previous
    /// one (`AFFINITY_V4`) while it came within this many seconds; 0: off.
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Frontend>() == 24);

/// `BACKENDS[backend_id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// IPv4 in `addr[0]`, the rest zero; IPv6 uses all four words.
    pub addr: [u32; 4],
    /// Target port.
    pub port: u16,
    /// [`FAMILY_V4`], [`FAMILY_V6`], or [`FAMILY_NONE`] for a free id.
    pub family: u8,
    /// [`BACKEND_RETIRED`] once removed from the manifest: no new flows (it is in no
    /// slot table), established TCP flows finish; the id is recycled when none is left.
    /// See also [`BACKEND_DRAINING`] and [`Backend::in_rotation`].
    pub flags: u8,
    /// Weight for weighted algorithms; 0 for a backend that takes no new
    /// flows (the far side of a rollout).
    pub weight: u32,
    /// Owning frontend.
    pub frontend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Backend>() == 32);

impl Backend {
    /// Whether this backend is in frontend `frontend_id`'s slot table, told
    /// from the entry alone: user space puts exactly the backends with a
    /// weight that are neither retired nor draining in slot tables. The kernel
    /// asks before following a client's affinity, which may name a backend
    /// that has left rotation since. (A freed id is all zeroes: weight 0.)
    #[inline(always)]
    pub fn in_rotation(&self, frontend_id: u32) -> bool {
        self.frontend_id == frontend_id
            && self.flags & (BACKEND_RETIRED | BACKEND_DRAINING) == 0
            && self.weight > 0
    }
}

pub const BACKEND_RETIRED: u8 = 1;
/// In no slot table because it drains (marked so, or failing its health check);
/// unlike a retired one it stays in the service. The kernel reads `flags` only
/// to decide whether a client's affinity may still be followed.
pub const BACKEND_DRAINING: u8 = 2;

/// 5-tuple key of `FLOWS_V4` (client → VIP) and `REPLIES_V4` (backend → client).
///
/// Padding comes in naturally aligned pieces (not `[u8; 3]`): the programs are
/// built with misaligned access allowed, and LLVM zeroes a 3-byte array at
/// offset 13 with a 2-byte store at an odd stack offset, which the verifier
/// rejects. The same holds for every type built on the kernel's stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<FlowKeyV4>() == 16);

impl FlowKeyV4 {
    #[inline(always)]
    pub const fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Flow is open: it holds one count in `BACKEND_CONNS`.
pub const FLOW_OPEN: u32 = 0;
/// FIN or RST seen (or never counted): its connection count has been returned.
pub const FLOW_CLOSED: u32 = 1;

/// A cached route, so that packets skip `bpf_fib_lookup` (the costliest helper
/// on the path): per backend towards backends (`NEXT_HOPS[backend_id]`, shared
/// by all its flows, new ones included), per flow towards clients
/// ([`ReplyV4::next_hop`]). Refreshed when older than
/// `layout::NEXT_HOP_TTL_NS`, like an ARP cache; never filled from a lookup
/// that did not resolve the neighbour.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface; 0 when nothing is cached.
    pub ifindex: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the lookup.
    pub at_ns: u64,
    /// The first 12 bytes of the Ethernet header to send with: next hop's MAC,
    /// then ours. Kept as words: see ebpf/programs/src/fib.rs.
    pub l2: [u64; 2],
}
const _: () = assert!(size_of::<NextHop>() == 32);

/// Value of `FLOWS_V4`: where this client flow goes. The backend address is copied
/// here so established flows need no second lookup and survive backend removal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowV4 {
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad0: u16,
    pub backend_id: u32,
    pub frontend_id: u32,
    /// [`FLOW_OPEN`] or [`FLOW_CLOSED`]; changed only by atomic exchange so the
    /// connection count is returned exactly once, whoever sees the close first.
    pub state: u32,
    pub _pad1: u32,
    /// `bpf_ktime_get_coarse_ns` of the last packet (refreshed at most every second).
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<FlowV4>() == 32);

/// Key of `AFFINITY_V4`: one client of one service port. The frontend id is
/// part of the key so that a client's affinity to one service says nothing
/// about another on the same VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKeyV4 {
    pub frontend_id: u32,
    /// Client address.
    pub client: u32,
}
const _: () = assert!(size_of::<AffinityKeyV4>() == 8);

/// Value of `AFFINITY_V4`: the backend the client's last new flow went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityV4 {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the client's last new flow to this
    /// service: the timeout runs from there, as with Kubernetes' ClientIP
    /// affinity (kube-proxy's `recent` match sees only new connections).
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<AffinityV4>() == 16);

/// A source address no policy entry covers.
pub const IDENTITY_WORLD: u32 = 1;
/// In a rule: any source identity.
pub const IDENTITY_ANY: u32 = 0;
/// [`PolicyIdentity::flags`]: ingress is default-deny for this destination.
pub const IDENTITY_ENFORCED: u32 = 1;
/// [`PolicyIdentity::flags`]: egress is default-deny for this source.
pub const IDENTITY_EGRESS_ENFORCED: u32 = 2;
/// [`PolicyRuleKey::direction`].
pub const RULE_INGRESS: u8 = 0;
pub const RULE_EGRESS: u8 = 1;

/// The data of a `POLICY_IDENTITIES_V4` (LPM trie) key, after its prefix
/// length: the generation, then the address, both in network byte order, so
/// that a prefix length of 32 + the address prefix matches one generation's
/// entries only.
#[inline(always)]
pub const fn policy_identity_key(generation: u32, addr: u32) -> [u32; 2] {
    [generation.to_be(), addr]
}

/// Value of `POLICY_IDENTITIES_V4`: the identity of the addresses a prefix
/// covers (an endpoint's /32, or a CIDR that rules name).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyIdentity {
    pub identity: u32,
    /// [`IDENTITY_ENFORCED`], [`IDENTITY_EGRESS_ENFORCED`].
    pub flags: u32,
    /// `POLICY_STATS` slot that counts flows denied to this destination.
    pub stats_slot: u32,
    /// `POLICY_STATS` slot that counts flows this source was denied.
    pub egress_slot: u32,
}
const _: () = assert!(size_of::<PolicyIdentity>() == 16);

/// Key of `POLICY_RULES`: what one rule allows, in one generation. An
/// ingress rule is the destination's, with any source; an egress rule the
/// source's, with any destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyRuleKey {
    pub generation: u32,
    /// [`IDENTITY_ANY`] (egress rules only): every destination.
    pub dst: u32,
    /// [`IDENTITY_ANY`] (ingress rules only): every source.
    pub src: u32,
    /// The destination (target) port, network order; 0: every port.
    pub port: u16,
    /// 0: every protocol (only with port 0).
    pub proto: u8,
    /// [`RULE_INGRESS`] or [`RULE_EGRESS`].
    pub direction: u8,
}
const _: () = assert!(size_of::<PolicyRuleKey>() == 16);

/// Value of `POLICY_RULES`: the policy that allows, for its counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyRule {
    pub stats_slot: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<PolicyRule>() == 8);

/// `POLICY_STATE[0]`: the generation packets use. One array update switches
/// every node-local rule at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    pub generation: u32,
    /// 0: no destination is enforced, skip every lookup.
    pub enabled: u32,
}
const _: () = assert!(size_of::<PolicyState>() == 8);

/// Per-CPU flow verdict counters, per `POLICY_STATS` slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub allowed: u64,
    pub denied: u64,
}
const _: () = assert!(size_of::<PolicyStats>() == 16);

/// [`FlowEvent::kind`]: a flow opened (sampled).
pub const FLOW_EVENT_NEW: u8 = 1;
/// [`FlowEvent::kind`]: a TCP flow closed by FIN or RST (sampled like its opening).
pub const FLOW_EVENT_CLOSE: u8 = 2;
/// [`FlowEvent::kind`]: a packet to a VIP dropped, [`FlowEvent::reason`] says why
/// (sampled, except network-policy refusals, which are all reported).
pub const FLOW_EVENT_DROP: u8 = 3;

/// [`FlowEvent::verdict`]: no network policy applied to the flow.
pub const POLICY_NONE: u8 = 0;
/// [`FlowEvent::verdict`]: a policy rule allowed it ([`FlowEvent::stats_slot`] counted it).
pub const POLICY_ALLOWED: u8 = 1;
/// [`FlowEvent::verdict`]: network policy refused it.
pub const POLICY_DENIED: u8 = 2;

/// [`FlowEvent::reason`] of a close: the TCP flag that ended the flow.
pub const CLOSE_FIN: u8 = 1;
pub const CLOSE_RST: u8 = 2;

/// [`FlowEvent::frontend_id`] of a drop before any service port matched.
pub const NO_FRONTEND: u32 = u32::MAX;

/// One flow-log record, as `FLOW_EVENTS` (a ring buffer) carries it to the
/// agent. Addresses and ports in network order.
///
/// Fields are ordered so that every 8-byte word of the record is 8-byte
/// aligned: LLVM merges adjacent constant stores into one 64-bit store, and
/// the verifier refuses a misaligned one on the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_coarse_ns`.
    pub time_ns: u64,
    pub client: u32,
    pub vip: u32,
    /// 0 when no backend was chosen (a drop before balancing).
    pub backend: u32,
    /// The service port's id, or [`NO_FRONTEND`].
    pub frontend_id: u32,
    /// `POLICY_STATS` slot that counted the policy verdict, if any.
    pub stats_slot: u32,
    /// [`FLOW_EVENT_NEW`], [`FLOW_EVENT_CLOSE`] or [`FLOW_EVENT_DROP`].
    pub kind: u8,
    /// [`POLICY_NONE`], [`POLICY_ALLOWED`] or [`POLICY_DENIED`].
    pub verdict: u8,
    pub _pad: u16,
    pub client_port: u16,
    pub vip_port: u16,
    pub backend_port: u16,
    pub proto: u8,
    /// A drop: one of [`crate::reason`]; a close: [`CLOSE_FIN`] or [`CLOSE_RST`].
    pub reason: u8,
}
const _: () = assert!(size_of::<FlowEvent>() == 40);

/// `FLOW_LOG[0]`: which flows the data plane reports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowLogConfig {
    /// 0: none (policy refusals are reported all the same); 1: every flow;
    /// N: one flow in N, chosen by the hash of its 5-tuple, so that a flow's
    /// opening and closing are reported together or not at all.
    pub sample_every: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowLogConfig>() == 8);

/// Value of `REPLIES_V4`: how to make a backend's reply look like it came from the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyV4 {
    pub vip: u32,
    pub vport: u16,
    pub _pad: u16,
    pub backend_id: u32,
    pub frontend_id: u32,
    /// Refreshed like [`FlowV4::last_seen_ns`]; a flow is idle only when both are.
    pub last_seen_ns: u64,
    pub next_hop: NextHop,
}
const _: () = assert!(size_of::<ReplyV4>() == 56);

/// Per-CPU traffic counters, per frontend and per backend.
/// "fwd" is client → backend, "rev" is backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficStats {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(size_of::<TrafficStats>() == 40);

impl TrafficStats {
    /// Sum of per-CPU values.
    pub fn add(&mut self, other: &Self) {
        let Self {
            fwd_packets,
            fwd_bytes,
            rev_packets,
            rev_bytes,
            new_flows,
        } = other;
        self.fwd_packets += fwd_packets;
        self.fwd_bytes += fwd_bytes;
        self.rev_packets += rev_packets;
        self.rev_bytes += rev_bytes;
        self.new_flows += new_flows;
    }
}

/// Name stored for status: `FRONTEND_META[frontend_id]`. The kernel never reads it.
pub const NAME_LEN: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendMeta {
    /// Service name, NUL-padded UTF-8.
    pub name: [u8; NAME_LEN],
    /// Target port in host order (the backends carry it too; kept for display of
    /// frontends without backends).
    pub target_port: u16,
    /// Non-zero when this id is in use.
    pub in_use: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}
const _: () = assert!(size_of::<FrontendMeta>() == 136);

impl Default for FrontendMeta {
    fn default() -> Self {
        Self {
            name: [0; NAME_LEN],
            target_port: 0,
            in_use: 0,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// How packets are hooked on an interface, in `IfaceMeta::hook`.
pub mod hook {
    pub const NONE: u32 = 0;
    /// TCX ingress program only.
    pub const TC: u32 = 1;
    /// Native XDP fast path, with the TCX program for what XDP hands up.
    pub const XDP: u32 = 2;
}

/// `IFACE_META[i]`: an interface the agent manages, for status and restarts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceMeta {
    pub ifindex: u32,
    /// One of [`hook`].
    pub hook: u32,
    /// NUL-padded interface name (IFNAMSIZ).
    pub name: [u8; 16],
}
const _: () = assert!(size_of::<IfaceMeta>() == 24);

/// `AGENT_META[0]`: facts about the pinned data plane itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentMeta {
    /// [`crate::layout::LAYOUT_VERSION`] of the agent that created the maps.
    pub layout_version: u32,
    pub _pad: u32,
    /// Network namespace cookie the maps belong to.
    pub netns_cookie: u64,
    /// FNV-1a hash of the last manifest applied, zero if none.
    pub manifest_hash: u64,
    /// Unix time (seconds) of the last successful reconcile.
    pub applied_at: u64,
}
const _: () = assert!(size_of::<AgentMeta>() == 32);

pod!(
    FrontendKeyV4,
    Frontend,
    Backend,
    FlowKeyV4,
    FlowV4,
    AffinityKeyV4,
    AffinityV4,
    PolicyIdentity,
    PolicyRuleKey,
    PolicyRule,
    PolicyState,
    PolicyStats,
    FlowEvent,
    FlowLogConfig,
    NextHop,
    ReplyV4,
    TrafficStats,
    FrontendMeta,
    IfaceMeta,
    AgentMeta,
);

/// Copies `s` into a NUL-padded fixed array, truncating at a char boundary.
pub fn fixed_name<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// The string in a NUL-padded fixed array (invalid UTF-8 is cut at the first bad byte).
pub fn name_str(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_truncate_on_char_boundary() {
        let n: [u8; 16] = fixed_name("eth0");
        assert_eq!(name_str(&n), "eth0");
        let n: [u8; 4] = fixed_name("añb");
        assert_eq!(name_str(&n), "añb");
        let n: [u8; 3] = fixed_name("añb");
        assert_eq!(name_str(&n), "añ");
        let n: [u8; 2] = fixed_name("añb");
        assert_eq!(name_str(&n), "a");
    }

    #[test]
    fn only_weighted_active_backends_of_the_frontend_are_in_rotation() {
        let active = Backend {
            family: FAMILY_V4,
            weight: 1,
            frontend_id: 7,
            ..Default::default()
        };
        assert!(active.in_rotation(7));
        assert!(!active.in_rotation(8), "another frontend's backend");
        for flags in [BACKEND_RETIRED, BACKEND_DRAINING] {
            assert!(!Backend { flags, ..active }.in_rotation(7), "flags {flags}");
        }
        assert!(
            !Backend {
                weight: 0,
                ..active
            }
            .in_rotation(7),
            "no share"
        );
        assert!(!Backend::default().in_rotation(0), "a free id");
    }
}
