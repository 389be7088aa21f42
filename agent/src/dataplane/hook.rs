//! Which hook serves each interface: native XDP or TC, decided from what the
//! kernel reports about the interface, before anything is loaded.
//!
//! Native XDP is fastest, but on interfaces with default settings it can
//! fail silently (see docs/architecture.md, "Kernel traps"):
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

use sluice_common::layout::MAX_INTERFACES;

use super::DataplaneError;
use crate::netdev::{self, InterfaceInfo};

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
