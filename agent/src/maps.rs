//! Typed handles on the data-plane maps, opened from pins (the running agent,
//! `status`, `down`) or taken from a freshly loaded object (kernel tests).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{
        Array, DevMapHash, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        RingBuf,
    },
    util::nr_cpus,
};
use sluice_common::{
    layout::{MAX_BACKENDS, map},
    reason,
    types::{
        AffinityKeyV4, AffinityV4, AgentMeta, Backend, FlowKeyV4, FlowLogConfig, FlowV4, Frontend,
        FrontendKeyV4, FrontendMeta, IfaceMeta, NextHop, PolicyIdentity, PolicyRule, PolicyRuleKey,
        PolicyState, PolicyStats, ReplyV4, TrafficStats,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path}")]
    OpenPin {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("map {name} is missing from the object")]
    Missing { name: &'static str },
    #[error("map {name} has an unexpected type")]
    WrongType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} on map {name}")]
    Op {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("counting possible CPUs ({path})")]
    Cpus {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("memory-mapping {name}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// All data-plane maps. Fields are public: reconcile, reaper and status each
/// use a few of them; this type only knows how to open them.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKeyV4, Frontend>,
    pub vips: HashMap<MapData, u32, u32>,
    pub flows: HashMap<MapData, FlowKeyV4, FlowV4>,
    pub replies: HashMap<MapData, FlowKeyV4, ReplyV4>,
    pub affinity: HashMap<MapData, AffinityKeyV4, AffinityV4>,
    pub backends: Array<MapData, Backend>,
    pub conns: ConnCounters,
    pub next_hops: Array<MapData, NextHop>,
    pub slots: Array<MapData, u32>,
    pub rr_cursors: Array<MapData, u64>,
    pub frontend_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub outcomes: PerCpuArray<MapData, u64>,
    pub xdp_egress: DevMapHash<MapData>,
    pub frontend_meta: Array<MapData, FrontendMeta>,
    pub iface_meta: Array<MapData, IfaceMeta>,
    pub agent_meta: Array<MapData, AgentMeta>,
    pub policy_identities: LpmTrie<MapData, [u32; 2], PolicyIdentity>,
    pub policy_rules: HashMap<MapData, PolicyRuleKey, PolicyRule>,
    pub policy_state: Array<MapData, PolicyState>,
    pub policy_stats: PerCpuArray<MapData, PolicyStats>,
    /// Taken by the run loop, which reads it.
    pub flow_events: Option<RingBuf<MapData>>,
    pub flow_log: Array<MapData, FlowLogConfig>,
    pub flow_events_lost: PerCpuArray<MapData, u64>,
}

/// Where to get a map from.
trait Source {
    fn take(&mut self, name: &'static str) -> Result<Map, MapsError>;
}

struct Pins(PathBuf);

impl Source for Pins {
    fn take(&mut self, name: &'static str) -> Result<Map, MapsError> {
        let path = self.0.join(name);
        let data = MapData::from_pin(&path).map_err(|source| MapsError::OpenPin {
            path: path.clone(),
            source,
        })?;
        Map::from_map_data(data).map_err(|source| MapsError::OpenPin { path, source })
    }
}

impl Source for &mut Ebpf {
    fn take(&mut self, name: &'static str) -> Result<Map, MapsError> {
        self.take_map(name).ok_or(MapsError::Missing { name })
    }
}

macro_rules! typed {
    ($source:expr, $name:expr) => {{
        let name: &'static str = $name;
        $source
            .take(name)?
            .try_into()
            .map_err(|source| MapsError::WrongType { name, source })?
    }};
}

impl Maps {
    /// Opens the maps pinned in `dir` (a `PinDir::maps()` directory).
    pub fn open_pinned(dir: PathBuf) -> Result<Self, MapsError> {
        Self::from_source(Pins(dir))
    }

    /// Takes the maps out of a loaded object (its programs keep their own
    /// references, so they stay valid).
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Self::from_source(ebpf)
    }

    fn from_source(mut source: impl Source) -> Result<Self, MapsError> {
        let conns_map: Array<MapData, u64> = typed!(source, map::BACKEND_CONNS);
        Ok(Self {
            frontends: typed!(source, map::FRONTENDS_V4),
            vips: typed!(source, map::VIPS_V4),
            flows: typed!(source, map::FLOWS_V4),
            replies: typed!(source, map::REPLIES_V4),
            affinity: typed!(source, map::AFFINITY_V4),
            backends: typed!(source, map::BACKENDS),
            conns: ConnCounters::new(conns_map)?,
            next_hops: typed!(source, map::NEXT_HOPS),
            slots: typed!(source, map::SLOTS),
            rr_cursors: typed!(source, map::RR_CURSORS),
            frontend_stats: typed!(source, map::FRONTEND_STATS),
            backend_stats: typed!(source, map::BACKEND_STATS),
            outcomes: typed!(source, map::OUTCOMES),
            xdp_egress: typed!(source, map::XDP_EGRESS),
            frontend_meta: typed!(source, map::FRONTEND_META),
            iface_meta: typed!(source, map::IFACE_META),
            agent_meta: typed!(source, map::AGENT_META),
            policy_identities: typed!(source, map::POLICY_IDENTITIES_V4),
            policy_rules: typed!(source, map::POLICY_RULES),
            policy_state: typed!(source, map::POLICY_STATE),
            policy_stats: typed!(source, map::POLICY_STATS),
            flow_events: Some(typed!(source, map::FLOW_EVENTS)),
            flow_log: typed!(source, map::FLOW_LOG),
            flow_events_lost: typed!(source, map::FLOW_EVENTS_LOST),
        })
    }

    /// Sum over CPUs of a frontend's or backend's traffic counters.
    pub fn traffic(
        stats: &PerCpuArray<MapData, TrafficStats>,
        id: u32,
        name: &'static str,
    ) -> Result<TrafficStats, MapsError> {
        let per_cpu = stats.get(&id, 0).map_err(|source| MapsError::Op {
            op: "reading counters",
            name,
            source,
        })?;
        let mut total = TrafficStats::default();
        for s in per_cpu.iter() {
            total.add(s);
        }
        Ok(total)
    }

    /// Zeroes a traffic counter slot on every CPU (a recycled id starts clean).
    pub fn reset_traffic(
        stats: &mut PerCpuArray<MapData, TrafficStats>,
        id: u32,
        name: &'static str,
    ) -> Result<(), MapsError> {
        let op = |source| MapsError::Op {
            op: "resetting counters",
            name,
            source,
        };
        let cpus = nr_cpus().map_err(|(path, source)| MapsError::Cpus { path, source })?;
        let zeros =
            PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).map_err(|source| {
                MapsError::Cpus {
                    path: "/sys/devices/system/cpu/possible",
                    source,
                }
            })?;
        stats.set(id, zeros, 0).map_err(op)
    }

    /// Per-reason outcome totals, summed over CPUs, keyed by reason name.
    pub fn outcomes(&self) -> Result<BTreeMap<&'static str, u64>, MapsError> {
        let mut out = BTreeMap::new();
        for (i, name) in reason::NAMES.iter().enumerate() {
            let per_cpu = self
                .outcomes
                .get(&(i as u32), 0)
                .map_err(|source| MapsError::Op {
                    op: "reading outcomes",
                    name: map::OUTCOMES,
                    source,
                })?;
            out.insert(*name, per_cpu.iter().sum());
        }
        Ok(out)
    }
}

