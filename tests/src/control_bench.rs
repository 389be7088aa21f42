//! The control-plane benchmark (`cargo xtask bench`): how long from
//! `sluicectl apply` being acknowledged until every agent's maps hold the
//! change, and what the control service and the agents weigh at that size.
//!
//! A real cluster in namespaces ([`ClusterTopology`]): `sluice-control` with
//! its embedded store, or on a 3-member etcd in the control namespace, two
//! joined agents, `sluicectl` as an admin runs it. On etcd the first load goes
//! in applies of at most [`ETCD_BATCH`] objects (one etcd transaction bounds
//! an apply: `--max-txn-ops`) and is timed from the first request to the
//! last agent programmed.
//! "Programmed" is the moment an agent logs `applied view version N`, which
//! it does right after the last map write of that version; the agents' log
//! timestamps and the acknowledgement are read off the same clock. Agents can
//! finish before the acknowledgement reaches `sluicectl` (the view is
//! published at commit, the answer is sent after): such a lag counts as 0,
//! and the time from sending the request is given beside it.

use std::{
    fmt::Write as _,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use crate::{
    Agent, ClusterTopology, ControlService, agent::agent_bin, cluster::CONTROL_ADDR,
    control::sluicectl_bin,
};

/// VIPs for 10,000 services need more than a /24.
const VIP_CIDR: &str = "198.18.128.0/17";
const NODES: u8 = 2;
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(300);
/// Objects per apply of the first load on etcd: within its transaction limit
/// (the test clusters' `--max-txn-ops` is 1024; an object costs a put and a
/// compare).
pub const ETCD_BATCH: usize = 400;

/// Where the control service keeps its state in a case.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Embedded,
    Etcd,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub store: StoreKind,
    pub case: String,
    pub services: usize,
    pub endpoints: usize,
    #[serde(flatten)]
    pub timing: Timing,
}

/// One apply, timed.
#[derive(Debug, Serialize)]
pub struct Timing {
    /// From starting `sluicectl apply` to its exit (the acknowledgement).
    pub apply_ms: f64,
    /// From the acknowledgement to the last agent's maps programmed (0 if
    /// they were programmed before it arrived).
    pub ack_to_programmed_ms: f64,
    /// From starting `sluicectl apply` to the last agent programmed.
    pub request_to_programmed_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Memory {
    pub store: StoreKind,
    pub services: usize,
    pub endpoints: usize,
    pub control_rss_mib: f64,
    pub agent_rss_mib: Vec<f64>,
    /// Kernel memory of the maps and programs the agent holds (memlock).
    pub agent_kernel_mib: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub memory: Vec<Memory>,
}

/// Runs the cases: 1 service (first apply, then `rounds` single-endpoint
/// changes) and `services` services with `per_service` endpoints each (the
/// whole set in one apply, then one endpoint change at that size).
pub fn run(services: usize, per_service: usize, rounds: usize) -> anyhow::Result<Report> {
    let mut report = Report {
        rows: Vec::new(),
        memory: Vec::new(),
    };
    for store in [StoreKind::Embedded, StoreKind::Etcd] {
        for (size, per) in [(1, 3), (services, per_service)] {
            let cluster = BenchCluster::start(store).context("starting the cluster")?;
            let batches: Vec<std::path::PathBuf> = match store {
                StoreKind::Embedded => vec![manifest(size, per, 1)],
                StoreKind::Etcd => (0..size)
                    .step_by((ETCD_BATCH / (1 + per)).max(1))
                    .map(|first| {
                        let last = (first + (ETCD_BATCH / (1 + per)).max(1)).min(size);
                        manifest_range(first..last, per, 1)
                    })
                    .collect(),
            }
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                cluster
                    .control
                    .scratch()
                    .write(&format!("load-{i}.yaml"), text)
            })
            .collect();
            report.rows.push(Row {
                store,
                case: if batches.len() == 1 {
                    "first apply".into()
                } else {
                    format!("first load ({} applies)", batches.len())
                },
                services: size,
                endpoints: size * per,
                timing: cluster.apply(&batches)?,
            });
            let changes = if size == 1 { rounds } else { 3 };
            let mut samples = Vec::new();
            for round in 0..changes {
                let change = cluster
                    .control
                    .scratch()
                    .write("change.yaml", endpoint(size / 2, 0, 2 + round as u32));
                samples.push(cluster.apply(&[change])?);
            }
            samples.sort_by(|a, b| a.ack_to_programmed_ms.total_cmp(&b.ack_to_programmed_ms));
            report.rows.push(Row {
                store,
                case: "one endpoint changes (median)".into(),
                services: size,
                endpoints: size * per,
                timing: samples.swap_remove(samples.len() / 2),
            });
            report.memory.push(cluster.memory(store, size, size * per)?);
        }
    }
    Ok(report)
}

