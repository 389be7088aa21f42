//! Sluice's per-node agent as a library; `sluice-agent` (src/main.rs) is a thin
//! command-line shell around it.
//!
//! | module | what it does |
//! |---|---|
//! | [`reconcile`] | desired state → map operations (pure) |
//! | [`apply`] | executes plans on the maps; reads them back |
//! | [`dataplane`] | hook choice, loading, pinned links, `down` |
//! | [`agent`] | `run`: start-up, the sources of the run loop, the reconciler they feed |
//! | [`flowlog`] | the data plane's flow log, read and named |
//! | [`reaper`] | idle-flow expiry |
//! | [`health`] | health probes; unhealthy backends leave rotation |
//! | [`drain`] | drain timeouts: when a drained backend's flows end |
//! | [`policy`] | network policy: compiled form, reference evaluation, atomic install |
//! | [`status`] | `status`: report from the pinned maps |
//! | [`maps`], [`pins`], [`objects`], [`netdev`], [`sys`], [`alloc`] | supporting pieces |

pub mod agent;
pub mod alloc;
pub mod apply;
pub mod controlplane;
pub mod dataplane;
pub mod drain;
pub mod flowlog;
pub mod health;
pub mod maps;
pub mod metrics;
pub mod netdev;
pub mod objects;
pub mod pins;
pub mod policy;
pub mod reaper;
pub mod reconcile;
pub mod status;
pub mod sys;
