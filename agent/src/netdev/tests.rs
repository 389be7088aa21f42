use super::genl::*;
use super::xdp::*;
use super::*;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use std::process::Command;
use std::time::{Duration, Instant};

// ---- pure: names, framing and parsing

#[test]
fn features_names_and_display() {
    let veth = XdpFeatures::BASIC | XdpFeatures::REDIRECT | XdpFeatures::RX_SG;
    assert_eq!(veth, XdpFeatures(0x23));
    assert_eq!(veth.names(), ["basic", "redirect", "rx-sg"]);
    assert_eq!(veth.to_string(), "basic,redirect,rx-sg");
    assert!(veth.native() && !veth.accepts_redirect());
    let with_peer_napi = XdpFeatures(0x67);
    assert!(with_peer_napi.accepts_redirect());
    assert_eq!(
        with_peer_napi.to_string(),
        "basic,redirect,ndo-xmit,rx-sg,ndo-xmit-sg"
    );
    assert_eq!(XdpFeatures::default().to_string(), "none");
    assert!(XdpFeatures::default().names().is_empty());
    assert_eq!(XdpFeatures(0x101).to_string(), "basic,0x100");
}

#[test]
fn valid_names_follow_the_kernel() {
    assert!(valid_name("eth0") && valid_name("a.b") && valid_name("x".repeat(15).as_str()));
    for bad in ["", ".", "..", "a/b", "a:b", "a b", "a\tb", "a\0b"] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    assert!(!valid_name(&"x".repeat(16)));
}

// Raw wire bytes, built independently of the crates, so the tests check them against the
// kernel's layout rather than against themselves.
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

fn align4(len: usize) -> usize {
    len.next_multiple_of(4)
}

fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&0_u16.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0_u32.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(align4(msg.len()), 0);
    msg
}

fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut attr = Vec::new();
    attr.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&kind.to_ne_bytes());
    attr.extend_from_slice(value);
    attr.resize(align4(attr.len()), 0);
    attr
}

fn genl(cmd: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let mut payload = vec![cmd, version, 0, 0];
    payload.extend_from_slice(attrs);
    payload
}

fn is_malformed<T>(result: Result<T, NetdevError>) -> bool {
    matches!(result, Err(NetdevError::Malformed { .. }))
}

/// The dev attributes of one netdev-family message carrying `attrs` (raw bytes).
fn parse_dev(attrs: &[u8]) -> Result<DevAttrs, NetdevError> {
    let msg = nlmsg(0x20, 1, &genl(NETDEV_CMD_DEV_CHANGE_NTF, 1, attrs));
    let msgs = split_messages(&msg)?;
    let [only] = msgs.as_slice() else {
        panic!("one message expected")
    };
    match parse_genl::<NetdevMessage>(only)? {
        NetlinkPayload::InnerMessage(m) => Ok(dev_attrs(&m.payload.attrs)),
        other => panic!("not a netdev message: {other:?}"),
    }
}

#[test]
fn requests_have_the_kernels_layout() {
    let get = NetdevMessage {
        cmd: NETDEV_CMD_DEV_GET,
        attrs: vec![DevAttr::Ifindex(5)],
    };
    let mut want = nlmsg(
        0x20,
        7,
        &genl(
            NETDEV_CMD_DEV_GET,
            1,
            &nla(NETDEV_A_DEV_IFINDEX, &5_u32.to_ne_bytes()),
        ),
    );
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    want[6..8].copy_from_slice(&flags.to_ne_bytes());
    let msg = request(get.clone(), 0x20, 7);
    assert_eq!(msg, want);
    assert_eq!(msg.len(), NLMSG_HDRLEN + GENL_HDRLEN + 8);

    let msgs = split_messages(&msg).expect("well-formed");
    let [only] = msgs.as_slice() else {
        panic!("one message expected")
    };
    assert_eq!((only.kind, only.seq), (0x20, 7));
    match parse_genl::<NetdevMessage>(only).expect("parses") {
        NetlinkPayload::InnerMessage(m) => {
            assert_eq!((m.header.cmd, m.header.version), (NETDEV_CMD_DEV_GET, 1));
            assert_eq!(m.payload, get);
        }
        other => panic!("not a netdev message: {other:?}"),
    }

    let lookup = GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName("netdev".into())],
    };
    let mut want = nlmsg(
        libc::GENL_ID_CTRL as u16,
        1,
        &genl(
            libc::CTRL_CMD_GETFAMILY as u8,
            2,
            &nla(libc::CTRL_ATTR_FAMILY_NAME as u16, b"netdev\0"),
        ),
    );
    want[6..8].copy_from_slice(&flags.to_ne_bytes());
    assert_eq!(
        request(lookup, 0, 1),
        want,
        "the control family's id is static"
    );
}

