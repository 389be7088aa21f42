//! The in-kernel traffic generator of the packet-rate benchmark, and its
//! sink (`bench_gen`, `bench_sink` in ebpf/programs/src/bin/bench.rs).
//!
//! [`Generator::run`] is `BPF_PROG_TEST_RUN` of the generator with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, its ingress the sending veth: every frame
//! the generator returns `XDP_TX` for is transmitted to the veth's peer. The
//! sink, attached (XDP) where the frames end up, counts them by destination
//! address and port and drops them; a receiving veth needs an XDP program
//! (or GRO) for NAPI, or the run reports success and nothing arrives. Rates
//! come from the kernel's loop time (`duration`, per frame), not wall time:
//! each call sleeps some 30 ms after its loop, tearing its page pool down.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, PerCpuHashMap},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};

use crate::netns::Netns;

/// The flows a run's frames belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Every frame the template's: one established flow.
    OneFlow,
    /// A new source port and address every frame.
    NewFlows,
    /// That many flows, cycled.
    WorkingSet(u32),
}

const XDP_TX: u32 = 3;

/// Frames per batch the kernel builds before it runs them.
const BATCH: u32 = 64;

/// The generator and the sink, loaded.
pub struct Generator {
    ebpf: Ebpf,
    /// Where the sink is attached (detached with the programs).
    sinks: Vec<XdpLinkId>,
}

impl Generator {
    pub fn load() -> anyhow::Result<Self> {
        let mut ebpf =
            Ebpf::load(sluice_agent::objects::BENCH).context("loading the bench object")?;
        for name in ["bench_gen", "bench_sink"] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        Ok(Self {
            ebpf,
            sinks: Vec::new(),
        })
    }

    /// Attaches the sink to `iface` in `ns` (driver mode: veth runs XDP
    /// natively).
    pub fn attach_sink(&mut self, ns: &Netns, iface: &str) -> anyhow::Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("bench_sink")
            .context("bench_sink")?
            .try_into()?;
        let link = ns.enter(|| prog.attach(iface, XdpMode::Driver))?;
        self.sinks.push(link);
        Ok(())
    }

    /// The template every frame starts from (its first 64 bytes).
    pub fn set_frame(&mut self, frame: &[u8; 64]) -> anyhow::Result<()> {
        let mut map: Array<_, [u8; 64]> =
            Array::try_from(self.ebpf.map_mut("GEN_FRAME").context("GEN_FRAME")?)?;
        map.set(0, frame, 0)?;
        Ok(())
    }

    pub fn set_shape(&mut self, shape: Shape) -> anyhow::Result<()> {
        let mut map: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("GEN_CONFIG").context("GEN_CONFIG")?)?;
        let (code, size) = match shape {
            Shape::OneFlow => (0, 0),
            Shape::NewFlows => (1, 0),
            Shape::WorkingSet(n) => (2, n),
        };
        map.set(0, code, 0)?;
        map.set(1, size, 0)?;
        Ok(())
    }

    fn program(&self) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program("bench_gen")
            .context("bench_gen")?
            .try_into()?)
    }

    /// Sends `frames` frames out of `iface` in `ns` (a veth: they arrive at
    /// its peer); the kernel's loop time per frame, in nanoseconds.
    pub fn run(&self, ns: &Netns, iface: &str, frames: u32) -> anyhow::Result<f64> {
        let prog = self.program()?;
        let template = [0u8; 64];
        let duration = ns.enter(|| -> anyhow::Result<u32> {
            let ifindex = nix_ifindex(iface)?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
            // rx_queue_index, egress_ifindex.
            let ctx: Vec<u8> = [0u32, 64, 0, ifindex, 0, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            let result = prog.test_run(TestRunOptions {
                data_in: Some(&template),
                ctx_in: Some(&ctx),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })?;
            Ok(result.duration.as_nanos() as u32)
        })?;
        if duration == 0 && frames > 0 {
            bail!("the generator ran no frames");
        }
        Ok(f64::from(duration))
    }

    /// One frame as the generator makes it, without sending it (an
    /// ordinary test run): to check what it writes.
    pub fn make_one(&self) -> anyhow::Result<Vec<u8>> {
        let prog = self.program()?;
        let template = [0u8; 64];
        let mut out = vec![0u8; 64];
        let result = prog.test_run(TestRunOptions {
            data_in: Some(&template),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        if result.return_value != XDP_TX {
            bail!("the generator returned {}", result.return_value);
        }
        Ok(out)
    }

    /// What the sink counted so far, by (destination, port).
    pub fn seen(&self) -> anyhow::Result<BTreeMap<(Ipv4Addr, u16), u64>> {
        let map: PerCpuHashMap<_, u64, u64> =
            PerCpuHashMap::try_from(self.ebpf.map("SINK_SEEN").context("SINK_SEEN")?)?;
        let mut out = BTreeMap::new();
        for entry in map.iter() {
            let (key, counts) = entry?;
            let daddr = (key >> 16) as u32;
            let dport = key as u16;
            let addr = Ipv4Addr::from(daddr.to_ne_bytes());
            *out.entry((addr, u16::from_be(dport))).or_insert(0) += counts.iter().sum::<u64>();
        }
        Ok(out)
    }

    /// Forgets what the sink counted.
    pub fn clear_seen(&mut self) -> anyhow::Result<()> {
        let mut map: PerCpuHashMap<_, u64, u64> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("SINK_SEEN").context("SINK_SEEN")?)?;
        let keys: Vec<u64> = map.keys().collect::<Result<_, _>>()?;
        for key in keys {
            map.remove(&key)?;
        }
        Ok(())
    }
}

/// The index of `iface` in the calling thread's namespace.
fn nix_ifindex(iface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface}: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}
