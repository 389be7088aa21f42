use std::net::Ipv4Addr;

use super::*;
use crate::endpoint::Endpoint;
use crate::grant::{Grant, Permission, Resource, Role, Scope, Subject, Verb};
use crate::kind::Object;
use crate::manifest::parse_objects;
use crate::service::{BackendSpec, ServicePort, ServiceSpec};

fn addr(s: &str) -> Ipv4Addr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("{s}: {e}"),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn service() -> ServiceSpec {
    ServiceSpec {
        namespace: "shop".to_owned(),
        name: "web".to_owned(),
        labels: labels(&[("tier", "frontend")]),
        vip: Some(addr("198.18.0.10")),
        ports: vec![
            ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
            },
            ServicePort {
                port: 53,
                protocol: Protocol::Udp,
                target_port: 53,
            },
        ],
        algorithm: Algorithm::WeightedLeastConnections,
        backends: vec![
            BackendSpec {
                address: addr("198.19.1.2"),
                weight: 3,
                draining: false,
                version: None,
            },
            BackendSpec {
                address: addr("198.19.1.3"),
                weight: 1,
                draining: false,
                version: None,
            },
        ],
        selector: Labels::new(),
        maglev_table_size: None,
        traffic: Default::default(),
    }
}

fn selecting_service() -> ServiceSpec {
    ServiceSpec {
        vip: None,
        backends: Vec::new(),
        selector: labels(&[("app", "web"), ("app.kubernetes.io/part-of", "shop")]),
        maglev_table_size: None,
        algorithm: Algorithm::RoundRobin,
        ..service()
    }
}

fn endpoint() -> Endpoint {
    Endpoint {
        namespace: "shop".to_owned(),
        name: "web-1".to_owned(),
        labels: labels(&[("app", "web")]),
        address: addr("198.19.1.2"),
        node: Some("node-1.eu".to_owned()),
        zone: Some("eu-west-1a".to_owned()),
        weight: 2,
        ready: false,
        draining: false,
    }
}

fn grant() -> Grant {
    Grant {
        namespace: "default".to_owned(),
        name: "ops".to_owned(),
        labels: Labels::new(),
        subject: Subject::Group("dev".to_owned()),
        role: Role::Custom,
        scope: Scope::All,
        permissions: vec![
            Permission {
                verb: Verb::Get,
                resource: Resource::Services,
            },
            Permission {
                verb: Verb::All,
                resource: Resource::Endpoints,
            },
        ],
    }
}

