//! A lab for the kernel programs: a private network namespace with routes and
//! static neighbours (so `bpf_fib_lookup` has real answers), the data plane
//! loaded unpinned into it with a manifest applied through the agent's own
//! reconcile code, and `BPF_PROG_TEST_RUN` on the XDP and TC programs.
//!
//! ```text
//!  lab namespace (ip_forward=1)
//!    n0   198.18.1.1/24   neighbour 198.18.1.2 (the client)   02:00:00:00:00:02
//!    nb1  198.19.1.1/24   neighbour 198.19.1.2                02:00:00:00:01:02
//!    nb2  198.19.2.1/24   neighbour 198.19.2.2                02:00:00:00:02:02
//!    nb3  198.19.3.1/24   neighbour 198.19.3.2                02:00:00:00:03:02
//!    nb4  198.19.4.1/24   no neighbour entry: the first packet finds NO_NEIGH
//! ```
//! The namespace belongs to one thread (`unshare`), so the lab disappears with
//! it; nothing is created elsewhere.

use std::{collections::BTreeMap, net::Ipv4Addr, process::Command};

use aya::programs::{TestRun as _, TestRunOptions};
use sluice_agent::{
    apply,
    dataplane::{Dataplane, LoadOptions},
    reconcile,
};
use sluice_common::{
    layout::map,
    types::{AffinityKeyV4, AffinityV4, FlowEvent, FlowKeyV4, FlowV4, TrafficStats},
};
use sluice_model::manifest;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub fn backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, i, 2)
}

pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, i, 0x02]
}

/// What a test run returned.
#[derive(Debug)]
pub struct Run {
    pub action: u32,
    /// The frame after the program, from its first byte (XDP metadata, if
    /// any, is in `meta`).
    pub frame: Vec<u8>,
    pub meta: Vec<u8>,
}

pub struct Lab {
    pub dataplane: Dataplane,
    state: reconcile::State,
    alloc: reconcile::Allocator,
    ifindex: BTreeMap<String, u32>,
}

/// Runs `f` with a lab whose maps hold `manifest`.
pub fn with_lab<T: Send>(manifest: &str, f: impl FnOnce(&mut Lab) -> T + Send) -> T {
    with_edited_lab(manifest, |_| {}, f)
}

