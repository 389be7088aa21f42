//! Control-mode manifests (`parse_objects`, `load_objects`): Service, Endpoint and Grant
//! with namespaces, labels, selectors and optional VIPs.

use super::agent_tests::assert_mentions;
use super::*;
#[allow(unused_imports, reason = "the tests share one prelude")]
use crate::{endpoint::*, grant::*, kind::*, policy::*, rules::*, service::*, traffic::*, wire::*};

/// Bases for rejection tests; each test appends or replaces lines, so the line numbers
/// below are the ones messages must name.
///
/// kind 1, namespace 2, name 3, ports 4, ports[0] 5; appended lines start at 6.
const SERVICE: &str = "\
kind: Service
namespace: shop
name: web
ports:
  - { port: 80, protocol: TCP }
";

/// kind 1, namespace 2, name 3, address 4; appended lines start at 5.
const ENDPOINT: &str = "\
kind: Endpoint
namespace: shop
name: web-1
address: 198.19.1.2
";

/// kind 1, namespace 2, name 3, subject 4, role 5, scope 6; appended lines start at 7.
const GRANT: &str = "\
kind: Grant
namespace: shop
name: alice
subject: { user: alice }
role: viewer
scope: shop
";

fn ok(text: &str) -> Vec<Object> {
    match parse_objects("app.yaml", text) {
        Ok(objects) => objects,
        Err(e) => panic!("expected valid objects, got: {e}"),
    }
}

fn err(text: &str) -> ManifestError {
    match parse_objects("app.yaml", text) {
        Ok(objects) => panic!("expected an error, got {objects:?}"),
        Err(e) => e,
    }
}

/// The error is the rule `problem` broke at `field`.
fn assert_problem(e: &ManifestError, field: &str, problem: impl Fn(&Problem) -> bool) {
    assert!(
        matches!(e, ManifestError::Invalid { field: f, problem: p, .. } if f == field && problem(p)),
        "expected a problem at {field}, got {e:?}"
    );
}

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

// --- Accepted manifests -----------------------------------------------------------------

