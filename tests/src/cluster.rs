//! A cluster in namespaces: a control service, nodes that each serve a client,
//! and backends every node reaches, on one shared L2 fabric.
//!
//! ```text
//!  client k ns              node k ns (ip_forward=1)        fabric ns: bridge br0
//! ┌──────────────────┐    ┌──────────────────────────┐    ┌──────────────────────┐
//! │ c0 198.18.k.2/24 ├────┤ n0 198.18.k.1/24         │    │                      │
//! │ default via .k.1 │    │ f0 198.19.0.k/24         ├────┤ pn<k>                │
//! └──────────────────┘    └──────────────────────────┘    │                      │
//!  control ns: f0 198.19.0.100/24 (sluice-control :7443) ─┤ pctl                 │
//!  backend i ns: b0 198.19.0.<10+i>/24 ───────────────────┤ pb<i>                │
//!    routes 198.18.k.0/24 via 198.19.0.k (replies go     └──────────────────────┘
//!    back through the node that balanced the flow)
//! ```
//!
//! Service VIPs come from [`VIP_CIDR`] and are on no interface: each client
//! reaches them through its default route, i.e. through its own node. The
//! agents serve `n0` and `f0`; the control traffic crosses `f0` too, as it
//! would on a single-NIC host. Every veth pair is created directly across
//! namespaces, like [`crate::Topology`]'s: nothing appears in the root
//! namespace. Dropping the cluster deletes every namespace.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use crate::{
    Agent, ControlService, HttpConn, HttpServer, StartFailure, agent::agent_bin, http_get,
    netns::Netns, scratch::ScratchDir, tally,
};

/// Client timeout for one request through a VIP.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on an applied change reaching every agent.
pub const PROPAGATION: Duration = Duration::from_secs(20);

/// The pool the control service allocates service VIPs from.
pub const VIP_CIDR: &str = "198.18.100.0/24";
/// Where the control service listens.
pub const CONTROL_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 100), 7443);
/// The node interfaces the agents serve.
pub const NODE_INTERFACES: [&str; 2] = ["n0", "f0"];

/// Backend `i`'s address (1-based): `198.19.0.<10+i>`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    match u8::try_from(10 + i) {
        Ok(octet @ 11..=99) => Ipv4Addr::new(198, 19, 0, octet),
        _ => panic!("cluster backends are numbered 1..=89, got {i}"),
    }
}

#[derive(Debug)]
pub struct ClusterNode {
    /// `node-<k>`: the name it joins with.
    pub name: String,
    /// 1-based.
    pub index: u8,
    pub ns: Netns,
    pub client: Netns,
    /// For the agent's state (identity, saved view).
    pub scratch: ScratchDir,
}

impl ClusterNode {
    /// `198.18.<k>.2`.
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 2)
    }

    /// `zone-a` for odd nodes, `zone-b` for even ones: the zone it joins in.
    pub fn zone(&self) -> &'static str {
        if self.index % 2 == 1 {
            "zone-a"
        } else {
            "zone-b"
        }
    }

    /// `198.19.0.<k>`, on the fabric.
    pub fn fabric_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, self.index)
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> String {
        self.scratch.join("state").display().to_string()
    }

    /// `sluice-agent run --state-dir ...` for this node once joined.
    pub fn run_args(&self) -> Vec<String> {
        let mut args = vec!["run".to_owned(), "--state-dir".to_owned(), self.state_dir()];
        for interface in NODE_INTERFACES {
            args.extend(["--interface".to_owned(), interface.to_owned()]);
        }
        args
    }

    /// `sluice-agent join ...` for this node, serving [`NODE_INTERFACES`].
    pub fn join_args(&self, control_url: &str, token: &str, ca_hash: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "join",
            "--control",
            control_url,
            "--token",
            token,
            "--ca-hash",
            ca_hash,
            "--node",
            &self.name,
            "--zone",
            self.zone(),
            "--state-dir",
            &self.state_dir(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for interface in NODE_INTERFACES {
            args.extend(["--interface".to_owned(), interface.to_owned()]);
        }
        args
    }
}

#[derive(Debug)]
pub struct FabricBackend {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub index: usize,
}

/// The namespaces and wiring; see the module docs.
#[derive(Debug)]
pub struct ClusterTopology {
    // Dropped in declaration order.
    pub backends: Vec<FabricBackend>,
    pub nodes: Vec<ClusterNode>,
    pub control: Netns,
    pub fabric: Netns,
}

