//! Calls to `sluicectl` and the control service as the admin, and what they
//! answer, checked: a demo step that fails says what the tool said.

use anyhow::{Context as _, bail};
use sluice_tests::ControlService;
use std::{net::Ipv4Addr, process::Output, time::Instant};

use crate::PROPAGATION;

/// `sluicectl <args>` as the admin; stdout, or an error with its output.
pub(crate) fn ctl(control: &ControlService, args: &[&str]) -> anyhow::Result<String> {
    checked(&args.join(" "), &control.sluicectl(args))
}

/// `sluicectl -o json <args>`, parsed.
pub(crate) fn ctl_json(
    control: &ControlService,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = ctl(control, &all)?;
    serde_json::from_str(&out).with_context(|| format!("sluicectl {args:?}: not JSON:\n{out}"))
}

/// sluicectl's stdout if it succeeded, else an error with what it said.
pub(crate) fn checked(what: &str, out: &Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "sluicectl {what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn exit_code(out: &Output) -> String {
    out.status
        .code()
        .map_or_else(|| out.status.to_string(), |c| c.to_string())
}

/// The VIP the control service allocated to `default/web`.
pub(crate) fn web_vip(control: &ControlService) -> anyhow::Result<Ipv4Addr> {
    let service = ctl_json(control, &["get", "service", "web"])?;
    service["vip"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VIP allocated to web: {service}"))
}

/// Waits until every node in `nodes` applied the view version current now.
pub(crate) fn wait_programmed(control: &ControlService, nodes: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    let desired = control.view_version();
    control
        .wait_programmed(nodes, desired, PROPAGATION)
        .map_err(|last| {
            anyhow::anyhow!(
                "the nodes did not apply view version {desired} within {PROPAGATION:?}: {last}"
            )
        })?;
    println!(
        "   {} report view version {desired} applied (waited {} ms)",
        nodes.join(" and "),
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The traffic counters each node reported (`get nodes -o json`, `traffic`).
pub(crate) fn print_node_traffic(control: &ControlService) -> anyhow::Result<()> {
    let nodes = ctl_json(control, &["get", "nodes"])?;
    println!(
        "     {:<8} {:<22} {:>9} {:>10} {:>10} {:>7}",
        "NODE", "FRONTEND", "PACKETS", "BYTES", "NEW FLOWS", "ACTIVE"
    );
    for node in nodes
        .as_array()
        .context("`get nodes -o json`: not a list")?
    {
        let name = node["name"].as_str().unwrap_or("?");
        let traffic = node["traffic"].as_array().cloned().unwrap_or_default();
        if traffic.is_empty() {
            println!("     {name:<8} (no traffic reported)");
        }
        for t in &traffic {
            let frontend = format!(
                "{}:{}/{}",
                t["vip"].as_str().unwrap_or("?"),
                t["port"],
                t["protocol"].as_str().unwrap_or("?")
            );
            println!(
                "     {name:<8} {frontend:<22} {:>9} {:>10} {:>10} {:>7}",
                t["packets"].to_string(),
                t["bytes"].to_string(),
                t["newFlows"].to_string(),
                t["activeConnections"].to_string()
            );
        }
    }
    Ok(())
}
