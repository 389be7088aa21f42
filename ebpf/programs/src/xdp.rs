//! The XDP fast path: rewrite in place, redirect to the egress device.
//!
//! XDP sees raw frames: checksums are updated incrementally (RFC 1624), which is
//! only right when the L4 checksum is complete. Packets whose checksum offload
//! is still pending are handed to the TC companion untouched (see
//! [`Verdict::Defer`]). Frames are redirected only to devices listed in
//! `XDP_EGRESS`; a redirect into a device that cannot take XDP frames (a veth
//! whose peer has no NAPI) is dropped by the kernel without a trace.

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::generated::bpf_xdp_adjust_meta,
    programs::XdpContext,
};
use aya_log_ebpf::error;
use sluice_common::{csum, layout::XDP_DEFER_MARK, reason, types::IPPROTO_UDP};

use crate::{
    balance::{Nat, Verdict, classify},
    fib::{self, Route},
    maps::XDP_EGRESS,
    outcome::count,
    packet::{ETH_HLEN, MAX_IPV4_HLEN, load, ptr_at, store},
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    match classify(start, end, end - start, true) {
        Verdict::Pass(why) => {
            count(why);
            XDP_PASS
        }
        Verdict::Drop(why) => {
            if why == reason::DROP_INTERNAL {
                error!(
                    ctx,
                    "xdp: maps disagree (a slot or flow names a missing entry)"
                );
            }
            count(why);
            XDP_DROP
        }
        Verdict::Defer => defer(ctx),
        Verdict::Nat(nat) => match forward(ctx, &nat) {
            Ok(action) => action,
            Err(()) => {
                error!(ctx, "xdp: rewrite failed on a packet parsed before");
                count(reason::DROP_INTERNAL);
                XDP_ABORTED
            }
        },
    }
}

/// Marks the frame for the TC companion (4 bytes of XDP metadata, which the
/// kernel carries into the skb) and passes it up untouched.
#[inline(always)]
fn defer(ctx: &XdpContext) -> u32 {
    const MARK_LEN: i32 = core::mem::size_of::<u32>() as i32;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -MARK_LEN) } != 0 {
        // No metadata support on this driver: the companion would not know the
        // packet. Never expected where partial checksums occur (veth has it).
        error!(
            ctx,
            "xdp: cannot defer a partial-checksum packet: no XDP metadata"
        );
        count(reason::DROP_INTERNAL);
        return XDP_DROP;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    let Some(mark) = ptr_at::<u32>(meta, data, 0) else {
        count(reason::DROP_INTERNAL);
        return XDP_DROP;
    };
    store::<u32>(mark, XDP_DEFER_MARK);
    count(reason::XDP_DEFER_PARTIAL_CSUM);
    XDP_PASS
}

#[inline(always)]
fn forward(ctx: &XdpContext, nat: &Nat) -> Result<u32, ()> {
    rewrite(ctx, nat)?;
    let ingress = ctx.ingress_ifindex() as u32;
    match fib::next_hop(ctx, nat, ingress, nat.tot_len) {
        Route::Forward { ifindex, l2 } => {
            if nat.ttl <= 1 {
                count(reason::STACK_OTHER);
                return Ok(XDP_PASS);
            }
            // The redirect takes effect when the program returns, so it can be
            // decided first: if the device is not in XDP_EGRESS the frame goes
            // to the kernel, L2 untouched.
            match XDP_EGRESS.redirect(ifindex, XDP_PASS as u64) {
                Ok(action) => {
                    set_l2_and_ttl(ctx, nat.ttl, l2)?;
                    count(reason::FWD_XDP);
                    Ok(action)
                }
                Err(_) => {
                    count(reason::STACK_NO_XDP_EGRESS);
                    Ok(XDP_PASS)
                }
            }
        }
        Route::NoNeighbour => {
            count(reason::STACK_NO_NEIGH);
            Ok(XDP_PASS)
        }
        Route::Other => {
            count(reason::STACK_OTHER);
            Ok(XDP_PASS)
        }
    }
}

/// Rewrites one address and one port, updating both checksums incrementally.
#[inline(always)]
fn rewrite(ctx: &XdpContext, nat: &Nat) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = ptr_at::<[u8; 20]>(start, end, ETH_HLEN).ok_or(())?;
    let addr_at = ip + if nat.reply { 12 } else { 16 };
    store::<u32>(addr_at, nat.new_addr);
    let ip_check = load::<u16>(ip + 10);
    store::<u16>(
        ip + 10,
        csum::replace32(ip_check, nat.old_addr, nat.new_addr),
    );

    // The bound is re-established here for the verifier (it came via the stack).
    let l4_off = nat.l4_off;
    if !(ETH_HLEN + 20..=ETH_HLEN + MAX_IPV4_HLEN).contains(&l4_off) {
        return Err(());
    }
    let udp = nat.proto == IPPROTO_UDP;
    let l4 = if udp {
        ptr_at::<[u8; 8]>(start, end, l4_off)
    } else {
        ptr_at::<[u8; 20]>(start, end, l4_off)
    }
    .ok_or(())?;
    store::<u16>(l4 + if nat.reply { 0 } else { 2 }, nat.new_port);
    if udp && nat.l4_check == 0 {
        return Ok(()); // UDP without checksum stays without
    }
    let check = csum::replace32(nat.l4_check, nat.old_addr, nat.new_addr);
    let check = csum::replace16(check, nat.old_port, nat.new_port);
    // In UDP a computed zero is sent as all ones (RFC 768).
    let check = if udp && check == 0 { 0xffff } else { check };
    store::<u16>(l4 + if udp { 6 } else { 16 }, check);
    Ok(())
}

/// What a router does before sending: decrement TTL, set the next hop's MACs.
#[inline(always)]
fn set_l2_and_ttl(ctx: &XdpContext, ttl: u8, l2: [u64; 2]) -> Result<(), ()> {
    let (start, end) = (ctx.data(), ctx.data_end());
    let eth = ptr_at::<[u8; ETH_HLEN + 20]>(start, end, 0).ok_or(())?;
    let ip = eth + ETH_HLEN;
    // TTL shares a 16-bit checksum word with the protocol byte.
    let old_word = load::<u16>(ip + 8);
    store::<u8>(ip + 8, ttl - 1);
    let new_word = load::<u16>(ip + 8);
    let check = load::<u16>(ip + 10);
    store::<u16>(ip + 10, csum::replace16(check, old_word, new_word));
    store::<u64>(eth, l2[0]);
    store::<u32>(eth + 8, l2[1] as u32);
    Ok(())
}