#[test]
fn all_three_kinds_parse_in_document_order() {
    let text = "\
kind: Service
namespace: shop
name: web
labels: { tier: frontend }
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
selector: { app: web }
---
kind: Endpoint
namespace: shop
name: web-1
labels: { app: web, app.kubernetes.io/version: \"1.2\" }
address: 198.19.1.2
node: node-1
zone: eu-west-1a
---
kind: Grant
name: dev-edits-shop
subject: { group: dev }
role: custom
scope: shop
permissions:
  - { verb: get, resource: services }
  - { verb: \"*\", resource: endpoints }
---
kind: Service
name: dns
vip: 198.18.0.53
ports: [{ port: 53, protocol: UDP }]
algorithm: weighted-round-robin
backends: [{ address: 198.19.2.2, weight: 5 }]
";
    let expected = vec![
        Object::Service(ServiceSpec {
            namespace: "shop".to_owned(),
            name: "web".to_owned(),
            labels: labels(&[("tier", "frontend")]),
            vip: None,
            ports: vec![ServicePort {
                port: 80,
                protocol: Protocol::Tcp,
                target_port: 8080,
            }],
            algorithm: Algorithm::RoundRobin,
            backends: Vec::new(),
            selector: labels(&[("app", "web")]),
            maglev_table_size: None,
            traffic: Default::default(),
        }),
        Object::Endpoint(Endpoint {
            namespace: "shop".to_owned(),
            name: "web-1".to_owned(),
            labels: labels(&[("app", "web"), ("app.kubernetes.io/version", "1.2")]),
            address: addr("198.19.1.2"),
            node: Some("node-1".to_owned()),
            zone: Some("eu-west-1a".to_owned()),
            weight: 1,
            ready: true,
            draining: false,
        }),
        Object::Grant(Grant {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: "dev-edits-shop".to_owned(),
            labels: Labels::new(),
            subject: Subject::Group("dev".to_owned()),
            role: Role::Custom,
            scope: Scope::Namespace("shop".to_owned()),
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
        }),
        Object::Service(ServiceSpec {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            name: "dns".to_owned(),
            labels: Labels::new(),
            vip: Some(addr("198.18.0.53")),
            ports: vec![ServicePort {
                port: 53,
                protocol: Protocol::Udp,
                target_port: 53,
            }],
            algorithm: Algorithm::WeightedRoundRobin,
            backends: vec![BackendSpec {
                address: addr("198.19.2.2"),
                weight: 5,
                draining: false,
                version: None,
            }],
            selector: Labels::new(),
            maglev_table_size: None,
            traffic: Default::default(),
        }),
    ];
    assert_eq!(ok(text), expected);
}

#[test]
fn optional_fields_may_be_left_out() {
    let objects = ok(&format!("{SERVICE}---\n{ENDPOINT}"));
    let Some(Object::Service(service)) = objects.first() else {
        panic!("{objects:?}");
    };
    assert_eq!(service.vip, None, "the control service allocates one");
    assert_eq!(service.backends, []);
    assert_eq!(service.selector, Labels::new());
    // The endpoint's defaults, and the namespace's: defaults_tests.rs.
    assert!(matches!(objects.get(1), Some(Object::Endpoint(_))));

    let objects = ok(&SERVICE.replace("namespace: shop\n", ""));
    assert_eq!(
        objects[0].object_ref().to_string(),
        "Service \"default/web\""
    );
}

#[test]
fn endpoint_fields_are_read() {
    let text = format!("{ENDPOINT}weight: 7\nready: false\n");
    let objects = ok(&text);
    let Some(Object::Endpoint(endpoint)) = objects.first() else {
        panic!("{objects:?}");
    };
    assert_eq!((endpoint.weight, endpoint.ready), (7, false));
}

#[test]
fn grant_roles_scopes_and_subjects() {
    for role in Role::ALL {
        let permissions = if role == Role::Custom {
            "permissions: [{ verb: list, resource: \"*\" }]\n"
        } else {
            ""
        };
        let text = format!(
            "{}{permissions}",
            GRANT.replace("role: viewer", &format!("role: {role}"))
        );
        let objects = ok(&text);
        assert!(
            matches!(&objects[0], Object::Grant(g) if g.role == role),
            "{objects:?}"
        );
    }
    let objects = ok(&GRANT
        .replace("scope: shop", "scope: \"*\"")
        .replace("{ user: alice }", "{ group: \"system:admins\" }"));
    let Some(Object::Grant(grant)) = objects.first() else {
        panic!("{objects:?}");
    };
    assert_eq!(grant.scope, Scope::All);
    assert_eq!(grant.subject, Subject::Group("system:admins".to_owned()));
}

#[test]
fn a_standalone_manifest_is_also_a_control_manifest() {
    let text = include_str!("../../../../agent/manifests/web.yaml");
    let objects = ok(text);
    let standalone = match parse("web.yaml", text) {
        Ok(manifest) => manifest,
        Err(e) => panic!("{e}"),
    };
    let expected: Vec<Object> = standalone
        .services
        .into_iter()
        .map(|s| Object::Service(s.into()))
        .collect();
    assert_eq!(objects, expected);
}

#[test]
fn names_are_unique_per_kind_and_namespace() {
    let other_namespace = SERVICE.replace("namespace: shop", "namespace: blog");
    let endpoint_named_web = ENDPOINT.replace("name: web-1", "name: web");
    let grant_named_web = GRANT.replace("name: alice", "name: web");
    let objects = ok(&format!(
        "{SERVICE}---\n{other_namespace}---\n{endpoint_named_web}---\n{grant_named_web}"
    ));
    assert_eq!(objects.len(), 4);
}

#[test]
fn services_without_a_vip_never_conflict() {
    let objects = ok(&format!(
        "{SERVICE}---\n{}",
        SERVICE.replace("name: web", "name: api")
    ));
    assert_eq!(objects.len(), 2);
}

#[test]
fn labels_edge_cases_are_accepted() {
    let text = format!(
        "{SERVICE}labels: {{ empty: \"\", example.com/team: a.b_c-d, {}: x }}\n",
        "k".repeat(63)
    );
    let objects = ok(&text);
    assert_eq!(objects[0].labels().len(), 3);
    assert_eq!(objects[0].labels()["empty"], "");
}

#[test]
fn empty_files_have_no_objects() {
    for text in ["", "# nothing\n", "---\n---\n"] {
        assert_eq!(ok(text), [], "{text:?}");
    }
}

#[test]
fn serialized_objects_parse_back() {
    let selecting =
        format!("{SERVICE}selector: {{ app: web }}\n").replace("name: web", "name: sel");
    let endpoint = format!("{ENDPOINT}labels: {{ app: web }}\nnode: n1\nzone: z\nready: false\n");
    let with_backends =
        format!("{SERVICE}vip: 198.18.0.1\nbackends: [{{ address: 198.19.0.1 }}]\n");
    let grant = format!(
        "{}permissions: [{{ verb: \"*\", resource: \"*\" }}]\n",
        GRANT
            .replace("role: viewer", "role: custom")
            .replace("scope: shop", "scope: \"*\"")
    );
    let text = format!("{selecting}---\n{endpoint}---\n{with_backends}---\n{grant}");
    let objects = ok(&text);
    let yaml = match serde_saphyr::to_string_multiple(&objects) {
        Ok(yaml) => yaml,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(ok(&yaml), objects, "{yaml}");
}

// --- kind, name, namespace --------------------------------------------------------------

#[test]
fn unknown_kinds_list_the_control_kinds() {
    let e = err(&format!(
        "{SERVICE}---\n{}",
        ENDPOINT.replace("kind: Endpoint", "kind: Pod")
    ));
    assert!(
        matches!(&e, ManifestError::UnsupportedKind { kind, mode: Mode::Control, .. } if kind == "Pod"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "app.yaml: document 2, line 7",
            "kind: unsupported kind \"Pod\"",
            "the control service understands: Service, Endpoint, Grant",
        ],
    );
}

#[test]
fn invalid_namespaces_say_why() {
    for (namespace, problem) in [
        ("Shop", NameProblem::InvalidChar { ch: 'S' }),
        ("shop_eu", NameProblem::InvalidChar { ch: '_' }),
        ("-shop", NameProblem::BadStartAlnum),
        ("shop-", NameProblem::BadEnd),
        ("\"\"", NameProblem::Empty),
    ] {
        let e = err(&ENDPOINT.replace("namespace: shop", &format!("namespace: {namespace}")));
        assert_problem(
            &e,
            "namespace",
            |p| matches!(p, Problem::InvalidNamespace { problem: found, .. } if *found == problem),
        );
        let shown = format!("{:?}", namespace.trim_matches('"'));
        assert_mentions(
            &e,
            &[
                "app.yaml: document 1, line 2, column 12",
                "namespace: ",
                &shown,
                "DNS-1123",
            ],
        );
    }
    let e = err(&SERVICE.replace("namespace: shop", "namespace: 7"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "namespace"),
        "{e:?}"
    );
}

#[test]
fn invalid_names_in_every_kind() {
    for base in [SERVICE, ENDPOINT, GRANT] {
        let e = err(&base.replace("name: ", "name: X"));
        assert!(
            matches!(
                &e,
                ManifestError::InvalidName {
                    problem: NameProblem::InvalidChar { ch: 'X' },
                    ..
                }
            ),
            "{e:?}"
        );
        assert_mentions(&e, &["document 1, line 3", "name: \"X", "DNS-1035"]);
    }
}

#[test]
fn duplicate_objects_across_documents() {
    let e = err(&format!(
        "{ENDPOINT}---\n{SERVICE}---\n{}",
        ENDPOINT.replace("198.19.1.2", "198.19.1.3")
    ));
    assert!(
        matches!(&e, ManifestError::DuplicateObject { object, first_document: 1, .. }
            if object.kind == ObjectKind::Endpoint && object.name == "web-1"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "app.yaml: document 3 (Endpoint \"shop/web-1\"), line 14",
            "name: Endpoint \"shop/web-1\" is already defined in document 1",
        ],
    );

    let e = err(&format!("{GRANT}---\n{GRANT}"));
    assert_mentions(
        &e,
        &[
            "document 2 (Grant \"shop/alice\"), line 10",
            "already defined in document 1",
        ],
    );

    let e = err(&format!(
        "{SERVICE}---\n{}",
        SERVICE.replace("port: 80", "port: 81")
    ));
    assert!(
        matches!(&e, ManifestError::DuplicateService { namespace, name, first_document: 1, .. }
            if namespace == "shop" && name == "web"),
        "{e:?}"
    );
    assert_mentions(&e, &["document 2 (Service \"shop/web\"), line 9"]);
}

#[test]
fn explicit_vips_conflict_across_namespaces() {
    let first = format!("{SERVICE}vip: 198.18.0.10\n");
    let second = first
        .replace("namespace: shop", "namespace: blog")
        .replace("name: web", "name: api");
    let e = err(&format!("{first}---\n{second}"));
    assert!(
        matches!(&e, ManifestError::ListenerConflict { field, other_service, other_document: 1, .. }
            if field == "ports[0]" && other_service == "shop/web"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 2 (Service \"blog/api\"), line 12",
            "ports[0]: 198.18.0.10:80/TCP is already served by Service \"shop/web\" (document 1)",
        ],
    );
}

// --- Labels and selectors ---------------------------------------------------------------

#[test]
fn invalid_labels_name_key_value_and_line() {
    // (appended line, field, which problem, what the message says)
    type Case = (
        &'static str,
        &'static str,
        fn(&Problem) -> bool,
        &'static [&'static str],
    );
    let cases: [Case; 6] = [
        (
            "labels: { \"app name\": web }",
            "labels.app name",
            |p| matches!(p, Problem::InvalidLabelKey { .. }),
            &["label key \"app name\" is invalid", "' '"],
        ),
        (
            "labels: { Example.com/app: web }",
            "labels.Example.com/app",
            |p| {
                matches!(
                    p,
                    Problem::InvalidLabelKey {
                        problem: LabelProblem::BadPrefix { .. },
                        ..
                    }
                )
            },
            &["prefix \"Example.com\" is not a DNS-1123 subdomain"],
        ),
        (
            "labels: { app: -web }",
            "labels.app",
            |p| matches!(p, Problem::InvalidLabelValue { .. }),
            &[
                "label value \"-web\" is invalid",
                "start and end with a letter or digit",
            ],
        ),
        (
            "labels: { app: web/1 }",
            "labels.app",
            |p| matches!(p, Problem::InvalidLabelValue { .. }),
            &["\"web/1\"", "'/'"],
        ),
        (
            "selector: { app: \"we b\" }",
            "selector.app",
            |p| matches!(p, Problem::InvalidLabelValue { .. }),
            &["\"we b\""],
        ),
        (
            "selector: {}",
            "selector",
            |p| matches!(p, Problem::EmptySelector),
            &["empty selector would select every endpoint"],
        ),
    ];
    for (line, field, problem, parts) in cases {
        let e = err(&format!("{SERVICE}{line}\n"));
        assert_problem(&e, field, problem);
        assert_mentions(&e, &["app.yaml: document 1 (Service \"shop/web\"), line 6"]);
        assert_mentions(&e, &[&format!("{field}: ")]);
        assert_mentions(&e, parts);
    }
}

#[test]
fn label_values_must_be_strings() {
    let e = err(&format!("{ENDPOINT}labels: {{ version: 2 }}\n"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "labels.version"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "(Endpoint \"shop/web-1\"), line 5",
            "labels.version: expected a string, got integer 2",
        ],
    );

    let e = err(&format!("{ENDPOINT}labels: [app]\n"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "labels"),
        "{e:?}"
    );
}

#[test]
fn too_many_labels() {
    let many: Vec<String> = (0..=crate::rules::MAX_LABELS)
        .map(|i| format!("k{i}: v"))
        .collect();
    let e = err(&format!("{GRANT}labels: {{ {} }}\n", many.join(", ")));
    assert_problem(&e, "labels", |p| {
        matches!(p, Problem::TooManyLabels { count: 65, max: 64 })
    });
    assert_mentions(
        &e,
        &[
            "(Grant \"shop/alice\"), line 7",
            "at most 64 labels, got 65",
        ],
    );
}

#[test]
fn backends_and_selector_are_exclusive() {
    let e = err(&format!(
        "{SERVICE}backends: [{{ address: 198.19.1.2 }}]\nselector: {{ app: web }}\n"
    ));
    assert_problem(&e, "selector", |p| {
        matches!(p, Problem::BackendsAndSelector)
    });
    assert_mentions(
        &e,
        &[
            "app.yaml: document 1 (Service \"shop/web\"), line 7",
            "selector: backends and selector are mutually exclusive",
        ],
    );
}

#[test]
fn backend_is_vip_only_checked_with_a_vip() {
    let text = format!("{SERVICE}backends: [{{ address: 198.18.0.10 }}]\n");
    assert_eq!(ok(&text).len(), 1);
    let e = err(&format!(
        "{SERVICE}vip: 198.18.0.10\nbackends: [{{ address: 198.18.0.10 }}]\n"
    ));
    assert!(matches!(e, ManifestError::BackendIsVip { .. }), "{e:?}");
    assert_mentions(&e, &["line 7", "backends[0].address", "own VIP"]);
}

#[test]
fn service_unknown_field_lists_selector() {
    let e = err(&format!("{SERVICE}selectr: {{ app: web }}\n"));
    assert_mentions(
        &e,
        &[
            "line 6",
            "selectr: unknown field",
            "vip, ports, algorithm, backends, selector",
        ],
    );
}

// --- Endpoints --------------------------------------------------------------------------

#[test]
fn endpoint_rejections() {
    let cases: [(&str, &str, &str, &[&str]); 8] = [
        (
            "address: 198.19.1.2",
            "address: 127.0.0.1",
            "line 4",
            &["address: a loopback address cannot be used, got \"127.0.0.1\""],
        ),
        (
            "address: 198.19.1.2",
            "address: web-1",
            "line 4",
            &["address: not an IPv4 address, got \"web-1\""],
        ),
        (
            "address: 198.19.1.2\n",
            "",
            "line 1",
            &["address: missing required field"],
        ),
        (
            "",
            "node: Node_1",
            "line 5",
            &["node: \"Node_1\" is not a valid node name", "'N'"],
        ),
        (
            "",
            "zone: \"eu west\"",
            "line 5",
            &["zone: \"eu west\" is not a valid zone", "' '"],
        ),
        (
            "",
            "weight: 0",
            "line 5",
            &["weight: must be between 1 and 10000, got 0"],
        ),
        (
            "",
            "ready: yes please",
            "line 5",
            &["ready: expected a boolean, got string \"yes please\""],
        ),
        (
            "",
            "port: 80",
            "line 5",
            &["port: unknown field", "address, node, zone, weight, ready"],
        ),
    ];
    for (from, to, line, parts) in cases {
        // An empty `from` appends `to` as line 5.
        let text = if from.is_empty() {
            format!("{ENDPOINT}{to}\n")
        } else {
            ENDPOINT.replacen(from, to, 1)
        };
        let e = err(&text);
        assert_mentions(
            &e,
            &[&format!(
                "app.yaml: document 1 (Endpoint \"shop/web-1\"), {line}"
            )],
        );
        assert_mentions(&e, parts);
    }
}

// --- Grants -----------------------------------------------------------------------------

#[test]
fn grant_subject_must_be_exactly_one() {
    let e = err(&GRANT.replace("{ user: alice }", "{ user: alice, group: dev }"));
    assert_problem(&e, "subject", |p| matches!(p, Problem::TwoSubjects { .. }));
    assert_mentions(
        &e,
        &[
            "(Grant \"shop/alice\"), line 4",
            "subject: must name exactly one of user, group; got both (user \"alice\", group \"dev\")",
        ],
    );

    let e = err(&GRANT.replace("{ user: alice }", "{}"));
    assert_problem(&e, "subject", |p| matches!(p, Problem::NoSubject));
    assert_mentions(&e, &["line 4", "got neither"]);

    let e = err(&GRANT.replace("{ user: alice }", "{ serviceAccount: ci }"));
    assert_mentions(
        &e,
        &[
            "line 4",
            "subject.serviceAccount: unknown field, expected one of: user, group",
        ],
    );

    let e = err(&GRANT.replace("{ user: alice }", "{ user: \"al ice\" }"));
    assert_problem(&e, "subject.user", |p| {
        matches!(p, Problem::InvalidSubject { .. })
    });
    assert_mentions(
        &e,
        &["line 4", "\"al ice\" is not a valid user or group name"],
    );

    let e = err(&GRANT.replace("subject: { user: alice }\n", ""));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "subject"),
        "{e:?}"
    );
}

#[test]
fn grant_role_and_scope() {
    let e = err(&GRANT.replace("role: viewer", "role: owner"));
    assert_problem(&e, "role", |p| matches!(p, Problem::UnknownRole { .. }));
    assert_mentions(
        &e,
        &[
            "(Grant \"shop/alice\"), line 5",
            "role: unknown role \"owner\", expected one of: viewer, editor, admin, custom",
        ],
    );

    let e = err(&GRANT.replace("scope: shop", "scope: All"));
    assert_problem(&e, "scope", |p| matches!(p, Problem::InvalidScope { .. }));
    assert_mentions(&e, &["line 6", "scope: \"All\" is neither \"*\""]);

    for field in ["role", "scope"] {
        let text: String = GRANT
            .lines()
            .filter(|l| !l.starts_with(field))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = err(&text);
        assert!(
            matches!(&e, ManifestError::MissingField { field: f, .. } if f == field),
            "{e:?}"
        );
    }
}

/// `*` alone is YAML alias syntax; the message says where, and the docs say to quote it.
#[test]
fn unquoted_star_is_a_yaml_error() {
    let e = err(&GRANT.replace("scope: shop", "scope: *"));
    assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
    assert_mentions(&e, &["document 1", "line 6"]);
}

#[test]
fn grant_permissions() {
    let custom = GRANT.replace("role: viewer", "role: custom");
    let e = err(&custom);
    assert_problem(&e, "permissions", |p| matches!(p, Problem::NoPermissions));
    assert_mentions(
        &e,
        &[
            "(Grant \"shop/alice\"), line 1",
            "permissions: role custom needs at least one permission",
        ],
    );

    let e = err(&format!("{custom}permissions: []\n"));
    assert_mentions(&e, &["line 7", "needs at least one permission"]);

    let e = err(&format!(
        "{GRANT}permissions: [{{ verb: get, resource: services }}]\n"
    ));
    assert_problem(&e, "permissions", |p| {
        matches!(p, Problem::PermissionsNotCustom { role: Role::Viewer })
    });
    assert_mentions(
        &e,
        &["line 7", "only role custom takes permissions; role viewer"],
    );

    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "{ verb: patch, resource: services }",
            "permissions[1].verb",
            &[
                "unknown verb \"patch\"",
                "get, list, watch, create, update, delete, *",
            ],
        ),
        (
            "{ verb: get, resource: pods }",
            "permissions[1].resource",
            &[
                "unknown resource \"pods\"",
                "services, endpoints, grants, networkpolicies, nodes, tokens, users, *",
            ],
        ),
        (
            "{ verb: get, resource: services }",
            "permissions[1]",
            &["get on services is already listed as permissions[0]"],
        ),
        (
            "{ verb: get }",
            "permissions[1].resource",
            &["missing required field"],
        ),
        (
            "{ verb: get, resource: services, namespace: x }",
            "permissions[1].namespace",
            &["unknown field, expected one of: verb, resource"],
        ),
    ];
    for (entry, field, parts) in cases {
        let text =
            format!("{custom}permissions:\n  - {{ verb: get, resource: services }}\n  - {entry}\n");
        let e = err(&text);
        assert_mentions(
            &e,
            &["(Grant \"shop/alice\"), line 9", &format!("{field}: ")],
        );
        assert_mentions(&e, parts);
    }
}

