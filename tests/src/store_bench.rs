//! `cargo xtask bench -- --only store`: the control service's writes on each
//! store, in one run, so they compare as a ratio: the embedded store and a
//! 3-member etcd cluster on loopback (`sluice_control::testing`). The
//! control service runs in-process and the time is the API call's, from the
//! request to its acknowledgement (durable in the store, the view updated);
//! there are no agents (the `control` part times agents programming).
//!
//! etcd takes at most `--max-txn-ops` operations and 1.5 MiB per
//! transaction, so the first apply goes in batches of [`BATCH`] objects (each
//! all or nothing) on both stores alike.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sluice_api::v1;
use sluice_control::{
    rbac::{ADMIN_GROUP, Caller},
    sealing,
    server::{Control, Options, StoreConfig},
    testing::EtcdCluster,
};
use sluice_model::{Endpoint, manifest};

use crate::control_bench;

/// Objects per apply of the first load.
pub const BATCH: usize = 400;

#[derive(Debug, Serialize)]
pub struct Row {
    pub store: String,
    pub services: usize,
    pub endpoints: usize,
    pub first_apply_ms: f64,
    /// Median of the rounds.
    pub one_change_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
}

/// Both stores at 1 service and at `services` × `per_service`.
pub fn run(services: usize, per_service: usize, rounds: usize) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for (size, per) in [(1, 3), (services, per_service)] {
        for store in ["embedded", "etcd"] {
            rows.push(runtime.block_on(measure(store, size, per, rounds))?);
        }
    }
    Ok(Report { rows })
}

async fn measure(store: &str, services: usize, per: usize, rounds: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("kek");
    std::fs::write(&key_file, sealing::new_key_line()?)?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    // Kept until the end of the measurement: dropping it stops etcd.
    let mut cluster = None;
    let config = match store {
        "etcd" => {
            let started = EtcdCluster::start(3).context("starting etcd")?;
            let config = StoreConfig::Etcd {
                endpoints: started.endpoints(),
                tls: None,
                prefix: "/bench/".into(),
            };
            cluster = Some(started);
            config
        }
        _ => StoreConfig::Embedded,
    };
    let control = Control::open(Options {
        listen: "127.0.0.1:7443".parse()?,
        data_dir: dir.path().join("data"),
        vip_cidr: "198.18.0.0/16".into(),
        advertise: vec![],
        node_cert_ttl: Duration::from_secs(3600),
        user_cert_ttl: Duration::from_secs(3600),
        admin_config: dir.path().join("admin.conf"),
        encryption_key_file: Some(key_file),
        store: config,
    })?;
    let admin = Caller {
        name: "admin".into(),
        groups: vec![ADMIN_GROUP.into()],
    };
    let objects: Vec<v1::Object> =
        manifest::parse_objects("bench.yaml", &control_bench::manifest(services, per, 1))?
            .iter()
            .map(v1::Object::from)
            .collect();
    let started = Instant::now();
    for batch in objects.chunks(BATCH) {
        control.apply(&admin, batch.to_vec(), false).await?;
    }
    let first_apply_ms = started.elapsed().as_secs_f64() * 1e3;

    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let text = control_bench::endpoint(services / 2, 0, 2 + round as u32);
        let mut message = v1::Object::from(&manifest::parse_objects("one.yaml", &text)?[0]);
        let version = control
            .state()
            .objects
            .get::<Endpoint>("default", &format!("ep-{}-0", services / 2))
            .map_or(0, |e| e.version);
        if let Some(v1::object::Kind::Endpoint(e)) = &mut message.kind {
            e.meta.get_or_insert_default().resource_version = version;
        }
        let started = Instant::now();
        control.apply(&admin, vec![message], false).await?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    drop(control);
    drop(cluster);
    Ok(Row {
        store: store.to_owned(),
        services,
        endpoints: services * per,
        first_apply_ms,
        one_change_ms: samples[samples.len() / 2],
    })
}

/// The table, with each etcd figure beside the embedded one as a ratio.
pub fn render(report: &Report) -> String {
    let mut out = String::from(
        "| store    | services | endpoints | first apply | one change (median) | one change, × embedded |\n\
         |----------|---------:|----------:|------------:|--------------------:|-----------------------:|\n",
    );
    for row in &report.rows {
        let base = report
            .rows
            .iter()
            .find(|r| r.store == "embedded" && r.services == row.services)
            .map_or(f64::NAN, |r| r.one_change_ms);
        out.push_str(&format!(
            "| {:<8} | {:>8} | {:>9} | {:>8.0} ms | {:>16.1} ms | {:>22.1} |\n",
            row.store,
            row.services,
            row.endpoints,
            row.first_apply_ms,
            row.one_change_ms,
            row.one_change_ms / base
        ));
    }
    out
}
