//! The defaults, each asserted once, where it is applied: when a manifest
//! becomes a domain value (here), when an API message does (the same values:
//! [`an_api_message_of_zeros_reads_as_the_manifest_that_leaves_everything_out`]),
//! and the two that are resolved only when the view is computed (the Maglev
//! table size, a probe's port: `view::tests`). Nothing downstream re-derives
//! one; everything after this point reads the domain value.

use sluice_api::v1;
use sluice_common::layout::MAGLEV_DEFAULT_TABLE_SIZE;

use super::{parse, parse_objects};
use crate::kind::{DEFAULT_NAMESPACE, Object};
use crate::policy::{NetworkPolicy, PolicyTypes};
use crate::service::{Algorithm, ServiceSpec};
use crate::traffic::{
    DEFAULT_AFFINITY_SECONDS, DEFAULT_HEALTHY_THRESHOLD, DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS,
    DEFAULT_UNHEALTHY_THRESHOLD, HealthCheck, Probe,
};
use crate::{Endpoint, Kind as _};

/// A service that gives only what has no default.
const BARE_SERVICE: &str = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP }
backends:
  - { address: 198.19.0.1 }
healthCheck: { tcp: {} }
";

fn bare_service() -> ServiceSpec {
    service(BARE_SERVICE)
}

fn service(text: &str) -> ServiceSpec {
    match parse_objects("bare.yaml", text) {
        Ok(objects) => match objects.as_slice() {
            [Object::Service(service)] => service.clone(),
            other => panic!("expected one service, got {other:?}"),
        },
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_service_that_leaves_everything_out_gets_the_defaults() {
    let service = bare_service();
    assert_eq!(service.namespace, DEFAULT_NAMESPACE);
    assert_eq!(
        service.ports[0].target_port, 80,
        "the target port is the port"
    );
    assert_eq!(service.algorithm, Algorithm::RoundRobin);
    assert_eq!(service.backends[0].weight, 1);
    assert!(!service.backends[0].draining);
    assert_eq!(service.backends[0].version, None);
    assert_eq!(
        service.traffic.drain_timeout_seconds, None,
        "flows run until they close"
    );
    assert_eq!(service.traffic.rollout, None);
    assert!(!service.traffic.topology_aware);
    assert_eq!(
        service.traffic.health_check,
        Some(HealthCheck {
            // Resolved when the view is computed: the first TCP target port.
            probe: Probe::Tcp { port: None },
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            unhealthy_threshold: DEFAULT_UNHEALTHY_THRESHOLD,
            healthy_threshold: DEFAULT_HEALTHY_THRESHOLD,
            fail_open: true,
        })
    );
    assert_eq!(service.traffic.session_affinity, None);
    // The standalone parser applies the very same defaults.
    let standalone = match parse("bare.yaml", BARE_SERVICE) {
        Ok(manifest) => manifest.services,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        standalone
            .into_iter()
            .map(ServiceSpec::from)
            .collect::<Vec<_>>(),
        [service]
    );
}

#[test]
fn client_ip_affinity_without_a_timeout_uses_the_default() {
    let text = format!("{BARE_SERVICE}sessionAffinity: {{ clientIP: {{}} }}\n");
    assert_eq!(
        service(&text)
            .traffic
            .session_affinity
            .map(|a| a.timeout_seconds),
        Some(DEFAULT_AFFINITY_SECONDS)
    );
}

#[test]
fn a_short_interval_shortens_the_default_timeout() {
    let text = BARE_SERVICE.replace("{ tcp: {} }", "{ tcp: {}, intervalMs: 400 }");
    let Ok(manifest) = parse("short.yaml", &text) else {
        panic!("valid manifest");
    };
    let check = manifest.services[0].traffic.health_check.clone();
    assert_eq!(check.map(|c| c.timeout_ms), Some(400));
}

#[test]
fn maglev_without_a_size_uses_the_default_table() {
    let text = BARE_SERVICE.replace("ports:", "algorithm: maglev\nports:");
    let Ok(manifest) = parse("maglev.yaml", &text) else {
        panic!("valid manifest");
    };
    assert_eq!(manifest.services[0].maglev_table_size, None);
    assert_eq!(
        manifest.services[0].maglev_table_size(),
        MAGLEV_DEFAULT_TABLE_SIZE
    );
}

#[test]
fn an_endpoint_that_leaves_everything_out_gets_the_defaults() {
    let objects = parse_objects("e.yaml", "kind: Endpoint\nname: e\naddress: 198.19.1.2\n");
    let Ok([Object::Endpoint(endpoint)]) = objects.as_deref() else {
        panic!("expected one endpoint, got {objects:?}");
    };
    assert_eq!(endpoint.namespace, DEFAULT_NAMESPACE);
    assert_eq!(endpoint.weight, 1);
    assert!(
        endpoint.ready,
        "an endpoint is ready unless it says otherwise"
    );
    assert!(!endpoint.draining);
    assert_eq!((&endpoint.node, &endpoint.zone), (&None, &None));
}

#[test]
fn a_policy_without_policy_types_restricts_ingress_and_egress_if_it_has_it() {
    let policy = |extra: &str| -> NetworkPolicy {
        let text = format!(
            "kind: NetworkPolicy\nname: p\nselector: {{ app: db }}\ningress:\n  - from: [ {{ selector: {{ app: web }} }} ]\n{extra}"
        );
        match parse_objects("p.yaml", &text).as_deref() {
            Ok([Object::NetworkPolicy(p)]) => p.clone(),
            other => panic!("expected one policy, got {other:?}"),
        }
    };
    assert_eq!(
        policy("").types,
        PolicyTypes {
            ingress: true,
            egress: false
        }
    );
    // An empty egress list restricts egress too: nothing may leave.
    assert_eq!(
        policy("egress: []\n").types,
        PolicyTypes {
            ingress: true,
            egress: true
        }
    );
}

/// The API's "zero means default" gives exactly the manifest's defaults: a
/// message that sets nothing optional reads as the manifest that writes
/// nothing optional.
#[test]
fn an_api_message_of_zeros_reads_as_the_manifest_that_leaves_everything_out() {
    let service = bare_service();
    let message = v1::Service {
        meta: Some(v1::ObjectMeta {
            name: "web".into(),
            ..Default::default()
        }),
        vip: "198.18.0.10".into(),
        ports: vec![v1::ServicePort {
            port: 80,
            protocol: v1::Protocol::Tcp.into(),
            target_port: 0,
        }],
        backends: vec![v1::StaticBackend {
            address: "198.19.0.1".into(),
            ..Default::default()
        }],
        health_check: Some(v1::HealthCheck {
            probe: Some(v1::health_check::Probe::Tcp(v1::TcpProbe { port: 0 })),
            ..Default::default()
        }),
        ..Default::default()
    };
    match ServiceSpec::try_from(message) {
        Ok(read) => assert_eq!(read, service),
        Err(e) => panic!("{e}"),
    }

    let endpoint = v1::Endpoint {
        meta: Some(v1::ObjectMeta {
            name: "e".into(),
            ..Default::default()
        }),
        address: "198.19.1.2".into(),
        // The wire's bool cannot be left out: `ready` is sent as it is.
        ready: true,
        ..Default::default()
    };
    let parsed = parse_objects("e.yaml", "kind: Endpoint\nname: e\naddress: 198.19.1.2\n");
    match (Endpoint::from_wire(endpoint), parsed.as_deref()) {
        (Ok(read), Ok([Object::Endpoint(written)])) => assert_eq!(&read, written),
        other => panic!("{other:?}"),
    }
}
