//! `view.json`'s format: the last applied view in plain JSON, so that a node
//! restarted while the control service is down can program it again, and an
//! operator can read it. Kept apart from the state directory's file handling:
//! this is the part that must stay readable across agent versions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sluice_api::v1;
use sluice_model::policy::compiled::CompiledPolicy;
use sluice_model::view::{Frontend, Frontends, View};

/// `view`, as `view.json` holds it.
pub(super) fn encode(view: &View) -> serde_json::Result<Vec<u8>> {
    use prost::Message as _;
    let file = ViewFile {
        version: view.version,
        frontends: view
            .frontends
            .values()
            .map(|f| FrontendFile::from(&v1::FrontendView::from(f)))
            .collect(),
        policy: to_hex(&v1::PolicyView::from(&view.policy).encode_to_vec()),
    };
    serde_json::to_vec_pretty(&file)
}

/// The view in `view.json`'s `bytes`, or why they do not hold one.
pub(super) fn decode(bytes: &[u8]) -> Result<View, String> {
    let file: ViewFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    // Read as the stream is: a view saved by an older agent may carry
    // the wire's zero-means-default values, which this applies.
    // A frontend that does not read (saved by a version that knew more)
    // is left out, as the stream leaves it out.
    let frontends: Frontends = file
        .frontends
        .into_iter()
        .filter_map(|f| {
            let read = v1::FrontendView::try_from(f)
                .and_then(|message| Frontend::try_from(message).map_err(|e| e.to_string()));
            read.inspect_err(|e| tracing::warn!("the saved view: skipping a frontend: {e}"))
                .ok()
        })
        .map(|f| (f.key, f))
        .collect();
    use prost::Message as _;
    let policy = from_hex(&file.policy)
        .and_then(|bytes| v1::PolicyView::decode(bytes.as_slice()).ok())
        .ok_or_else(|| "the saved network policy does not decode".to_owned())?;
    let policy = CompiledPolicy::try_from(policy).map_err(|e| e.to_string())?;
    Ok(View {
        version: file.version,
        frontends,
        policy,
    })
}