/// `BACKEND_CONNS`, memory-mapped. The kernel adds and subtracts with BPF
/// atomics; when the agent expires a flow it must subtract too, atomically with
/// respect to them, which a map update (read, modify, write back) cannot do.
pub struct ConnCounters {
    _map: Array<MapData, u64>,
    base: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics.
unsafe impl Send for ConnCounters {}
// SAFETY: as above.
unsafe impl Sync for ConnCounters {}

impl ConnCounters {
    fn new(map: Array<MapData, u64>) -> Result<Self, MapsError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let len = MAX_BACKENDS as usize;
        let bytes = len * size_of::<u64>();
        let fd = map.inner_fd();
        // SAFETY: mapping a BPF_F_MMAPABLE array map of `len` u64 values; the
        // kernel keeps the pages alive while mapped; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MapsError::Mmap {
                name: map::BACKEND_CONNS,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(MapsError::Mmap {
            name: map::BACKEND_CONNS,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Self {
            _map: map,
            base,
            len,
        })
    }

    fn slot(&self, backend_id: u32) -> Option<&AtomicU64> {
        let i = backend_id as usize;
        // SAFETY: in bounds of the mapping, which lives as long as self;
        // AtomicU64 has the layout of u64 and the array is 8-byte aligned.
        (i < self.len).then(|| unsafe { self.base.add(i).as_ref() })
    }

    /// Open connections of a backend.
    pub fn get(&self, backend_id: u32) -> u64 {
        self.slot(backend_id)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    /// Returns one connection (a flow expired by the agent).
    pub fn release(&self, backend_id: u32) {
        if let Some(c) = self.slot(backend_id) {
            c.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Starts a recycled backend id at zero.
    pub fn reset(&self, backend_id: u32) {
        if let Some(c) = self.slot(backend_id) {
            c.store(0, Ordering::SeqCst);
        }
    }
}

impl Drop for ConnCounters {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len * size_of::<u64>());
        }
    }
}

/// The fd behind a typed map, for mmap.
trait InnerFd {
    fn inner_fd(&self) -> &aya::maps::MapFd;
}

impl InnerFd for Array<MapData, u64> {
    fn inner_fd(&self) -> &aya::maps::MapFd {
        use aya::maps::IterableMap as _;
        self.map().fd()
    }
}
