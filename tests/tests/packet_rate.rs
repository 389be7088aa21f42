//! The packet-rate benchmark's generator, smoke-tested (no rates: those are
//! the bench's): frames it makes carry valid checksums and the flow its
//! shape says, and a live-frames run out of a veth delivers every frame to
//! the sink at the other end, counted under the right destination.

use std::{collections::BTreeSet, net::Ipv4Addr};

use sluice_tests::{
    Netns,
    packet::{self, Spec, TCP_SYN},
    packet_rate::{Generator, Shape},
};

const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 1);
const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 50, 2);

fn template(spec: &Spec) -> [u8; 64] {
    spec.build().try_into().expect("a 64-byte frame")
}

fn udp() -> [u8; 64] {
    template(&Spec::udp((SRC, 40_000), (DST, 5353), &[7; 22]))
}

fn tcp_syn() -> [u8; 64] {
    template(&Spec {
        payload: vec![0; 10],
        ..Spec::tcp((SRC, 40_000), (DST, 80), TCP_SYN)
    })
}

#[test]
fn generated_frames_have_valid_checksums_and_the_flows_their_shape_says() {
    let mut generator = Generator::load().expect("loading the generator");
    for frame in [udp(), tcp_syn()] {
        generator.set_frame(&frame).expect("template");
        for (shape, distinct) in [
            (Shape::OneFlow, 1),
            (Shape::NewFlows, 50),
            (Shape::WorkingSet(5), 5),
        ] {
            generator.set_shape(shape).expect("shape");
            let mut flows = BTreeSet::new();
            for _ in 0..50 {
                let seen = packet::read(&generator.make_one().expect("a frame"));
                assert!(seen.ip_checksum_ok, "{shape:?}: IP checksum");
                assert!(seen.l4_checksum_ok, "{shape:?}: L4 checksum");
                assert_eq!(
                    (seen.dst, seen.dport),
                    (DST, u16::from_be_bytes([frame[36], frame[37]]))
                );
                flows.insert((seen.src, seen.sport));
            }
            assert_eq!(flows.len(), distinct, "{shape:?}");
        }
    }
}

#[test]
fn a_live_frames_run_delivers_every_frame_to_the_sink() {
    let sender = Netns::new("gen");
    let receiver = Netns::new("sink");
    sender.ip_ok(&[
        "link",
        "add",
        "g0",
        "type",
        "veth",
        "peer",
        "name",
        "s0",
        "netns",
        receiver.name(),
    ]);
    sender.ip_ok(&["address", "add", "198.18.50.1/24", "dev", "g0"]);
    sender.ip_ok(&["link", "set", "g0", "up"]);
    receiver.ip_ok(&["address", "add", "198.18.50.2/24", "dev", "s0"]);
    receiver.ip_ok(&["link", "set", "s0", "up"]);

    let mut generator = Generator::load().expect("loading the generator");
    generator.attach_sink(&receiver, "s0").expect("the sink");
    generator.set_frame(&udp()).expect("template");
    for shape in [Shape::OneFlow, Shape::NewFlows, Shape::WorkingSet(100)] {
        generator.clear_seen().expect("clearing the sink");
        generator.set_shape(shape).expect("shape");
        let ns_per_frame = generator.run(&sender, "g0", 5_000).expect("the run");
        assert!(ns_per_frame > 0.0);
        let seen = generator.seen().expect("the sink's counts");
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            [((DST, 5353), 5_000)],
            "{shape:?}: every frame arrived, to its destination"
        );
    }
}