#[test]
fn framing_errors_are_reported_not_panicked() {
    let good = nlmsg(
        0x20,
        1,
        &genl(
            NETDEV_CMD_DEV_CHANGE_NTF,
            1,
            &nla(NETDEV_A_DEV_IFINDEX, &3_u32.to_ne_bytes()),
        ),
    );
    assert_eq!(split_messages(&good).expect("good").len(), 1);
    let mut two = good.clone();
    two.extend_from_slice(&good);
    assert_eq!(
        notified_ifindexes(&two, 0x20).expect("two notifications"),
        [3, 3]
    );
    assert!(
        notified_ifindexes(&two, 0x21)
            .expect("other family")
            .is_empty()
    );

    assert!(is_malformed(split_messages(&good[..10])), "short header");
    assert!(
        is_malformed(split_messages(&good[..good.len() - 4])),
        "length beyond the datagram"
    );
    let mut tiny = good.clone();
    tiny[..4].copy_from_slice(&8_u32.to_ne_bytes());
    assert!(
        is_malformed(split_messages(&tiny)),
        "length below the header size"
    );
    let mut huge = good.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(is_malformed(split_messages(&huge)), "absurd length");

    let short_genl = nlmsg(0x20, 1, &[1, 1]);
    let msgs = split_messages(&short_genl).expect("framing is fine");
    assert!(
        is_malformed(parse_genl::<NetdevMessage>(&msgs[0])),
        "short genl header"
    );
    assert!(
        is_malformed(notified_ifindexes(&short_genl, 0x20)),
        "short genl header in a notification"
    );

    let mut bad_attr = nla(NETDEV_A_DEV_IFINDEX, &3_u32.to_ne_bytes());
    bad_attr[..2].copy_from_slice(&2_u16.to_ne_bytes());
    assert!(
        is_malformed(parse_dev(&bad_attr)),
        "attribute shorter than its header"
    );
    bad_attr[..2].copy_from_slice(&64_u16.to_ne_bytes());
    assert!(
        is_malformed(parse_dev(&bad_attr)),
        "attribute beyond its container"
    );
    assert!(
        is_malformed(parse_dev(&[8, 0])),
        "truncated attribute header"
    );
    assert!(
        is_malformed(parse_dev(&nla(NETDEV_A_DEV_IFINDEX, &[1, 2]))),
        "ifindex of 2 bytes"
    );
    assert!(
        is_malformed(parse_dev(&nla(NETDEV_A_DEV_XDP_FEATURES, &[1, 2, 3]))),
        "features of 3 bytes"
    );
}

#[test]
fn feature_attribute_is_u64_or_u32_and_flag_bits_are_ignored() {
    let mut attrs = nla(NETDEV_A_DEV_IFINDEX | 0x4000, &9_u32.to_ne_bytes());
    attrs.extend(nla(2, &[0; 4])); // NETDEV_A_DEV_PAD: skipped
    attrs.extend(nla(NETDEV_A_DEV_XDP_FEATURES, &0x67_u64.to_ne_bytes()));
    let dev = parse_dev(&attrs).expect("attrs");
    assert_eq!(
        dev,
        DevAttrs {
            ifindex: Some(9),
            xdp_features: Some(XdpFeatures(0x67))
        }
    );
    let short = nla(NETDEV_A_DEV_XDP_FEATURES, &0x23_u32.to_ne_bytes());
    assert_eq!(
        parse_dev(&short).expect("u32 form").xdp_features,
        Some(XdpFeatures(0x23))
    );
}

