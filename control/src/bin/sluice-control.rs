//! `sluice-control`: the control service. The work is in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use sluice_control::server::{Control, Options, StoreConfig};

#[derive(Parser)]
#[command(
    name = "sluice-control",
    version,
    about = "Sluice control service: desired state, node views, node identity, RBAC (gRPC over mutual TLS)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Seals the secrets in the store with a new key-encryption key: adds a
    /// new key first in the key file, seals every secret again with it, then
    /// drops the old keys (run it with the control service stopped).
    RotateKey(RotateKey),
    /// Moves a single-machine cluster (the embedded store of --from) into an
    /// empty etcd store, as it is: VIPs, node identities, the CA, view
    /// versions. Run it with the control service stopped; then start the
    /// replicas with --store and the same key file.
    Migrate(Migrate),
}

#[derive(clap::Args)]
struct Migrate {
    /// The data directory of the control service to move.
    #[arg(long)]
    from: PathBuf,
    /// The etcd cluster to move it to.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    to: String,
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    #[arg(long, default_value = sluice_control::store::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

#[derive(clap::Args)]
struct RotateKey {
    /// The control service's data directory.
    #[arg(long, default_value = DATA_DIR)]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// The key file the control service runs with (default: the one it
    /// generated, `<data-dir>/encryption.key`).
    #[arg(long)]
    encryption_key_file: Option<PathBuf>,
    /// Keep the old keys in the key file (readable, no longer sealing).
    #[arg(long)]
    keep_old: bool,
}

const DATA_DIR: &str = "/var/lib/sluice-control";

/// Where the desired state is kept.
#[derive(clap::Args)]
struct StoreArgs {
    /// Keep the desired state in etcd (replicas share it); default: the
    /// embedded store in --data-dir.
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    store: Option<String>,
    /// TLS to etcd: the CA its certificates are checked against (with
    /// --etcd-cert and --etcd-key, the client certificate).
    #[arg(long, requires = "store")]
    etcd_ca: Option<PathBuf>,
    #[arg(long, requires = "store")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "store")]
    etcd_key: Option<PathBuf>,
    /// The key prefix everything is kept under, for several clusters on one etcd.
    #[arg(long, default_value = sluice_control::store::DEFAULT_PREFIX, requires = "store")]
    etcd_prefix: String,
}

impl StoreArgs {
    fn config(&self) -> anyhow::Result<StoreConfig> {
        self.config_named("--store")
    }

    /// The configuration, errors naming the URL's option as `flag`.
    fn config_named(&self, flag: &str) -> anyhow::Result<StoreConfig> {
        use anyhow::{Context as _, bail};
        let Some(url) = &self.store else {
            return Ok(StoreConfig::Embedded);
        };
        let endpoints = sluice_control::store::parse_etcd_url(url)
            .with_context(|| format!("{flag} {url:?}"))?;
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let tls = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(sluice_control::store::EtcdTls {
                ca_pem: read("--etcd-ca", ca)?,
                cert_pem: read("--etcd-cert", cert)?,
                key_pem: read("--etcd-key", key)?,
            }),
            _ => bail!("TLS to etcd needs all of --etcd-ca, --etcd-cert and --etcd-key"),
        };
        Ok(StoreConfig::Etcd {
            endpoints,
            tls,
            prefix: self.etcd_prefix.clone(),
        })
    }
}

#[derive(clap::Args)]
struct Serve {
    /// Address to serve the API on (TLS only).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Where the state (an embedded database) and, without
    /// --encryption-key-file, the key sealing its secrets live (mode 0700).
    #[arg(long, default_value = DATA_DIR)]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Where the first admin's credentials (a private key) are written on
    /// first start, owner-only; `sluicectl` reads this path by default.
    #[arg(long, default_value = sluice_control::cli::config::SYSTEM_CONFIG)]
    admin_config: PathBuf,
    /// 256-bit keys (64 hex digits a line, the first seals) that seal the
    /// secrets in the store; readable by its owner only. Default: a key
    /// generated in the data directory.
    #[arg(long)]
    encryption_key_file: Option<PathBuf>,
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
    // Everything this process creates is for its owner: the store, the
    // generated key file, the admin's credentials.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        let done = match command {
            Command::RotateKey(args) => rotate_key(args),
            Command::Migrate(args) => migrate(args),
        };
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-control: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = cli.serve;
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