// --- load_objects -----------------------------------------------------------------------

#[test]
fn load_objects_reads_the_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("sluice-objects-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{}: {e}", dir.display());
    }
    let good = dir.join("good.yaml");
    let bad = dir.join("bad.yaml");
    for (path, text) in [
        (&good, format!("{SERVICE}---\n{ENDPOINT}")),
        (&bad, format!("{ENDPOINT}weigth: 1\n")),
    ] {
        if let Err(e) = std::fs::write(path, text) {
            panic!("{}: {e}", path.display());
        }
    }
    let loaded = load_objects(&good);
    let bad_result = load_objects(&bad);
    let missing = load_objects(&dir.join("missing.yaml"));
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        matches!(&loaded, Ok(objects) if objects.len() == 2),
        "{loaded:?}"
    );
    match bad_result {
        Err(e) => assert_mentions(
            &e,
            &[
                &format!(
                    "{}: document 1 (Endpoint \"shop/web-1\"), line 5",
                    bad.display()
                ),
                "weigth",
            ],
        ),
        Ok(objects) => panic!("expected an error, got {objects:?}"),
    }
    assert!(
        matches!(missing, Err(ManifestError::Read { .. })),
        "{missing:?}"
    );
}

// ---- traffic policies ----------------------------------------------------------

