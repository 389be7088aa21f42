//! Parts 1 and 2 of `cargo xtask bench`: what one packet costs in Sluice's
//! XDP program, and whether that cost stays flat as services and backends
//! grow.
//!
//! Every row is `BPF_PROG_TEST_RUN` with `repeat` runs on one crafted frame,
//! in a lab namespace whose routes and neighbours are real, so the figure
//! includes the FIB lookup and the redirect decision. Beside them, in the same
//! run: the hook's floor (parse Ethernet/IPv4, swap MACs, `XDP_TX`).
//!
//! A test run with `repeat` reuses one buffer: a program that rewrites the
//! packet (DNAT) would see its own output from the second run on and measure
//! its pass-through path. So the rewriting rows run through a harness that
//! copies the original frame back before tail-calling the data plane (and,
//! for new flows, gives every run a new 5-tuple). The harness alone is
//! measured too and subtracted. Each row then proves, by the data plane's own
//! counters, that every run took the path the row names.
//!
//! Part 1 is `paths`, part 2 `scaling`; both run their rows through
//! `harness`, and `render` prints their reports.

mod harness;
mod paths;
mod render;
mod scaling;

use std::net::Ipv4Addr;

use serde::Serialize;

pub use paths::{Report, dataplane};
pub use render::{render_dataplane, render_scaling};
pub use scaling::{
    SCALE_ROWS, SCALES, ScaleCase, ScalingReport, capacity_check, pool_addr, scale_manifest,
    scale_vip, scaling,
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const FRAME: usize = 64;
/// A client no rule admits (no identity: "world"), for the denied rows.
const DENIED_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 2);

/// How long each row runs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub repeat: u32,
    pub rounds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    /// Median over rounds, on the scale of the XDP_PASS row: a harnessed row
    /// is measured − harness + XDP_PASS, i.e. the hook's own cost plus the
    /// program's (the tail call's few ns stay in, to our disadvantage).
    pub ns_per_packet: f64,
    /// Per-round figures as measured (before subtraction).
    pub rounds_ns: Vec<f64>,
    pub via_harness: bool,
    /// The counter that proves the path, and by how much it moved per round.
    pub path_counter: &'static str,
    pub path_counter_delta: u64,
}
