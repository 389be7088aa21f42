//! Programs for `cargo xtask bench`, never attached to an interface.
//!
//! * `bench_floor`: the hook's floor — parse Ethernet/IPv4, swap MACs, `XDP_TX`.
//! * `bench_restore`: `BPF_PROG_TEST_RUN` with `repeat` reuses one buffer, so a
//!   program that rewrites the packet (DNAT) would see its own output from the
//!   second run on. This harness copies the original frame back, optionally
//!   gives it a fresh source port (a new flow every run), and tail-calls the
//!   program under test. `bench_restore_only` measures the harness alone.
//! * `bench_gen`: the packet-rate generator, run with `BPF_PROG_TEST_RUN` and
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` on a client's veth: it writes its template
//!   frame, varies the flow per its shape (one flow; a new flow every packet;
//!   a working set cycled) with valid checksums, and returns `XDP_TX`, so the
//!   kernel really transmits each frame toward the node.
//! * `bench_sink`: attached at the receiving end, counts what arrives by
//!   destination address and port (a wrong rewrite shows) and drops it;
//!   anything else (ARP) goes on to the stack.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, PerCpuHashMap, ProgramArray},
    programs::XdpContext,
};

/// Bytes restored before each run: Ethernet + IPv4 + TCP fit with room to spare.
const FRAME: usize = 64;

#[map]
static BENCH_FRAME: Array<[u8; FRAME]> = Array::with_max_entries(1, 0);

/// Slot 0: the program under test.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Slot 0: non-zero to vary the TCP/UDP source port every run.
#[map]
static BENCH_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Source port and low half of the IPv4 source in the bench frames (Ethernet,
/// then a 20-byte IPv4 header).
const SPORT_AT: usize = 14 + 20;
const SRC_LOW_AT: usize = 14 + 14;

#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The hook's own cost: nothing but a verdict.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 + 20 > end {
        return XDP_PASS;
    }
    // SAFETY: 34 bytes checked above.
    unsafe {
        let eth = start as *mut [u8; 6];
        if *(start as *const u8).add(12) != 0x08 || *(start as *const u8).add(13) != 0x00 {
            return XDP_PASS;
        }
        if *(start as *const u8).add(14) >> 4 != 4 {
            return XDP_PASS;
        }
        let dst = core::ptr::read_unaligned(eth);
        let src = core::ptr::read_unaligned(eth.add(1));
        core::ptr::write_unaligned(eth, src);
        core::ptr::write_unaligned(eth.add(1), dst);
    }
    XDP_TX
}

#[xdp]
pub fn bench_restore(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_err() {
        return XDP_ABORTED;
    }
    // SAFETY: tail call with our own context; returns only on failure.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    XDP_ABORTED
}

#[xdp]
pub fn bench_restore_only(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_err() {
        return XDP_ABORTED;
    }
    XDP_DROP
}

#[inline(always)]
fn restore(ctx: &XdpContext) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FRAME > end {
        return Err(());
    }
    let frame = BENCH_FRAME.get(0).ok_or(())?;
    // SAFETY: FRAME bytes of packet checked above; the map value is FRAME bytes.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; FRAME], *frame) };
    if BENCH_CONFIG.get(0).copied().unwrap_or(0) != 0 {
        let seq = BENCH_SEQ.get_ptr_mut(0).ok_or(())?;
        // SAFETY: per-CPU counter; both fields lie in the FRAME bytes checked above.
        unsafe {
            *seq = (*seq).wrapping_add(1);
            // A different port every run, and the source address varies with the
            // turn: no two runs share a 5-tuple before 2^32 runs.
            let port = 1024 + (*seq % 64_512) as u16;
            core::ptr::write_unaligned((start + SPORT_AT) as *mut u16, port.to_be());
            let salt = (*seq / 64_512) as u16;
            let low = core::ptr::read_unaligned((start + SRC_LOW_AT) as *const u16);
            core::ptr::write_unaligned((start + SRC_LOW_AT) as *mut u16, low ^ salt.to_be());
        }
    }
    Ok(())
}

/// The generator's template: the first [`FRAME`] bytes of every frame.
#[map]
static GEN_FRAME: Array<[u8; FRAME]> = Array::with_max_entries(1, 0);

/// Slot 0: the shape ([`SHAPE_ONE_FLOW`], [`SHAPE_NEW_FLOWS`],
/// [`SHAPE_WORKING_SET`]); slot 1: the working set's size.
#[map]
static GEN_CONFIG: Array<u32> = Array::with_max_entries(2, 0);

#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

const SHAPE_ONE_FLOW: u32 = 0;
const SHAPE_NEW_FLOWS: u32 = 1;
const SHAPE_WORKING_SET: u32 = 2;

/// Frames the sink saw and dropped: key `daddr << 16 | dport` as they are
/// on the wire; what is not IPv4 TCP/UDP without options passes.
#[map]
static SINK_SEEN: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(256, 0);

const IP_AT: usize = 14;
const IP_CSUM_AT: usize = IP_AT + 10;
const PROTO_AT: usize = IP_AT + 9;
const DADDR_AT: usize = IP_AT + 16;
const L4_AT: usize = IP_AT + 20;

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    match generate(&ctx) {
        Ok(()) => XDP_TX,
        Err(()) => XDP_ABORTED,
    }
}

#[inline(always)]
fn generate(ctx: &XdpContext) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + FRAME > end {
        return Err(());
    }
    let frame = GEN_FRAME.get(0).ok_or(())?;
    // SAFETY: FRAME bytes of packet checked above; the map value is FRAME
    // bytes. Frames are recycled after the node saw (and may have rewritten)
    // them, so every one starts again from the template.
    unsafe { core::ptr::write_unaligned(start as *mut [u8; FRAME], *frame) };
    let shape = GEN_CONFIG.get(0).copied().unwrap_or(SHAPE_ONE_FLOW);
    if shape == SHAPE_ONE_FLOW {
        return Ok(());
    }
    let seq = GEN_SEQ.get_ptr_mut(0).ok_or(())?;
    // SAFETY: a per-CPU counter: no other writer.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    let n = match shape {
        SHAPE_NEW_FLOWS => n,
        SHAPE_WORKING_SET => n % GEN_CONFIG.get(1).copied().unwrap_or(1).max(1),
        _ => return Err(()),
    };
    // The source port, then the last octet of the source address (.2 to
    // .201: the client's /24, the cluster network kube-proxy does not
    // masquerade): 12.9 million distinct flows before one repeats.
    let port = (1024 + n % 64_512) as u16;
    let last_octet = (2 + (n / 64_512) % 200) as u8;
    // SAFETY: every offset below lies in the FRAME bytes checked above.
    unsafe {
        let at = |offset: usize| (start + offset) as *mut u16;
        let old_port = core::ptr::read_unaligned(at(SPORT_AT));
        let new_port = port.to_be();
        core::ptr::write_unaligned(at(SPORT_AT), new_port);
        let old_low = core::ptr::read_unaligned(at(SRC_LOW_AT));
        let third_octet = old_low.to_ne_bytes()[0];
        let new_low = u16::from_ne_bytes([third_octet, last_octet]);
        core::ptr::write_unaligned(at(SRC_LOW_AT), new_low);
        let ip_csum = core::ptr::read_unaligned(at(IP_CSUM_AT));
        core::ptr::write_unaligned(at(IP_CSUM_AT), csum_replace(ip_csum, old_low, new_low));
        // The L4 checksum covers the port and (pseudo header) the address;
        // a UDP checksum of 0 means none.
        let l4_csum_at = match *((start + PROTO_AT) as *const u8) {
            6 => L4_AT + 16,
            17 => L4_AT + 6,
            _ => return Ok(()),
        };
        let l4 = core::ptr::read_unaligned(at(l4_csum_at));
        if l4 != 0 {
            let l4 = csum_replace(csum_replace(l4, old_port, new_port), old_low, new_low);
            core::ptr::write_unaligned(at(l4_csum_at), l4);
        }
    }
    Ok(())
}

/// RFC 1624's incremental update of a one's-complement checksum for one
/// 16-bit word changed from `old` to `new` (byte order as on the wire).
#[inline(always)]
fn csum_replace(csum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let key = sink_key(&ctx);
    if key == 0 {
        // ARP, neighbour discovery and the like: the stack answers them.
        return XDP_PASS;
    }
    match SINK_SEEN.get_ptr_mut(key) {
        // SAFETY: this CPU's value of the entry.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = SINK_SEEN.insert(key, 1, 0);
        }
    }
    XDP_DROP
}

#[inline(always)]
fn sink_key(ctx: &XdpContext) -> u64 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + L4_AT + 4 > end {
        return 0;
    }
    // SAFETY: L4_AT + 4 bytes checked above.
    unsafe {
        let byte = |offset: usize| *((start + offset) as *const u8);
        if byte(12) != 0x08 || byte(13) != 0x00 || byte(IP_AT) != 0x45 {
            return 0;
        }
        if !matches!(byte(PROTO_AT), 6 | 17) {
            return 0;
        }
        let daddr = core::ptr::read_unaligned((start + DADDR_AT) as *const u32);
        let dport = core::ptr::read_unaligned((start + L4_AT + 2) as *const u16);
        (u64::from(daddr) << 16) | u64::from(dport)
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
