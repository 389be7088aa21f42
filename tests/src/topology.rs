//! The fixed client / node / backends topology (see the crate docs for the
//! diagram). Tests rely on its names and addresses.

use std::{net::Ipv4Addr, path::Path};

use crate::netns::Netns;

/// The service address tests use: on no interface, reached by the client
/// through its default route, i.e. through the node.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The client's address, on `c0`.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The node's address on `n0`, the client's gateway.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Interface of the client (peer of the node's `n0`).
pub const CLIENT_IF: &str = "c0";
/// The node's interface facing the client.
pub const NODE_CLIENT_IF: &str = "n0";
/// Interface of every backend (peer of the node's `nb<i>`).
pub const BACKEND_IF: &str = "b0";

/// The VIP, [`VIP`].
pub fn vip() -> Ipv4Addr {
    VIP
}

/// Backend `i`'s address, `198.19.<i>.2` (backends are numbered from 1).
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, subnet_octet(i), 2)
}

/// The node's address facing backend `i`, `198.19.<i>.1`: backend `i`'s gateway.
pub fn backend_gateway(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, subnet_octet(i), 1)
}

fn subnet_octet(i: usize) -> u8 {
    match u8::try_from(i) {
        Ok(octet @ 1..=254) => octet,
        _ => panic!("backends are numbered 1..=254, got {i}"),
    }
}

/// How the client and backend ends of the veth pairs are set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offloads {
    /// veth as the kernel makes it: checksum offload on (packets from local
    /// sockets carry CHECKSUM_PARTIAL), no GRO/NAPI on receive.
    #[default]
    KernelDefault,
    /// `ethtool -K <dev> tx off gro on` on `c0` and every `b0`: they stand
    /// for real NICs, which send complete checksums and receive through NAPI.
    NicLike,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// Number of backends, 1..=254.
    pub backends: usize,
    pub offloads: Offloads,
}

#[derive(Debug)]
pub struct Backend {
    pub ns: Netns,
    /// `198.19.<index>.2`, on `b0`.
    pub addr: Ipv4Addr,
    /// The node's interface facing this backend: `nb<index>`.
    pub node_if: String,
    /// 1-based, as in the addresses and `node_if`.
    pub index: usize,
}

impl Backend {
    /// The node's address facing this backend (its gateway), `198.19.<index>.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        backend_gateway(self.index)
    }
}

/// Client, node and backends, each in its own namespace. Dropping it deletes
/// every namespace, and with them every interface.
#[derive(Debug)]
pub struct Topology {
    // Fields drop in declaration order: backends, then node, then client.
    pub backends: Vec<Backend>,
    pub node: Netns,
    pub client: Netns,
    offloads: Offloads,
}

impl Topology {
    /// Builds the topology; panics, showing the failing command's output, if
    /// a step fails (whatever was already created is deleted).
    pub fn build(spec: TopologySpec) -> Self {
        let TopologySpec { backends, offloads } = spec;
        assert!(
            (1..=254).contains(&backends),
            "a topology has 1..=254 backends, not {backends}"
        );
        let client = Netns::new("client");
        let node = Netns::new("node");

        // Both ends are created in their namespaces by one netlink request:
        // nothing ever appears in the root namespace.
        node.ip_ok(&[
            "link",
            "add",
            NODE_CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            client.name(),
        ]);
        configure_end(&client, CLIENT_IF, CLIENT_ADDR, Some(NODE_ADDR));
        configure_end(&node, NODE_CLIENT_IF, NODE_ADDR, None);

        let backends: Vec<Backend> = (1..=backends)
            .map(|index| {
                let ns = Netns::new(&format!("backend{index}"));
                let node_if = format!("nb{index}");
                let addr = backend_addr(index);
                let gateway = backend_gateway(index);
                node.ip_ok(&[
                    "link",
                    "add",
                    &node_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    BACKEND_IF,
                    "netns",
                    ns.name(),
                ]);
                configure_end(&node, &node_if, gateway, None);
                configure_end(&ns, BACKEND_IF, addr, Some(gateway));
                Backend {
                    ns,
                    addr,
                    node_if,
                    index,
                }
            })
            .collect();

        node.enter(|| {
            for (key, value) in [
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv4/conf/all/forwarding", "1"),
            ] {
                // /proc/sys/net is the calling thread's namespace's.
                let path = Path::new("/proc/sys").join(key);
                std::fs::write(&path, value)
                    .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            }
        });

        if offloads == Offloads::NicLike {
            let nic_like = |ns: &Netns, dev: &str| {
                ns.exec_ok(&["ethtool", "-K", dev, "tx", "off", "gro", "on"]);
            };
            nic_like(&client, CLIENT_IF);
            for backend in &backends {
                nic_like(&backend.ns, BACKEND_IF);
            }
        }

        Self {
            backends,
            node,
            client,
            offloads,
        }
    }

    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// The node's interfaces the data plane attaches to: `n0`, `nb1`, ...
    pub fn node_interfaces(&self) -> Vec<String> {
        std::iter::once(NODE_CLIENT_IF.to_owned())
            .chain(self.backends.iter().map(|b| b.node_if.clone()))
            .collect()
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// The node's address facing the client (the client's gateway).
    pub fn node_addr(&self) -> Ipv4Addr {
        NODE_ADDR
    }

    /// Backend `i`, numbered from 1 like its address `198.19.<i>.2` and its
    /// node interface `nb<i>` (`backends[i - 1]`).
    pub fn backend(&self, i: usize) -> &Backend {
        i.checked_sub(1)
            .and_then(|index| self.backends.get(index))
            .unwrap_or_else(|| {
                panic!(
                    "no backend {i}: backends are numbered 1..={} like their addresses \
                     (use `backends[0]` for a 0-based index)",
                    self.backends.len()
                )
            })
    }
}

/// Puts `addr/24` on `dev` in `ns`, brings `dev` up and, for a host end,
/// routes everything via `gateway`.
fn configure_end(ns: &Netns, dev: &str, addr: Ipv4Addr, gateway: Option<Ipv4Addr>) {
    ns.ip_ok(&["address", "add", &format!("{addr}/24"), "dev", dev]);
    ns.ip_ok(&["link", "set", dev, "up"]);
    if let Some(gateway) = gateway {
        ns.ip_ok(&[
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
            "dev",
            dev,
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_layout() {
        assert_eq!(backend_addr(1), Ipv4Addr::new(198, 19, 1, 2));
        assert_eq!(backend_gateway(12), Ipv4Addr::new(198, 19, 12, 1));
        assert_eq!(vip(), Ipv4Addr::new(198, 18, 0, 10));
    }

    #[test]
    #[should_panic(expected = "numbered 1..=254")]
    fn backend_zero_does_not_exist() {
        backend_addr(0);
    }
}
