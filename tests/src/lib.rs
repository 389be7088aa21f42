//! Sluice's test harness: network namespaces, a fixed veth topology, real
//! servers and clients, and a handle on the real `sluice-agent` binary.
//!
//! # Topology
//!
//! [`Topology::build`] makes one client, one node (where the agent runs) and
//! `N` backends, each in its own network namespace, wired with veth pairs that
//! are created directly across namespaces:
//!
//! ```text
//!   client ns                node ns (ip_forward=1)                backend ns i (1..=N)
//! ┌──────────────────┐     ┌──────────────────────────┐          ┌─────────────────────┐
//! │ c0 198.18.1.2/24 ├─────┤ n0  198.18.1.1/24        │          │                     │
//! │ default via      │     │                          │          │                     │
//! │   198.18.1.1     │     │ nb<i> 198.19.<i>.1/24    ├──────────┤ b0 198.19.<i>.2/24  │
//! └──────────────────┘     └──────────────────────────┘          │ default via         │
//!                                                                │   198.19.<i>.1      │
//!   VIP 198.18.0.10: not on any interface; the client            └─────────────────────┘
//!   reaches it through its default route, i.e. the node.
//! ```
//!
//! With [`Offloads::NicLike`] the client end (`c0`) and every backend end
//! (`b0`) get `ethtool -K <dev> tx off gro on`: they stand for real NICs
//! (complete checksums, NAPI on receive). [`Offloads::KernelDefault`] leaves
//! veth as the kernel made it (see docs/architecture.md, "Kernel traps").
//!
//! Namespace names are `slt-<pid>-<n>-<role>` ([`NETNS_PREFIX`], the test
//! process id and a per-process counter), so tests run in parallel, in one
//! process or several, and [`netns::cleanup_stale`] (also the
//! `sluice-netns-gc` binary) can delete what a crashed run left without
//! touching a live one. Interface names (`c0`, `n0`, `nb<i>`, `b0`) only have
//! to be unique inside their namespace.
//!
//! # Safety rules this crate keeps (and test authors must keep)
//!
//! - Traffic goes only to loopback or to hosts inside namespaces the harness
//!   created; the root namespace's interfaces are never configured: every
//!   veth pair is born in its namespaces (`ip link add .. netns A type veth
//!   peer name .. netns B`), nothing ever appears in the root namespace.
//! - Every address is in the benchmarking range 198.18.0.0/15 (RFC 2544).
//! - Every traffic loop is bounded in count and time: every client call
//!   takes a timeout, servers stop in bounded time.
//! - Everything created is deleted on drop, panics included: [`Netns`],
//!   [`Topology`], [`HttpServer`], [`UdpServer`], [`Agent`] and
//!   [`ScratchDir`] are drop guards. Drop never panics; failures are logged to
//!   stderr.
//! - Sockets belong to the namespace of the thread that created them: create
//!   them inside [`Netns::enter`]; after that they can be used from any
//!   thread. Threads spawned inside `enter` inherit its namespace.

pub mod agent;
pub mod browser;
pub mod chart;
pub mod clients;
pub mod cluster;
pub mod command;
pub mod control;
pub mod control_bench;
pub mod dataplane_bench;
pub mod ha;
pub mod hollow;
pub mod hollow_bench;
pub mod lab;
pub mod loadgen;
pub mod netns;
pub mod packet;
pub mod packet_rate;
pub mod packet_rate_bench;
pub mod results;
pub mod scratch;
pub mod servers;
pub mod store_bench;
pub mod throughput;
pub mod topology;

pub use agent::{Agent, StartFailure};
pub use clients::{
    ClientError, HttpConn, http_get, http_get_from, scrape_metrics, tally, udp_exchange,
};
pub use cluster::{ClusterNode, ClusterTopology};
pub use command::CommandError;
pub use control::ControlService;
pub use netns::{NETNS_PREFIX, Netns, cleanup_stale};
pub use scratch::ScratchDir;
pub use servers::{HttpServer, UdpServer};
pub use topology::{Backend, Offloads, Topology, TopologySpec, vip};

use std::sync::atomic::{AtomicU64, Ordering};

/// A number unique within this process, for names that must not collide
/// between tests running in parallel.
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
