//! The data plane's lifecycle: choose a hook per interface, load the programs
//! with their pinned maps, attach (or re-point) pinned links, and tear down.
//!
//! **Which hook.** Native XDP is fastest, but on interfaces with default
//! settings it can fail silently (see docs/architecture.md, "Kernel traps"):
//! - a veth delivers packets from local sockets with offload-pending checksums
//!   (`CHECKSUM_PARTIAL`) that XDP cannot update; our XDP program detects them
//!   and defers them, untouched, to the TC companion program;
//! - frames XDP redirects into a veth whose peer has no NAPI are dropped without
//!   a trace; the kernel reports which devices accept them (`NDO_XMIT` in the
//!   device's XDP features) and XDP redirects only to those (`XDP_EGRESS`),
//!   handing everything else to the kernel stack.
//!
//! So XDP is always correct, and `auto` picks it where it pays: the driver has
//! native XDP and the interface accepts redirected frames (for a veth: its peer
//! has NAPI, as a real NIC would). Elsewhere the TCX program does all the work:
//! its checksum helpers handle partial checksums and `bpf_redirect` from TC
//! needs nothing of the peer.
//!
//! **Pins.** Maps and links are pinned (see [`crate::pins`]), so the data plane
//! keeps forwarding when the agent stops or crashes. A restarted agent loads
//! its programs against the pinned maps and swaps them into the pinned links
//! atomically (`bpf_link_update`): no packet sees an unattached interface.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use sluice_common::{
    layout::{LAYOUT_VERSION, MAX_INTERFACES, map, program},
    types::{AgentMeta, FlowLogConfig, IfaceMeta, fixed_name, hook, name_str},
};
use tracing::{info, warn};

use crate::{
    maps::{Maps, MapsError},
    netdev::{self, InterfaceInfo, NetdevError},
    objects,
    pins::{LinkKind, LinkPin, PinDir},
    sys,
};

/// `--mode`: how to pick the hook per interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Native XDP where the interface takes redirected frames, TC elsewhere.
    Auto,
    /// Native XDP (with the TC companion); refused where the driver lacks it.
    Xdp,
    /// TC only.
    Tc,
}

/// The hook chosen for an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Native XDP fast path, with the TC companion for deferred packets.
    Xdp,
    /// TCX ingress only.
    Tc,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