fn service_of(objects: Vec<Object>) -> ServiceSpec {
    match objects.into_iter().next() {
        Some(Object::Service(s)) => s,
        other => panic!("expected a service, got {other:?}"),
    }
}

#[test]
fn traffic_policies_parse() {
    // Their defaults: defaults_tests.rs.
    let s = service_of(ok(&format!(
        "{SERVICE}healthCheck: {{ tcp: {{}} }}\nrollout: {{ to: v2, percent: 5 }}\n\
         sessionAffinity: {{ clientIP: {{ timeoutSeconds: 60 }} }}\ntopologyAware: true\ndrainTimeoutSeconds: 30\n\
         backends:\n  - {{ address: 198.19.1.2, version: v1 }}\n  - {{ address: 198.19.1.3, version: v2, draining: true }}\n"
    )));
    assert!(s.traffic.health_check.is_some());
    assert_eq!(
        s.traffic.rollout,
        Some(Rollout {
            to: "v2".into(),
            percent: 5
        })
    );
    assert_eq!(
        s.traffic.session_affinity.map(|a| a.timeout_seconds),
        Some(60)
    );
    assert!(s.traffic.topology_aware);
    assert_eq!(s.traffic.drain_timeout_seconds, Some(30));
    assert_eq!(s.backends[0].version.as_deref(), Some("v1"));
    assert!(!s.backends[0].draining && s.backends[1].draining);

    let s = service_of(ok(&format!(
        "{SERVICE}healthCheck: {{ http: {{ path: /healthz, port: 9000 }}, intervalMs: 500, timeoutMs: 200, \
         unhealthyThreshold: 4, healthyThreshold: 5, failOpen: false }}\n"
    )));
    let check = s.traffic.health_check.expect("health check");
    assert_eq!(
        (
            check.interval_ms,
            check.timeout_ms,
            check.unhealthy_threshold,
            check.healthy_threshold
        ),
        (500, 200, 4, 5)
    );
    assert!(!check.fail_open);
    assert_eq!(check.probe.port(), Some(9000));
}

