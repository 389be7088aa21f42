//! Hollow nodes: simulated nodes that speak the real node protocol to real
//! control replicas — join with a one-time token (pinning the CA), then over
//! mutual TLS watch their view and the health verdicts, and report their
//! applied version every report interval — and program nothing. The
//! benchmark's `hollow` part joins N of them to three `sluice-control`
//! replicas on etcd and times an apply until all N have the new version.
//!
//! Everything runs in one network namespace the bench creates (etcd, the
//! replicas, and this process's runtime threads entered into it), on its
//! loopback.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use sluice_api::{MAX_MESSAGE_BYTES, v1, v1::node_agent_client::NodeAgentClient};
use sluice_control::cli::client::Client;

/// Joins in flight at once: a fleet joins in seconds without a SYN storm.
const JOINS_AT_ONCE: usize = 64;

/// N hollow nodes; each one's applied version.
pub struct Fleet {
    applied: Vec<Arc<AtomicU64>>,
    /// Nodes whose stream or report failed (they stop).
    pub failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Fleet {
    /// Joins `n` hollow nodes named `<prefix>-<i>`, spread over `urls`,
    /// with tokens `admin` creates, reporting every `report_every`; returns
    /// once each watches its view.
    pub async fn join(
        admin: &Client,
        urls: &[String],
        prefix: &str,
        n: usize,
        report_every: Duration,
    ) -> anyhow::Result<Self> {
        let mut tokens = Vec::with_capacity(n);
        for _ in 0..n {
            let token = admin
                .create_join_token(Duration::from_secs(600))
                .await
                .map_err(|e| anyhow::anyhow!("creating join token {}: {e:?}", tokens.len()))?;
            tokens.push(token);
        }
        let failed = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(JOINS_AT_ONCE));
        let mut joins = Vec::with_capacity(n);
        for (i, token) in tokens.into_iter().enumerate() {
            let url = urls[i % urls.len()].clone();
            let name = format!("{prefix}-{i}");
            let gate = gate.clone();
            joins.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                connect(&url, &token, &name)
                    .await
                    .with_context(|| format!("{name} through {url}"))
            }));
        }
        let mut applied = Vec::with_capacity(n);
        let mut tasks = Vec::with_capacity(n);
        for join in joins {
            let (client, watch) = join.await??;
            let version = Arc::new(AtomicU64::new(0));
            applied.push(version.clone());
            tasks.push(tokio::spawn(run(
                client,
                watch,
                version,
                failed.clone(),
                report_every,
            )));
        }
        Ok(Self {
            applied,
            failed,
            tasks,
        })
    }

    /// The lowest and highest view version the nodes have.
    pub fn versions(&self) -> (u64, u64) {
        let versions = self.applied.iter().map(|v| v.load(Ordering::Acquire));
        let (mut low, mut high) = (u64::MAX, 0);
        for v in versions {
            low = low.min(v);
            high = high.max(v);
        }
        (low, high)
    }

    /// Waits until every node has a version above `above`; how long it took.
    pub async fn wait_all_above(&self, above: u64, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.versions().0 > above {
                return Ok(started.elapsed());
            }
            if self.failed.load(Ordering::Relaxed) > 0 {
                bail!(
                    "{} hollow nodes failed",
                    self.failed.load(Ordering::Relaxed)
                );
            }
            if started.elapsed() > timeout {
                bail!("not every hollow node passed version {above} in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

type Watch = tonic::Streaming<v1::ViewUpdate>;

/// Joins as `name` through `url` and opens the view watch.
async fn connect(
    url: &str,
    token: &v1::CreateJoinTokenResponse,
    name: &str,
) -> anyhow::Result<(NodeAgentClient<tonic::transport::Channel>, Watch)> {
    let keys = sluice_pki::new_key_and_csr(name)?;
    let (channel, ca_pem) = sluice_pki::pinned_join_channel(url, &token.ca_hash)
        .await
        .context("connecting to join")?;
    let joined = NodeAgentClient::new(channel)
        .join(v1::JoinRequest {
            token: token.token.clone(),
            node_name: name.to_owned(),
            zone: String::new(),
            csr_pem: keys.csr_pem.clone(),
        })
        .await
        .with_context(|| format!("{name} joining"))?
        .into_inner();
    let channel = sluice_pki::mtls_channel(url, &ca_pem, &joined.certificate_pem, &keys.key_pem)
        .await
        .context("connecting with the node certificate")?;
    let mut client = NodeAgentClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let watch = client
        .watch_view(v1::WatchViewRequest { since_version: 0 })
        .await
        .with_context(|| format!("{name} watching"))?
        .into_inner();
    Ok((client, watch))
}

/// Follows the view (keeping only its version), drains the health stream and
/// reports every `report_every`, until aborted or the service ends a stream.
async fn run(
    mut client: NodeAgentClient<tonic::transport::Channel>,
    mut watch: Watch,
    applied: Arc<AtomicU64>,
    failed: Arc<AtomicUsize>,
    report_every: Duration,
) {
    let health = client.watch_health(v1::WatchHealthRequest {}).await;
    let Ok(health) = health else {
        failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut health = health.into_inner();
    let mut reports = tokio::time::interval(report_every);
    loop {
        tokio::select! {
            update = watch.message() => match update {
                Ok(Some(update)) => applied.store(update.version, Ordering::Release),
                _ => break,
            },
            verdicts = health.message() => if !matches!(verdicts, Ok(Some(_))) {
                break;
            },
            _ = reports.tick() => {
                let report = v1::ReportStatusRequest {
                    applied_version: applied.load(Ordering::Acquire),
                    ..Default::default()
                };
                if client.report_status(report).await.is_err() {
                    break;
                }
            }
        }
    }
    failed.fetch_add(1, Ordering::Relaxed);
}
