//! `cargo xtask demo`: a cluster balancing a service VIP in the kernel,
//! driven through the control service.
//!
//! Builds a control namespace, two nodes (each serving its own client) and
//! three backends on a shared fabric (real HTTP and UDP servers in the
//! backends), all in network namespaces (see `sluice_tests::cluster`). Starts
//! `sluice-control`, joins a `sluice-agent` on each node with a one-time
//! token, applies control/manifests/web.yaml with `sluicectl`, sends real
//! traffic through both nodes to the VIP the control service allocated and
//! shows where it went; then adds a backend and changes the algorithm live
//! through the control service, kills the control service under an open
//! connection to show that forwarding does not depend on it, adds a health
//! check and kills a backend's server (both nodes take it out of rotation, no
//! request fails; restarted, it returns), rolls out version v2 as a 10%
//! canary, a blue-green switch and an undo, and applies a network policy that
//! admits one node's clients only (the other's are dropped in the kernel and
//! listed by `sluicectl flows`). Every namespace,
//! process and pin is removed at the end, also on failure.
//!
//! `--standalone` runs the agent alone instead: one node with
//! agent/manifests/web.yaml, no control service (a live manifest change, UDP
//! stickiness, `kill -9` of the agent, `sluice-agent status`). `--nic-like`
//! (which implies `--standalone`) sets its client and backend ends to
//! `tx off, gro on` (as real NICs), where the agent picks native XDP instead
//! of TC.
//!
//! `--ha` runs the control plane replicated instead: three replicas on a
//! 3-member etcd, a replica killed under traffic (see `ha`).
//!
//! The flows are `cluster`, `standalone` and `ha`, each one function in the
//! order of its steps; `introspection` is the cluster flow's step 11,
//! `sluicectl` its calls to the control service; `traffic` and `output` are
//! what both send and print.

mod cluster;
mod ha;
mod introspection;
mod output;
mod sluicectl;
mod standalone;
mod traffic;

use std::time::Duration;

use anyhow::bail;

use crate::{cluster::cluster, standalone::standalone};

const EXAMPLE: &str = include_str!("../../../../agent/manifests/web.yaml");
/// What `sluicectl apply -f control/manifests/web.yaml` applies.
const CLUSTER_EXAMPLE: &str = include_str!("../../../../control/manifests/web.yaml");
const TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on an applied change reaching every node, and on an agent
/// reconnecting to a restarted control service.
const PROPAGATION: Duration = Duration::from_secs(20);
/// Comfortably past the demo's health-check bound (2 × 200 ms + 100 ms).
const HEALTH_WAIT: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: sluice-demo [--standalone] [--nic-like] [--ha]
  (no option)   two nodes joined to sluice-control, driven with sluicectl
  --ha          three sluice-control replicas on etcd, one killed under traffic
  --standalone  one sluice-agent with a manifest file, no control service
  --nic-like    the standalone demo with NIC-like veth ends (native XDP)";

fn main() -> anyhow::Result<()> {
    let mut standalone_flow = false;
    let mut nic_like = false;
    let mut ha_flow = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--standalone" => standalone_flow = true,
            "--nic-like" => nic_like = true,
            "--ha" => ha_flow = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if ha_flow {
        ha::ha()
    } else if standalone_flow || nic_like {
        standalone(nic_like)
    } else {
        cluster()
    }
}