/// An NLMSG_ERROR message answering `seq` with `code` (and a payload as the kernel sends it:
/// the code, then the request's header).
fn error_msg(seq: u32, code: &[u8]) -> Vec<u8> {
    let mut payload = code.to_vec();
    if code.len() == 4 {
        payload.extend_from_slice(&nlmsg(0x20, seq, &[])[..NLMSG_HDRLEN]);
    }
    nlmsg(libc::NLMSG_ERROR as u16, seq, &payload)
}

fn collect(datagram: &[u8]) -> Result<(bool, Vec<NetdevMessage>), NetdevError> {
    let mut replies = Vec::new();
    let done = collect_replies(datagram, 4, "t", &mut replies)?;
    Ok((done, replies))
}

#[test]
fn errors_and_acks() {
    let (done, replies) = collect(&error_msg(4, &0_i32.to_ne_bytes())).expect("ack");
    assert!(done && replies.is_empty());
    match collect(&error_msg(4, &(-libc::ENODEV).to_ne_bytes())) {
        Err(NetdevError::Netlink { op: "t", source }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENODEV))
        }
        other => panic!("expected ENODEV, got {other:?}"),
    }
    assert!(is_malformed(collect(&error_msg(4, &5_i32.to_ne_bytes()))));
    assert!(is_malformed(collect(&error_msg(4, &[0, 0]))));
    assert!(collect(&error_msg(4, &i32::MIN.to_ne_bytes())).is_err());

    // A reply and its ACK in one datagram; another exchange's messages are skipped.
    let reply = nlmsg(
        0x20,
        4,
        &genl(
            1,
            1,
            &nla(NETDEV_A_DEV_XDP_FEATURES, &0x23_u64.to_ne_bytes()),
        ),
    );
    let mut datagram = error_msg(3, &(-libc::ENODEV).to_ne_bytes());
    datagram.extend(&reply);
    let (done, replies) = collect(&datagram).expect("reply, no ACK yet");
    assert!(!done);
    assert_eq!(
        dev_attrs(&replies[0].attrs).xdp_features,
        Some(XdpFeatures(0x23))
    );
    datagram.extend(error_msg(4, &0_i32.to_ne_bytes()));
    let (done, replies) = collect(&datagram).expect("reply and ACK");
    assert!(done && replies.len() == 1);
    let done_msg = nlmsg(libc::NLMSG_DONE as u16, 4, &0_i32.to_ne_bytes());
    assert!(collect(&done_msg).expect("done").0);
}

fn family_reply(attrs: &[u8]) -> Result<NetdevFamily, NetdevError> {
    let msg = nlmsg(libc::GENL_ID_CTRL as u16, 4, &genl(1, 2, attrs));
    let mut replies = Vec::new();
    collect_replies::<FamilyReply>(&msg, 4, "t", &mut replies)?;
    parse_family(&replies)
}

#[test]
fn family_reply_yields_id_and_mgmt_group() {
    let group = |id: u32, name: &[u8]| {
        let mut g = nla(libc::CTRL_ATTR_MCAST_GRP_ID as u16, &id.to_ne_bytes());
        g.extend(nla(libc::CTRL_ATTR_MCAST_GRP_NAME as u16, name));
        g
    };
    let mut groups = nla(1, &group(30, b"page-pool\0"));
    groups.extend(nla(2, &group(29, b"mgmt\0")));
    let mut attrs = nla(libc::CTRL_ATTR_FAMILY_NAME as u16, b"netdev\0");
    attrs.extend(nla(
        libc::CTRL_ATTR_FAMILY_ID as u16,
        &0x1a_u16.to_ne_bytes(),
    ));
    // An attribute type this build does not know (a newer kernel's) is skipped.
    attrs.extend(nla(99, &[1, 2, 3, 4]));
    attrs.extend(nla(libc::CTRL_ATTR_MCAST_GROUPS as u16 | 0x8000, &groups));
    assert_eq!(
        family_reply(&attrs).expect("family"),
        NetdevFamily {
            id: 0x1a,
            mgmt_group: 29
        }
    );

    let mut no_mgmt = nla(libc::CTRL_ATTR_FAMILY_ID as u16, &0x1a_u16.to_ne_bytes());
    no_mgmt.extend(nla(
        libc::CTRL_ATTR_MCAST_GROUPS as u16,
        &nla(1, &group(30, b"page-pool\0")),
    ));
    assert!(is_malformed(family_reply(&no_mgmt)));
    let no_id = nla(libc::CTRL_ATTR_MCAST_GROUPS as u16, &groups);
    assert!(is_malformed(family_reply(&no_id)));
    let short_id = nla(libc::CTRL_ATTR_FAMILY_ID as u16, &[0x1a]);
    assert!(is_malformed(family_reply(&short_id)));
    assert!(is_malformed(parse_family(&[])));
}

