//! The kernel programs, branch by branch, through `BPF_PROG_TEST_RUN` on
//! crafted frames. Each test gets its own lab (a private network namespace
//! with routes and neighbours, see `sluice_tests::lab`) and, where the branch
//! exists in both, runs against the XDP and the TC program.
//!
//! Needs root (BPF, network namespaces); the kernel features used are in
//! docs/architecture.md ("Kernel traps", "Toolchain").

use std::{net::Ipv4Addr, time::Duration};

use sluice_common::{
    layout::XDP_DEFER_MARK,
    types::{AffinityV4, FLOW_CLOSED, FLOW_OPEN},
};
use sluice_tests::{
    lab::{CLIENT, CLIENT_MAC, Lab, Run, backend, backend_mac, coarse_now_ns, with_lab},
    packet::{self, L4, Spec, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const VIP_NO_BACKENDS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const VIP_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

const MANIFEST: &str = r#"
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP, targetPort: 5353 }
algorithm: round-robin
backends:
  - { address: 198.19.1.2 }
  - { address: 198.19.2.2 }
  - { address: 198.19.3.2 }
---
kind: Service
name: empty
vip: 198.18.0.11
ports: [{ port: 80, protocol: TCP }]
---
kind: Service
name: unresolved
vip: 198.18.0.12
ports: [{ port: 80, protocol: TCP }]
backends: [{ address: 198.19.4.2 }]
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Pass,
    Drop,
    Redirect,
    Aborted,
    Other(u32),
}

fn action(hook: Hook, code: u32) -> Action {
    match (hook, code) {
        (Hook::Xdp, 0) => Action::Aborted,
        (Hook::Xdp, 1) | (Hook::Tc, 2) => Action::Drop,
        (Hook::Xdp, 2) | (Hook::Tc, 0) => Action::Pass,
        (Hook::Xdp, 4) | (Hook::Tc, 7) => Action::Redirect,
        (_, other) => Action::Other(other),
    }
}

/// Runs `frame` arriving on `interface` through `hook`'s program. XDP may
/// redirect into every lab interface that has a neighbour.
fn run(lab: &mut Lab, hook: Hook, interface: &str, frame: &[u8]) -> (Action, Run) {
    let run = match hook {
        Hook::Xdp => {
            for i in ["n0", "nb1", "nb2", "nb3"] {
                lab.allow_xdp_egress(i);
            }
            lab.xdp(interface, frame)
        }
        Hook::Tc => lab.tc(interface, frame, false),
    };
    (action(hook, run.action), run)
}

fn fwd(hook: Hook) -> &'static str {
    match hook {
        Hook::Xdp => "fwd_xdp",
        Hook::Tc => "fwd_tc",
    }
}

fn syn(sport: u16) -> Spec {
    Spec::tcp((CLIENT, sport), (VIP, 80), TCP_SYN)
}

fn to_vip(sport: u16, flags: u8) -> Vec<u8> {
    Spec::tcp((CLIENT, sport), (VIP, 80), flags).build()
}

/// Sends a SYN and returns the backend address it was sent to.
fn open(lab: &mut Lab, hook: Hook, sport: u16) -> Ipv4Addr {
    open_from(lab, hook, CLIENT, sport)
}

/// As [`open`], from another client address (on the client's link).
fn open_from(lab: &mut Lab, hook: Hook, client: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let frame = Spec::tcp((client, sport), (VIP, 80), TCP_SYN).build();
    let (act, out) = run(lab, hook, "n0", &frame);
    assert_eq!(
        act,
        Action::Redirect,
        "{hook:?} SYN from {client}:{sport}: {:?}",
        lab.outcomes()
    );
    packet::read(&out.frame).dst
}

#[test]
fn syn_to_a_vip_is_balanced_natted_and_forwarded() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let (act, out) = run(lab, hook, "n0", &syn(40000).build());
            assert_eq!(act, Action::Redirect, "{hook:?}: {:?}", lab.outcomes());
            let seen = packet::read(&out.frame);
            assert_eq!(seen.dst, backend(1), "{hook:?}: first round-robin turn");
            assert_eq!((seen.src, seen.sport, seen.dport), (CLIENT, 40000, 8080));
            assert_eq!(seen.ttl, 63, "{hook:?}: a router decrements TTL");
            assert!(
                seen.ip_checksum_ok && seen.l4_checksum_ok,
                "{hook:?}: {seen:?}"
            );
            assert_eq!(seen.dst_mac, backend_mac(1), "{hook:?}: next hop's MAC");
            assert_eq!(seen.tcp_flags, TCP_SYN);
            assert_eq!(lab.outcomes().get(fwd(hook)), Some(&1), "{hook:?}");
            let flows = lab.flows();
            assert_eq!(flows.len(), 1);
            assert_eq!(flows[0].1.state, FLOW_OPEN);
            assert_eq!(lab.open_connections(backend(1)), 1);
            assert_eq!(lab.backend_traffic(backend(1)).new_flows, 1);
            assert_eq!(lab.backend_traffic(backend(1)).fwd_packets, 1);
        });
    }
}

#[test]
fn an_established_flow_keeps_its_backend() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            assert_eq!(open(lab, hook, 40001), backend(2));
            for flags in [TCP_ACK, TCP_ACK | TCP_PSH, TCP_SYN] {
                // Retransmitted SYN and data alike stay on the first choice.
                let (act, out) = run(lab, hook, "n0", &to_vip(40000, flags));
                assert_eq!(act, Action::Redirect);
                assert_eq!(
                    packet::read(&out.frame).dst,
                    backend(1),
                    "{hook:?} {flags:#x}"
                );
            }
            assert_eq!(
                open(lab, hook, 40002),
                backend(3),
                "{hook:?}: the turn moved on"
            );
            assert_eq!(lab.flows().len(), 3);
        });
    }
}

#[test]
fn round_robin_is_exact_over_300_flows() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let mut counts = [0usize; 3];
            for sport in 0..300 {
                let dst = open(lab, hook, 20000 + sport);
                counts[dst.octets()[2] as usize - 1] += 1;
            }
            assert_eq!(counts, [100, 100, 100], "{hook:?}");
        });
    }
}

#[test]
fn weighted_round_robin_is_exact() {
    let manifest = MANIFEST
        .replace("algorithm: round-robin", "algorithm: weighted-round-robin")
        .replace(
            "{ address: 198.19.3.2 }",
            "{ address: 198.19.3.2, weight: 2 }",
        );
    for hook in HOOKS {
        with_lab(&manifest, |lab| {
            let mut counts = [0usize; 3];
            for sport in 0..400 {
                let dst = open(lab, hook, 20000 + sport);
                counts[dst.octets()[2] as usize - 1] += 1;
            }
            assert_eq!(counts, [100, 100, 200], "{hook:?}: 1:1:2");
        });
    }
}

#[test]
fn least_connections_prefers_the_backend_with_fewest_open_flows() {
    let manifest = MANIFEST.replace("algorithm: round-robin", "algorithm: least-connections");
    for hook in HOOKS {
        with_lab(&manifest, |lab| {
            // Ties rotate: one flow each.
            let first: Vec<Ipv4Addr> = (0..3).map(|i| open(lab, hook, 30000 + i)).collect();
            let mut sorted = first.clone();
            sorted.sort();
            assert_eq!(sorted, [backend(1), backend(2), backend(3)], "{hook:?}");
            // Close the flow on the backend that got port 30001.
            let freed = first[1];
            let (act, _) = run(lab, hook, "n0", &to_vip(30001, TCP_FIN | TCP_ACK));
            assert_eq!(act, Action::Redirect);
            assert_eq!(
                lab.open_connections(freed),
                0,
                "{hook:?}: FIN returns the count"
            );
            // The next two new flows: the freed backend first, then any (all tie).
            assert_eq!(open(lab, hook, 30010), freed, "{hook:?}: fewest open wins");
            for b in 1..=3 {
                assert_eq!(lab.open_connections(backend(b)), 1, "{hook:?}");
            }
        });
    }
}