pub(crate) fn endpoint(service: usize, j: usize, weight: u32) -> String {
    let n = service * 16 + j;
    format!(
        "---\nkind: Endpoint\nname: ep-{service}-{j}\nlabels: {{ app: svc-{service} }}\naddress: 198.19.{}.{}\nweight: {weight}\n",
        (n / 250) % 256,
        n % 250 + 1
    )
}

/// `services` services selecting `per` endpoints each; VIPs allocated.
pub(crate) fn manifest(services: usize, per: usize, weight: u32) -> String {
    manifest_range(0..services, per, weight)
}

/// [`manifest`]'s services numbered `range`.
pub(crate) fn manifest_range(range: std::ops::Range<usize>, per: usize, weight: u32) -> String {
    let mut out = String::with_capacity(range.len() * (120 + per * 110));
    for i in range {
        let _ = write!(
            out,
            "---\nkind: Service\nname: svc-{i}\nports: [{{ port: 80, protocol: TCP, targetPort: 8080 }}]\nselector: {{ app: svc-{i} }}\n"
        );
        for j in 0..per {
            out.push_str(&endpoint(i, j, weight));
        }
    }
    out
}

/// Fields drop in order: agents, the control service, etcd, the namespaces.
struct BenchCluster {
    agents: Vec<Agent>,
    control: ControlService,
    _etcd: Option<(sluice_control::testing::EtcdCluster, crate::ScratchDir)>,
    topology: ClusterTopology,
}