#[test]
fn traffic_policy_errors_name_the_field_and_value() {
    let cases: &[(&str, &[&str])] = &[
        (
            "rollout: { to: v2, percent: 101 }",
            &["line 6", "rollout.percent", "between 0 and 100", "101"],
        ),
        ("rollout: { percent: 5 }", &["rollout.to"]),
        (
            "rollout: { to: \"\", percent: 5 }",
            &["rollout.to", "version must not be empty"],
        ),
        (
            "healthCheck: { http: { path: healthz } }",
            &["healthCheck.http.path", "absolute path", "\"healthz\""],
        ),
        (
            "healthCheck: { tcp: {}, http: { path: / } }",
            &["healthCheck", "exactly one probe"],
        ),
        (
            "healthCheck: { intervalMs: 1000 }",
            &["healthCheck", "exactly one probe"],
        ),
        (
            "healthCheck: { tcp: {}, intervalMs: 50 }",
            &["healthCheck.intervalMs", "between 100 and 300000", "50"],
        ),
        (
            "healthCheck: { tcp: {}, intervalMs: 1000, timeoutMs: 2000 }",
            &["healthCheck.timeoutMs", "between 10 and 1000", "2000"],
        ),
        (
            "healthCheck: { tcp: { port: 0 } }",
            &["healthCheck.tcp.port", "between 1 and 65535"],
        ),
        (
            "healthCheck: { tcp: {}, unhealthyThreshold: 0 }",
            &["healthCheck.unhealthyThreshold", "between 1 and 100"],
        ),
        ("healthCheck: { grpc: {} }", &["healthCheck.grpc"]),
        (
            "drainTimeoutSeconds: 0",
            &["drainTimeoutSeconds", "between 1 and 86400", "got 0"],
        ),
        (
            "sessionAffinity: { clientIP: { timeoutSeconds: 100000 } }",
            &[
                "sessionAffinity.clientIP.timeoutSeconds",
                "between 1 and 86400",
            ],
        ),
        (
            "sessionAffinity: { cookie: {} }",
            &["sessionAffinity.cookie"],
        ),
        ("topologyAware: yes please", &["topologyAware"]),
    ];
    for (line, parts) in cases {
        let e = err(&format!("{SERVICE}{line}\n"));
        assert_mentions(&e, parts);
    }
    let e = err(&format!(
        "{SERVICE}backends:\n  - {{ address: 198.19.1.2, version: \"v 2\" }}\n"
    ));
    assert_mentions(&e, &["backends[0].version", "\"v 2\""]);
    let e = err(&format!("{ENDPOINT}labels: {{ version: \"\" }}\n"));
    assert_mentions(&e, &["labels.version", "version must not be empty"]);
    // A UDP-only service has no port an HTTP or TCP probe could default to.
    let udp_only = "kind: Service\nname: dns\nports: [{ port: 53, protocol: UDP }]\n";
    let e = err(&format!("{udp_only}healthCheck: {{ tcp: {{}} }}\n"));
    assert_mentions(&e, &["line 4", "healthCheck", "needs a port", "tcp.port"]);
    ok(&format!(
        "{udp_only}healthCheck: {{ tcp: {{ port: 8053 }} }}\n"
    ));
}