#[test]
fn weighted_least_connections_scales_by_weight() {
    let manifest = MANIFEST
        .replace(
            "algorithm: round-robin",
            "algorithm: weighted-least-connections",
        )
        .replace(
            "{ address: 198.19.3.2 }",
            "{ address: 198.19.3.2, weight: 3 }",
        );
    with_lab(&manifest, |lab| {
        let mut counts = [0usize; 3];
        for sport in 0..50 {
            let dst = open(lab, Hook::Xdp, 30000 + sport);
            counts[dst.octets()[2] as usize - 1] += 1;
        }
        // Open flows per unit of weight stay level: 10 / 10 / 30.
        assert_eq!(counts, [10, 10, 30]);
    });
}

/// Where the kernel sends each of `sports` for a Maglev service whose
/// backends are listed as `order` (backend numbers).
fn maglev_choices(hook: Hook, order: &[u8], sports: std::ops::Range<u16>) -> Vec<Ipv4Addr> {
    let backends: String = order
        .iter()
        .map(|&i| format!("  - {{ address: 198.19.{i}.2 }}\n"))
        .collect();
    let manifest = format!(
        "kind: Service\nname: web\nvip: 198.18.0.10\nports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]\nalgorithm: maglev\nbackends:\n{backends}"
    );
    with_lab(&manifest, |lab| {
        sports.map(|sport| open(lab, hook, sport)).collect()
    })
}

#[test]
fn maglev_picks_by_flow_hash_the_same_on_every_node() {
    use sluice_common::{layout::MAGLEV_DEFAULT_TABLE_SIZE, maglev};
    let sports = 40000u16..40300;
    // What user space predicts: the flow hash of the client's 5-tuple (as on
    // the wire) into the lookup table built from (address, port).
    let listed = [backend(1), backend(2), backend(3)];
    let identities: Vec<(u64, u32)> = listed
        .iter()
        .map(|a| ((u64::from(u32::from(*a)) << 16) | 8080, 1))
        .collect();
    let table = maglev::table(&identities, MAGLEV_DEFAULT_TABLE_SIZE);
    let expected: Vec<Ipv4Addr> = sports
        .clone()
        .map(|sport| {
            let hash = maglev::flow_hash(
                u32::from_ne_bytes(CLIENT.octets()),
                u32::from_ne_bytes(VIP.octets()),
                sport.to_be(),
                80u16.to_be(),
                6,
            );
            listed[table[(hash % MAGLEV_DEFAULT_TABLE_SIZE) as usize] as usize]
        })
        .collect();
    for hook in HOOKS {
        let node_a = maglev_choices(hook, &[1, 2, 3], sports.clone());
        assert_eq!(node_a, expected, "{hook:?}");
        // Another node, backends listed (and numbered) differently: same choices.
        let node_b = maglev_choices(hook, &[3, 1, 2], sports.clone());
        assert_eq!(node_b, node_a, "{hook:?}: consistent across nodes");
        for b in listed {
            let n = node_a.iter().filter(|&&d| d == b).count();
            assert!((70..=130).contains(&n), "{hook:?}: {b} got {n} of 300");
        }
        // Without backend 2, flows that were elsewhere stay where they were.
        let without_2 = maglev_choices(hook, &[1, 3], sports.clone());
        let moved = node_a
            .iter()
            .zip(&without_2)
            .filter(|(before, after)| **before != backend(2) && before != after)
            .count();
        assert!(
            moved <= 6,
            "{hook:?}: {moved} of the flows on 1 and 3 moved"
        );
        assert!(without_2.iter().all(|&d| d != backend(2)));
    }
}

#[test]
fn replies_are_reverse_natted_to_the_vip() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            let reply = Spec::tcp((backend(1), 8080), (CLIENT, 40000), TCP_SYN | TCP_ACK);
            let (act, out) = run(lab, hook, "nb1", &reply.build());
            assert_eq!(act, Action::Redirect, "{hook:?}: {:?}", lab.outcomes());
            let seen = packet::read(&out.frame);
            assert_eq!(
                (seen.src, seen.sport),
                (VIP, 80),
                "{hook:?}: the client sees the VIP"
            );
            assert_eq!((seen.dst, seen.dport), (CLIENT, 40000));
            assert_eq!(seen.dst_mac, CLIENT_MAC);
            assert_eq!(seen.ttl, 63);
            assert!(
                seen.ip_checksum_ok && seen.l4_checksum_ok,
                "{hook:?}: {seen:?}"
            );
            assert_eq!(lab.backend_traffic(backend(1)).rev_packets, 1);
        });
    }
}

#[test]
fn udp_is_natted_both_ways_with_valid_or_absent_checksums() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let query = Spec::udp((CLIENT, 5000), (VIP, 53), b"what is the answer");
            let (act, out) = run(lab, hook, "n0", &query.build());
            assert_eq!(act, Action::Redirect);
            let seen = packet::read(&out.frame);
            assert_eq!((seen.dst, seen.dport), (backend(1), 5353));
            assert!(seen.l4_checksum_ok && !seen.udp_checksum_zero, "{hook:?}");

            let answer = Spec::udp((backend(1), 5353), (CLIENT, 5000), b"42");
            let (act, out) = run(lab, hook, "nb1", &answer.build());
            assert_eq!(act, Action::Redirect);
            let seen = packet::read(&out.frame);
            assert_eq!((seen.src, seen.sport), (VIP, 53));
            assert!(seen.l4_checksum_ok, "{hook:?}");

            let unchecked = Spec {
                l4: L4::Udp { checksum: false },
                ..Spec::udp((CLIENT, 5000), (VIP, 53), b"again")
            };
            let (_, out) = run(lab, hook, "n0", &unchecked.build());
            let seen = packet::read(&out.frame);
            assert!(
                seen.udp_checksum_zero,
                "{hook:?}: no checksum stays no checksum"
            );
            assert_eq!(seen.dst, backend(1), "{hook:?}: the UDP flow sticks");
        });
    }
}

#[test]
fn traffic_not_for_a_vip_passes_untouched() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let direct = Spec::tcp((CLIENT, 40000), (backend(1), 8080), TCP_SYN).build();
            let (act, out) = run(lab, hook, "n0", &direct);
            assert_eq!(act, Action::Pass);
            assert_eq!(out.frame, direct, "{hook:?}: not a byte changed");
            // An unsolicited packet from a backend is not a reply of any flow.
            let stray = Spec::tcp((backend(1), 8080), (CLIENT, 1234), TCP_ACK).build();
            let (act, out) = run(lab, hook, "nb1", &stray);
            assert_eq!((act, out.frame), (Action::Pass, stray));
            let icmp = Spec {
                l4: L4::Other { proto: 1 },
                payload: vec![8, 0, 0, 0, 0, 0, 0, 0],
                ..Spec::tcp((CLIENT, 0), (backend(1), 0), 0)
            };
            assert_eq!(run(lab, hook, "n0", &icmp.build()).0, Action::Pass);
            let arp = Spec {
                ethertype: 0x0806,
                ..syn(1)
            };
            assert_eq!(run(lab, hook, "n0", &arp.build()).0, Action::Pass);
            let outcomes = lab.outcomes();
            assert_eq!(outcomes.get("pass_not_service"), Some(&2), "{hook:?}");
            assert_eq!(outcomes.get("pass_other_protocol"), Some(&1));
            assert_eq!(outcomes.get("pass_not_ipv4"), Some(&1));
            assert!(lab.flows().is_empty());
        });
    }
}