/// view.json: the view in plain JSON (the generated protobuf types have no
/// serde), enums by their protobuf names so an operator can read it.
#[derive(Debug, Serialize, Deserialize)]
struct ViewFile {
    version: u64,
    frontends: Vec<FrontendFile>,
    /// The compiled network policy: its protobuf encoding, in hex (an
    /// operator reads it with `sluicectl get networkpolicies` instead).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    policy: String,
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, Serialize, Deserialize)]
struct FrontendFile {
    service: String,
    vip: String,
    port: u32,
    protocol: String,
    target_port: u32,
    algorithm: String,
    backends: Vec<BackendFile>,
    #[serde(default, skip_serializing_if = "is_zero")]
    maglev_table_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health_check: Option<HealthCheckFile>,
    #[serde(default, skip_serializing_if = "is_zero")]
    drain_timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    session_affinity_seconds: u32,
    /// Zone → weights aligned with `backends`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    zones: BTreeMap<String, Vec<u32>>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Serialize, Deserialize)]
struct BackendFile {
    address: String,
    weight: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    draining: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    probers: Vec<String>,
}

/// The API's health check, zeros and all (validated when applied, as sent).
#[derive(Debug, Serialize, Deserialize)]
struct HealthCheckFile {
    /// `None`: a TCP probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_path: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    port: u32,
    interval_ms: u32,
    timeout_ms: u32,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    fail_closed: bool,
}

impl From<&v1::HealthCheck> for HealthCheckFile {
    fn from(check: &v1::HealthCheck) -> Self {
        use v1::health_check::Probe;
        let (http_path, port) = match &check.probe {
            Some(Probe::Http(http)) => (Some(http.path.clone()), http.port),
            Some(Probe::Tcp(tcp)) => (None, tcp.port),
            None => (None, 0),
        };
        Self {
            http_path,
            port,
            interval_ms: check.interval_ms,
            timeout_ms: check.timeout_ms,
            unhealthy_threshold: check.unhealthy_threshold,
            healthy_threshold: check.healthy_threshold,
            fail_closed: check.fail_closed,
        }
    }
}

impl From<HealthCheckFile> for v1::HealthCheck {
    fn from(file: HealthCheckFile) -> Self {
        use v1::health_check::Probe;
        let probe = match file.http_path {
            Some(path) => Probe::Http(v1::HttpProbe {
                path,
                port: file.port,
            }),
            None => Probe::Tcp(v1::TcpProbe { port: file.port }),
        };
        Self {
            probe: Some(probe),
            interval_ms: file.interval_ms,
            timeout_ms: file.timeout_ms,
            unhealthy_threshold: file.unhealthy_threshold,
            healthy_threshold: file.healthy_threshold,
            fail_closed: file.fail_closed,
        }
    }
}

impl From<&v1::FrontendView> for FrontendFile {
    fn from(view: &v1::FrontendView) -> Self {
        // Destructured, so a new field in the API breaks this until it is saved too.
        let v1::FrontendView {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            backends,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
        } = view;
        FrontendFile {
            service: service.clone(),
            vip: vip.clone(),
            port: *port,
            protocol: v1::Protocol::try_from(*protocol)
                .map_or_else(|_| protocol.to_string(), |p| p.as_str_name().to_owned()),
            target_port: *target_port,
            algorithm: v1::Algorithm::try_from(*algorithm)
                .map_or_else(|_| algorithm.to_string(), |a| a.as_str_name().to_owned()),
            backends: backends
                .iter()
                .map(
                    |v1::ViewBackend {
                         address,
                         weight,
                         draining,
                         probers,
                     }| BackendFile {
                        address: address.clone(),
                        weight: *weight,
                        draining: *draining,
                        probers: probers.clone(),
                    },
                )
                .collect(),
            maglev_table_size: *maglev_table_size,
            health_check: health_check.as_ref().map(HealthCheckFile::from),
            drain_timeout_seconds: *drain_timeout_seconds,
            session_affinity_seconds: *session_affinity_seconds,
            zones: zones
                .iter()
                .map(|z| (z.zone.clone(), z.weights.clone()))
                .collect(),
        }
    }
}

impl TryFrom<FrontendFile> for v1::FrontendView {
    type Error = String;

    fn try_from(file: FrontendFile) -> Result<Self, String> {
        let FrontendFile {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            backends,
            maglev_table_size,
            health_check,
            drain_timeout_seconds,
            session_affinity_seconds,
            zones,
        } = file;
        // A value this build does not know (from a newer control service)
        // was saved as its number.
        let protocol = v1::Protocol::from_str_name(&protocol)
            .map(|p| p as i32)
            .or_else(|| protocol.parse().ok())
            .ok_or_else(|| format!("unknown protocol {protocol:?}"))?;
        let algorithm = v1::Algorithm::from_str_name(&algorithm)
            .map(|a| a as i32)
            .or_else(|| algorithm.parse().ok())
            .ok_or_else(|| format!("unknown algorithm {algorithm:?}"))?;
        Ok(v1::FrontendView {
            service,
            vip,
            port,
            protocol,
            target_port,
            algorithm,
            maglev_table_size,
            health_check: health_check.map(v1::HealthCheck::from),
            drain_timeout_seconds,
            session_affinity_seconds,
            zones: zones
                .into_iter()
                .map(|(zone, weights)| v1::ZoneWeights { zone, weights })
                .collect(),
            backends: backends
                .into_iter()
                .map(
                    |BackendFile {
                         address,
                         weight,
                         draining,
                         probers,
                     }| v1::ViewBackend {
                        address,
                        weight,
                        draining,
                        probers,
                    },
                )
                .collect(),
        })
    }
}