#[derive(Clone, Debug)]
pub struct HookChoice {
    pub interface: InterfaceInfo,
    pub hook: Hook,
    /// Why, in a few words, for logs and status.
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        #[source]
        source: NetdevError,
    },
    #[error("interface {name} is a loopback device; Sluice serves interfaces packets arrive on")]
    Loopback { name: String },
    #[error(
        "interface {name}: IPv4 forwarding is off. Sluice forwards balanced packets and hands \
         some (unresolved next hop, expiring TTL) to the kernel, which would drop them. \
         Enable it: sysctl -w net.ipv4.conf.{name}.forwarding=1 (or net.ipv4.ip_forward=1)"
    )]
    ForwardingOff { name: String },
    #[error(
        "interface {name}: driver {driver:?} has no native XDP support (features: {features}); \
         use --mode tc or --mode auto"
    )]
    NoNativeXdp {
        name: String,
        driver: String,
        features: String,
    },
    #[error("interface {name} is listed twice")]
    Duplicate { name: String },
    #[error("{count} interfaces given; at most {max} are supported")]
    TooManyInterfaces { count: usize, max: u32 },
    #[error(
        "pinned data plane in {dir} has layout version {found}, this agent uses {expected}: \
         stop the old agent and run `sluice-agent down` (drops established flows) or run an \
         agent of the matching version"
    )]
    LayoutVersion {
        dir: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "pinned map {path} does not match this agent's ({what}: pinned {pinned}, expected \
         {expected}); run `sluice-agent down` to reset the data plane"
    )]
    MapMismatch {
        path: PathBuf,
        what: &'static str,
        pinned: u32,
        expected: u32,
    },
    #[error("{op} {path}")]
    Pin {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {op}")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("link {path}: {op}")]
    Link {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning link {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("reading the object's map definitions")]
    Object(#[source] aya_obj::ParseError),
    #[error("reading map {path}")]
    MapInfo {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
}

/// Looks up `names` and picks each one's hook, or says why it cannot be served.
/// Refuses the whole set on the first problem: half-served is never an option.
pub fn choose_hooks(names: &[String], mode: Mode) -> Result<Vec<HookChoice>, DataplaneError> {
    if names.len() > MAX_INTERFACES as usize {
        return Err(DataplaneError::TooManyInterfaces {
            count: names.len(),
            max: MAX_INTERFACES,
        });
    }
    let mut out: Vec<HookChoice> = Vec::new();
    for name in names {
        if out.iter().any(|c| &c.interface.name == name) {
            return Err(DataplaneError::Duplicate { name: name.clone() });
        }
        let info = netdev::interface(name).map_err(|source| DataplaneError::Interface {
            name: name.clone(),
            source,
        })?;
        out.push(choose_hook(info, mode)?);
    }
    Ok(out)
}

/// The hook for one interface (pure: decided from what the kernel reported).
pub fn choose_hook(info: InterfaceInfo, mode: Mode) -> Result<HookChoice, DataplaneError> {
    if info.loopback {
        return Err(DataplaneError::Loopback { name: info.name });
    }
    if !info.ipv4_forwarding {
        return Err(DataplaneError::ForwardingOff { name: info.name });
    }
    let features = info.xdp_features;
    let (hook, why) = match mode {
        Mode::Tc => (Hook::Tc, "--mode tc".to_string()),
        Mode::Xdp if features.native() => (Hook::Xdp, "--mode xdp".to_string()),
        Mode::Xdp => {
            return Err(DataplaneError::NoNativeXdp {
                driver: info.driver.clone(),
                features: features.to_string(),
                name: info.name,
            });
        }
        Mode::Auto if !features.native() => (Hook::Tc, "no native XDP in the driver".to_string()),
        Mode::Auto if !features.accepts_redirect() => (
            Hook::Tc,
            "XDP-redirected frames would not be delivered (no NDO_XMIT: for a veth, its peer \
             has no NAPI)"
                .to_string(),
        ),
        Mode::Auto => (
            Hook::Xdp,
            "native XDP and the interface takes redirected frames".to_string(),
        ),
    };
    Ok(HookChoice {
        interface: info,
        hook,
        why,
    })
}

/// Sizing of the maps that are sized at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Entries of the connection table (each direction).
    pub flow_capacity: u32,
}

/// The loaded programs and their maps.
pub struct Dataplane {
    ebpf: Ebpf,
    pub maps: Maps,
    pins: Option<PinDir>,
    /// Keeps the programs' log ring buffer open; read by the agent.
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Dataplane {
    /// Loads the programs. With `pins`, maps are reused from (or created and
    /// pinned in) the pin directory, which must have passed [`prepare`].
    /// Without, they are private to this object (kernel tests).
    pub fn load(pins: Option<&PinDir>, options: &LoadOptions) -> Result<Self, DataplaneError> {
        let pin_paths: Vec<(&'static str, PathBuf)> = match pins {
            Some(p) => {
                p.create().map_err(|source| DataplaneError::Pin {
                    op: "creating",
                    path: p.path().to_path_buf(),
                    source,
                })?;
                map::PINNED.iter().map(|&n| (n, p.map(n))).collect()
            }
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(map::FLOWS_V4, options.flow_capacity)
            .map_max_entries(map::REPLIES_V4, options.flow_capacity);
        let mut ebpf = loader
            .load(objects::DATAPLANE)
            .map_err(DataplaneError::Load)?;
        // The logger must exist before programs load (aya-log 0.3 takes the
        // ring buffer's fd; dropped earlier, the load fails).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("kernel program logs unavailable: {e}");
                None
            }
        };
        for name in [program::XDP, program::TC, program::TC_COMPANION] {
            load_program(&mut ebpf, name).map_err(|source| DataplaneError::Program {
                name,
                op: "loading (verifier)",
                source,
            })?;
        }
        let maps = Maps::take_from(&mut ebpf)?;
        let mut dataplane = Self {
            ebpf,
            maps,
            pins: pins.cloned(),
            logger,
        };
        if let Some(p) = pins {
            dataplane.write_agent_meta(p)?;
        }
        Ok(dataplane)
    }

    fn write_agent_meta(&mut self, pins: &PinDir) -> Result<(), DataplaneError> {
        let mut meta = self.maps.agent_meta.get(&0, 0).unwrap_or_default();
        meta.layout_version = LAYOUT_VERSION;
        meta.netns_cookie = netdev::netns_cookie()?;
        self.maps
            .agent_meta
            .set(0, meta, 0)
            .map_err(|source| DataplaneError::MapInfo {
                path: pins.map(map::AGENT_META),
                source,
            })
    }

    /// Where its maps and links are pinned (`None` for unpinned test loads).
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Which flows the data plane reports to the flow log: one in `every`
    /// (0: none but policy refusals; 1: all).
    pub fn set_flow_log_sample(&mut self, every: u32) -> Result<(), DataplaneError> {
        let config = FlowLogConfig {
            sample_every: every,
            _pad: 0,
        };
        self.maps.flow_log.set(0, config, 0).map_err(|source| {
            DataplaneError::Maps(MapsError::Op {
                op: "setting the flow-log sample",
                name: map::FLOW_LOG,
                source,
            })
        })
    }

    /// Flow-log events the kernel could not queue (the agent fell behind).
    pub fn flow_events_lost(&self) -> u64 {
        self.maps
            .flow_events_lost
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    pub fn xdp_program(&mut self) -> &mut Xdp {
        match self.ebpf.program_mut(program::XDP) {
            Some(aya::programs::Program::Xdp(p)) => p,
            _ => unreachable!("the object defines {} as XDP", program::XDP),
        }
    }

    pub fn tc_program(&mut self, companion: bool) -> &mut SchedClassifier {
        let name = if companion {
            program::TC_COMPANION
        } else {
            program::TC
        };
        match self.ebpf.program_mut(name) {
            Some(aya::programs::Program::SchedClassifier(p)) => p,
            _ => unreachable!("the object defines {name} as a classifier"),
        }
    }

    /// Attaches so that exactly `choices` are hooked: pinned links of earlier
    /// runs are re-pointed to the programs just loaded (atomically), missing
    /// ones created and pinned, unwanted ones removed.
    pub fn attach(&mut self, choices: &[HookChoice]) -> Result<(), DataplaneError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(());
        };
        let existing = pins.link_pins().map_err(|source| DataplaneError::Pin {
            op: "listing",
            path: pins.links(),
            source,
        })?;
        // Links of interfaces no longer listed go first.
        for pin in &existing {
            let listed = choices.iter().any(|c| c.interface.ifindex == pin.ifindex);
            if !listed {
                remove_link(pin)?;
                info!(ifindex = pin.ifindex, kind = ?pin.kind, "detached from an interface no longer listed");
            }
        }
        for choice in choices {
            let ifindex = choice.interface.ifindex;
            match choice.hook {
                Hook::Xdp => {
                    // XDP first: until it runs, the companion would ignore everything.
                    self.attach_xdp(&pins, ifindex)?;
                    self.attach_tc(&pins, ifindex, true)?;
                }
                Hook::Tc => {
                    self.attach_tc(&pins, ifindex, false)?;
                    if let Some(pin) = existing
                        .iter()
                        .find(|p| p.ifindex == ifindex && p.kind == LinkKind::Xdp)
                    {
                        remove_link(pin)?;
                    }
                }
            }
            info!(
                interface = %choice.interface.name,
                ifindex,
                hook = choice.hook.as_str(),
                why = %choice.why,
                "attached"
            );
        }
        self.write_iface_meta(choices)
    }

    fn attach_tc(
        &mut self,
        pins: &PinDir,
        ifindex: u32,
        companion: bool,
    ) -> Result<(), DataplaneError> {
        let path = pins.link(ifindex, LinkKind::Tc);
        let name = if companion {
            program::TC_COMPANION
        } else {
            program::TC
        };
        let prog = self.tc_program(companion);
        let prog_err = |op| move |source| DataplaneError::Program { name, op, source };
        let (id, fresh) = match open_pinned_link(&path)? {
            Some(fd_link) => {
                let link = SchedClassifierLink::try_from(fd_link).map_err(|source| {
                    DataplaneError::Link {
                        path: path.clone(),
                        op: "reopening as a TCX link",
                        source,
                    }
                })?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(prog_err("updating the pinned TCX link"))?;
                (id, false)
            }
            None => {
                let ifname = netdev::interface_by_index(ifindex)?.name;
                let id = prog
                    .attach_with_options(
                        &ifname,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(prog_err("attaching to TCX ingress"))?;
                (id, true)
            }
        };
        let link = prog.take_link(id).map_err(prog_err("taking the link"))?;
        let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
            path: path.clone(),
            op: "converting to an fd link",
            source,
        })?;
        if fresh {
            pin_link(fd_link, &path)?;
        }
        Ok(())
    }

    fn attach_xdp(&mut self, pins: &PinDir, ifindex: u32) -> Result<(), DataplaneError> {
        let path = pins.link(ifindex, LinkKind::Xdp);
        let prog = self.xdp_program();
        let prog_err = |op| {
            move |source| DataplaneError::Program {
                name: program::XDP,
                op,
                source,
            }
        };
        let (id, fresh) = match open_pinned_link(&path)? {
            Some(fd_link) => {
                let link = XdpLink::try_from(fd_link).map_err(|source| DataplaneError::Link {
                    path: path.clone(),
                    op: "reopening as an XDP link",
                    source,
                })?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(prog_err("updating the pinned XDP link"))?;
                (id, false)
            }
            None => {
                let id = prog
                    .attach_to_if_index(ifindex, XdpMode::Driver)
                    .map_err(prog_err("attaching native XDP"))?;
                (id, true)
            }
        };
        let link = prog.take_link(id).map_err(prog_err("taking the link"))?;
        let fd_link = FdLink::try_from(link).map_err(|source| DataplaneError::Link {
            path: path.clone(),
            op: "converting to an fd link (needs bpf_link XDP)",
            source,
        })?;
        if fresh {
            pin_link(fd_link, &path)?;
        }
        Ok(())
    }

    fn write_iface_meta(&mut self, choices: &[HookChoice]) -> Result<(), DataplaneError> {
        for slot in 0..MAX_INTERFACES {
            let meta = match choices.get(slot as usize) {
                Some(c) => IfaceMeta {
                    ifindex: c.interface.ifindex,
                    hook: match c.hook {
                        Hook::Xdp => hook::XDP,
                        Hook::Tc => hook::TC,
                    },
                    name: fixed_name(&c.interface.name),
                },
                None => IfaceMeta::default(),
            };
            self.maps
                .iface_meta
                .set(slot, meta, 0)
                .map_err(|source| DataplaneError::MapInfo {
                    path: PathBuf::from(map::IFACE_META),
                    source,
                })?;
        }
        Ok(())
    }

    /// Keeps `XDP_EGRESS` equal to the managed interfaces that accept
    /// XDP-redirected frames right now. Returns (interface, accepts) for each
    /// change made.
    pub fn sync_xdp_egress(
        &mut self,
        interfaces: &[(u32, String)],
    ) -> Result<Vec<(String, bool)>, DataplaneError> {
        let mut changes = Vec::new();
        for (ifindex, name) in interfaces {
            let accepts = netdev::xdp_features(*ifindex)?.accepts_redirect();
            let listed = self.maps.xdp_egress.get(*ifindex, 0).is_ok();
            let result = match (accepts, listed) {
                (true, false) => self
                    .maps
                    .xdp_egress
                    .insert(*ifindex, *ifindex, None, 0)
                    .map_err(|e| {
                        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                            call: "devmap insert",
                            io_error: io::Error::other(e.to_string()),
                        })
                    }),
                (false, true) => self.maps.xdp_egress.remove(*ifindex),
                _ => continue,
            };
            result.map_err(|source| DataplaneError::MapInfo {
                path: PathBuf::from(map::XDP_EGRESS),
                source,
            })?;
            changes.push((name.clone(), accepts));
        }
        Ok(changes)
    }
}

