//! The data plane's lifecycle: choose a hook per interface, load the programs
//! with their pinned maps, attach (or re-point) pinned links, and tear down.
//!
//! - `hook`: which hook (native XDP or TC) serves each interface, and why
//!   XDP is only chosen where it is both correct and worth it
//!   ([`choose_hooks`]);
//! - `load`: loading against the pinned maps, attaching through pinned links
//!   that a restart re-points atomically ([`Dataplane`]);
//! - `pinned`: what an earlier run pinned: checked before reuse
//!   ([`prepare`]), collected when dead ([`collect_garbage`]), removed by
//!   `sluice-agent down` ([`down`]).
//!
//! They share one error type, [`DataplaneError`]: a start fails on the first
//! problem, whichever step finds it.

mod hook;
mod load;
mod pinned;

use std::{io, path::PathBuf};

pub use hook::{Hook, HookChoice, Mode, choose_hook, choose_hooks};
pub use load::{Dataplane, LoadOptions};
pub use pinned::{Prepared, collect_garbage, down, pinned_layout_version, prepare};

use crate::{maps::MapsError, netdev::NetdevError};

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