impl ClusterTopology {
    /// `nodes` nodes (1..=9) and `backends` backends (1..=89).
    pub fn build(nodes: u8, backends: usize) -> Self {
        assert!((1..=9).contains(&nodes), "1..=9 nodes, not {nodes}");
        let fabric = Netns::new("fabric");
        fabric.ip_ok(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip_ok(&["link", "set", "br0", "up"]);
        let port = |name: &str, peer_ns: &Netns, peer: &str| {
            fabric.ip_ok(&[
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                peer_ns.name(),
            ]);
            fabric.ip_ok(&["link", "set", name, "master", "br0"]);
            fabric.ip_ok(&["link", "set", name, "up"]);
        };

        let control = Netns::new("control");
        port("pctl", &control, "f0");
        configure(&control, "f0", *CONTROL_ADDR.ip(), None);

        let nodes: Vec<ClusterNode> = (1..=nodes)
            .map(|index| {
                let node = ClusterNode {
                    name: format!("node-{index}"),
                    index,
                    ns: Netns::new(&format!("node{index}")),
                    client: Netns::new(&format!("client{index}")),
                    scratch: ScratchDir::new(),
                };
                node.ns.ip_ok(&[
                    "link",
                    "add",
                    "n0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "c0",
                    "netns",
                    node.client.name(),
                ]);
                let gateway = Ipv4Addr::new(198, 18, index, 1);
                configure(&node.ns, "n0", gateway, None);
                configure(&node.client, "c0", node.client_addr(), Some(gateway));
                port(&format!("pn{index}"), &node.ns, "f0");
                configure(&node.ns, "f0", node.fabric_addr(), None);
                node.ns.enter(|| {
                    for key in ["net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding"] {
                        // /proc/sys/net is the calling thread's namespace's.
                        std::fs::write(format!("/proc/sys/{key}"), "1")
                            .unwrap_or_else(|e| panic!("enabling forwarding: {e}"));
                    }
                });
                node
            })
            .collect();

        let backends = (1..=backends)
            .map(|index| {
                let ns = Netns::new(&format!("backend{index}"));
                let addr = backend_addr(index);
                port(&format!("pb{index}"), &ns, "b0");
                configure(&ns, "b0", addr, None);
                for node in &nodes {
                    ns.ip_ok(&[
                        "route",
                        "add",
                        &format!("198.18.{}.0/24", node.index),
                        "via",
                        &node.fabric_addr().to_string(),
                    ]);
                }
                FabricBackend { ns, addr, index }
            })
            .collect();

        ClusterTopology {
            backends,
            nodes,
            control,
            fabric,
        }
    }

    /// Node `k` (1-based).
    pub fn node(&self, k: usize) -> &ClusterNode {
        &self.nodes[k - 1]
    }

    /// Backend `i`'s HTTP server (1-based), serving its name (`backend-<i>`)
    /// on :8080.
    pub fn serve_backend(&self, i: usize) -> HttpServer {
        let b = &self.backends[i - 1];
        HttpServer::start(&b.ns, b.addr, 8080, &format!("backend-{i}"))
    }

    /// Every backend's server, in order.
    pub fn serve_backends(&self) -> Vec<HttpServer> {
        (1..=self.backends.len())
            .map(|i| self.serve_backend(i))
            .collect()
    }

    /// `n` new connections from node `k`'s client to `vip:80`; who answered
    /// (a request that fails panics).
    pub fn spread(&self, k: usize, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
        let to = SocketAddrV4::new(vip, 80);
        let bodies = self.node(k).client.enter(|| {
            (0..n)
                .map(|i| {
                    http_get(to, TIMEOUT)
                        .unwrap_or_else(|e| panic!("node-{k}: request {i} to {to}: {e}"))
                })
                .collect::<Vec<_>>()
        });
        tally(bodies)
    }

    /// Like [`Self::spread`], a failed request counted as "failed".
    pub fn try_spread(&self, k: usize, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
        let to = SocketAddrV4::new(vip, 80);
        let bodies = self.node(k).client.enter(|| {
            (0..n)
                .map(|_| http_get(to, TIMEOUT).unwrap_or_else(|_| "failed".into()))
                .collect::<Vec<_>>()
        });
        tally(bodies)
    }

    /// `n` long-lived connections from node `k`'s client to `vip:80`, each
    /// with the backend that answered its first request.
    pub fn hold(&self, k: usize, vip: Ipv4Addr, n: usize) -> Vec<(HttpConn, String)> {
        let to = SocketAddrV4::new(vip, 80);
        self.node(k).client.enter(|| {
            (0..n)
                .map(|i| {
                    let mut conn = HttpConn::connect(to, TIMEOUT)
                        .unwrap_or_else(|e| panic!("node-{k}: connection {i} to {to}: {e}"));
                    let backend = conn
                        .get()
                        .unwrap_or_else(|e| panic!("node-{k}: connection {i} to {to}: {e}"));
                    (conn, backend)
                })
                .collect()
        })
    }
}

/// Puts `addr/24` on `dev` in `ns`, brings it up and, for a host end, routes
/// everything via `gateway`.
fn configure(ns: &Netns, dev: &str, addr: Ipv4Addr, gateway: Option<Ipv4Addr>) {
    ns.ip_ok(&["address", "add", &format!("{addr}/24"), "dev", dev]);
    ns.ip_ok(&["link", "set", dev, "up"]);
    if let Some(gateway) = gateway {
        ns.ip_ok(&["route", "add", "default", "via", &gateway.to_string()]);
    }
}

/// The cluster: control service, joined agents, backends with servers.
/// Fields drop in order: agents (their `down` needs the namespaces), servers,
/// the control service, then the namespaces.
pub struct Cluster {
    pub agents: Vec<Agent>,
    /// (token, CA pin) each agent joined with.
    pub tokens: Vec<(String, String)>,
    /// Backend `i`'s server is `servers[i - 1]`; they serve until the cluster drops.
    pub servers: Vec<HttpServer>,
    pub control: ControlService,
    pub topology: ClusterTopology,
}

impl Cluster {
    /// `nodes` nodes, each joined with its own token; `backends` backends,
    /// each serving its name (`backend-<i>`) on :8080.
    pub fn start(nodes: u8, backends: usize, control_args: &[&str]) -> Self {
        Self::start_joined(nodes, nodes, backends, control_args)
    }