#[test]
fn traffic_policies_round_trip_through_yaml_and_the_api() {
    let text = format!(
        "{SERVICE}healthCheck: {{ http: {{ path: /healthz }}, intervalMs: 300, timeoutMs: 100, failOpen: false }}\n\
         rollout: {{ to: v2, percent: 1 }}\nsessionAffinity: {{ clientIP: {{ timeoutSeconds: 60 }} }}\n\
         topologyAware: true\ndrainTimeoutSeconds: 5\nselector: {{ app: web }}\n"
    );
    let original = ok(&text);
    let yaml = serde_saphyr::to_string(&original[0]).expect("serializes");
    assert_eq!(ok(&yaml), original, "{yaml}");
    let message = sluice_api::v1::Object::from(&original[0]);
    assert_eq!(Object::try_from(message).expect("valid"), original[0]);
}

// ---- network policies ------------------------------------------------------------

/// kind 1, namespace 2, name 3, selector 4; appended lines start at 5.
const POLICY: &str = "\
kind: NetworkPolicy
namespace: shop
name: web-ingress
selector: { app: web }
";

#[test]
fn network_policies_parse_and_round_trip() {
    let text = format!(
        "{POLICY}ingress:\n  - from:\n      - selector: {{ app: frontend }}\n        namespace: shop\n      \
         - cidr: 198.18.100.0/24\n        except: [198.18.100.128/25]\n      - selector: {{}}\n    \
         ports: [{{ port: 8080, protocol: TCP }}]\n  - {{}}\n"
    );
    let objects = ok(&text);
    let Object::NetworkPolicy(policy) = &objects[0] else {
        panic!("expected a policy: {objects:?}");
    };
    assert_eq!(policy.selector, Some(labels(&[("app", "web")])));
    assert_eq!(policy.ingress.len(), 2);
    assert_eq!(policy.ingress[0].from.len(), 3);
    assert!(policy.ingress[1].from.is_empty() && policy.ingress[1].ports.is_empty());
    let yaml = serde_saphyr::to_string(&objects[0]).expect("serializes");
    assert_eq!(ok(&yaml), objects, "{yaml}");
    let message = sluice_api::v1::Object::from(&objects[0]);
    assert_eq!(Object::try_from(message).expect("valid"), objects[0]);
    // Egress: where the selected endpoints may go; types follow Kubernetes.
    let egress = ok(&format!(
        "{POLICY}policyTypes: [Egress]\negress:\n  - to: [{{ selector: {{ app: db }} }}]\n    ports: [{{ port: 5432, protocol: TCP }}]\n"
    ));
    let Object::NetworkPolicy(p) = &egress[0] else {
        panic!("a policy");
    };
    assert!(!p.types.ingress && p.types.egress && p.egress.len() == 1);
    let yaml = serde_saphyr::to_string(&egress[0]).expect("serializes");
    assert_eq!(ok(&yaml), egress, "{yaml}");
    assert_eq!(
        Object::try_from(sluice_api::v1::Object::from(&egress[0])).expect("valid"),
        egress[0]
    );
    // A namespace-wide default deny.
    let deny = ok("kind: NetworkPolicy\nname: deny-all\nselector: {}\n");
    assert!(
        matches!(&deny[0], Object::NetworkPolicy(p) if p.selector == Some(Labels::new()) && p.ingress.is_empty())
    );
    // A service's VIP, for clients outside the cluster.
    let vip = ok(
        "kind: NetworkPolicy\nname: web-vip\nservice: web\ningress:\n  - from: [{ cidr: 198.18.1.0/24 }]\n    ports: [{ port: 80, protocol: TCP }]\n",
    );
    assert!(
        matches!(&vip[0], Object::NetworkPolicy(p) if p.selector.is_none() && p.service.as_deref() == Some("web"))
    );
    let yaml = serde_saphyr::to_string(&vip[0]).expect("serializes");
    assert_eq!(ok(&yaml), vip, "{yaml}");
    assert_eq!(
        Object::try_from(sluice_api::v1::Object::from(&vip[0])).expect("valid"),
        vip[0]
    );
}

