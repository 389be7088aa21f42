//! Programs for `cargo xtask bench`, never attached to an interface.
//!
//! * `bench_floor`: the hook's floor — parse Ethernet/IPv4, swap MACs, `XDP_TX`.
//! * `bench_restore`: `BPF_PROG_TEST_RUN` with `repeat` reuses one buffer, so a
//!   program that rewrites the packet (DNAT) would see its own output from the
//!   second run on. This harness copies the original frame back, optionally
//!   gives it a fresh source port (a new flow every run), and tail-calls the
//!   program under test. `bench_restore_only` measures the harness alone.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