// ---- kernel: each test works in its own private network namespace

/// Runs `f` on a new thread that first moves into a fresh, unnamed network namespace. The
/// namespace (and every device in it) disappears when the thread ends: nothing to clean up,
/// even on panic. Child processes forked from that thread (`ip`, `ethtool`, `sysctl`)
/// inherit its namespace, because fork copies the calling thread's nsproxy.
fn in_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) only changes this thread's namespace membership.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) (needs root): {}",
            io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A veth pair with names unique to this process and `tag`.
fn veth_pair(tag: &str) -> (String, String) {
    let (a, b) = (
        format!("sl{}{tag}a", std::process::id()),
        format!("sl{}{tag}b", std::process::id()),
    );
    run(
        "ip",
        &["link", "add", &a, "type", "veth", "peer", "name", &b],
    );
    (a, b)
}

/// (ifindex, MAC) of `dev` as iproute2 sees it.
fn ip_link(dev: &str) -> (u32, [u8; 6]) {
    let out = run("ip", &["-o", "link", "show", "dev", dev]);
    let ifindex = out
        .split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .expect("ifindex in `ip link`");
    let mut words = out.split_whitespace().skip_while(|w| *w != "link/ether");
    let mac_text = words.nth(1).expect("MAC in `ip link`");
    let mut mac = [0; 6];
    for (byte, hex) in mac.iter_mut().zip(mac_text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).expect("hex MAC byte");
    }
    (ifindex, mac)
}

#[test]
fn interface_reads_veth_and_loopback() {
    in_netns(|| {
        let (a, b) = veth_pair("i");
        let info = interface(&a).expect("veth");
        let (ifindex, mac) = ip_link(&a);
        assert_eq!(info.name, a);
        assert_eq!((info.ifindex, info.mac), (ifindex, mac));
        assert_eq!(info.driver, "veth");
        assert!(!info.loopback && !info.up);
        assert_eq!(info.xdp_features, XdpFeatures(0x23));
        assert_eq!(interface_by_index(ifindex).expect("by index"), info);

        run("ip", &["link", "set", &a, "up"]);
        run("ip", &["link", "set", &b, "up"]);
        assert!(interface(&a).expect("veth").up);

        run(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{a}.forwarding=0")],
        );
        assert!(!interface(&a).expect("veth").ipv4_forwarding);
        run(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{a}.forwarding=1")],
        );
        assert!(interface(&a).expect("veth").ipv4_forwarding);
        assert!(
            !interface(&b).expect("peer").ipv4_forwarding,
            "forwarding is per device"
        );

        let lo = interface("lo").expect("lo");
        assert!(lo.loopback && !lo.up, "lo starts down in a new namespace");
        assert_eq!((lo.ifindex, lo.driver.as_str(), lo.mac), (1, "", [0; 6]));
        assert!(
            !lo.xdp_features.native(),
            "lo has no native XDP: {}",
            lo.xdp_features
        );
        run("ip", &["link", "set", "lo", "up"]);
        assert!(interface("lo").expect("lo").up);

        let missing = format!("sl{}none", std::process::id());
        match interface(&missing) {
            Err(NetdevError::NoSuchInterface { name }) => assert_eq!(name, missing),
            other => panic!("expected NoSuchInterface, got {other:?}"),
        }
        assert!(matches!(
            interface("../lo"),
            Err(NetdevError::NoSuchInterface { .. })
        ));
        assert!(matches!(
            interface_by_index(99_999),
            Err(NetdevError::NoSuchIfindex { ifindex: 99_999 })
        ));
        assert!(matches!(
            xdp_features(99_999),
            Err(NetdevError::NoSuchIfindex { ifindex: 99_999 })
        ));
    });
}