/// Like [`with_lab`], with `edit` applied to the map operations the agent's
/// reconcile plans for `manifest` before they are applied: a benchmark can
/// program sizes a manifest cannot express (more backends in one service
/// than the manifest rules allow, say).
pub fn with_edited_lab<T: Send>(
    manifest: &str,
    edit: impl FnOnce(&mut Vec<reconcile::Step>) + Send,
    f: impl FnOnce(&mut Lab) -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare only affects this thread, which owns the namespace
                // for the rest of its life.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "unshare(CLONE_NEWNET): {}",
                    std::io::Error::last_os_error()
                );
                let mut lab = Lab::build(manifest, edit);
                f(&mut lab)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Lab {
    fn build(manifest_text: &str, edit: impl FnOnce(&mut Vec<reconcile::Step>)) -> Self {
        sh(&["ip", "link", "set", "lo", "up"]);
        // /proc/sys/net belongs to the opening thread's network namespace.
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .expect("enabling forwarding in the lab");
        let mut links = vec![(
            "n0",
            "c0",
            Ipv4Addr::new(198, 18, 1, 1),
            Some((CLIENT, CLIENT_MAC)),
        )];
        let names: Vec<(String, String)> = (1..=4)
            .map(|i| (format!("nb{i}"), format!("b{i}")))
            .collect();
        for (i, (nb, b)) in names.iter().enumerate() {
            let i = i as u8 + 1;
            let neighbour = (i <= 3).then(|| (backend(i), backend_mac(i)));
            links.push((nb, b, Ipv4Addr::new(198, 19, i, 1), neighbour));
        }
        for (inside, peer, addr, neighbour) in &links {
            sh(&[
                "ip", "link", "add", inside, "type", "veth", "peer", "name", peer,
            ]);
            sh(&["ip", "addr", "add", &format!("{addr}/24"), "dev", inside]);
            sh(&["ip", "link", "set", inside, "up"]);
            sh(&["ip", "link", "set", peer, "up"]);
            if let Some((ip, mac)) = neighbour {
                let mac = mac.map(|b| format!("{b:02x}")).join(":");
                sh(&[
                    "ip",
                    "neigh",
                    "replace",
                    &ip.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    inside,
                    "nud",
                    "permanent",
                ]);
            }
        }
        let mut ifindex = BTreeMap::new();
        for (inside, ..) in &links {
            let info = sluice_agent::netdev::interface(inside).expect("lab interface");
            ifindex.insert(inside.to_string(), info.ifindex);
        }
        let dataplane = Dataplane::load(
            None,
            &LoadOptions {
                flow_capacity: sluice_common::layout::DEFAULT_FLOW_CAPACITY,
            },
        )
        .expect("loading the data plane (verifier)");
        let mut lab = Self {
            state: apply::read_state(&dataplane.maps).expect("read state"),
            alloc: reconcile::Allocator::for_state(&reconcile::State::default()),
            dataplane,
            ifindex,
        };
        lab.apply_edited(manifest_text, edit);
        lab
    }

    /// Reconciles the maps to `manifest_text`, as the agent would.
    pub fn apply(&mut self, manifest_text: &str) {
        self.apply_edited(manifest_text, |_| {});
    }

    fn apply_edited(&mut self, manifest_text: &str, edit: impl FnOnce(&mut Vec<reconcile::Step>)) {
        let manifest = manifest::parse("lab.yaml", manifest_text).expect("valid lab manifest");
        let view = sluice_model::view::View::of_manifest(&manifest);
        let desired = reconcile::desired(&view.frontends, &reconcile::Node::standalone());
        let mut plan = reconcile::plan(&desired, &self.state, &self.alloc).expect("plan");
        edit(&mut plan.steps);
        apply::apply(&mut self.dataplane.maps, &plan.steps).expect("apply");
        self.state = plan.next;
        self.alloc = plan.alloc;
    }

    /// Runs a command in the lab's namespace (e.g. `ip neigh replace ...`).
    pub fn command(&self, args: &[&str]) {
        sh(args);
    }

    /// The lab interface a packet from `addr` arrives on: `nb<i>` for
    /// `backend(i)`, else `nb1`, the one neighbour routes of wider ranges go
    /// through.
    pub fn interface_towards(&self, addr: Ipv4Addr) -> String {
        match addr.octets() {
            [198, 19, i @ 1..=4, _] => format!("nb{i}"),
            _ => "nb1".to_owned(),
        }
    }

    /// The frontend id of service port `vip:port` (`proto` an IP protocol number).
    pub fn frontend_id(&self, vip: Ipv4Addr, port: u16, proto: u8) -> u32 {
        let key = sluice_common::types::FrontendKeyV4 {
            vip: u32::from_ne_bytes(vip.octets()),
            port: port.to_be(),
            proto,
            _pad: 0,
        };
        self.state
            .frontends
            .get(&key)
            .unwrap_or_else(|| panic!("no frontend {vip}:{port}/{proto}"))
            .frontend
            .id
    }

    pub fn ifindex(&self, name: &str) -> u32 {
        self.ifindex[name]
    }

    /// Lets XDP redirect into `interface` (as the agent does when the device
    /// accepts XDP frames).
    pub fn allow_xdp_egress(&mut self, interface: &str) {
        let i = self.ifindex(interface);
        self.dataplane
            .maps
            .xdp_egress
            .insert(i, i, None, 0)
            .expect("XDP_EGRESS insert");
    }

    /// Runs the XDP program on `frame` arriving on `interface`.
    pub fn xdp(&mut self, interface: &str, frame: &[u8]) -> Run {
        let ingress = self.ifindex(interface);
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex (include/uapi/linux/bpf.h).
        let mut ctx_in = [0u32; 6];
        ctx_in[1] = frame.len() as u32;
        ctx_in[3] = ingress;
        let ctx_in: Vec<u8> = ctx_in.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut ctx_out = [0u8; 24];
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .xdp_program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .expect("XDP test run");
        out.truncate(result.data_size_out as usize);
        // ctx_out.data is where the packet starts after the metadata.
        let meta_len = u32::from_ne_bytes(ctx_out[0..4].try_into().expect("4 bytes")) as usize;
        let frame = out.split_off(meta_len.min(out.len()));
        Run {
            action: result.return_value,
            frame,
            meta: out,
        }
    }

    /// Runs a TC program (`companion` selects `sluice_tc_companion`) on `frame`
    /// arriving on `interface`.
    pub fn tc(&mut self, interface: &str, frame: &[u8], companion: bool) -> Run {
        self.try_tc(interface, frame, companion)
            .unwrap_or_else(|e| panic!("TC test run: {e}"))
    }

    /// As [`Lab::tc`], returning the kernel's refusal (some frames cannot be
    /// made into a test skb) instead of panicking.
    pub fn try_tc(
        &mut self,
        interface: &str,
        frame: &[u8],
        companion: bool,
    ) -> Result<Run, aya::programs::ProgramError> {
        let ingress = self.ifindex(interface);
        // The head of struct __sk_buff up to tc_index (include/uapi/linux/bpf.h);
        // test runs accept this prefix and only ingress_ifindex (offset 36) and
        // ifindex (40) among these fields.
        let mut ctx_in = [0u32; 12];
        ctx_in[9] = ingress;
        ctx_in[10] = ingress;
        let ctx_in: Vec<u8> = ctx_in.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .tc_program(companion)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ..TestRunOptions::default()
            })?;
        out.truncate(result.data_size_out as usize);
        Ok(Run {
            action: result.return_value,
            frame: out,
            meta: Vec::new(),
        })
    }

    /// Non-zero outcome counters by name.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        self.dataplane
            .maps
            .outcomes()
            .expect("outcomes")
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn flows(&self) -> Vec<(FlowKeyV4, FlowV4)> {
        self.dataplane
            .maps
            .flows
            .iter()
            .map(|e| e.expect("flow entry"))
            .collect()
    }

    /// One flow in `every` goes to the flow log (0: only policy refusals).
    pub fn set_flow_log_sample(&mut self, every: u32) {
        self.dataplane
            .set_flow_log_sample(every)
            .expect("setting the flow-log sample");
    }

    /// Drains the flow-log ring: the records written since the last call.
    pub fn flow_events(&mut self) -> Vec<FlowEvent> {
        let ring = self
            .dataplane
            .maps
            .flow_events
            .as_mut()
            .expect("the flow-log ring");
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size_of::<FlowEvent>(), "record size");
            // SAFETY: a whole `FlowEvent` (length checked); ring records carry
            // no alignment promise, hence the unaligned read.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        out
    }

    /// Client-IP affinity entries.
    pub fn affinities(&self) -> Vec<(AffinityKeyV4, AffinityV4)> {
        self.dataplane
            .maps
            .affinity
            .iter()
            .map(|e| e.expect("affinity entry"))
            .collect()
    }

    /// The backend id serving `address` on `target_port` (active or retired).
    /// One address serving two ports is two backends.
    pub fn backend_id(&self, address: Ipv4Addr, target_port: u16) -> u32 {
        let raw = u32::from_ne_bytes(address.octets());
        *self
            .state
            .backends
            .iter()
            .find(|(_, b)| b.addr[0] == raw && b.port == target_port.to_be())
            .unwrap_or_else(|| panic!("no backend {address}:{target_port}"))
            .0
    }

    /// Open connections of the TCP backend at `address` (target port 8080).
    pub fn open_connections(&self, address: Ipv4Addr) -> u64 {
        self.dataplane
            .maps
            .conns
            .get(self.backend_id(address, 8080))
    }

    /// Summed traffic counters of the TCP backend at `address` (port 8080).
    pub fn backend_traffic(&self, address: Ipv4Addr) -> TrafficStats {
        sluice_agent::maps::Maps::traffic(
            &self.dataplane.maps.backend_stats,
            self.backend_id(address, 8080),
            map::BACKEND_STATS,
        )
        .expect("backend stats")
    }
}

/// The kernel's `bpf_ktime_get_coarse_ns` clock (`CLOCK_MONOTONIC_COARSE`),
/// for writing timestamps into map entries as the programs would.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
