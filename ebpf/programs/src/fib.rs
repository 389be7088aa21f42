//! Next-hop lookup in the kernel's FIB and neighbour tables, as a router would.
//!
//! The `struct bpf_fib_lookup` argument is built as eight 64-bit words at the
//! byte offsets of include/uapi/linux/bpf.h rather than as the bindgen struct:
//! the programs are compiled with misaligned memory access allowed (packet
//! fields sit at odd offsets), and LLVM then merges the struct's 2-byte
//! fields into wider stores at misaligned stack offsets, which the verifier
//! rejects. Whole aligned words never are.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::generated::bpf_fib_lookup as fib_lookup_helper,
};

use sluice_common::{layout::NEXT_HOP_TTL_NS, types::NextHop};

use crate::balance::Nat;

const AF_INET: u64 = 2;

pub enum Route {
    /// Forward out of `ifindex`; `l2` holds the first 12 bytes of the
    /// Ethernet header (next hop's MAC, then ours), see [`NextHop::l2`].
    Forward { ifindex: u32, l2: [u64; 2] },
    /// The next hop's neighbour entry is not resolved yet.
    NoNeighbour,
    /// Anything the FIB helper does not forward itself (local, unreachable,
    /// fragmentation needed, ...): the kernel stack will handle and answer it.
    Other,
}

/// `struct bpf_fib_lookup`, 64 bytes.
#[repr(C, align(8))]
struct Params([u64; 8]);

/// The route for the rewritten packet: from the flow's cache while it is
/// fresh, else from the kernel (and cached when fully resolved).
#[inline(always)]
pub fn next_hop<C: EbpfContext>(ctx: &C, nat: &Nat, ingress_ifindex: u32, tot_len: u16) -> Route {
    let cache = nat.next_hop;
    if !cache.is_null() {
        // SAFETY: non-null pointers here point into live flow entries.
        let hop = unsafe { *cache };
        if hop.ifindex != 0 && nat.now.wrapping_sub(hop.at_ns) < NEXT_HOP_TTL_NS {
            return Route::Forward {
                ifindex: hop.ifindex,
                l2: hop.l2,
            };
        }
    }
    let route = lookup(ctx, nat, ingress_ifindex, tot_len);
    if let Route::Forward { ifindex, l2 } = route
        && !cache.is_null()
    {
        // SAFETY: as above. Two CPUs may refresh at once; both write the same
        // lookup result.
        unsafe {
            *cache = NextHop {
                ifindex,
                _pad: 0,
                at_ns: nat.now,
                l2,
            }
        };
    }
    route
}

/// Asks the kernel for the route. `tot_len` is the IPv4 total length for an
/// MTU check (XDP), or 0 for skbs, where the helper checks the skb itself,
/// GSO included.
#[inline(always)]
fn lookup<C: EbpfContext>(ctx: &C, nat: &Nat, ingress_ifindex: u32, tot_len: u16) -> Route {
    // Offsets: 0 family, 1 l4_protocol, 2 sport, 4 dport, 6 tot_len,
    // 8 ifindex, 12 tos, 16 ipv4_src, 32 ipv4_dst, 48 vlan/tbid, 52 smac,
    // 58 dmac. Ports and addresses are raw network-order values, which keep
    // their byte order when placed in a little-endian word.
    let mut params = Params([
        AF_INET
            | (nat.proto as u64) << 8
            | (nat.sport as u64) << 16
            | (nat.dport as u64) << 32
            | (tot_len as u64) << 48,
        ingress_ifindex as u64 | (nat.tos as u64) << 32,
        nat.src as u64,
        0,
        nat.dst as u64,
        0,
        0,
        0,
    ]);
    // SAFETY: `params` is a writable bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup_helper(ctx.as_ptr(), params.0.as_mut_ptr().cast(), 64, 0) };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // smac is bytes 52..58 (w6 bits 32.., w7 bits ..16), dmac bytes
            // 58..64 (w7 bits 16..). Ethernet wants dmac then smac.
            let [_, w1, _, _, _, _, w6, w7] = params.0;
            let dmac = w7 >> 16;
            let smac_01 = (w6 >> 32) & 0xffff;
            let smac_25 = (w6 >> 48) | (w7 & 0xffff) << 16;
            Route::Forward {
                ifindex: w1 as u32,
                l2: [dmac | smac_01 << 48, smac_25],
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeighbour,
        _ => Route::Other,
    }
}
