//! Sluice's kernel programs. One object, three programs sharing the maps:
//!
//! * `sluice_xdp`: native XDP fast path (interfaces in XDP mode);
//! * `sluice_tc`: TCX ingress, the complete path (interfaces in TC mode);
//! * `sluice_tc_companion`: TCX ingress beside XDP, for packets XDP deferred.
//!
//! The decisions live in [`balance`], which consults [`conntrack`], [`lb`],
//! [`affinity`] and [`policy`]; [`xdp`] and [`tc`] apply them.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "atomic intrinsics: see atomic.rs")]

mod affinity;
mod atomic;
mod balance;
mod conntrack;
mod fib;
mod flowlog;
mod lb;
mod maps;
mod outcome;
mod packet;
mod policy;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn sluice_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[classifier]
pub fn sluice_tc(ctx: TcContext) -> i32 {
    tc::run::<false>(&ctx)
}

#[classifier]
pub fn sluice_tc_companion(ctx: TcContext) -> i32 {
    tc::run::<true>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_fib_lookup` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
