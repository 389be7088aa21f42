//! The TC (TCX ingress) path: the same decisions as XDP, applied to an skb.
//!
//! skbs may carry offload-pending checksums (`CHECKSUM_PARTIAL`), so all
//! rewrites go through `bpf_l3_csum_replace` / `bpf_l4_csum_replace`
//! (`BPF_F_PSEUDO_HDR` for the address, which is in the pseudo header): they
//! update whichever checksum form the skb carries. `bpf_redirect` from TC works
//! into any device, veth without NAPI included.
//!
//! The same code runs as two programs: `sluice_tc` on interfaces in TC mode
//! (every packet), and `sluice_tc_companion` on interfaces in XDP mode, where it
//! handles only the packets XDP deferred (marked in the XDP metadata).

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_store_bytes},
    programs::TcContext,
};
use aya_log_ebpf::error;
use sluice_common::{layout::XDP_DEFER_MARK, reason, types::IPPROTO_UDP};

use crate::{
    balance::{Nat, Verdict, classify},
    fib::{self, Route},
    outcome::count,
    packet::{ETH_HLEN, MAX_HEADERS, load, ptr_at},
};

#[inline(always)]
pub fn run<const COMPANION: bool>(ctx: &TcContext) -> i32 {
    if COMPANION && !deferred_by_xdp(ctx) {
        // XDP already dealt with it (passed, dropped or handed to the stack).
        return TC_ACT_OK;
    }
    let len = ctx.len() as usize;
    // Headers must be in the linear part for direct access.
    let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
    if ctx.data() + want > ctx.data_end() && ctx.pull_data(want as u32).is_err() {
        count(reason::PASS_MALFORMED_L2);
        return TC_ACT_OK;
    }
    match classify(ctx.data(), ctx.data_end(), len, false) {
        Verdict::Pass(why) => {
            count(why);
            TC_ACT_OK
        }
        Verdict::Drop(why) => {
            if why == reason::DROP_INTERNAL {
                error!(
                    ctx,
                    "tc: maps disagree (a slot or flow names a missing entry)"
                );
            }
            count(why);
            TC_ACT_SHOT
        }
        // classify defers only when asked to.
        Verdict::Defer => TC_ACT_OK,
        Verdict::Nat(nat) => match forward(ctx, &nat) {
            Ok(action) => action,
            Err(errno) => {
                error!(ctx, "tc: rewriting a balanced packet failed: {}", errno);
                count(reason::DROP_INTERNAL);
                TC_ACT_SHOT
            }
        },
    }
}

#[inline(always)]
fn skb(ctx: &TcContext) -> *mut __sk_buff {
    ctx.skb.skb
}

#[inline(always)]
fn deferred_by_xdp(ctx: &TcContext) -> bool {
    // SAFETY: reading context fields the verifier allows for sched_cls.
    let (meta, data) = unsafe { ((*skb(ctx)).data_meta as usize, (*skb(ctx)).data as usize) };
    match ptr_at::<u32>(meta, data, 0) {
        Some(mark) => load::<u32>(mark) == XDP_DEFER_MARK,
        None => false,
    }
}

#[inline(always)]
fn forward(ctx: &TcContext, nat: &Nat) -> Result<i32, i64> {
    let udp = nat.proto == IPPROTO_UDP;
    // With MANGLED_0 a zero UDP checksum (none) stays zero, and a computed zero
    // becomes all ones.
    let mangled = if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    let check_at = nat.l4_off + if udp { 6 } else { 16 };
    let (addr_at, port_at) = if nat.reply {
        (ETH_HLEN + 12, nat.l4_off)
    } else {
        (ETH_HLEN + 16, nat.l4_off + 2)
    };
    let (old_addr, new_addr) = (nat.old_addr as u64, nat.new_addr as u64);
    let (old_port, new_port) = (nat.old_port as u64, nat.new_port as u64);
    ctx.l4_csum_replace(
        check_at,
        old_addr,
        new_addr,
        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
    )?;
    ctx.l4_csum_replace(check_at, old_port, new_port, mangled | 2)?;
    ctx.l3_csum_replace(ETH_HLEN + 10, old_addr, new_addr, 4)?;
    ctx.store(addr_at, &nat.new_addr, 0)?;
    ctx.store(port_at, &nat.new_port, 0)?;

    // SAFETY: reading a context field.
    let ingress = unsafe { (*skb(ctx)).ingress_ifindex };
    match fib::next_hop(ctx, nat, ingress, 0) {
        Route::Forward { ifindex, l2 } => {
            if nat.ttl <= 1 {
                count(reason::STACK_OTHER);
                return Ok(TC_ACT_OK);
            }
            let old_word = u16::from_ne_bytes([nat.ttl, nat.proto]);
            let new_word = u16::from_ne_bytes([nat.ttl - 1, nat.proto]);
            ctx.l3_csum_replace(ETH_HLEN + 10, old_word as u64, new_word as u64, 2)?;
            ctx.store(ETH_HLEN + 8, &(nat.ttl - 1), 0)?;
            // SAFETY: the first 12 bytes of a live, aligned 16-byte buffer;
            // offset 0 is in the packet (parsed above).
            let rc = unsafe { bpf_skb_store_bytes(skb(ctx), 0, l2.as_ptr().cast(), 12, 0) };
            if rc != 0 {
                return Err(rc);
            }
            count(reason::FWD_TC);
            // SAFETY: plain helper call; returns TC_ACT_REDIRECT.
            Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
        }
        Route::NoNeighbour => {
            count(reason::STACK_NO_NEIGH);
            Ok(TC_ACT_OK)
        }
        Route::Other => {
            count(reason::STACK_OTHER);
            Ok(TC_ACT_OK)
        }
    }
}
