//! `sluice-control`: the control service. The work is in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use sluice_control::server::{Control, Options};

#[derive(Parser)]
#[command(
    name = "sluice-control",
    version,
    about = "Sluice control service: desired state, node views, node identity, RBAC (gRPC over mutual TLS)"
)]
struct Cli {
    /// Address to serve the API on (TLS only).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Where the state (an embedded database), the CA and `admin.conf` live.
    #[arg(long, default_value = "/var/lib/sluice-control")]
    data_dir: PathBuf,
    /// Range service VIPs are allocated from when a service gives none.
    #[arg(long, default_value = "198.18.0.0/24")]
    vip_cidr: String,
    /// A host name or address clients use to reach this service (goes into its
    /// certificate; the first goes into admin.conf). Repeat for several.
    #[arg(long)]
    advertise: Vec<String>,
    /// Validity of node certificates, in seconds; agents renew at two thirds.
    #[arg(long, default_value_t = 24 * 3600)]
    node_cert_ttl: u64,
    /// Validity of admin certificates, in seconds.
    #[arg(long, default_value_t = 365 * 24 * 3600)]
    user_cert_ttl: u64,
    /// Address for the Prometheus metrics (`GET /metrics`, plain HTTP);
    /// `off` serves none.
    #[arg(long, default_value = "127.0.0.1:9465", value_name = "ADDR|off")]
    metrics_listen: String,
    /// Address to serve the web dashboard on (HTTPS only, with the API's
    /// certificate; open it with `sluicectl dashboard`), or `off`.
    #[arg(long, default_value = sluice_control::server::dashboard::DEFAULT_LISTEN, value_name = "ADDR|off")]
    dashboard_listen: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-control: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-control: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding {}", cli.listen))?;
    let listen = listener.local_addr().context("reading the bound address")?;
    let dashboard = match cli.dashboard_listen.as_str() {
        "off" => None,
        addr => {
            let addr: SocketAddr = addr.parse().with_context(|| {
                format!("--dashboard-listen {addr:?}: expected ADDR:PORT or off")
            })?;
            Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the dashboard to {addr}"))?,
            )
        }
    };
    let control = Control::open(Options {
        listen,
        data_dir: cli.data_dir,
        vip_cidr: cli.vip_cidr,
        advertise: cli.advertise,
        node_cert_ttl: Duration::from_secs(cli.node_cert_ttl),
        user_cert_ttl: Duration::from_secs(cli.user_cert_ttl),
    })
    .context("opening the control service's state")?;
    if cli.metrics_listen != "off" {
        let addr: SocketAddr = cli.metrics_listen.parse().with_context(|| {
            format!(
                "--metrics-listen {:?}: expected ADDRESS:PORT or off",
                cli.metrics_listen
            )
        })?;
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr} (--metrics-listen)"))?;
        tracing::info!(listen = %addr, "serving Prometheus metrics at /metrics");
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = sluice_control::server::metrics::serve(metrics, control).await {
                tracing::warn!("metrics server stopped: {e}");
            }
        });
    }
    tracing::info!(url = %control.server_url(), "control service ready");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    control
        .serve_with_dashboard(listener, dashboard, shutdown)
        .await
        .context("serving")?;
    Ok(())
}