#[test]
fn a_vip_on_a_wrong_port_or_protocol_is_dropped() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let wrong_port = Spec::tcp((CLIENT, 40000), (VIP, 81), TCP_SYN).build();
            let wrong_proto = Spec::udp((CLIENT, 40000), (VIP, 80), b"x").build();
            let icmp = Spec {
                l4: L4::Other { proto: 1 },
                payload: vec![8, 0, 0, 0, 0, 0, 0, 0],
                ..Spec::tcp((CLIENT, 0), (VIP, 0), 0)
            }
            .build();
            for frame in [&wrong_port, &wrong_proto, &icmp] {
                assert_eq!(run(lab, hook, "n0", frame).0, Action::Drop, "{hook:?}");
            }
            let outcomes = lab.outcomes();
            assert_eq!(outcomes.get("drop_vip_unknown_port"), Some(&2), "{hook:?}");
            assert_eq!(outcomes.get("drop_vip_protocol"), Some(&1));
        });
    }
}

#[test]
fn truncated_frames_get_a_defined_verdict_at_every_layer() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let whole = syn(40000).build();
            // The kernel refuses test runs shorter than an Ethernet header, so
            // cuts start there. Up to the IPv4 header, and wherever the IPv4
            // total length promises more than the frame holds, the packet is
            // not parseable as ours: passed, counted as malformed IPv4.
            // The kernel (6.18) builds no test skb whose IPv4 header is
            // incomplete, so TC starts at a whole IPv4 header; XDP covers the
            // shorter cuts, with the same parser.
            let shortest = match hook {
                Hook::Xdp => packet::ETH_HLEN,
                Hook::Tc => packet::ETH_HLEN + 20,
            };
            for cut in shortest..whole.len() {
                let (act, out) = run(lab, hook, "n0", &whole[..cut]);
                assert_eq!(act, Action::Pass, "{hook:?} cut at {cut}");
                assert_eq!(out.frame, &whole[..cut]);
            }
            assert_eq!(
                lab.outcomes().get("pass_malformed_ipv4").copied(),
                Some((whole.len() - shortest) as u64),
                "{hook:?}"
            );
            // A consistent IPv4 header carrying a cut TCP header: to a VIP it
            // is dropped, elsewhere passed.
            let short_tcp = |dst: Ipv4Addr| {
                let mut frame = Spec::tcp((CLIENT, 40000), (dst, 80), TCP_SYN).build();
                frame.truncate(packet::ETH_HLEN + 20 + 10);
                let total = (20u16 + 10).to_be_bytes();
                frame[packet::ETH_HLEN + 2..packet::ETH_HLEN + 4].copy_from_slice(&total);
                fix_ip_checksum(&mut frame);
                frame
            };
            assert_eq!(run(lab, hook, "n0", &short_tcp(VIP)).0, Action::Drop);
            assert_eq!(run(lab, hook, "n0", &short_tcp(backend(1))).0, Action::Pass);
            // A TCP data offset below 5 words is invalid too.
            let mut bad_offset = syn(40001).build();
            bad_offset[packet::ETH_HLEN + 20 + 12] = 4 << 4;
            assert_eq!(run(lab, hook, "n0", &bad_offset).0, Action::Drop);
            let outcomes = lab.outcomes();
            assert_eq!(outcomes.get("drop_vip_malformed_l4"), Some(&2), "{hook:?}");
            assert_eq!(outcomes.get("pass_malformed_l4"), Some(&1));
            assert!(lab.flows().is_empty());
        });
    }
}

fn fix_ip_checksum(frame: &mut [u8]) {
    let ip = &mut frame[packet::ETH_HLEN..packet::ETH_HLEN + 20];
    ip[10] = 0;
    ip[11] = 0;
    let c = sluice_common::csum::checksum(ip, 0);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
}

#[test]
fn malformed_ipv4_headers_pass_to_the_kernel() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let mut version6 = syn(40000).build();
            version6[packet::ETH_HLEN] = 0x65;
            let mut ihl4 = syn(40000).build();
            ihl4[packet::ETH_HLEN] = 0x44;
            for frame in [version6, ihl4] {
                let (act, out) = run(lab, hook, "n0", &frame);
                assert_eq!((act, out.frame), (Action::Pass, frame), "{hook:?}");
            }
            assert_eq!(lab.outcomes().get("pass_malformed_ipv4"), Some(&2));
        });
    }
}

#[test]
fn ipv4_options_are_skipped_and_preserved() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let options = vec![1, 1, 1, 1, 0x94, 4, 0, 0]; // NOPs, Router Alert
            let spec = Spec {
                ip_options: options.clone(),
                ..syn(40000)
            };
            let (act, out) = run(lab, hook, "n0", &spec.build());
            assert_eq!(act, Action::Redirect, "{hook:?}: {:?}", lab.outcomes());
            let seen = packet::read(&out.frame);
            assert_eq!((seen.dst, seen.dport), (backend(1), 8080));
            assert!(
                seen.ip_checksum_ok && seen.l4_checksum_ok,
                "{hook:?}: {seen:?}"
            );
            let at = packet::ETH_HLEN + 20;
            assert_eq!(&out.frame[at..at + options.len()], &options[..]);
        });
    }
}

#[test]
fn fragments_are_dropped_for_vips_and_passed_otherwise() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let first = Spec {
                fragment: (true, 0),
                ..syn(40000)
            };
            let later = Spec {
                fragment: (false, 100),
                ..syn(40000)
            };
            let elsewhere = Spec {
                fragment: (true, 0),
                ..Spec::tcp((CLIENT, 40000), (backend(1), 8080), TCP_SYN)
            };
            assert_eq!(run(lab, hook, "n0", &first.build()).0, Action::Drop);
            assert_eq!(run(lab, hook, "n0", &later.build()).0, Action::Drop);
            assert_eq!(run(lab, hook, "n0", &elsewhere.build()).0, Action::Pass);
            let outcomes = lab.outcomes();
            assert_eq!(outcomes.get("drop_vip_fragment"), Some(&2), "{hook:?}");
            assert_eq!(outcomes.get("pass_fragment"), Some(&1));
            assert!(lab.flows().is_empty());
        });
    }
}

#[test]
fn fin_and_rst_return_the_connection_count_exactly_once() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            assert_eq!(lab.open_connections(backend(1)), 1);
            // Client FIN closes...
            assert_eq!(
                run(lab, hook, "n0", &to_vip(40000, TCP_FIN | TCP_ACK)).0,
                Action::Redirect
            );
            assert_eq!(lab.open_connections(backend(1)), 0, "{hook:?}");
            assert_eq!(lab.flows()[0].1.state, FLOW_CLOSED);
            // ...and the backend's FIN (reply direction) does not count again.
            let fin = Spec::tcp((backend(1), 8080), (CLIENT, 40000), TCP_FIN | TCP_ACK).build();
            assert_eq!(run(lab, hook, "nb1", &fin).0, Action::Redirect);
            assert_eq!(
                lab.open_connections(backend(1)),
                0,
                "{hook:?}: exactly once"
            );
            // The last ACK still reaches the backend.
            let (act, out) = run(lab, hook, "n0", &to_vip(40000, TCP_ACK));
            assert_eq!(
                (act, packet::read(&out.frame).dst),
                (Action::Redirect, backend(1))
            );

            // A fresh SYN on the closed 5-tuple is a new connection: balanced again.
            assert_eq!(open(lab, hook, 40000), backend(2), "{hook:?}: port reuse");
            assert_eq!(lab.open_connections(backend(2)), 1);
            // A reply RST closes it.
            let rst = Spec::tcp((backend(2), 8080), (CLIENT, 40000), TCP_RST).build();
            assert_eq!(run(lab, hook, "nb2", &rst).0, Action::Redirect);
            assert_eq!(lab.open_connections(backend(2)), 0, "{hook:?}");

            // A RST for no known flow is dropped, never balanced.
            assert_eq!(
                run(lab, hook, "n0", &to_vip(41000, TCP_RST)).0,
                Action::Drop
            );
            assert_eq!(lab.outcomes().get("drop_rst_no_flow"), Some(&1));
        });
    }
}

