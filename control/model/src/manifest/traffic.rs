//! The traffic policies of a service in a manifest (see [`crate::traffic`]).

use super::ManifestError;
use super::yaml::{Cx, Fields, Node, boolean, integer, string};
use crate::rules::{self, Problem};
use crate::service::ServicePort;
use crate::traffic::*;

// ---------------------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------------------

const HEALTH_FIELDS: &[&str] = &[
    "http",
    "tcp",
    "intervalMs",
    "timeoutMs",
    "unhealthyThreshold",
    "healthyThreshold",
    "failOpen",
];
const HTTP_FIELDS: &[&str] = &["path", "port"];
const TCP_FIELDS: &[&str] = &["port"];
const ROLLOUT_FIELDS: &[&str] = &["to", "percent"];
const AFFINITY_FIELDS: &[&str] = &["clientIP"];
const CLIENT_IP_FIELDS: &[&str] = &["timeoutSeconds"];

/// The traffic policies among a service's `fields`, for a service with `ports`.
pub(super) fn parse(
    cx: Cx<'_>,
    fields: &Fields<'_>,
    ports: &[ServicePort],
) -> Result<Traffic, ManifestError> {
    let health_check = fields
        .get("healthCheck")
        .map(|node| {
            let check = parse_health_check(cx, node)?;
            if probe_port(&check, ports).is_none() {
                return Err(cx.invalid(node, "healthCheck", Problem::ProbePort));
            }
            Ok(check)
        })
        .transpose()?;
    let drain_timeout_seconds = fields
        .get("drainTimeoutSeconds")
        .map(|node| {
            validate_drain_timeout(integer(cx, "drainTimeoutSeconds", node)?)
                .map_err(cx.fail(node, "drainTimeoutSeconds"))
        })
        .transpose()?;
    let rollout = fields
        .get("rollout")
        .map(|node| {
            let fields = Fields::new(cx, "rollout".to_owned(), node)?;
            fields.deny_unknown(cx, ROLLOUT_FIELDS)?;
            let to_node = fields.require(cx, "to")?;
            let to = string(cx, "rollout.to", to_node)?;
            validate_version(to).map_err(cx.fail(to_node, "rollout.to"))?;
            let percent_node = fields.require(cx, "percent")?;
            let percent = validate_percent(integer(cx, "rollout.percent", percent_node)?)
                .map_err(cx.fail(percent_node, "rollout.percent"))?;
            Ok(Rollout {
                to: to.to_owned(),
                percent,
            })
        })
        .transpose()?;
    let session_affinity = fields
        .get("sessionAffinity")
        .map(|node| {
            let fields = Fields::new(cx, "sessionAffinity".to_owned(), node)?;
            fields.deny_unknown(cx, AFFINITY_FIELDS)?;
            let client_ip = fields.require(cx, "clientIP")?;
            let client_ip = Fields::new(cx, "sessionAffinity.clientIP".to_owned(), client_ip)?;
            client_ip.deny_unknown(cx, CLIENT_IP_FIELDS)?;
            let timeout_seconds = match client_ip.get("timeoutSeconds") {
                None => DEFAULT_AFFINITY_SECONDS,
                Some(node) => {
                    let field = client_ip.path("timeoutSeconds");
                    validate_affinity_timeout(integer(cx, &field, node)?)
                        .map_err(cx.fail(node, &field))?
                }
            };
            Ok(SessionAffinity { timeout_seconds })
        })
        .transpose()?;
    let topology_aware = match fields.get("topologyAware") {
        Some(node) => boolean(cx, "topologyAware", node)?,
        None => false,
    };
    Ok(Traffic {
        health_check,
        drain_timeout_seconds,
        rollout,
        session_affinity,
        topology_aware,
    })
}

fn parse_health_check(cx: Cx<'_>, node: &Node) -> Result<HealthCheck, ManifestError> {
    let fields = Fields::new(cx, "healthCheck".to_owned(), node)?;
    fields.deny_unknown(cx, HEALTH_FIELDS)?;
    let probe_port = |fields: &Fields<'_>| -> Result<Option<u16>, ManifestError> {
        fields
            .get("port")
            .map(|node| {
                let field = fields.path("port");
                rules::validate_port(integer(cx, &field, node)?).map_err(cx.fail(node, &field))
            })
            .transpose()
    };
    let probe = match (fields.get("http"), fields.get("tcp")) {
        (Some(http), None) => {
            let http = Fields::new(cx, "healthCheck.http".to_owned(), http)?;
            http.deny_unknown(cx, HTTP_FIELDS)?;
            let path_node = http.require(cx, "path")?;
            let path = string(cx, "healthCheck.http.path", path_node)?;
            validate_http_path(path).map_err(cx.fail(path_node, "healthCheck.http.path"))?;
            Probe::Http {
                path: path.to_owned(),
                port: probe_port(&http)?,
            }
        }
        (None, Some(tcp)) => {
            let tcp = Fields::new(cx, "healthCheck.tcp".to_owned(), tcp)?;
            tcp.deny_unknown(cx, TCP_FIELDS)?;
            Probe::Tcp {
                port: probe_port(&tcp)?,
            }
        }
        (None, None) => return Err(cx.invalid(node, "healthCheck", Problem::ProbeKind)),
        (Some(_), Some(_)) => return Err(cx.invalid(node, "healthCheck", Problem::ProbeKind)),
    };
    let number = |key: &str, rule: &dyn Fn(i128) -> Result<u32, Problem>, default: u32| {
        let Some(node) = fields.get(key) else {
            return Ok(default);
        };
        let field = fields.path(key);
        rule(integer(cx, &field, node)?).map_err(cx.fail(node, &field))
    };
    let interval_ms = number("intervalMs", &validate_interval, DEFAULT_INTERVAL_MS)?;
    let timeout_ms = number(
        "timeoutMs",
        &|v| validate_timeout(v, interval_ms),
        default_timeout(interval_ms),
    )?;
    let unhealthy_threshold = number(
        "unhealthyThreshold",
        &validate_threshold,
        DEFAULT_UNHEALTHY_THRESHOLD,
    )?;
    let healthy_threshold = number(
        "healthyThreshold",
        &validate_threshold,
        DEFAULT_HEALTHY_THRESHOLD,
    )?;
    let fail_open = match fields.get("failOpen") {
        Some(node) => boolean(cx, "healthCheck.failOpen", node)?,
        None => true,
    };
    Ok(HealthCheck {
        probe,
        interval_ms,
        timeout_ms,
        unhealthy_threshold,
        healthy_threshold,
        fail_open,
    })
}
