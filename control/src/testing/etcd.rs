//! A throwaway etcd cluster on 127.0.0.1 for tests.
//!
//! [`EtcdCluster::start`] runs `size` members of Debian's `etcd` (3.4, `/usr/bin/etcd`, or
//! `$SLUICE_ETCD`) on unique free loopback ports, each with its own data dir in one temp dir,
//! as a new cluster with a unique token, and returns once every member reports healthy (at most
//! [`START_TIMEOUT`]). Dropping it kills every member and deletes the data dirs, also when the
//! test panics (unwinding drops it); a test process killed outright leaves them behind.
//! A 3-member start takes about 0.7 s here, so each test starts its own cluster: nothing is
//! shared between tests, and revisions are the test's alone. Members listen on 127.0.0.1 only.
//!
//! [`EtcdCluster::start_tls`] serves clients over TLS and requires client certificates signed by
//! the given CA (peers still talk plain HTTP on loopback). Health is always read over plain HTTP
//! from each member's metrics port.
//!
//! [`EtcdCluster::start_in_netns`] runs the members in a network namespace (`ip netns`), on that
//! namespace's loopback: end-to-end tests put the control replicas beside them there.
//!
//! Members log at `warn` to `<member>.log` in the temp dir; [`StartError::Unhealthy`] carries
//! the tail of each log.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Debian's `etcd-server` puts the binary (`cargo xtask bootstrap` installs it).
pub const DEFAULT_ETCD: &str = "/usr/bin/etcd";
/// Overrides [`DEFAULT_ETCD`].
pub const ETCD_ENV: &str = "SLUICE_ETCD";
/// Bound on a start, and on a restarted member becoming healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Larger than etcd's default of 128, as a control plane with large applies would set it.
pub const MAX_TXN_OPS: u32 = 1024;
/// Starts whose ports were taken in between are tried again this often.
const START_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "no etcd at {path}: install Debian's etcd-server (`cargo xtask bootstrap` does), or \
         point ${ETCD_ENV} at an etcd 3.4 binary"
    )]
    NoBinary { path: PathBuf },
    #[error("creating the cluster's temp dir")]
    TempDir(#[source] std::io::Error),
    #[error("finding free loopback ports")]
    Ports(#[source] std::io::Error),
    #[error("starting etcd member {member}")]
    Spawn {
        member: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd members {members} not healthy after {waited:?}: {reason}\n{logs}")]
    Unhealthy {
        members: String,
        waited: Duration,
        reason: String,
        /// The last lines of each member's log.
        logs: String,
    },
    #[error("no member {index} (the cluster has {size})")]
    NoMember { index: usize, size: usize },
    #[error("writing the cluster's TLS files")]
    TlsFiles(#[source] std::io::Error),
}

/// What members serve clients with under [`EtcdCluster::start_tls`]: their certificate (for
/// 127.0.0.1) and key, and the CA client certificates must be signed by.
#[derive(Clone)]
pub struct ServerTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where the members find their [`ServerTls`], in the temp dir.
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// Plain HTTP `/health` and `/metrics`, also under TLS.
    metrics: u16,
    child: Option<Child>,
}

/// A running etcd cluster: see the module documentation.
pub struct EtcdCluster {
    binary: PathBuf,
    members: Vec<Member>,
    token: String,
    tls: Option<TlsFiles>,
    /// The network namespace the members run in (`None`: this process's).
    netns: Option<String>,
    /// Dropped after the members are killed (see `Drop`).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Starts a new cluster of `size` members and waits until all are healthy.
    pub fn start(size: usize) -> Result<Self, StartError> {
        Self::start_with(size, None, None)
    }

    /// Like [`EtcdCluster::start`], in the network namespace `netns` (a name `ip netns` knows).
    pub fn start_in_netns(size: usize, netns: &str) -> Result<Self, StartError> {
        Self::start_with(size, None, Some(netns))
    }

    /// Like [`EtcdCluster::start`], with clients served over TLS (client certificates
    /// required).
    pub fn start_tls(size: usize, tls: &ServerTls) -> Result<Self, StartError> {
        Self::start_with(size, Some(tls), None)
    }

    fn start_with(
        size: usize,
        tls: Option<&ServerTls>,
        netns: Option<&str>,
    ) -> Result<Self, StartError> {
        let binary = std::env::var_os(ETCD_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD));
        if !binary.is_file() {
            return Err(StartError::NoBinary { path: binary });
        }
        let mut attempt = 1;
        loop {
            match Self::start_once(&binary, size, tls, netns) {
                // Another process may have taken a port between our probe and etcd's bind.
                Err(StartError::Unhealthy { ref logs, .. })
                    if attempt < START_ATTEMPTS && logs.contains("address already in use") =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn start_once(
        binary: &Path,
        size: usize,
        tls: Option<&ServerTls>,
        netns: Option<&str>,
    ) -> Result<Self, StartError> {
        let ports = in_netns(netns, || free_ports(3 * size))
            .and_then(|ports| ports)
            .map_err(StartError::Ports)?;
        let members = ports
            .chunks_exact(3)
            .enumerate()
            .map(|(i, p)| Member {
                name: format!("m{i}"),
                client: p[0],
                peer: p[1],
                metrics: p[2],
                child: None,
            })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix("sluice-etcd-")
            .tempdir()
            .map_err(StartError::TempDir)?;
        let tls = match tls {
            Some(tls) => {
                let files = TlsFiles {
                    ca: dir.path().join("ca.pem"),
                    cert: dir.path().join("server.pem"),
                    key: dir.path().join("server-key.pem"),
                };
                for (path, pem) in [
                    (&files.ca, &tls.ca_pem),
                    (&files.cert, &tls.cert_pem),
                    (&files.key, &tls.key_pem),
                ] {
                    std::fs::write(path, pem).map_err(StartError::TlsFiles)?;
                }
                Some(files)
            }
            None => None,
        };
        let mut cluster = Self {
            binary: binary.to_owned(),
            members,
            token: unique_token(),
            tls,
            netns: netns.map(str::to_owned),
            dir,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(&(0..size).collect::<Vec<_>>())?;
        Ok(cluster)
    }

    /// The members' client endpoints, `127.0.0.1:PORT`, as [`crate::store::EtcdStore::connect`]
    /// takes them (with or without TLS: the store picks the scheme).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `index`'s client endpoint.
    pub fn endpoint(&self, index: usize) -> String {
        match self.members.get(index) {
            Some(m) => format!("127.0.0.1:{}", m.client),
            None => String::new(),
        }
    }

    /// The cluster as an `etcd://` URL.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// Member `index`'s process id, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.members.get(index)?.child.as_ref().map(Child::id)
    }

    /// Kills member `index` with SIGKILL (no clean shutdown) and reaps it.
    pub fn kill(&mut self, index: usize) -> Result<(), StartError> {
        let size = self.members.len();
        let member = self
            .members
            .get_mut(index)
            .ok_or(StartError::NoMember { index, size })?;
        if let Some(mut child) = member.child.take() {
            // It may have exited already; either way it is reaped below.
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts member `index` again on its data dir and waits until it is healthy (which needs a
    /// majority running: see [`EtcdCluster::revive`]).
    pub fn restart(&mut self, index: usize) -> Result<(), StartError> {
        self.kill(index)?;
        self.spawn(index)?;
        self.wait_healthy(&[index])
    }

    /// Starts every member that is not running (after [`EtcdCluster::kill`]s of a majority,
    /// none can become healthy alone) and waits until all are healthy.
    pub fn revive(&mut self) -> Result<(), StartError> {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members.get(i).is_some_and(|m| m.child.is_none()))
            .collect();
        for &i in &stopped {
            self.spawn(i)?;
        }
        self.wait_healthy(&stopped)
    }

    fn spawn(&mut self, index: usize) -> Result<(), StartError> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let data_dir = self.dir.path().join(format!("m{index}"));
        let log_path = self.dir.path().join(format!("m{index}.log"));
        let size = self.members.len();
        let member = self
            .members
            .get_mut(index)
            .ok_or(StartError::NoMember { index, size })?;
        let spawn_error = |source| StartError::Spawn {
            member: member.name.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(spawn_error)?;
        let log_err = log.try_clone().map_err(spawn_error)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client);
        let peer_url = format!("http://127.0.0.1:{}", member.peer);
        let metrics_url = format!("http://127.0.0.1:{}", member.metrics);
        let max_txn_ops = MAX_TXN_OPS.to_string();
        let mut command = match &self.netns {
            // `ip netns exec` enters the namespace and execs etcd: the child is etcd itself.
            Some(netns) => {
                let mut c = Command::new(IP);
                c.args(["netns", "exec", netns]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            // etcd reads ETCD_* variables as flags: none of the caller's may leak in.
            .env_clear()
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--listen-metrics-urls", &metrics_url])
            .args(["--initial-cluster", &initial_cluster])
            // Ignored by a member restarted on its data dir, which knows its cluster.
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--max-txn-ops", &max_txn_ops])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(spawn_error)?;
        member.child = Some(child);
        Ok(())
    }

    /// Waits until each member in `indexes` answers `/health` with `true` (which needs a leader).
    pub fn wait_healthy(&mut self, indexes: &[usize]) -> Result<(), StartError> {
        let started = Instant::now();
        let mut pending: Vec<usize> = indexes.to_vec();
        loop {
            let mut exited = None;
            for &i in &pending {
                if let Some(child) = self.members.get_mut(i).and_then(|m| m.child.as_mut())
                    && let Ok(Some(status)) = child.try_wait()
                {
                    exited = Some(format!("member m{i} exited ({status})"));
                }
            }
            let reason = match exited {
                Some(reason) => Some(reason),
                None => {
                    let netns = self.netns.as_deref();
                    pending.retain(|&i| {
                        self.members.get(i).is_some_and(|m| {
                            !in_netns(netns, || healthy(m.metrics)).unwrap_or(false)
                        })
                    });
                    if pending.is_empty() {
                        return Ok(());
                    }
                    (started.elapsed() > START_TIMEOUT).then(|| "timed out".to_owned())
                }
            };
            if let Some(reason) = reason {
                return Err(StartError::Unhealthy {
                    members: pending
                        .iter()
                        .map(|i| format!("m{i}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    waited: started.elapsed(),
                    reason,
                    logs: self.log_tails(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn log_tails(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let path = self.dir.path().join(format!("{}.log", m.name));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ({})\n", m.name, path.display()));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `dir` is removed after this, with the members gone.
    }
}

/// `ip`, which starts members in a namespace.
const IP: &str = "/usr/sbin/ip";

/// Runs `f` in the network namespace `netns` (on a thread of its own, which joins it), or here.
fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    use std::os::fd::AsRawFd as _;
    let Some(netns) = netns else {
        return Ok(f());
    };
    let file = std::fs::File::open(Path::new("/run/netns").join(netns))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on an open namespace file; it changes only this thread's
                // network namespace, and the thread ends with `f`.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `count` distinct free ports on 127.0.0.1: all bound at once, so none repeats, then released
/// for etcd to bind.
fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "sluice-test-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the member on `port` answers `GET /health` with `"health":"true"`.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut response = String::new();
    // A timeout or a reset leaves a partial answer, which is judged like any other.
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}