/// A way to break a valid message, the field it breaks, and what the message says.
type Case<T> = (fn(&mut T), &'static str, &'static [&'static str]);

fn invalid<T: std::fmt::Debug>(result: Result<T, ObjectError>) -> ObjectError {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(e) => e,
    }
}

/// The error is about `field` of `object`, and its message has every part.
fn assert_invalid(e: &ObjectError, object: &str, field: &str, parts: &[&str]) {
    assert!(
        matches!(e, ObjectError::Invalid { field: f, .. } if f == field),
        "{e:?} is not about {field}"
    );
    let message = e.to_string();
    assert!(
        message.starts_with(&format!("{object}: {field}: ")),
        "{message:?} does not start with {object}: {field}"
    );
    for part in parts {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

// --- Round trips ------------------------------------------------------------------

#[test]
fn every_kind_round_trips() {
    for object in [
        Object::Service(service()),
        Object::Service(selecting_service()),
        Object::Endpoint(endpoint()),
        Object::Endpoint(Endpoint {
            node: None,
            zone: None,
            labels: Labels::new(),
            ..endpoint()
        }),
        Object::Grant(grant()),
        Object::Grant(Grant {
            subject: Subject::User("alice@example.com".to_owned()),
            role: Role::Viewer,
            scope: Scope::Namespace("shop".to_owned()),
            permissions: Vec::new(),
            ..grant()
        }),
    ] {
        let message = v1::Object::from(&object);
        let back = Object::try_from(message.clone());
        assert_eq!(back.as_ref().ok(), Some(&object), "{message:?}: {back:?}");
        // And through the wire.
        let bytes = prost::Message::encode_to_vec(&message);
        let decoded = <v1::Object as prost::Message>::decode(bytes.as_slice());
        assert_eq!(decoded.ok(), Some(message));
    }
}

#[test]
fn every_algorithm_round_trips() {
    for algorithm in Algorithm::ALL {
        let proto = v1::Algorithm::from(algorithm) as i32;
        assert_eq!(algorithm_from_proto(proto), Ok(algorithm));
    }
}

#[test]
fn manifest_objects_round_trip() {
    let text = "\
kind: Service
namespace: shop
name: web
ports: [{ port: 80, protocol: TCP }]
selector: { app: web }
---
kind: Endpoint
namespace: shop
name: web-1
labels: { app: web }
address: 198.19.1.2
---
kind: Grant
name: alice
subject: { user: alice }
role: admin
scope: shop
";
    let objects = match parse_objects("all.yaml", text) {
        Ok(objects) => objects,
        Err(e) => panic!("{e}"),
    };
    for object in objects {
        let back = Object::try_from(v1::Object::from(&object));
        assert_eq!(back.ok(), Some(object));
    }
}

#[test]
fn domain_to_proto_spells_defaults_out() {
    let proto = v1::Service::from(&service());
    assert_eq!(proto.ports[0].protocol, v1::Protocol::Tcp as i32);
    assert_eq!(proto.ports[1].protocol, v1::Protocol::Udp as i32);
    assert_eq!(proto.ports[1].target_port, 53, "never the zero default");
    assert_eq!(
        proto.algorithm,
        v1::Algorithm::WeightedLeastConnections as i32
    );
    assert_eq!(proto.vip, "198.18.0.10");
    let meta = proto.meta.unwrap_or_default();
    assert_eq!(
        (meta.namespace.as_str(), meta.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(meta.resource_version, 0);

    assert_eq!(v1::Service::from(&selecting_service()).vip, "");
    let grant = v1::Grant::from(&grant());
    assert_eq!(grant.scope_namespace, "*");
    assert_eq!(grant.role, "custom");
    assert_eq!(grant.permissions[1].verb, "*");
    assert_eq!(
        grant.subject.and_then(|s| s.kind),
        Some(v1::subject::Kind::Group("dev".to_owned()))
    );
}

// --- Zero means default -----------------------------------------------------------

#[test]
fn proto_zero_values_take_their_defaults() {
    let mut proto = v1::Service::from(&service());
    proto.meta = Some(v1::ObjectMeta {
        name: "web".to_owned(),
        ..Default::default()
    });
    proto.vip = String::new();
    proto.ports[0].target_port = 0;
    proto.algorithm = v1::Algorithm::Unspecified as i32;
    proto.backends[0].weight = 0;
    let service = match ServiceSpec::try_from(proto) {
        Ok(service) => service,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(service.namespace, DEFAULT_NAMESPACE);
    assert_eq!(service.vip, None);
    assert_eq!(service.ports[0].target_port, 80);
    assert_eq!(service.algorithm, Algorithm::RoundRobin);
    assert_eq!(service.backends[0].weight, 1);

    let mut proto = v1::Endpoint::from(&endpoint());
    proto.weight = 0;
    proto.node = String::new();
    proto.zone = String::new();
    let endpoint = Endpoint::try_from(proto).ok();
    assert_eq!(
        endpoint.map(|e| (e.weight, e.node, e.zone)),
        Some((1, None, None))
    );
}

// --- Proto-side validation --------------------------------------------------------

#[test]
fn service_errors_name_object_field_and_value() {
    let cases: [Case<v1::Service>; 14] = [
        (
            |s| s.ports[1].port = 0,
            "ports[1].port",
            &["must be between 1 and 65535, got 0"],
        ),
        (
            |s| s.ports[0].port = 70_000,
            "ports[0].port",
            &["got 70000"],
        ),
        (
            |s| s.ports[0].target_port = 65_536,
            "ports[0].targetPort",
            &["got 65536"],
        ),
        (
            |s| s.ports[0].protocol = v1::Protocol::Unspecified as i32,
            "ports[0].protocol",
            &["must be \"TCP\" or \"UDP\", got \"PROTOCOL_UNSPECIFIED\""],
        ),
        (
            |s| s.ports[0].protocol = 9,
            "ports[0].protocol",
            &["got \"9\""],
        ),
        (
            |s| s.ports[1] = s.ports[0],
            "ports[1]",
            &["port 80/TCP is already listed as ports[0]"],
        ),
        (|s| s.ports.clear(), "ports", &["at least one port"]),
        (
            |s| s.algorithm = 42,
            "algorithm",
            &["unknown algorithm \"42\"", "round-robin"],
        ),
        (
            |s| s.vip = "2001:db8::1".to_owned(),
            "vip",
            &["IPv6 is not supported yet", "\"2001:db8::1\""],
        ),
        (
            |s| s.backends[1].address = "198.18.0.10".to_owned(),
            "backends[1].address",
            &["198.18.0.10 is the service's own VIP"],
        ),
        (
            |s| s.backends[1].address = s.backends[0].address.clone(),
            "backends[1].address",
            &["backend 198.19.1.2 is already listed as backends[0]"],
        ),
        (
            |s| s.backends[0].weight = 10_001,
            "backends[0].weight",
            &["must be between 1 and 10000, got 10001"],
        ),
        (
            |s| {
                s.selector.insert("app".to_owned(), "web".to_owned());
            },
            "selector",
            &["mutually exclusive"],
        ),
        (
            |s| {
                s.selector.clear();
                s.backends.clear();
                s.selector.insert("app".to_owned(), "web/1".to_owned());
            },
            "selector.app",
            &["label value \"web/1\" is invalid", "'/'"],
        ),
    ];
    for (break_it, field, parts) in cases {
        let mut proto = v1::Service::from(&service());
        break_it(&mut proto);
        let e = invalid(ServiceSpec::try_from(proto));
        assert_invalid(&e, "Service \"shop/web\"", field, parts);
        assert_eq!(
            e.object().map(ToString::to_string).as_deref(),
            Some("Service \"shop/web\"")
        );
    }
}

#[test]
fn too_many_ports_and_backends() {
    let mut proto = v1::Service::from(&service());
    proto.ports = (1..=65)
        .map(|port| v1::ServicePort {
            port,
            protocol: v1::Protocol::Tcp as i32,
            target_port: 0,
        })
        .collect();
    let e = invalid(ServiceSpec::try_from(proto));
    assert_invalid(
        &e,
        "Service \"shop/web\"",
        "ports",
        &["at most 64", "got 65"],
    );

    let mut proto = v1::Service::from(&service());
    proto.backends = (0..=4096)
        .map(|i| v1::StaticBackend {
            address: format!("198.19.{}.{}", i / 250, i % 250 + 1),
            weight: 0,
            draining: Default::default(),
            version: Default::default(),
        })
        .collect();
    let e = invalid(ServiceSpec::try_from(proto));
    assert_invalid(
        &e,
        "Service \"shop/web\"",
        "backends",
        &["at most 4096", "got 4097"],
    );
}

#[test]
fn meta_errors() {
    let mut proto = v1::Service::from(&service());
    proto.meta = None;
    let e = invalid(ServiceSpec::try_from(proto));
    assert_invalid(&e, "Service \"default/\"", "name", &["\"\"", "it is empty"]);

    let mut proto = v1::Endpoint::from(&endpoint());
    if let Some(meta) = proto.meta.as_mut() {
        meta.namespace = "Shop".to_owned();
    }
    let e = invalid(Endpoint::try_from(proto));
    assert_invalid(
        &e,
        "Endpoint \"Shop/web-1\"",
        "namespace",
        &["\"Shop\" is not a valid namespace", "'S'", "DNS-1123"],
    );

    let mut proto = v1::Grant::from(&grant());
    if let Some(meta) = proto.meta.as_mut() {
        meta.labels.insert("-bad".to_owned(), "x".to_owned());
    }
    let e = invalid(Grant::try_from(proto));
    assert_invalid(
        &e,
        "Grant \"default/ops\"",
        "labels.-bad",
        &["label key \"-bad\" is invalid"],
    );
}

#[test]
fn endpoint_errors() {
    let cases: [Case<v1::Endpoint>; 5] = [
        (
            |e| e.address.clear(),
            "address",
            &["missing required field"],
        ),
        (
            |e| e.address = "127.0.0.1".to_owned(),
            "address",
            &["loopback", "\"127.0.0.1\""],
        ),
        (
            |e| e.node = "node_1".to_owned(),
            "node",
            &["\"node_1\" is not a valid node name", "'_'"],
        ),
        (
            |e| e.zone = "eu west".to_owned(),
            "zone",
            &["\"eu west\" is not a valid zone"],
        ),
        (|e| e.weight = 20_000, "weight", &["got 20000"]),
    ];
    for (break_it, field, parts) in cases {
        let mut proto = v1::Endpoint::from(&endpoint());
        break_it(&mut proto);
        let e = invalid(Endpoint::try_from(proto));
        assert_invalid(&e, "Endpoint \"shop/web-1\"", field, parts);
    }
}

#[test]
fn grant_errors() {
    let cases: [Case<v1::Grant>; 10] = [
        (
            |g| g.subject = None,
            "subject",
            &["exactly one of user, group"],
        ),
        (
            |g| g.subject = Some(v1::Subject { kind: None }),
            "subject",
            &["got neither"],
        ),
        (
            |g| {
                g.subject = Some(v1::Subject {
                    kind: Some(v1::subject::Kind::User("al ice".to_owned())),
                });
            },
            "subject.user",
            &["\"al ice\" is not a valid user or group name"],
        ),
        (|g| g.role.clear(), "role", &["missing required field"]),
        (
            |g| g.role = "owner".to_owned(),
            "role",
            &["unknown role \"owner\""],
        ),
        (
            |g| g.scope_namespace.clear(),
            "scope",
            &["missing required field"],
        ),
        (
            |g| g.scope_namespace = "Shop".to_owned(),
            "scope",
            &["\"Shop\" is neither \"*\""],
        ),
        (
            |g| g.permissions.clear(),
            "permissions",
            &["role custom needs at least one permission"],
        ),
        (
            |g| g.permissions[1].resource = "pods".to_owned(),
            "permissions[1].resource",
            &["unknown resource \"pods\""],
        ),
        (
            |g| g.permissions[1] = g.permissions[0].clone(),
            "permissions[1]",
            &["get on services is already listed as permissions[0]"],
        ),
    ];
    for (break_it, field, parts) in cases {
        let mut proto = v1::Grant::from(&grant());
        break_it(&mut proto);
        let e = invalid(Grant::try_from(proto));
        assert_invalid(&e, "Grant \"default/ops\"", field, parts);
    }

    let mut proto = v1::Grant::from(&grant());
    proto.role = "viewer".to_owned();
    let e = invalid(Grant::try_from(proto));
    assert_invalid(
        &e,
        "Grant \"default/ops\"",
        "permissions",
        &["only role custom takes permissions; role viewer"],
    );
}

#[test]
fn objects_without_kind_and_nodes_are_rejected() {
    let e = invalid(Object::try_from(v1::Object { kind: None }));
    assert_eq!(e, ObjectError::NoKind);
    let node = v1::Object {
        kind: Some(v1::object::Kind::Node(v1::Node {
            meta: Some(v1::ObjectMeta {
                name: "node-1".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    let e = invalid(Object::try_from(node));
    assert!(
        matches!(&e, ObjectError::NodeNotApplicable { name } if name == "node-1"),
        "{e:?}"
    );
    assert!(e.to_string().contains("join token"), "{e}");
}

#[test]
fn kinds_convert_both_ways() {
    for &kind in ObjectKind::ALL {
        assert_eq!(kind_from_proto(kind.into()), Some(kind));
    }
    assert_eq!(kind_from_proto(v1::Kind::Node), None);
    assert_eq!(kind_from_proto(v1::Kind::Unspecified), None);
}

/// A manifest and an API call that break the same rule give the same reason.
#[test]
fn manifest_and_api_agree_on_wording() {
    let text = "\
kind: Service
namespace: shop
name: web
vip: 198.18.0.10
ports: [{ port: 80, protocol: TCP }, { port: 81, protocol: TCP }]
backends: [{ address: 198.19.1.2, weight: 0 }]
";
    let from_manifest = match parse_objects("web.yaml", text) {
        Ok(objects) => panic!("expected an error, got {objects:?}"),
        Err(e) => e.to_string(),
    };
    let mut proto = v1::Service::from(&service());
    proto.backends.truncate(1);
    // Zero means "default" in a message, so break the rule with the other bound.
    proto.backends[0].weight = 10_001;
    let from_api = invalid(ServiceSpec::try_from(proto)).to_string();
    let reason = |message: &str| {
        message
            .split_once("backends[0].weight: ")
            .map(|(_, reason)| {
                reason
                    .replace("got 0", "got N")
                    .replace("got 10001", "got N")
            })
    };
    assert!(reason(&from_manifest).is_some(), "{from_manifest}");
    assert_eq!(reason(&from_manifest), reason(&from_api));
}
