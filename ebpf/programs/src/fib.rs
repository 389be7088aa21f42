//! Next-hop lookup in the kernel's FIB and neighbour tables, as a router would.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
};

use crate::balance::Nat;

const AF_INET: u8 = 2;

pub enum Route {
    /// Forward out of `ifindex` with these MAC addresses.
    Forward {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// The next hop's neighbour entry is not resolved yet.
    NoNeighbour,
    /// Anything the FIB helper does not forward itself (local, unreachable,
    /// fragmentation needed, ...): the kernel stack will handle and answer it.
    Other,
}

/// Looks up the route for the rewritten packet. `tot_len` is the IPv4 total
/// length for an MTU check (XDP), or 0 for skbs, where the helper checks the
/// skb itself, GSO included.
#[inline(always)]
pub fn route<C: EbpfContext>(ctx: &C, nat: &Nat, ingress_ifindex: u32, tot_len: u16) -> Route {
    // SAFETY: plain-old-data struct of integers and unions of integers.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = nat.proto;
    params.sport = nat.sport;
    params.dport = nat.dport;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_2.tos = nat.tos;
    params.__bindgen_anon_3.ipv4_src = nat.src;
    params.__bindgen_anon_4.ipv4_dst = nat.dst;
    // SAFETY: `params` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Forward {
            ifindex: params.ifindex,
            smac: params.smac,
            dmac: params.dmac,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour,
        _ => Route::Other,
    }
}
