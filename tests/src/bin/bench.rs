//! `cargo xtask bench`: the whole benchmark suite in one run, side by side.
//!
//! 1. `dataplane`: ns/packet of Sluice's XDP program by path, beside the
//!    hook's floor (`sluice_tests::dataplane_bench`).
//! 2. `packet-rate`: packets/s of a generator in the kernel through the
//!    node (`sluice_tests::packet_rate_bench`).
//! 3. `scaling`: the same paths with 1, 1,000 and 100,000 backends and with
//!    10,000 services.
//! 4. `throughput`: packets/s, connections/s and request latency through a
//!    client → node → backends topology in namespaces: Sluice against
//!    kube-proxy-style iptables DNAT and nftables DNAT
//!    (`sluice_tests::throughput`).
//! 5. `control`: `sluicectl apply` → programmed on every agent, on the
//!    embedded store and on etcd (`sluice_tests::control_bench`).
//! 6. `store`: the control service's writes in-process, both stores
//!    (`sluice_tests::store_bench`).
//! 7. `hollow`: 100 and 1,000 simulated nodes on three replicas on etcd:
//!    apply → every node has it, and each replica's CPU and memory
//!    (`sluice_tests::hollow_bench`).
//!
//! Prints each part's table and one combined table, writes every row with
//! the machine's description to `target/bench/results.json` and draws
//! `target/bench/bench.svg`. `--only PART` runs one part.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sluice_tests::{
    chart, control_bench,
    dataplane_bench::{self, Settings},
    results::{Machine, Results},
    throughput,
};

const PARTS: [&str; 7] = [
    "dataplane",
    "packet-rate",
    "scaling",
    "throughput",
    "control",
    "store",
    "hollow",
];

struct Args {
    settings: Settings,
    out_dir: PathBuf,
    only: Option<String>,
    services: usize,
    per_service: usize,
    hollow: Vec<usize>,
    packet_rate_services: Vec<usize>,
    throughput: throughput::Settings,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        settings: Settings {
            repeat: 1_000_000,
            rounds: 5,
        },
        out_dir: PathBuf::from("target/bench"),
        only: None,
        services: 10_000,
        per_service: 10,
        hollow: vec![100, 1000],
        packet_rate_services: vec![1],
        throughput: throughput::Settings::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--repeat" => args.settings.repeat = value()?.parse().context("--repeat")?,
            "--rounds" => args.settings.rounds = value()?.parse().context("--rounds")?,
            "--out-dir" => args.out_dir = PathBuf::from(value()?),
            "--services" => args.services = value()?.parse().context("--services")?,
            "--per-service" => args.per_service = value()?.parse().context("--per-service")?,
            "--packet-rate-services" => {
                args.packet_rate_services = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--packet-rate-services")?;
            }
            "--hollow" => {
                args.hollow = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--hollow")?;
            }
            "--seconds" => {
                args.throughput.seconds = value()?.parse().context("--seconds")?;
            }
            "--sizes" => {
                args.throughput.sizes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--sizes")?;
            }
            "--only" => {
                let part = value()?;
                if !PARTS.contains(&part.as_str()) {
                    bail!("--only takes one of {PARTS:?}, not {part:?}");
                }
                args.only = Some(part);
            }
            "-h" | "--help" => {
                println!(
                    "sluice-bench [--only dataplane|packet-rate|scaling|throughput|control|store|hollow] \
                     [--repeat N (1000000)] [--rounds R (5)] [--out-dir DIR (target/bench)] \
                     [--sizes 1,1000,10000] [--seconds S (2)] \
                     [--services N (10000)] [--per-service M (10)] [--hollow 100,1000] [--packet-rate-services 1]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.settings.repeat < 1_000_000 {
        eprintln!("note: --repeat below 1,000,000 gives noisy figures");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let runs = |part: &str| args.only.as_deref().is_none_or(|only| only == part);
    let command = std::iter::once("cargo xtask bench".to_owned())
        .chain((std::env::args().len() > 1).then(|| {
            format!(
                "-- {}",
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            )
        }))
        .collect::<Vec<_>>()
        .join(" ");
    let mut results = Results::new(Machine::detect(), command);

    if runs("dataplane") {
        let report = dataplane_bench::dataplane(args.settings)?;
        println!("\n{}", dataplane_bench::render_dataplane(&report));
        results.dataplane = Some(report);
    }
    if runs("packet-rate") {
        println!(
            "\npacket rate: 64-byte UDP and TCP SYN made in the kernel (BPF_PROG_TEST_RUN, live frames) \
             through the node to a counting sink, one CPU; {} rounds interleaved",
            args.settings.rounds
        );
        let report =
            sluice_tests::packet_rate_bench::run(args.settings.rounds, &args.packet_rate_services)?;
        print!("{}", sluice_tests::packet_rate_bench::render(&report));
        results.packet_rate = Some(report);
    }
    if runs("scaling") {
        let report = dataplane_bench::scaling(Settings {
            rounds: args.settings.rounds.min(3),
            ..args.settings
        })?;
        println!("\n{}", dataplane_bench::render_scaling(&report));
        results.scaling = Some(report);
    }
    if runs("throughput") {
        let report = throughput::run(&args.throughput)?;
        println!("\n{}", throughput::render(&report));
        results.throughput = Some(report);
    }
    if runs("control") {
        println!(
            "\ncontrol plane: apply → every agent programmed (2 joined agents; 1 service, then {} services × {} endpoints)",
            args.services, args.per_service
        );
        let report =
            control_bench::run(args.services, args.per_service, args.settings.rounds.max(3))?;
        print!("{}", control_bench::render(&report));
        results.control = Some(report);
    }

    if runs("hollow") {
        println!(
            "\nhollow nodes: three replicas on a 3-member etcd, {:?} simulated nodes reporting every second; \
             one endpoint change → every node has it (then at {} services × {})",
            args.hollow, args.services, args.per_service
        );
        let report = sluice_tests::hollow_bench::run(
            &args.hollow,
            args.services,
            args.per_service,
            args.settings.rounds.max(5),
        )?;
        print!("{}", sluice_tests::hollow_bench::render(&report));
        results.hollow = Some(report);
    }

    if runs("store") {
        println!(
            "\nstore: the control service's writes, embedded vs 3-member etcd (in-process; 1 service, then {} × {})",
            args.services, args.per_service
        );
        let report = sluice_tests::store_bench::run(
            args.services,
            args.per_service,
            args.settings.rounds.max(5),
        )?;
        print!("{}", sluice_tests::store_bench::render(&report));
        results.store = Some(report);
    }

    println!("\n{}", results.render_combined());
    write(&args.out_dir.join("results.json"), &json(&results)?)?;
    write(&args.out_dir.join("bench.svg"), &chart::draw(&results))?;
    Ok(())
}

fn json(value: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("written: {}", path.display());
    Ok(())
}