/// Loads one program, retrying a few times when the verifier gives up because
/// a signal arrived meanwhile (`EAGAIN`, see bpf(2)); libbpf does the same.
/// In a multi-threaded process a child's SIGCHLD can land on any thread.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        let result = match ebpf.program_mut(name) {
            Some(aya::programs::Program::Xdp(p)) => p.load(),
            Some(aya::programs::Program::SchedClassifier(p)) => p.load(),
            _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
        };
        match result {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn open_pinned_link(path: &Path) -> Result<Option<FdLink>, DataplaneError> {
    match PinnedLink::from_pin(path) {
        Ok(pinned) => Ok(Some(FdLink::from(pinned))),
        Err(aya::programs::links::LinkError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(DataplaneError::Link {
            path: path.to_path_buf(),
            op: "opening",
            source,
        }),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<(), DataplaneError> {
    link.pin(path).map_err(|source| DataplaneError::PinLink {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Unpinning the last reference to a link detaches it.
fn remove_link(pin: &LinkPin) -> Result<(), DataplaneError> {
    match fs::remove_file(&pin.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Pin {
            op: "removing",
            path: pin.path.clone(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// What [`prepare`] found in the pin directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Nothing pinned: a new data plane.
    Fresh,
    /// A live data plane of an earlier run: reuse it (established flows survive).
    Reuse,
    /// Pins of interfaces that no longer exist were removed; starting fresh.
    Cleaned,
}

/// Checks an existing pin directory before it is reused: the layout must be
/// this agent's, and it must still serve live interfaces. Links whose interface
/// is gone are removed; a directory with no live link left is removed whole
/// (its maps describe interfaces that no longer exist), never silently reused.
pub fn prepare(pins: &PinDir) -> Result<Prepared, DataplaneError> {
    if !pins.exists() {
        return Ok(Prepared::Fresh);
    }
    let live = live_links(pins)?;
    if live == 0 {
        warn!(dir = %pins.path().display(), "pinned data plane serves no live interface; removing it");
        pins.remove_all().map_err(|source| DataplaneError::Pin {
            op: "removing",
            path: pins.path().to_path_buf(),
            source,
        })?;
        return Ok(Prepared::Cleaned);
    }
    check_layout(pins)?;
    Ok(Prepared::Reuse)
}

/// Removes links whose interface is gone (or was replaced: same index, other
/// name) and returns how many live ones remain.
fn live_links(pins: &PinDir) -> Result<usize, DataplaneError> {
    let recorded = recorded_interfaces(pins);
    let mut live = 0;
    for pin in pins.link_pins().map_err(|source| DataplaneError::Pin {
        op: "listing",
        path: pins.links(),
        source,
    })? {
        let alive = link_is_live(&pin, &recorded);
        if alive {
            live += 1;
        } else {
            warn!(link = %pin.path.display(), "removing a pinned link whose interface is gone");
            remove_link(&pin)?;
        }
    }
    Ok(live)
}

fn link_is_live(pin: &LinkPin, recorded: &[IfaceMeta]) -> bool {
    let Ok(target) = sys::pinned_link_target(&pin.path) else {
        return false;
    };
    if target.ifindex == 0 || target.ifindex != pin.ifindex {
        return false;
    }
    // The index must still name the interface it was attached to.
    let recorded_name = recorded
        .iter()
        .find(|m| m.ifindex == pin.ifindex)
        .map(|m| name_str(&m.name).to_string());
    match (netdev::interface_by_index(pin.ifindex), recorded_name) {
        (Ok(now), Some(then)) => now.name == then,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    }
}

fn recorded_interfaces(pins: &PinDir) -> Vec<IfaceMeta> {
    let Ok(data) = MapData::from_pin(pins.map(map::IFACE_META)) else {
        return Vec::new();
    };
    let Ok(array) = aya::maps::Array::<MapData, IfaceMeta>::try_from(aya::maps::Map::Array(data))
    else {
        return Vec::new();
    };
    array
        .iter()
        .filter_map(Result::ok)
        .filter(|m| m.ifindex != 0)
        .collect()
}

/// The layout version a pinned data plane records, if it can be read.
/// `AGENT_META` keeps its shape across versions so that this always can.
pub fn pinned_layout_version(pins: &PinDir) -> Option<u32> {
    let data = MapData::from_pin(pins.map(map::AGENT_META)).ok()?;
    let array =
        aya::maps::Array::<MapData, AgentMeta>::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&0, 0).ok().map(|meta| meta.layout_version)
}

/// Pinned maps must be those this agent's programs were built for.
fn check_layout(pins: &PinDir) -> Result<(), DataplaneError> {
    if let Some(found) = pinned_layout_version(pins)
        && found != LAYOUT_VERSION
    {
        return Err(DataplaneError::LayoutVersion {
            dir: pins.path().to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    let object = aya_obj::Object::parse(objects::DATAPLANE).map_err(DataplaneError::Object)?;
    for name in map::PINNED {
        let path = pins.map(name);
        let Some(def) = object.maps.get(name) else {
            continue;
        };
        let pinned = match MapData::from_pin(&path) {
            Ok(data) => data.info().map_err(|source| DataplaneError::MapInfo {
                path: path.clone(),
                source,
            })?,
            // Missing pins are created at load.
            Err(_) => continue,
        };
        let pinned_type = pinned.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        for (what, pinned, expected) in [
            ("type", pinned_type, def.map_type()),
            ("key size", pinned.key_size(), def.key_size()),
            ("value size", pinned.value_size(), def.value_size()),
        ] {
            if pinned != expected {
                return Err(DataplaneError::MapMismatch {
                    path,
                    what,
                    pinned,
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// Removes pin directories of other namespaces that serve no live interface
/// and are older than `min_age` (younger ones may belong to an agent that is
/// starting right now and has not attached yet).
pub fn collect_garbage(pins: &PinDir, min_age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(siblings) = pins.siblings() else {
        return removed;
    };
    for other in siblings {
        let old_enough = fs::metadata(other.path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= min_age);
        if !old_enough {
            continue;
        }
        let any_live = other
            .link_pins()
            .unwrap_or_default()
            .iter()
            .any(|pin| sys::pinned_link_target(&pin.path).is_ok_and(|t| t.ifindex != 0));
        if !any_live && other.remove_all().is_ok() {
            removed.push(other.path().to_path_buf());
        }
    }
    removed
}

/// `sluice-agent down`: detaches every link and unpins every map of this
/// namespace's data plane. Returns whether there was anything to remove.
pub fn down(pins: &PinDir) -> Result<bool, DataplaneError> {
    if !pins.exists() {
        return Ok(false);
    }
    for pin in pins.link_pins().map_err(|source| DataplaneError::Pin {
        op: "listing",
        path: pins.links(),
        source,
    })? {
        remove_link(&pin)?;
    }
    pins.remove_all().map_err(|source| DataplaneError::Pin {
        op: "removing",
        path: pins.path().to_path_buf(),
        source,
    })?;
    Ok(true)
}
