//! Loading the programs against their pinned maps and attaching them through
//! pinned links: what a start (first or restart) does once the hooks are
//! chosen.
//!
//! Maps and links are pinned (see [`crate::pins`]), so the data plane keeps
//! forwarding when the agent stops or crashes. A restarted agent loads its
//! programs against the pinned maps and swaps them into the pinned links
//! atomically (`bpf_link_update`): no packet sees an unattached interface.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use sluice_common::{
    layout::{LAYOUT_VERSION, MAX_INTERFACES, map, program},
    types::{FlowLogConfig, IfaceMeta, fixed_name, hook},
};
use tracing::{info, warn};

use super::{DataplaneError, Hook, HookChoice, pinned::remove_link};
use crate::{
    maps::{Maps, MapsError},
    netdev, objects,
    pins::{LinkKind, PinDir},
};

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
    /// pinned in) the pin directory, which must have passed
    /// [`prepare`](super::prepare). Without, they are private to this object
    /// (kernel tests).
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