impl BenchCluster {
    fn start(store: StoreKind) -> anyhow::Result<Self> {
        let topology = ClusterTopology::build(NODES, 0);
        let (etcd, args) = match store {
            StoreKind::Embedded => (None, Vec::new()),
            StoreKind::Etcd => {
                use std::os::unix::fs::PermissionsExt as _;
                let etcd = sluice_control::testing::EtcdCluster::start_in_netns(
                    3,
                    topology.control.name(),
                )?;
                let keys = crate::ScratchDir::new();
                let key_file = keys.write("kek", sluice_control::sealing::new_key_line()?);
                fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600))?;
                let args = vec![
                    "--store".to_owned(),
                    etcd.url(),
                    "--encryption-key-file".to_owned(),
                    key_file.display().to_string(),
                ];
                (Some((etcd, keys)), args)
            }
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let control = ControlService::start(&topology.control, CONTROL_ADDR, VIP_CIDR, &args);
        let mut agents = Vec::new();
        for node in &topology.nodes {
            let (token, ca_hash) = control.join_token("10m");
            let agent = Agent::try_launch(
                &agent_bin(),
                &node.ns,
                node.join_args(&control.url(), &token, &ca_hash),
            )
            .map_err(|f| anyhow::anyhow!("{}: {f}", node.name))?;
            agents.push(agent);
        }
        Ok(Self {
            agents,
            control,
            _etcd: etcd,
            topology,
        })
    }

    /// Applies `files` one after the other and times them as one (see the
    /// module docs).
    fn apply(&self, files: &[std::path::PathBuf]) -> anyhow::Result<Timing> {
        let before: Vec<usize> = self.agents.iter().map(|a| applied_lines(a).len()).collect();
        let sent = SystemTime::now();
        let started = Instant::now();
        for file in files {
            let out = Command::new("ip")
                .args(["netns", "exec", self.topology.control.name()])
                .arg(sluicectl_bin())
                .arg("--config")
                .arg(self.control.admin_conf())
                .args(["apply", "-f"])
                .arg(file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .context("running sluicectl")?;
            if !out.status.success() {
                bail!("apply failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let apply = started.elapsed();
        let acked = sent + apply;
        let version = self.control.view_version();
        let deadline = Instant::now() + PROGRAMMED_TIMEOUT;
        let mut programmed = Vec::new();
        for (agent, seen) in self.agents.iter().zip(before) {
            loop {
                let lines = applied_lines(agent);
                if let Some(at) = lines[seen.min(lines.len())..]
                    .iter()
                    .find(|(v, _)| *v >= version)
                    .map(|(_, at)| *at)
                {
                    programmed.push(at);
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("an agent did not apply view version {version}");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let last = programmed.into_iter().max().context("no agents")?;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(Timing {
            apply_ms: ms(apply),
            ack_to_programmed_ms: ms(last.duration_since(acked).unwrap_or_default()),
            request_to_programmed_ms: ms(last.duration_since(sent).unwrap_or_default()),
        })
    }

    fn memory(
        &self,
        store: StoreKind,
        services: usize,
        endpoints: usize,
    ) -> anyhow::Result<Memory> {
        let control_pid = self.control.pid().context("control service not running")?;
        Ok(Memory {
            store,
            services,
            endpoints,
            control_rss_mib: rss_mib(control_pid)?,
            agent_rss_mib: self
                .agents
                .iter()
                .map(|a| rss_mib(a.pid()))
                .collect::<anyhow::Result<_>>()?,
            agent_kernel_mib: self.agents.iter().map(|a| memlock_mib(a.pid())).collect(),
        })
    }
}

/// (version, when) of every "applied view version" line of the agent's log.
fn applied_lines(agent: &Agent) -> Vec<(u64, SystemTime)> {
    agent
        .log()
        .lines()
        .filter_map(|line| {
            let rest = line.split("applied view version ").nth(1)?;
            let version: u64 = rest.split_whitespace().next()?.parse().ok()?;
            let at = parse_rfc3339(line.split_whitespace().next()?)?;
            Some((version, at))
        })
        .collect()
}

/// `2026-11-22T07:33:53.312899Z` (tracing's UTC timestamps).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<u64>());
    let (h, min, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let nanos: u64 = format!("{frac:0<9}")[..9].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + h * 3600 + min * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

pub(crate) fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

/// The memlock of every BPF map and program the process holds.
fn memlock_mib(pid: u32) -> f64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0.0;
    };
    let bytes: u64 = dir
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum();
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<9} {:<32} {:>9} {:>10} {:>10} {:>16} {:>18}",
        "store",
        "control plane",
        "services",
        "endpoints",
        "apply ms",
        "ack→programmed",
        "request→programmed"
    );
    for r in &report.rows {
        let _ = writeln!(
            out,
            "{:<9} {:<32} {:>9} {:>10} {:>10.1} {:>13.1} ms {:>15.1} ms",
            format!("{:?}", r.store).to_lowercase(),
            r.case,
            r.services,
            r.endpoints,
            r.timing.apply_ms,
            r.timing.ack_to_programmed_ms,
            r.timing.request_to_programmed_ms
        );
    }
    let _ = writeln!(
        out,
        "\n{:<9} {:<32} {:>9} {:>10} {:>16} {:>22}",
        "store", "memory", "services", "endpoints", "control RSS", "agent RSS / kernel"
    );
    for m in &report.memory {
        let agents: Vec<String> = m
            .agent_rss_mib
            .iter()
            .zip(&m.agent_kernel_mib)
            .map(|(rss, kernel)| format!("{rss:.1} / {kernel:.1} MiB"))
            .collect();
        let _ = writeln!(
            out,
            "{:<9} {:<32} {:>9} {:>10} {:>12.1} MiB {:>22}",
            format!("{:?}", m.store).to_lowercase(),
            "",
            m.services,
            m.endpoints,
            m.control_rss_mib,
            agents.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_parse() {
        let t = parse_rfc3339("2026-11-22T07:33:53.312899Z").expect("parses");
        let since = t.duration_since(UNIX_EPOCH).expect("after 1970");
        assert_eq!(since.as_secs(), 1_795_332_833);
        assert_eq!(since.subsec_micros(), 312_899);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn the_manifest_has_what_it_says() {
        let text = manifest(3, 2, 1);
        assert_eq!(text.matches("kind: Service").count(), 3);
        assert_eq!(text.matches("kind: Endpoint").count(), 6);
        let objects = sluice_model::manifest::parse_objects("m.yaml", &text).expect("valid");
        assert_eq!(objects.len(), 9);
    }
}