#[test]
fn a_service_without_backends_drops_its_traffic() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let frame = Spec::tcp((CLIENT, 40000), (VIP_NO_BACKENDS, 80), TCP_SYN).build();
            assert_eq!(run(lab, hook, "n0", &frame).0, Action::Drop);
            assert_eq!(lab.outcomes().get("drop_no_backend"), Some(&1), "{hook:?}");
        });
    }
}

#[test]
fn an_unresolved_next_hop_goes_to_the_stack_already_natted() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let frame = Spec::tcp((CLIENT, 40000), (VIP_UNRESOLVED, 80), TCP_SYN).build();
            let (act, out) = run(lab, hook, "n0", &frame);
            assert_eq!(act, Action::Pass, "{hook:?}: never dropped");
            let seen = packet::read(&out.frame);
            assert_eq!(
                (seen.dst, seen.dport),
                (backend(4), 80),
                "{hook:?}: already rewritten"
            );
            assert_eq!(
                seen.ttl, 64,
                "{hook:?}: the kernel decrements it when it forwards"
            );
            assert!(seen.ip_checksum_ok && seen.l4_checksum_ok);
            assert_eq!(lab.outcomes().get("stack_no_neigh"), Some(&1));
            // The flow exists: once ARP resolves, the next packets go the fast way.
            assert_eq!(lab.flows().len(), 1);
        });
    }
}

#[test]
fn an_expiring_ttl_goes_to_the_stack() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            let spec = Spec {
                ttl: 1,
                ..syn(40000)
            };
            let (act, out) = run(lab, hook, "n0", &spec.build());
            assert_eq!(act, Action::Pass, "{hook:?}");
            assert_eq!(
                packet::read(&out.frame).ttl,
                1,
                "the kernel answers with ICMP"
            );
            assert_eq!(lab.outcomes().get("stack_other"), Some(&1));
        });
    }
}

#[test]
fn xdp_redirects_only_into_devices_that_take_xdp_frames() {
    with_lab(MANIFEST, |lab| {
        // nb1 not in XDP_EGRESS: its peer could drop XDP frames silently.
        let out = lab.xdp("n0", &syn(40000).build());
        assert_eq!(action(Hook::Xdp, out.action), Action::Pass);
        let seen = packet::read(&out.frame);
        assert_eq!(seen.dst, backend(1), "rewritten: the kernel forwards it");
        assert_eq!(seen.ttl, 64);
        assert_eq!(seen.dst_mac, [0x02, 0, 0, 0, 0, 0x01], "L2 untouched");
        assert_eq!(lab.outcomes().get("stack_no_xdp_egress"), Some(&1));
        lab.allow_xdp_egress("nb1");
        let out = lab.xdp("n0", &to_vip(40000, TCP_ACK));
        assert_eq!(action(Hook::Xdp, out.action), Action::Redirect);
    });
}

#[test]
fn xdp_defers_offload_pending_checksums_to_tc_untouched() {
    with_lab(MANIFEST, |lab| {
        let partial = Spec {
            partial_checksum: true,
            ..syn(40000)
        }
        .build();
        let out = lab.xdp("n0", &partial);
        assert_eq!(action(Hook::Xdp, out.action), Action::Pass);
        assert_eq!(out.frame, partial, "untouched");
        assert_eq!(
            out.meta,
            XDP_DEFER_MARK.to_ne_bytes(),
            "marked for the companion"
        );
        assert_eq!(lab.outcomes().get("xdp_defer_partial_csum"), Some(&1));
        assert!(lab.flows().is_empty(), "no state changed before deferring");
        // A reply of a known flow with a pending checksum is deferred too.
        lab.allow_xdp_egress("nb1");
        assert_eq!(
            action(Hook::Xdp, lab.xdp("n0", &syn(40001).build()).action),
            Action::Redirect
        );
        let reply = Spec {
            partial_checksum: true,
            ..Spec::tcp((backend(1), 8080), (CLIENT, 40001), TCP_SYN | TCP_ACK)
        };
        let out = lab.xdp("nb1", &reply.build());
        assert_eq!(out.meta, XDP_DEFER_MARK.to_ne_bytes());
        assert_eq!(lab.outcomes().get("xdp_defer_partial_csum"), Some(&2));
    });
}

#[test]
fn the_tc_companion_acts_only_on_packets_xdp_deferred() {
    with_lab(MANIFEST, |lab| {
        let frame = syn(40000).build();
        let out = lab.tc("n0", &frame, true);
        assert_eq!(action(Hook::Tc, out.action), Action::Pass);
        assert_eq!(out.frame, frame);
        assert!(lab.outcomes().is_empty(), "XDP already counted it");
        assert!(lab.flows().is_empty());
    });
}

#[test]
fn a_manifest_change_keeps_tcp_flows_and_purges_udp_flows_of_removed_backends() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            let udp = Spec::udp((CLIENT, 5000), (VIP, 53), b"q").build();
            let (_, out) = run(lab, hook, "n0", &udp);
            // Each service port has its own round-robin turn.
            assert_eq!(packet::read(&out.frame).dst, backend(1));

            // Backends 1 and 2 leave.
            lab.apply(&MANIFEST.replace(
                "  - { address: 198.19.1.2 }\n  - { address: 198.19.2.2 }\n",
                "",
            ));
            // The established TCP flow finishes on its backend...
            let (act, out) = run(lab, hook, "n0", &to_vip(40000, TCP_ACK));
            assert_eq!(
                (act, packet::read(&out.frame).dst),
                (Action::Redirect, backend(1))
            );
            // ...new ones go to the remaining backend only...
            for sport in 0..4 {
                assert_eq!(open(lab, hook, 42000 + sport), backend(3), "{hook:?}");
            }
            // ...and the UDP flow was purged: the next datagram is balanced again.
            let (_, out) = run(lab, hook, "n0", &udp);
            assert_eq!(
                packet::read(&out.frame).dst,
                backend(3),
                "{hook:?}: not stuck on a removed backend"
            );
        });
    }
}