#[test]
fn veth_accepts_redirect_only_when_its_peer_has_napi() {
    in_netns(|| {
        let (a, b) = veth_pair("x");
        run("ip", &["link", "set", &a, "up"]);
        run("ip", &["link", "set", &b, "up"]);
        let (ia, ib) = (ip_link(&a).0, ip_link(&b).0);
        assert_eq!(xdp_features(ia).expect("a"), XdpFeatures(0x23));
        assert!(!xdp_features(ia).expect("a").accepts_redirect());

        run("ethtool", &["-K", &b, "gro", "on"]);
        let a_features = xdp_features(ia).expect("a");
        assert_eq!(a_features, XdpFeatures(0x67), "{a_features}");
        assert!(a_features.accepts_redirect() && a_features.contains(XdpFeatures::NDO_XMIT_SG));
        assert_eq!(
            xdp_features(ib).expect("b"),
            XdpFeatures(0x23),
            "b's own GRO does not change b"
        );

        run("ethtool", &["-K", &b, "gro", "off"]);
        assert_eq!(xdp_features(ia).expect("a"), XdpFeatures(0x23));
    });
}

#[test]
fn netns_cookie_is_stable_within_and_differs_between_namespaces() {
    let (first, again) = in_netns(|| {
        (
            netns_cookie().expect("cookie"),
            netns_cookie().expect("cookie"),
        )
    });
    assert_eq!(first, again);
    let other = in_netns(|| netns_cookie().expect("cookie"));
    assert_ne!(first, other);
    assert_ne!(netns_cookie().expect("cookie"), first);
}

#[test]
fn monitor_reports_the_device_whose_peer_toggled_gro() {
    in_netns(|| {
        let (a, b) = veth_pair("m");
        run("ip", &["link", "set", &a, "up"]);
        run("ip", &["link", "set", &b, "up"]);
        let ia = ip_link(&a).0;
        let mut monitor = FeatureMonitor::new().expect("monitor");
        assert!(
            monitor
                .wait(Duration::ZERO)
                .expect("nothing queued")
                .is_empty()
        );

        run("ethtool", &["-K", &b, "gro", "on"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while !seen.contains(&ia) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            assert!(
                !remaining.is_zero(),
                "no notification for {a} (#{ia}) within 5 s; saw {seen:?}"
            );
            seen.extend(monitor.wait(remaining).expect("wait"));
        }
        assert!(xdp_features(ia).expect("a").accepts_redirect());

        // A device created after subscribing is announced too.
        let (c, _) = veth_pair("n");
        let ic = ip_link(&c).0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !seen.contains(&ic) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            assert!(
                !remaining.is_zero(),
                "no notification for new {c} within 5 s; saw {seen:?}"
            );
            seen.extend(monitor.wait(remaining).expect("wait"));
        }
    });
}

#[test]
fn monitor_stays_bound_to_the_namespace_it_was_created_in() {
    use std::sync::mpsc;
    let (handoff_tx, handoff_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // The worker owns a fresh namespace for the whole test; the monitor it creates there is
    // then waited on from this thread, which is in the test process's own namespace.
    let worker = std::thread::spawn(move || {
        in_netns(move || {
            let (a, b) = veth_pair("w");
            run("ip", &["link", "set", &a, "up"]);
            run("ip", &["link", "set", &b, "up"]);
            let ia = ip_link(&a).0;
            let monitor = FeatureMonitor::new().expect("monitor");
            handoff_tx
                .send((monitor, ia))
                .expect("hand the monitor over");
            go_rx.recv().expect("go");
            run("ethtool", &["-K", &b, "gro", "on"]);
            // Keep the namespace's devices until the waiting side is done.
            let _ = done_rx.recv();
        })
    });
    let (mut monitor, ia) = handoff_rx.recv().expect("monitor from the worker");
    go_tx.send(()).expect("start the worker");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen.contains(&ia) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        assert!(
            !remaining.is_zero(),
            "no notification for #{ia} from the monitor's namespace within 5 s; saw {seen:?}"
        );
        seen.extend(monitor.wait(remaining).expect("wait"));
    }
    drop(done_tx);
    worker.join().expect("worker");
}
