//! Traffic both flows send and how it spread over the backends: each step
//! shows where connections went and fails if the shares are not the weights.

use anyhow::{Context as _, bail};
use sluice_tests::{Netns, http_get, tally};
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use crate::TIMEOUT;

/// `n` new connections from `client` to `vip:80`; who answered.
pub(crate) fn spread(
    client: &Netns,
    vip: Ipv4Addr,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let to = SocketAddrV4::new(vip, 80);
    let bodies = client.enter(|| -> anyhow::Result<Vec<String>> {
        (0..n)
            .map(|i| http_get(to, TIMEOUT).with_context(|| format!("connection {} to {to}", i + 1)))
            .collect()
    })?;
    Ok(tally(bodies))
}

pub(crate) fn show(spread: &BTreeMap<String, usize>) {
    show_indented(spread, "   ");
}

pub(crate) fn show_indented(spread: &BTreeMap<String, usize>, prefix: &str) {
    let total: usize = spread.values().sum();
    for (backend, n) in spread {
        let share = 100.0 * *n as f64 / total as f64;
        println!(
            "{prefix}{backend:<10} {n:>4} connections {share:>5.1}%  {}",
            "#".repeat(share.round() as usize / 2)
        );
    }
}

/// Fails unless every connection went to a listed backend and the shares
/// follow the weights (`(backend index, weight)`), within 5% or 2 connections.
pub(crate) fn check_spread(
    spread: &BTreeMap<String, usize>,
    weights: &[(usize, usize)],
    via: &str,
) -> anyhow::Result<()> {
    let total: usize = spread.values().sum();
    let weight_sum: usize = weights.iter().map(|(_, w)| w).sum();
    let mut listed = 0;
    for &(backend, weight) in weights {
        let got = spread
            .get(&format!("backend-{backend}"))
            .copied()
            .unwrap_or(0);
        listed += got;
        let want = total * weight / weight_sum;
        if got.abs_diff(want) > (total / 20).max(2) {
            bail!(
                "via {via}: backend-{backend} got {got} of {total} connections, expected about {want}: {spread:?}"
            );
        }
    }
    if listed != total {
        bail!("via {via}: connections went to unexpected backends: {spread:?}");
    }
    Ok(())
}

pub(crate) fn which(program: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