#[test]
fn next_hops_are_cached_per_backend_and_per_reply_and_refreshed() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            let id = lab.backend_id(backend(1), 8080);
            let cached = lab.dataplane.maps.next_hops.get(&id, 0).expect("next hop");
            assert_eq!(cached.ifindex, lab.ifindex("nb1"), "{hook:?}");
            // The backend's MAC changes: established packets keep the cached
            // next hop for at most NEXT_HOP_TTL_NS, then look it up again.
            let moved = [0x02, 0, 0, 0, 0x01, 0x99];
            lab.command(&[
                "ip",
                "neigh",
                "replace",
                "198.19.1.2",
                "lladdr",
                "02:00:00:00:01:99",
                "dev",
                "nb1",
                "nud",
                "permanent",
            ]);
            let (_, out) = run(lab, hook, "n0", &to_vip(40000, TCP_ACK));
            assert_eq!(
                packet::read(&out.frame).dst_mac,
                backend_mac(1),
                "{hook:?}: cached"
            );
            std::thread::sleep(Duration::from_nanos(
                sluice_common::layout::NEXT_HOP_TTL_NS + 200_000_000,
            ));
            let (_, out) = run(lab, hook, "n0", &to_vip(40000, TCP_ACK));
            assert_eq!(
                packet::read(&out.frame).dst_mac,
                moved,
                "{hook:?}: refreshed"
            );
            // Replies cache their own next hop.
            let reply = Spec::tcp((backend(1), 8080), (CLIENT, 40000), TCP_ACK).build();
            let (act, _) = run(lab, hook, "nb1", &reply);
            assert_eq!(act, Action::Redirect);
            let cached = lab
                .dataplane
                .maps
                .replies
                .iter()
                .map(|e| e.expect("reply entry").1)
                .next()
                .expect("a reply entry");
            assert_eq!(cached.next_hop.ifindex, lab.ifindex("n0"), "{hook:?}");
        });
    }
}

#[test]
fn deleting_a_service_port_ends_its_flows() {
    for hook in HOOKS {
        with_lab(MANIFEST, |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            let udp = Spec::udp((CLIENT, 5000), (VIP, 53), b"q").build();
            assert_eq!(run(lab, hook, "n0", &udp).0, Action::Redirect);
            assert_eq!(lab.flows().len(), 2);
            // TCP 80 goes; UDP 53 stays on the VIP.
            lab.apply(&MANIFEST.replace("  - { port: 80, protocol: TCP, targetPort: 8080 }\n", ""));
            assert_eq!(lab.flows().len(), 1, "{hook:?}: only the UDP flow is left");
            assert_eq!(
                run(lab, hook, "n0", &to_vip(40000, TCP_ACK)).0,
                Action::Drop,
                "{hook:?}"
            );
            assert_eq!(lab.outcomes().get("drop_vip_unknown_port"), Some(&1));
            assert_eq!(run(lab, hook, "n0", &udp).0, Action::Redirect, "{hook:?}");
        });
    }
}

/// A second client, beside [`CLIENT`] on its link.
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);

/// [`MANIFEST`] with client-IP session affinity on the web service.
fn with_affinity(seconds: u32) -> String {
    MANIFEST.replace(
        "algorithm: round-robin\n",
        &format!(
            "algorithm: round-robin\nsessionAffinity: {{ clientIP: {{ timeoutSeconds: {seconds} }} }}\n"
        ),
    )
}

/// (client, backend id) of every affinity entry, sorted.
fn remembered(lab: &Lab) -> Vec<(Ipv4Addr, u32)> {
    let mut out: Vec<(Ipv4Addr, u32)> = lab
        .affinities()
        .iter()
        .map(|(k, v)| (Ipv4Addr::from(k.client.to_ne_bytes()), v.backend_id))
        .collect();
    out.sort();
    out
}

#[test]
fn affinity_ties_a_clients_new_flows_to_one_backend() {
    for hook in HOOKS {
        with_lab(&with_affinity(300), |lab| {
            for sport in 40000..40010 {
                assert_eq!(open(lab, hook, sport), backend(1), "{hook:?}: from {sport}");
            }
            assert_eq!(
                open_from(lab, hook, OTHER_CLIENT, 40000),
                backend(2),
                "{hook:?}: another client takes the next round-robin turn"
            );
            assert_eq!(open(lab, hook, 40010), backend(1), "{hook:?}");
            assert_eq!(open_from(lab, hook, OTHER_CLIENT, 40001), backend(2));
            // Followed or not, a new flow counts as one (least-connections
            // and the idle reaper rely on it).
            assert_eq!(lab.open_connections(backend(1)), 11, "{hook:?}");
            assert_eq!(lab.open_connections(backend(2)), 2, "{hook:?}");
            assert_eq!(lab.backend_traffic(backend(1)).new_flows, 11, "{hook:?}");
            assert_eq!(
                remembered(lab),
                [
                    (CLIENT, lab.backend_id(backend(1), 8080)),
                    (OTHER_CLIENT, lab.backend_id(backend(2), 8080)),
                ],
                "{hook:?}"
            );
        });
    }
}

#[test]
fn an_expired_affinity_is_balanced_again() {
    for hook in HOOKS {
        with_lab(&with_affinity(2), |lab| {
            assert_eq!(open(lab, hook, 40000), backend(1));
            let (key, entry) = lab.affinities()[0];
            let seen_ago = |lab: &mut Lab, ns: u64| {
                let entry = AffinityV4 {
                    last_seen_ns: coarse_now_ns() - ns,
                    ..entry
                };
                lab.dataplane
                    .maps
                    .affinity
                    .insert(key, entry, 0)
                    .expect("writing an affinity entry");
                entry.last_seen_ns
            };
            // Seen a second ago, within the 2 s timeout: followed, and the
            // timeout starts again.
            let then = seen_ago(lab, 1_000_000_000);
            assert_eq!(open(lab, hook, 40001), backend(1), "{hook:?}");
            assert!(
                lab.affinities()[0].1.last_seen_ns > then,
                "{hook:?}: refreshed"
            );
            // Seen 3 s ago: balanced again (the next turn), and remembered.
            seen_ago(lab, 3_000_000_000);
            assert_eq!(open(lab, hook, 40002), backend(2), "{hook:?}: expired");
            assert_eq!(open(lab, hook, 40003), backend(2), "{hook:?}: new choice");
            assert_eq!(
                remembered(lab),
                [(CLIENT, lab.backend_id(backend(2), 8080))]
            );
        });
    }
}

#[test]
fn affinity_is_not_followed_to_a_backend_out_of_rotation() {
    let affine = with_affinity(300);
    let draining = affine.replace(
        "{ address: 198.19.1.2 }",
        "{ address: 198.19.1.2, draining: true }",
    );
    let removed = affine.replace("  - { address: 198.19.1.2 }\n", "");
    // The far side of a rollout keeps its entry with weight 0.
    let no_share = affine
        .replace(
            "algorithm: round-robin\n",
            "algorithm: round-robin\nrollout: { to: v2, percent: 100 }\n",
        )
        .replace(
            "{ address: 198.19.2.2 }",
            "{ address: 198.19.2.2, version: v2 }",
        )
        .replace(
            "{ address: 198.19.3.2 }",
            "{ address: 198.19.3.2, version: v2 }",
        );
    for (why, manifest) in [
        ("draining", draining),
        ("removed", removed),
        ("no share", no_share),
    ] {
        for hook in HOOKS {
            with_lab(&affine, |lab| {
                assert_eq!(open(lab, hook, 40000), backend(1));
                lab.apply(&manifest);
                let next = open(lab, hook, 40001);
                assert_ne!(next, backend(1), "{hook:?}, {why}");
                assert_eq!(open(lab, hook, 40002), next, "{hook:?}, {why}: sticks");
                // The established flow stays where it is.
                let (act, out) = run(lab, hook, "n0", &to_vip(40000, TCP_ACK));
                assert_eq!(act, Action::Redirect);
                assert_eq!(packet::read(&out.frame).dst, backend(1), "{hook:?}");
            });
        }
    }
}