async fn run(cli: Serve) -> anyhow::Result<()> {
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
        admin_config: cli.admin_config,
        encryption_key_file: cli.encryption_key_file,
        store: cli.store.config()?,
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

fn rotate_key(args: RotateKey) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use sluice_control::store::{EtcdStore, RedbStore, Store};
    use sluice_control::{sealing, server::secrets};
    let config = args.store.config()?;
    let path = match (&args.encryption_key_file, &config) {
        (Some(path), _) => path.clone(),
        (None, StoreConfig::Embedded) => args.data_dir.join(sealing::GENERATED_KEY_FILE),
        (None, StoreConfig::Etcd { .. }) => {
            anyhow::bail!("--encryption-key-file is required with an etcd store")
        }
    };
    let old = sealing::key_lines(&path)?;
    // Opened first: a running control service holds the embedded store,
    // and nothing changes then.
    let store: Box<dyn Store> = match config {
        StoreConfig::Embedded => {
            let store_path = args.data_dir.join("state.redb");
            Box::new(RedbStore::open(&store_path).with_context(|| {
                format!(
                    "opening {} (stop the control service first)",
                    store_path.display()
                )
            })?)
        }
        StoreConfig::Etcd {
            endpoints,
            tls,
            prefix,
        } => Box::new(EtcdStore::connect(&endpoints, tls, &prefix)?),
    };
    let new = sealing::new_key_line()?;
    // The old keys stay until every secret is sealed with the new one: a
    // crash in between leaves everything readable.
    let mut keys = vec![new.clone()];
    keys.extend(old.iter().cloned());
    sealing::write_key_file(&path, &keys)?;
    let keyring = sealing::Keyring::load(&path)?;
    let count = secrets::reseal(store.as_ref(), &keyring)?;
    if !args.keep_old {
        sealing::write_key_file(&path, &[new])?;
    }
    println!(
        "sealed {count} secret(s) with the new key {} in {}{}",
        keyring.sealing_key_id(),
        path.display(),
        if args.keep_old {
            ""
        } else {
            "; the old keys are removed from it"
        }
    );
    Ok(())
}

fn migrate(args: Migrate) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use sluice_control::sealing::GENERATED_KEY_FILE;
    use sluice_control::store::{EtcdStore, RedbStore};
    let target = StoreArgs {
        store: Some(args.to),
        etcd_ca: args.etcd_ca,
        etcd_cert: args.etcd_cert,
        etcd_key: args.etcd_key,
        etcd_prefix: args.etcd_prefix,
    };
    let StoreConfig::Etcd {
        endpoints,
        tls,
        prefix,
    } = target.config_named("--to")?
    else {
        anyhow::bail!("--to: expected etcd://HOST:PORT[,HOST:PORT...]");
    };
    let store_path = args.from.join("state.redb");
    if !store_path.is_file() {
        anyhow::bail!(
            "--from {}: no embedded store there (state.redb); give the control service's --data-dir",
            args.from.display()
        );
    }
    let from = RedbStore::open(&store_path).with_context(|| {
        format!(
            "opening {} (stop the control service first)",
            store_path.display()
        )
    })?;
    let to = EtcdStore::connect(&endpoints, tls, &prefix)?;
    let copied = sluice_control::server::migrate::migrate(&from, &to)?;
    println!(
        "copied {copied} records into {} under {prefix}; start the replicas with \
         --store etcd://{} and --encryption-key-file (the one this cluster used, \
         by default {})",
        endpoints.join(","),
        endpoints.join(","),
        args.from.join(GENERATED_KEY_FILE).display()
    );
    Ok(())
}
