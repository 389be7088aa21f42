//! A replicated control plane in namespaces: [`crate::cluster`]'s topology,
//! with three `sluice-control` replicas in the control namespace (ports
//! 7443, 7444, 7445 of [`CONTROL_ADDR`]'s address, dashboards on 8443-8445) on a 3-member etcd on that
//! namespace's loopback, and nodes joined with every replica's address.
//! Node `k` lists the replicas starting from replica `k - 1`, so node 1
//! watches replica 0 and node 2 replica 1 until they fail over.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use sluice_control::testing::EtcdCluster;

use crate::{
    Agent, ControlService, HttpServer,
    agent::agent_bin,
    cluster::{CONTROL_ADDR, ClusterTopology, PROPAGATION, VIP_CIDR, backend_addr},
    scratch::ScratchDir,
};

/// Replicas in a [`HaCluster`].
pub const REPLICAS: usize = 3;

/// Fields drop in order: agents, servers, replicas, etcd, then the
/// namespaces.
pub struct HaCluster {
    pub agents: Vec<Agent>,
    pub servers: Vec<HttpServer>,
    pub replicas: Vec<ControlService>,
    pub etcd: EtcdCluster,
    /// The key file every replica seals secrets with.
    pub keys: ScratchDir,
    pub topology: ClusterTopology,
}

/// Replica `i`'s address (0-based).
pub fn replica_addr(i: usize) -> SocketAddrV4 {
    let port = CONTROL_ADDR.port() + u16::try_from(i).unwrap_or(0);
    SocketAddrV4::new(*CONTROL_ADDR.ip(), port)
}

impl HaCluster {
    /// Starts backend `i`'s server again (after `servers[i - 1].stop()`).
    pub fn restart_backend(&mut self, i: usize) {
        self.servers[i - 1] = self.topology.serve_backend(i);
    }

    /// `nodes` nodes, all joined; `backends` backends serving their names
    /// (`backend-<i>`) on :8080.
    pub fn start(nodes: u8, backends: usize) -> Self {
        let topology = ClusterTopology::build(nodes, backends);
        let servers = topology.serve_backends();
        let etcd = EtcdCluster::start_in_netns(3, topology.control.name())
            .unwrap_or_else(|e| panic!("etcd in the control namespace: {e}"));
        let keys = ScratchDir::new();
        let key_file = keys.write("kek", sluice_control::sealing::new_key_line().expect("key"));
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
            .expect("key file mode");
        let store = etcd.url();
        let key_file = key_file.display().to_string();
        let replicas = (0..REPLICAS)
            .map(|i| {
                // Each its own dashboard and metrics port beside the API's.
                let dashboard = format!("{}:{}", CONTROL_ADDR.ip(), 8443 + i);
                let metrics = format!("127.0.0.1:{}", 9465 + i);
                ControlService::start(
                    &topology.control,
                    replica_addr(i),
                    VIP_CIDR,
                    &[
                        "--store",
                        &store,
                        "--encryption-key-file",
                        &key_file,
                        "--dashboard-listen",
                        &dashboard,
                        "--metrics-listen",
                        &metrics,
                    ],
                )
            })
            .collect();
        let mut cluster = HaCluster {
            agents: Vec::new(),
            servers,
            replicas,
            etcd,
            keys,
            topology,
        };
        for k in 1..=usize::from(nodes) {
            // Each token from another replica: a token works at any of them.
            let (token, ca_hash) = cluster.replica(k).join_token("10m");
            let node = cluster.topology.node(k);
            let agent = Agent::try_launch(
                &agent_bin(),
                &node.ns,
                node.join_args(&cluster.urls_from(k - 1), &token, &ca_hash),
            )
            .unwrap_or_else(|f| panic!("node-{k}: {f}"));
            cluster.agents.push(agent);
        }
        cluster
    }

    /// Every replica's URL, comma-separated, starting with replica `first`.
    pub fn urls_from(&self, first: usize) -> String {
        (0..REPLICAS)
            .map(|i| format!("https://{}", replica_addr((first + i) % REPLICAS)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Replica `i` modulo their number: a way to spread calls over them.
    pub fn replica(&self, i: usize) -> &ControlService {
        &self.replicas[i % REPLICAS]
    }

    /// Applies `manifest` through replica `i`, expecting success.
    pub fn apply_through(&self, i: usize, manifest: &str) -> String {
        let out = self.replica(i).apply("apply.yaml", manifest);
        assert!(
            out.status.success(),
            "apply through replica {i} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every node applied replica `i`'s current view, as
    /// replica `i` sees the nodes (from whichever replica they are on).
    pub fn wait_programmed_on(&self, i: usize) {
        let names: Vec<String> = self.topology.nodes[..self.agents.len()]
            .iter()
            .map(|n| n.name.clone())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let replica = self.replica(i);
        let desired = replica.view_version();
        if let Err(last) = replica.wait_programmed(&names, desired, PROPAGATION) {
            panic!("nodes did not apply view version {desired} within {PROPAGATION:?}: {last}");
        }
    }

    /// The VIP of `default/<name>`, as replica `i` answers.
    pub fn vip(&self, i: usize, name: &str) -> Ipv4Addr {
        let service = self.replica(i).sluicectl_json(&["get", "service", name]);
        service["vip"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no VIP in {service}"))
    }
}

/// How long a node may take to resume on another replica before a test
/// calls it stuck (the goal is 3 s; the test prints the figure).
pub const RESUME_BOUND: Duration = Duration::from_secs(15);

/// `default/web` with endpoints at backends `1..=count`, health-checked
/// (TCP, every 200 ms).
pub fn web(count: usize) -> String {
    let mut text = String::from(
        "kind: Service\nname: web\nports: [{ port: 80, protocol: TCP, targetPort: 8080 }]\n\
         selector: { app: web }\nhealthCheck: { tcp: {}, intervalMs: 200, timeoutMs: 100, \
         unhealthyThreshold: 2, healthyThreshold: 2 }\n",
    );
    for i in 1..=count {
        text.push_str(&format!(
            "---\nkind: Endpoint\nname: web-{i}\nlabels: {{ app: web }}\naddress: {}\n",
            backend_addr(i)
        ));
    }
    text
}