#[test]
fn without_affinity_round_robin_ignores_the_client() {
    for hook in HOOKS {
        with_lab(&with_affinity(300), |lab| {
            for sport in 40000..40003 {
                assert_eq!(open(lab, hook, sport), backend(1), "{hook:?}");
            }
            // Dropping affinity rewrites the frontend value alone (the slot
            // table is the same); the cursor moved once.
            lab.apply(MANIFEST);
            let next: Vec<Ipv4Addr> = (40003..40006).map(|p| open(lab, hook, p)).collect();
            assert_eq!(next, [backend(2), backend(3), backend(1)], "{hook:?}");
            assert_eq!(
                lab.affinities().len(),
                1,
                "{hook:?}: nothing new remembered"
            );
        });
        with_lab(MANIFEST, |lab| {
            let turns: Vec<Ipv4Addr> = (40000..40006).map(|p| open(lab, hook, p)).collect();
            let expected = [1, 2, 3, 1, 2, 3].map(backend);
            assert_eq!(turns, expected, "{hook:?}");
            assert!(lab.affinities().is_empty(), "{hook:?}");
        });
    }
}

#[test]
fn deleting_a_service_port_forgets_its_affinities() {
    let affine = with_affinity(300);
    with_lab(&affine, |lab| {
        assert_eq!(open(lab, Hook::Tc, 40000), backend(1));
        let udp = Spec::udp((CLIENT, 5000), (VIP, 53), b"q").build();
        assert_eq!(run(lab, Hook::Tc, "n0", &udp).0, Action::Redirect);
        assert_eq!(lab.affinities().len(), 2, "one per service port");
        // TCP 80 goes: its frontend id may be handed out again later.
        lab.apply(&affine.replace("  - { port: 80, protocol: TCP, targetPort: 8080 }\n", ""));
        let flows = lab.flows();
        assert_eq!(flows.len(), 1, "the UDP flow");
        let left: Vec<u32> = lab
            .affinities()
            .iter()
            .map(|(k, _)| k.frontend_id)
            .collect();
        assert_eq!(
            left,
            [flows[0].1.frontend_id],
            "only UDP 53's affinity is left"
        );
    });
}

// ---- network policy ---------------------------------------------------------------

mod policy {
    use sluice_agent::policy::{PolicyWriter, revoke};
    use sluice_common::types::{IDENTITY_ANY, IPPROTO_TCP, IPPROTO_UDP, PolicyStats};
    use sluice_model::policy::compiled::{CompiledPolicy, Endpoint, IdentityEntry, RuleEntry};

    use super::*;