    /// Like [`Cluster::start`], with only the first `joined` nodes joined.
    pub fn start_joined(nodes: u8, joined: u8, backends: usize, control_args: &[&str]) -> Self {
        let topology = ClusterTopology::build(nodes, backends);
        let servers = topology.serve_backends();
        let control =
            ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, control_args);
        let mut cluster = Cluster {
            agents: Vec::new(),
            tokens: Vec::new(),
            servers,
            control,
            topology,
        };
        for k in 1..=joined as usize {
            let (token, ca_hash) = cluster.control.join_token("10m");
            let agent = cluster
                .join_with(k, &token, &ca_hash)
                .unwrap_or_else(|f| panic!("node-{k}: {f}"));
            cluster.agents.push(agent);
            cluster.tokens.push((token, ca_hash));
        }
        cluster
    }

    pub fn join_with(&self, k: usize, token: &str, ca_hash: &str) -> Result<Agent, StartFailure> {
        let node = self.topology.node(k);
        Agent::try_launch(
            &agent_bin(),
            &node.ns,
            node.join_args(&self.control.url(), token, ca_hash),
        )
    }

    /// The nodes that joined.
    pub fn node_names(&self) -> Vec<String> {
        self.topology.nodes[..self.agents.len()]
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// Applies `manifest`, expecting success; returns sluicectl's output.
    pub fn apply(&self, manifest: &str) -> String {
        let out = self.control.apply("apply.yaml", manifest);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The view version now, then waits until every node applied it.
    pub fn wait_programmed(&self) {
        let names = self.node_names();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let desired = self.control.view_version();
        if let Err(last) = self.control.wait_programmed(&names, desired, PROPAGATION) {
            panic!("nodes did not apply view version {desired} within {PROPAGATION:?}: {last}");
        }
    }

    /// The VIP the control service allocated to `default/web`.
    pub fn web_vip(&self) -> Ipv4Addr {
        let service = self.control.sluicectl_json(&["get", "service", "web"]);
        service["vip"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VIP in {service}"))
    }

    /// `n` new connections from node `k`'s client to `vip:80`; who answered.
    pub fn spread(&self, k: usize, vip: Ipv4Addr, n: usize) -> BTreeMap<String, usize> {
        self.topology.spread(k, vip, n)
    }
}

impl Cluster {
    /// Starts backend `i`'s server again (after `servers[i - 1].stop()`).
    pub fn restart_backend(&mut self, i: usize) {
        self.servers[i - 1] = self.topology.serve_backend(i);
    }

    /// `n` long-lived connections from node `k`'s client to `vip:80`, each
    /// with the backend that answered its first request.
    pub fn hold(&self, k: usize, vip: Ipv4Addr, n: usize) -> Vec<(HttpConn, String)> {
        self.topology.hold(k, vip, n)
    }
}

/// `default/web` on port 80 (target 8080) selecting `app: web`, and its
/// endpoints `web-1..=count` at the fabric's backend addresses.
pub fn web_by_selector(count: usize) -> String {
    let mut docs = vec![
        "kind: Service
name: web
ports: [{ port: 80, protocol: TCP, targetPort: 8080 }]
selector: { app: web }
"
        .to_owned(),
    ];
    for i in 1..=count {
        docs.push(format!(
            "kind: Endpoint\nname: web-{i}\nlabels: {{ app: web }}\naddress: {}\n",
            backend_addr(i)
        ));
    }
    docs.join("---\n")
}

pub fn count(spread: &BTreeMap<String, usize>, backend: usize) -> usize {
    spread
        .get(&format!("backend-{backend}"))
        .copied()
        .unwrap_or(0)
}

pub fn assert_near(spread: &BTreeMap<String, usize>, expected: &[(usize, usize)], what: &str) {
    let total: usize = spread.values().sum();
    let listed: usize = expected.iter().map(|(b, _)| count(spread, *b)).sum();
    assert_eq!(total, listed, "{what}: unexpected backends in {spread:?}");
    for &(backend, want) in expected {
        let got = count(spread, backend);
        assert!(
            got.abs_diff(want) <= 1,
            "{what}: backend-{backend} got {got}, expected {want} ±1: {spread:?}"
        );
    }
}