#[test]
fn network_policy_errors_name_the_field_and_value() {
    let rule = |peer: &str| format!("{POLICY}ingress:\n  - from: [{peer}]\n");
    let cases: Vec<(String, &[&str])> = vec![
        (
            rule("{ cidr: 198.18.100.1/24 }"),
            &[
                "line 6",
                "ingress[0].from[0].cidr",
                "host bits",
                "198.18.100.0/24",
            ],
        ),
        (
            rule("{ cidr: 198.18.100.0/33 }"),
            &["ingress[0].from[0].cidr", "not an IPv4 CIDR"],
        ),
        (
            rule("{ cidr: 10.0.0.0/8, except: [11.0.0.0/16] }"),
            &[
                "ingress[0].from[0].except[0]",
                "not strictly inside 10.0.0.0/8",
            ],
        ),
        (
            rule("{ selector: { app: x }, cidr: 10.0.0.0/8 }"),
            &["ingress[0].from[0]", "exactly one of selector"],
        ),
        (
            rule("{ namespace: shop }"),
            &["ingress[0].from[0]", "exactly one of selector"],
        ),
        (
            rule("{ cidr: 10.0.0.0/8, namespace: shop }"),
            &["ingress[0].from[0].namespace", "only applies to a selector"],
        ),
        (
            rule("{ selector: {}, except: [10.0.0.0/9] }"),
            &["ingress[0].from[0].except", "only applies to a cidr"],
        ),
        (
            format!("{POLICY}ingress:\n  - ports: [{{ port: 0, protocol: TCP }}]\n"),
            &["ingress[0].ports[0].port", "between 1 and 65535"],
        ),
        (
            format!("{POLICY}ingress:\n  - ports: [{{ port: 80, protocol: SCTP }}]\n"),
            &["ingress[0].ports[0].protocol", "\"SCTP\""],
        ),
        (
            "kind: NetworkPolicy\nname: p\n".to_owned(),
            &["selector", "exactly one"],
        ),
        (
            format!("{POLICY}service: web\n"),
            &["line 5", "service", "exactly one"],
        ),
        (
            "kind: NetworkPolicy\nname: p\nservice: Web\n".to_owned(),
            &["service", "\"Web\""],
        ),
        (
            format!("{POLICY}policyTypes: [Ingres]\n"),
            &["policyTypes[0]", "\"Ingres\""],
        ),
        (
            "kind: NetworkPolicy\nname: p\nservice: web\negress: []\n".to_owned(),
            &["egress", "not a service's VIP"],
        ),
        (
            format!("{POLICY}policyTypes: [Ingress]\negress: []\n"),
            &["egress", "need Egress"],
        ),
        (
            format!("{POLICY}egress:\n  - to: [{{ cidr: 10.0.0.1/8 }}]\n"),
            &["egress[0].to[0].cidr", "host bits"],
        ),
    ];
    for (text, parts) in cases {
        let e = err(&text);
        assert_mentions(&e, parts);
    }
    // The standalone agent does not take them.
    assert!(parse("web.yaml", "kind: NetworkPolicy\nname: p\nselector: {}\n").is_err());
}