    /// One backend per service, so a flow's destination is known before the
    /// kernel picks it.
    const MANIFEST: &str = r#"
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP, targetPort: 5353 }
backends: [{ address: 198.19.1.2 }]
---
kind: Service
name: api
vip: 198.18.0.11
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
backends: [{ address: 198.19.2.2 }]
---
kind: Service
name: db
vip: 198.18.0.12
ports: [{ port: 80, protocol: TCP, targetPort: 9090 }]
backends: [{ address: 198.19.3.2 }]
"#;
    const VIPS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(198, 18, 0, 10),
        Ipv4Addr::new(198, 18, 0, 11),
        Ipv4Addr::new(198, 18, 0, 12),
    ];
    /// Target ports of the three services' TCP ports.
    const TARGETS: [u16; 3] = [8080, 8080, 9090];
    const EXCEPTED: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
    const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);

    fn identity(prefix: Ipv4Addr, len: u8, identity: u32, enforced: bool) -> IdentityEntry {
        IdentityEntry {
            prefix: ipnet::Ipv4Net::new(prefix, len).expect("a prefix length"),
            identity,
            enforced,
            stats_slot: identity,
            egress_enforced: Default::default(),
            egress_slot: Default::default(),
        }
    }

    /// backend-1 is protected: 198.18.1.0/24 except 198.18.1.128/25 may reach
    /// it on TCP 8080 (slot 7 counts it), nothing else may.
    fn web_ingress() -> CompiledPolicy {
        CompiledPolicy {
            identities: vec![
                identity(backend(1), 32, 100, true),
                identity(Ipv4Addr::new(198, 18, 1, 0), 24, 200, false),
                identity(Ipv4Addr::new(198, 18, 1, 128), 25, 201, false),
            ],
            rules: vec![RuleEntry {
                dst: 100,
                src: 200,
                port: 8080,
                protocol: IPPROTO_TCP,
                stats_slot: 7,
                egress: Default::default(),
            }],
            slots: Vec::new(),
        }
    }

    fn install(lab: &mut Lab, compiled: &CompiledPolicy) {
        PolicyWriter
            .install(&mut lab.dataplane.maps, compiled)
            .expect("installing policy");
    }

    fn stats(lab: &Lab, slot: u32) -> PolicyStats {
        let per_cpu = lab
            .dataplane
            .maps
            .policy_stats
            .get(&slot, 0)
            .expect("policy stats");
        per_cpu
            .iter()
            .fold(PolicyStats::default(), |sum, s| PolicyStats {
                allowed: sum.allowed + s.allowed,
                denied: sum.denied + s.denied,
            })
    }

    fn syn_from(src: Ipv4Addr, sport: u16, vip: Ipv4Addr) -> Vec<u8> {
        Spec::tcp((src, sport), (vip, 80), TCP_SYN).build()
    }

    #[test]
    fn allowed_sources_pass_others_are_dropped_and_counted() {
        for hook in HOOKS {
            with_lab(MANIFEST, |lab| {
                install(lab, &web_ingress());
                let vip = VIPS[0];
                let (act, out) = run(lab, hook, "n0", &syn_from(CLIENT, 40000, vip));
                assert_eq!(act, Action::Redirect, "{hook:?}: {:?}", lab.outcomes());
                assert_eq!(packet::read(&out.frame).dst, backend(1));
                for (src, what) in [(EXCEPTED, "the except"), (STRANGER, "the world")] {
                    let (act, _) = run(lab, hook, "n0", &syn_from(src, 40001, vip));
                    assert_eq!(act, Action::Drop, "{hook:?}: {what}");
                }
                // The rule names TCP 8080: the same source over UDP is denied.
                let udp = Spec::udp((CLIENT, 40002), (vip, 53), b"q").build();
                assert_eq!(run(lab, hook, "n0", &udp).0, Action::Drop, "{hook:?}");
                assert_eq!(lab.outcomes().get("drop_policy"), Some(&3), "{hook:?}");
                assert_eq!((stats(lab, 7).allowed, stats(lab, 100).denied), (1, 3));
                assert_eq!(
                    lab.flows().len(),
                    1,
                    "{hook:?}: denied flows leave no entry"
                );
                // An unprotected backend stays open to everyone.
                let (act, _) = run(lab, hook, "n0", &syn_from(STRANGER, 40003, VIPS[1]));
                assert_eq!(act, Action::Redirect, "{hook:?}");
            });
        }
    }

    #[test]
    fn verdicts_reach_the_flow_log_allowed_when_sampled_denied_always() {
        use sluice_common::{
            reason,
            types::{FLOW_EVENT_DROP, FLOW_EVENT_NEW, POLICY_ALLOWED, POLICY_DENIED},
        };
        for hook in HOOKS {
            with_lab(MANIFEST, |lab| {
                install(lab, &web_ingress());
                lab.set_flow_log_sample(1);
                let (act, _) = run(lab, hook, "n0", &syn_from(CLIENT, 40000, VIPS[0]));
                assert_eq!(act, Action::Redirect, "{hook:?}");
                let events = lab.flow_events();
                assert_eq!(events.len(), 1, "{hook:?}: {events:?}");
                assert_eq!(
                    (events[0].kind, events[0].verdict, events[0].stats_slot),
                    (FLOW_EVENT_NEW, POLICY_ALLOWED, 7),
                    "{hook:?}: allowed, counted by the web-ingress slot"
                );
                // Sampling off: allowed flows go unlogged, refusals do not.
                lab.set_flow_log_sample(0);
                let (act, _) = run(lab, hook, "n0", &syn_from(STRANGER, 40001, VIPS[0]));
                assert_eq!(act, Action::Drop, "{hook:?}");
                let (act, _) = run(lab, hook, "n0", &syn_from(CLIENT, 40002, VIPS[0]));
                assert_eq!(act, Action::Redirect, "{hook:?}");
                let events = lab.flow_events();
                assert_eq!(events.len(), 1, "{hook:?}: {events:?}");
                let e = events[0];
                assert_eq!(
                    (e.kind, e.verdict, e.reason, e.stats_slot),
                    (
                        FLOW_EVENT_DROP,
                        POLICY_DENIED,
                        reason::DROP_POLICY as u8,
                        100
                    ),
                    "{hook:?}"
                );
                assert_eq!(e.client, u32::from_ne_bytes(STRANGER.octets()));
                assert_eq!(e.backend, u32::from_ne_bytes(backend(1).octets()));
            });
        }
    }

    #[test]
    fn a_new_generation_switches_at_once_and_revokes_what_it_denies() {
        for hook in HOOKS {
            with_lab(MANIFEST, |lab| {
                let vip = VIPS[0];
                install(lab, &web_ingress());
                assert_eq!(
                    run(lab, hook, "n0", &syn_from(CLIENT, 40000, vip)).0,
                    Action::Redirect
                );
                let ack = Spec::tcp((CLIENT, 40000), (vip, 80), TCP_ACK).build();
                assert_eq!(run(lab, hook, "n0", &ack).0, Action::Redirect, "{hook:?}");

                // The new policy admits only 198.18.9.0/24: CLIENT's flow goes.
                let mut other = web_ingress();
                other.identities[1].prefix = "198.18.9.0/24".parse().expect("prefix");
                install(lab, &other);
                assert_eq!(revoke(&mut lab.dataplane.maps, &other).expect("revoke"), 1);
                assert!(lab.flows().is_empty(), "{hook:?}");
                assert_eq!(run(lab, hook, "n0", &ack).0, Action::Drop, "{hook:?}");
                // Only one generation's entries remain.
                let rules = lab.dataplane.maps.policy_rules.keys().count();
                let identities = lab.dataplane.maps.policy_identities.keys().count();
                assert_eq!((rules, identities), (1, 3), "{hook:?}");

                // No policy at all: open again.
                install(lab, &CompiledPolicy::default());
                assert_eq!(
                    run(lab, hook, "n0", &syn_from(CLIENT, 40001, vip)).0,
                    Action::Redirect,
                    "{hook:?}"
                );
                assert_eq!(lab.dataplane.maps.policy_rules.keys().count(), 0);
            });
        }
    }

    /// splitmix64: deterministic, so a failure names a reproducible case.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random policy over the three backends and sources in 198.18.0.0/22.
    fn random_policy(rng: &mut Rng) -> CompiledPolicy {
        let mut p = CompiledPolicy::default();
        for i in 1..=3u8 {
            p.identities.push(identity(
                backend(i),
                32,
                100 + u32::from(i),
                rng.below(4) != 0,
            ));
        }
        for n in 0..rng.below(6) {
            let len = 22 + rng.below(11) as u8;
            let addr = 0xc612_0000u32 | (rng.below(1 << 10) as u32);
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            let prefix = Ipv4Addr::from(addr & mask);
            if p.identities
                .iter()
                .any(|e| e.prefix.addr() == prefix && e.prefix.prefix_len() == len)
            {
                continue;
            }
            let mut client = identity(
                prefix,
                len,
                200 + rng.below(3) as u32 + 10 * n as u32,
                false,
            );
            // Sometimes a client's egress is restricted too.
            if rng.below(3) == 0 {
                client.egress_enforced = true;
                client.egress_slot = 400 + n as u32;
            }
            p.identities.push(client);
        }
        let restricted: Vec<u32> = p
            .identities
            .iter()
            .filter(|e| e.egress_enforced)
            .map(|e| e.identity)
            .collect();
        for _ in 0..rng.below(6) {
            if restricted.is_empty() {
                break;
            }
            let (port, protocol) = match rng.below(4) {
                0 => (0, 0),
                1 => (8080, IPPROTO_TCP),
                2 => (9090, IPPROTO_TCP),
                _ => (5353, IPPROTO_UDP),
            };
            let rule = RuleEntry {
                egress: true,
                src: restricted[rng.below(restricted.len() as u64) as usize],
                dst: match rng.below(4) {
                    0 => IDENTITY_ANY,
                    n => 100 + n as u32,
                },
                port,
                protocol,
                stats_slot: 500 + rng.below(3) as u32,
            };
            if !p.rules.iter().any(|r| {
                (r.egress, r.dst, r.src, r.port, r.protocol)
                    == (true, rule.dst, rule.src, rule.port, rule.protocol)
            }) {
                p.rules.push(rule);
            }
        }
        let sources: Vec<u32> = p.identities.iter().map(|e| e.identity).collect();
        for _ in 0..rng.below(8) {
            let src = if rng.below(4) == 0 {
                IDENTITY_ANY
            } else {
                sources[rng.below(sources.len() as u64) as usize]
            };
            let (port, protocol) = match rng.below(4) {
                0 => (0, 0),
                1 => (8080, IPPROTO_TCP),
                2 => (9090, IPPROTO_TCP),
                _ => (5353, IPPROTO_UDP),
            };
            // A rule for a backend, or for a VIP (on its service ports).
            let (dst, port, protocol) = if rng.below(3) == 0 {
                let service = rng.below(3) as u32;
                match rng.below(3) {
                    0 => (150 + service, 0, 0),
                    1 => (150 + service, 80, IPPROTO_TCP),
                    _ => (150 + service, 53, IPPROTO_UDP),
                }
            } else {
                (101 + rng.below(3) as u32, port, protocol)
            };
            let rule = RuleEntry {
                dst,
                src,
                port,
                protocol,
                stats_slot: 300 + rng.below(5) as u32,
                egress: Default::default(),
            };
            if !p.rules.iter().any(|r| {
                (r.egress, r.dst, r.src, r.port, r.protocol)
                    == (false, rule.dst, rule.src, rule.port, rule.protocol)
            }) {
                p.rules.push(rule);
            }
        }
        p
    }

    /// For random policies and random flows, the kernel's verdict is the
    /// reference evaluation's.
    #[test]
    fn kernel_verdicts_equal_the_reference_evaluation() {
        let mut rng = Rng(0x5eed);
        with_lab(MANIFEST, |lab| {
            let mut sport = 1024u16;
            let mut checked = 0;
            let mut denied = 0;
            for case in 0..60 {
                let policy = random_policy(&mut rng);
                install(lab, &policy);
                for _ in 0..25 {
                    let src = Ipv4Addr::from(0xc612_0000u32 | rng.below(1 << 11) as u32);
                    let service = rng.below(3) as usize;
                    let udp = service == 0 && rng.below(2) == 0;
                    sport = sport.wrapping_add(1).max(1024);
                    let (frame, vip_port, port, protocol) = if udp {
                        (
                            Spec::udp((src, sport), (VIPS[0], 53), b"q").build(),
                            53,
                            5353,
                            IPPROTO_UDP,
                        )
                    } else {
                        (
                            syn_from(src, sport, VIPS[service]),
                            80,
                            TARGETS[service],
                            IPPROTO_TCP,
                        )
                    };
                    let hook = if rng.below(2) == 0 {
                        Hook::Xdp
                    } else {
                        Hook::Tc
                    };
                    let (act, _) = run(lab, hook, "n0", &frame);
                    let want = policy.evaluate_flow(
                        src,
                        Endpoint {
                            addr: VIPS[service],
                            port: vip_port,
                        },
                        Endpoint {
                            addr: backend(service as u8 + 1),
                            port,
                        },
                        protocol,
                    );
                    assert_eq!(
                        act == Action::Drop,
                        !want.is_allowed(),
                        "case {case}: {hook:?} {src}:{sport} → backend-{} {port}/{protocol}: \
                         reference says {want:?}, kernel {act:?}\npolicy: {policy:#?}",
                        service + 1
                    );
                    checked += 1;
                    denied += usize::from(!want.is_allowed());
                }
            }
            assert_eq!(checked, 1500);
            // Both verdicts are exercised in earnest.
            assert!((300..=1200).contains(&denied), "{denied} of 1500 denied");
        });
    }
}

/// The flow log: what the programs write to `FLOW_EVENTS`, and which flows.
mod flow_log {
    use sluice_common::{
        flowlog, reason,
        types::{
            CLOSE_FIN, CLOSE_RST, FLOW_EVENT_CLOSE, FLOW_EVENT_DROP, FLOW_EVENT_NEW, FlowEvent,
            IPPROTO_TCP, NO_FRONTEND, POLICY_NONE,
        },
    };

    use super::*;

    fn be(addr: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(addr.octets())
    }

    fn kinds(events: &[FlowEvent]) -> Vec<(u8, u8)> {
        events.iter().map(|e| (e.kind, e.reason)).collect()
    }

    #[test]
    fn flows_are_logged_when_opened_closed_and_dropped() {
        for hook in HOOKS {
            with_lab(MANIFEST, |lab| {
                lab.set_flow_log_sample(1);
                assert_eq!(open(lab, hook, 40000), backend(1));
                let opened = lab.flow_events();
                assert_eq!(opened.len(), 1, "{hook:?}: {opened:?}");
                let e = opened[0];
                assert_eq!((e.kind, e.verdict), (FLOW_EVENT_NEW, POLICY_NONE));
                assert_eq!((e.client, e.client_port), (be(CLIENT), 40000u16.to_be()));
                assert_eq!((e.vip, e.vip_port), (be(VIP), 80u16.to_be()));
                assert_eq!(
                    (e.backend, e.backend_port),
                    (be(backend(1)), 8080u16.to_be())
                );
                assert_eq!(e.proto, IPPROTO_TCP);
                assert_ne!(e.frontend_id, NO_FRONTEND);
                assert!(e.time_ns > 0 && e.time_ns <= coarse_now_ns() + 1_000_000_000);

                // Data is not an event; the client's FIN closes the flow once.
                run(lab, hook, "n0", &to_vip(40000, TCP_ACK | TCP_PSH));
                run(lab, hook, "n0", &to_vip(40000, TCP_FIN | TCP_ACK));
                let fin = Spec::tcp((backend(1), 8080), (CLIENT, 40000), TCP_FIN | TCP_ACK).build();
                run(lab, hook, "nb1", &fin);
                let closed = lab.flow_events();
                assert_eq!(kinds(&closed), [(FLOW_EVENT_CLOSE, CLOSE_FIN)], "{hook:?}");
                assert_eq!(closed[0].backend, be(backend(1)));
                assert_eq!(closed[0].frontend_id, e.frontend_id);

                // A backend's RST closes from the reply side, named as the
                // client's flow (client → VIP).
                assert_eq!(open(lab, hook, 40001), backend(2));
                let rst = Spec::tcp((backend(2), 8080), (CLIENT, 40001), TCP_RST).build();
                run(lab, hook, "nb2", &rst);
                let events = lab.flow_events();
                assert_eq!(
                    kinds(&events),
                    [(FLOW_EVENT_NEW, 0), (FLOW_EVENT_CLOSE, CLOSE_RST)],
                    "{hook:?}"
                );
                assert_eq!(
                    (events[1].vip, events[1].client_port),
                    (be(VIP), 40001u16.to_be())
                );

                // Drops, each with its reason.
                let wrong_port = Spec::tcp((CLIENT, 40002), (VIP, 81), TCP_SYN).build();
                let no_backend = Spec::tcp((CLIENT, 40003), (VIP_NO_BACKENDS, 80), TCP_SYN).build();
                let fragment = Spec {
                    fragment: (true, 0),
                    ..syn(40004)
                };
                for frame in [
                    wrong_port,
                    no_backend,
                    fragment.build(),
                    to_vip(40005, TCP_RST),
                ] {
                    assert_eq!(run(lab, hook, "n0", &frame).0, Action::Drop, "{hook:?}");
                }
                let drops = lab.flow_events();
                let why = |r: u32| (FLOW_EVENT_DROP, r as u8);
                assert_eq!(
                    kinds(&drops),
                    [
                        why(reason::DROP_VIP_UNKNOWN_PORT),
                        why(reason::DROP_NO_BACKEND),
                        why(reason::DROP_VIP_FRAGMENT),
                        why(reason::DROP_RST_NO_FLOW),
                    ],
                    "{hook:?}"
                );
                assert_eq!(drops[0].frontend_id, NO_FRONTEND, "no service port matched");
                assert_ne!(drops[1].frontend_id, NO_FRONTEND, "the service matched");
                assert!(
                    drops.iter().all(|d| d.backend == 0),
                    "{hook:?}: no backend chosen"
                );
                assert_eq!(
                    (drops[2].client_port, drops[2].vip_port),
                    (0, 0),
                    "a fragment has no ports"
                );

                // Traffic that is not Sluice's is never logged.
                let elsewhere = Spec::tcp((CLIENT, 40006), (backend(1), 8080), TCP_SYN).build();
                assert_eq!(run(lab, hook, "n0", &elsewhere).0, Action::Pass);
                assert!(lab.flow_events().is_empty());
            });
        }
    }

    #[test]
    fn a_sample_takes_the_same_flows_at_opening_and_closing() {
        for hook in HOOKS {
            with_lab(MANIFEST, |lab| {
                lab.set_flow_log_sample(4);
                let sports = 41000..41200u16;
                for sport in sports.clone() {
                    open(lab, hook, sport);
                }
                let opened: Vec<u16> = lab
                    .flow_events()
                    .iter()
                    .map(|e| u16::from_be(e.client_port))
                    .collect();
                let predicted: Vec<u16> = sports
                    .clone()
                    .filter(|&p| {
                        flowlog::sampled(
                            be(CLIENT),
                            be(VIP),
                            p.to_be(),
                            80u16.to_be(),
                            IPPROTO_TCP,
                            4,
                        )
                    })
                    .collect();
                assert_eq!(
                    opened, predicted,
                    "{hook:?}: the kernel samples as user space predicts"
                );
                assert!(
                    (25..=75).contains(&opened.len()),
                    "{hook:?}: about 1 in 4 of 200: {}",
                    opened.len()
                );
                for sport in sports.clone() {
                    run(lab, hook, "n0", &to_vip(sport, TCP_FIN | TCP_ACK));
                }
                let closed: Vec<u16> = lab
                    .flow_events()
                    .iter()
                    .map(|e| u16::from_be(e.client_port))
                    .collect();
                assert_eq!(closed, predicted, "{hook:?}: closes of the same flows");

                lab.set_flow_log_sample(0);
                open(lab, hook, 42000);
                assert!(
                    lab.flow_events().is_empty(),
                    "{hook:?}: 0 turns the log off"
                );
            });
        }
    }
}
