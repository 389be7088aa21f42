//! The standalone agent's manifests (`parse`, `load`): Services with a VIP and static
//! backends. Control-mode manifests are tested in `control_tests`.

use super::*;
#[allow(unused_imports, reason = "the tests share one prelude")]
use crate::{endpoint::*, grant::*, kind::*, policy::*, rules::*, service::*, traffic::*, wire::*};

/// A valid document; the line numbers tests rely on: kind 1, name 2, vip 3, ports 4,
/// ports[0] 5.
const MINIMAL: &str = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP }
";

fn ok(text: &str) -> Manifest {
    match parse("web.yaml", text) {
        Ok(manifest) => manifest,
        Err(e) => panic!("expected a valid manifest, got: {e}"),
    }
}

fn err(text: &str) -> ManifestError {
    match parse("web.yaml", text) {
        Ok(manifest) => panic!("expected an error, got {manifest:?}"),
        Err(e) => e,
    }
}

/// The message names every part (file, document, field, value, line...).
/// Shared with the control-mode tests.
pub(super) fn assert_mentions(e: &ManifestError, parts: &[&str]) {
    let message = e.to_string();
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} does not mention {part:?}"
        );
    }
}

/// MINIMAL with `backends:` appended; backends[i] is on line 7 + i.
fn with_backends(entries: &[&str]) -> String {
    let mut text = format!("{MINIMAL}backends:\n");
    for entry in entries {
        text.push_str(&format!("  - {{ {entry} }}\n"));
    }
    text
}

fn addr(s: &str) -> Ipv4Addr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("{s}: {e}"),
    }
}

// --- Accepted manifests ---------------------------------------------------------

#[test]
fn example_parses_to_expected_structs() {
    let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP, targetPort: 5353 }
algorithm: round-robin   # round-robin | weighted-round-robin | ...
backends:
  - { address: 198.19.1.2, weight: 1 }
  - { address: 198.19.2.2, weight: 3 }
";
    let expected = Manifest {
        services: vec![Service {
            namespace: "default".to_owned(),
            name: "web".to_owned(),
            labels: Labels::new(),
            vip: addr("198.18.0.10"),
            ports: vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    target_port: 8080,
                },
                ServicePort {
                    port: 53,
                    protocol: Protocol::Udp,
                    target_port: 5353,
                },
            ],
            algorithm: Algorithm::RoundRobin,
            backends: vec![
                BackendSpec {
                    address: addr("198.19.1.2"),
                    weight: 1,
                    draining: false,
                    version: None,
                },
                BackendSpec {
                    address: addr("198.19.2.2"),
                    weight: 3,
                    draining: false,
                    version: None,
                },
            ],
            selector: Labels::new(),
            maglev_table_size: None,
            traffic: Default::default(),
        }],
    };
    assert_eq!(ok(text), expected);
}

#[test]
fn block_style_is_accepted_too() {
    let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - port: 80
    protocol: TCP
backends:
  - address: 198.19.1.2
    weight: 2
";
    let service = &ok(text).services[0];
    assert_eq!(service.ports[0].port, 80);
    assert_eq!(service.backends[0].weight, 2);
}

#[test]
fn omitted_backends_mean_an_empty_list() {
    assert_eq!(ok(MINIMAL).services[0].backends, []);
}

#[test]
fn null_optional_fields_count_as_omitted() {
    let text = format!("{MINIMAL}algorithm:\nbackends:\n");
    let service = &ok(&text).services[0];
    assert_eq!(service.algorithm, Algorithm::RoundRobin);
    assert_eq!(service.backends, []);
}

#[test]
fn every_algorithm_name_is_accepted() {
    for algorithm in Algorithm::ALL {
        let text = format!("{MINIMAL}algorithm: {algorithm}\n");
        assert_eq!(ok(&text).services[0].algorithm, algorithm);
    }
}

#[test]
fn limits_are_inclusive() {
    let ports: String = (1..=MAX_PORTS_PER_SERVICE)
        .map(|p| format!("  - {{ port: {p}, protocol: UDP }}\n"))
        .collect();
    let text = format!("kind: Service\nname: web\nvip: 198.18.0.10\nports:\n{ports}");
    assert_eq!(ok(&text).services[0].ports.len(), MAX_PORTS_PER_SERVICE);

    let weight = format!("address: 198.19.1.2, weight: {MAX_WEIGHT}");
    assert_eq!(
        ok(&with_backends(&[&weight])).services[0].backends[0].weight,
        MAX_WEIGHT
    );

    let backends: Vec<String> = (0..MAX_BACKENDS_PER_SERVICE)
        .map(|i| format!("address: 198.19.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let manifest = ok(&with_backends(&backends));
    assert_eq!(
        manifest.services[0].backends.len(),
        MAX_BACKENDS_PER_SERVICE
    );
}

#[test]
fn name_rules_accept_edge_cases() {
    for name in ["a", "a1", "a-b", "web-2", &"a".repeat(63)] {
        let text = MINIMAL.replace("name: web", &format!("name: {name}"));
        assert_eq!(ok(&text).services[0].name, name);
    }
}

#[test]
fn multiple_documents_keep_document_order() {
    let text = format!(
        "{MINIMAL}---\n{}",
        MINIMAL
            .replace("name: web", "name: api")
            .replace("port: 80", "port: 443")
    );
    let manifest = ok(&text);
    let names: Vec<&str> = manifest.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "api"]);
}

#[test]
fn empty_documents_are_skipped() {
    let text = format!("---\n# nothing here\n---\n{MINIMAL}---\n");
    assert_eq!(ok(&text).services.len(), 1);
}

#[test]
fn files_without_services_are_valid() {
    for text in ["", "\n", "# only a comment\n", "---\n", "---\n---\n...\n"] {
        assert_eq!(ok(text), Manifest::default(), "{text:?}");
    }
}

#[test]
fn services_may_share_a_vip_on_other_ports_or_protocols() {
    let other_port = MINIMAL
        .replace("name: web", "name: api")
        .replace("port: 80", "port: 81");
    let other_proto = MINIMAL
        .replace("name: web", "name: dns")
        .replace("TCP", "UDP");
    let manifest = ok(&format!("{MINIMAL}---\n{other_port}---\n{other_proto}"));
    assert_eq!(manifest.services.len(), 3);
}

#[test]
fn same_port_on_both_protocols_is_fine() {
    let text = format!("{MINIMAL}  - {{ port: 80, protocol: UDP }}\n");
    assert_eq!(ok(&text).services[0].ports.len(), 2);
}

#[test]
fn anchors_and_merge_keys_resolve() {
    let text = "\
kind: Service
name: web
vip: 198.18.0.10
ports:
  - &http { port: 80, protocol: TCP }
backends:
  - &b { address: 198.19.1.2, weight: 5 }
  - { <<: *b, address: 198.19.1.3 }
";
    let service = &ok(text).services[0];
    assert_eq!(service.backends[1].address, addr("198.19.1.3"));
    assert_eq!(service.backends[1].weight, 5);
}

// --- Domain types ---------------------------------------------------------------

#[test]
fn protocol_display_and_ip_proto() {
    assert_eq!(Protocol::Tcp.to_string(), "TCP");
    assert_eq!(Protocol::Udp.to_string(), "UDP");
    assert_eq!(Protocol::Tcp.ip_proto(), 6);
    assert_eq!(Protocol::Udp.ip_proto(), 17);
    assert_eq!("UDP".parse::<Protocol>(), Ok(Protocol::Udp));
    assert!("udp".parse::<Protocol>().is_err(), "upper case only");
}

#[test]
fn algorithm_display_and_from_str_round_trip() {
    for algorithm in Algorithm::ALL {
        assert_eq!(algorithm.to_string(), algorithm.as_str());
        assert_eq!(algorithm.as_str().parse::<Algorithm>(), Ok(algorithm));
    }
    assert_eq!(
        Algorithm::WeightedLeastConnections.as_str(),
        "weighted-least-connections"
    );
    let e = "random".parse::<Algorithm>().err();
    let message = e.map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("\"random\"") && message.contains("least-connections"),
        "{message}"
    );
}

#[test]
fn serializes_with_manifest_spellings() {
    let manifest = ok(&with_backends(&["address: 198.19.1.2"]));
    let json = serde_json::to_value(&manifest.services[0]).unwrap_or_default();
    assert_eq!(json["vip"], "198.18.0.10");
    assert_eq!(json["algorithm"], "round-robin");
    assert_eq!(json["ports"][0]["protocol"], "TCP");
    assert_eq!(json["ports"][0]["targetPort"], 80);
    assert_eq!(json["backends"][0]["weight"], 1);
}

// --- YAML errors ----------------------------------------------------------------

#[test]
fn syntax_error_names_document_line_and_column() {
    let text = format!("{MINIMAL}---\nkind: Service\nports: [ {{ port: 80\n");
    let e = err(&text);
    assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
    assert_mentions(
        &e,
        &["web.yaml: document 2", "line 8", "column", "invalid YAML"],
    );
    let position = e.position().cloned();
    assert_eq!(
        position.map(|p| (p.document, p.line.is_some())),
        Some((2, true))
    );
    assert!(std::error::Error::source(&e).is_some(), "cause is kept");
}

#[test]
fn bad_indentation_is_a_yaml_error() {
    let e = err("kind: Service\nname: web\n vip: 198.18.0.10\n");
    assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
    assert_mentions(&e, &["document 1", "line 3"]);
}

#[test]
fn duplicate_keys_are_a_yaml_error() {
    let e = err(&format!("{MINIMAL}name: api\n"));
    assert!(matches!(e, ManifestError::Yaml { .. }), "{e:?}");
    assert_mentions(&e, &["document 1", "line 6", "duplicate", "name"]);
}

#[test]
fn document_numbers_count_empty_documents() {
    let text = format!("---\n# empty\n---\n{MINIMAL}weigth: 1\n");
    let e = err(&text);
    assert_mentions(&e, &["document 2", "line 9", "weigth"]);
}

#[test]
fn a_document_must_be_a_mapping() {
    let e = err(&format!("{MINIMAL}---\n- kind: Service\n"));
    assert!(matches!(e, ManifestError::NotAMapping { .. }), "{e:?}");
    assert_mentions(&e, &["document 2", "line 7", "a sequence"]);

    let e = err("just a string\n");
    assert!(matches!(e, ManifestError::NotAMapping { .. }), "{e:?}");
    assert_mentions(&e, &["document 1", "line 1", "string \"just a string\""]);
}

// --- Fields -----------------------------------------------------------------------

#[test]
fn unknown_top_level_field() {
    let e = err(&format!("{MINIMAL}algoritm: round-robin\n"));
    assert!(
        matches!(&e, ManifestError::UnknownField { field, .. } if field == "algoritm"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "web.yaml: document 1 (Service \"default/web\"), line 6, column 1",
            "algoritm",
            "algorithm",
        ],
    );
}

#[test]
fn unknown_backend_field_has_full_path() {
    let e = err(&with_backends(&[
        "address: 198.19.1.2",
        "address: 198.19.1.3, weigth: 2",
    ]));
    assert!(
        matches!(&e, ManifestError::UnknownField { field, .. } if field == "backends[1].weigth"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 1",
            "line 8",
            "backends[1].weigth",
            "address, weight",
        ],
    );
}

#[test]
fn unknown_port_field_has_full_path() {
    let e = err(&MINIMAL.replace("protocol: TCP", "protocol: TCP, nodePort: 30080"));
    assert!(
        matches!(&e, ManifestError::UnknownField { field, .. } if field == "ports[0].nodePort"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 5", "ports[0].nodePort"]);
}

#[test]
fn non_string_keys_are_unknown_fields() {
    let e = err(&format!("{MINIMAL}80: http\n"));
    assert!(
        matches!(&e, ManifestError::UnknownField { field, .. } if field == "80"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 6"]);
}

#[test]
fn missing_required_fields() {
    for field in ["kind", "name", "vip", "ports"] {
        // Drop the field's line; for `ports` also its entry.
        let text: String = MINIMAL
            .lines()
            .filter(|l| !(l.starts_with(field) || (field == "ports" && l.starts_with("  -"))))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = err(&text);
        assert!(
            matches!(&e, ManifestError::MissingField { field: f, .. } if f == field),
            "{field}: {e:?}"
        );
        // A missing field points at the mapping that lacks it.
        assert_mentions(
            &e,
            &[
                "web.yaml: document 1",
                "line 1, column 1",
                &format!("{field}: missing"),
            ],
        );
    }
    let e = err(&MINIMAL.replace("ports:\n  - { port: 80, protocol: TCP }\n", ""));
    assert_mentions(
        &e,
        &[
            "document 1 (Service \"default/web\"), line 1",
            "ports: missing",
        ],
    );
}

#[test]
fn null_required_field_is_missing() {
    let e = err(&MINIMAL.replace("vip: 198.18.0.10", "vip:"));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "vip"),
        "{e:?}"
    );
}

#[test]
fn missing_fields_inside_entries() {
    let e = err(&MINIMAL.replace("port: 80, ", ""));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "ports[0].port"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 5", "ports[0].port"]);

    let e = err(&MINIMAL.replace(", protocol: TCP", ""));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "ports[0].protocol"),
        "{e:?}"
    );

    let e = err(&with_backends(&["weight: 2"]));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "backends[0].address"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 7", "backends[0].address"]);
}

#[test]
fn wrong_types_name_expected_and_found() {
    let e = err(&MINIMAL.replace("port: 80", "port: \"80\""));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "ports[0].port"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 5", "expected an integer", "string \"80\""]);

    let e = err(&MINIMAL.replace("name: web", "name: 42"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "name"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 2", "integer 42"]);

    let e = err(&format!("{MINIMAL}backends: {{ address: 198.19.1.2 }}\n"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "backends"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 6", "expected a sequence", "a mapping"]);

    let e = err(&with_backends(&["address: 198.19.1.2, weight: 1.5"]));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "backends[0].weight"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 7", "1.5"]);
}

#[test]
fn port_entries_must_be_mappings() {
    let e = err(&MINIMAL.replace("  - { port: 80, protocol: TCP }", "  - 80"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "ports[0]"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 5", "expected a mapping", "integer 80"]);
}

// --- kind and name ----------------------------------------------------------------

#[test]
fn other_kinds_are_rejected_listing_the_known_ones() {
    let e = err(&format!(
        "{MINIMAL}---\n{}",
        MINIMAL.replace("kind: Service", "kind: Deployment")
    ));
    assert!(
        matches!(&e, ManifestError::UnsupportedKind { kind, .. } if kind == "Deployment"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 2",
            "line 7",
            "kind",
            "\"Deployment\"",
            "understands: Service",
        ],
    );
}

#[test]
fn kind_is_case_sensitive() {
    let e = err(&MINIMAL.replace("kind: Service", "kind: service"));
    assert!(matches!(e, ManifestError::UnsupportedKind { .. }), "{e:?}");
}

#[test]
fn invalid_names_say_why() {
    let long = "a".repeat(64);
    let cases = [
        ("Web", NameProblem::InvalidChar { ch: 'W' }),
        ("web_api", NameProblem::InvalidChar { ch: '_' }),
        ("web.api", NameProblem::InvalidChar { ch: '.' }),
        ("1web", NameProblem::BadStart),
        ("-web", NameProblem::BadStart),
        ("web-", NameProblem::BadEnd),
        ("\"\"", NameProblem::Empty),
        (long.as_str(), NameProblem::TooLong { len: 64 }),
    ];
    for (name, expected) in cases {
        let e = err(&MINIMAL.replace("name: web", &format!("name: {name}")));
        assert!(
            matches!(&e, ManifestError::InvalidName { problem, .. } if *problem == expected),
            "{name}: {e:?}"
        );
        let shown = format!("{:?}", name.trim_matches('"'));
        assert_mentions(&e, &["document 1, line 2", "name:", &shown, "DNS-1035"]);
    }
}

// --- Addresses --------------------------------------------------------------------

#[test]
fn vip_must_be_a_usable_ipv4_address() {
    let cases = [
        ("not-an-ip", AddressProblem::NotIpv4),
        ("198.18.0.10/32", AddressProblem::NotIpv4),
        ("198.18.0.256", AddressProblem::NotIpv4),
        ("\"2001:db8::1\"", AddressProblem::Ipv6),
        ("0.0.0.0", AddressProblem::Unspecified),
        ("255.255.255.255", AddressProblem::Broadcast),
        ("224.0.0.1", AddressProblem::Multicast),
        ("127.0.0.1", AddressProblem::Loopback),
    ];
    for (vip, expected) in cases {
        let e = err(&MINIMAL.replace("198.18.0.10", vip));
        assert!(
            matches!(&e, ManifestError::InvalidAddress { field, problem, .. }
                    if field == "vip" && *problem == expected),
            "{vip}: {e:?}"
        );
        let shown = format!("{:?}", vip.trim_matches('"'));
        assert_mentions(
            &e,
            &[
                "(Service \"default/web\"), line 3, column 6",
                "vip:",
                &shown,
            ],
        );
    }
}

#[test]
fn ipv6_gets_its_own_message() {
    let e = err(&MINIMAL.replace("198.18.0.10", "\"fd00::10\""));
    assert_mentions(&e, &["IPv6 is not supported yet", "\"fd00::10\""]);
}

#[test]
fn vip_must_be_a_string() {
    let e = err(&MINIMAL.replace("198.18.0.10", "3323068426"));
    assert!(
        matches!(&e, ManifestError::WrongType { field, .. } if field == "vip"),
        "{e:?}"
    );
}

#[test]
fn backend_address_must_be_a_usable_ipv4_address() {
    let cases = [
        ("backend-1", AddressProblem::NotIpv4),
        ("\"2001:db8::2\"", AddressProblem::Ipv6),
        ("0.0.0.0", AddressProblem::Unspecified),
        ("255.255.255.255", AddressProblem::Broadcast),
        ("239.1.2.3", AddressProblem::Multicast),
        ("127.0.0.53", AddressProblem::Loopback),
    ];
    for (address, expected) in cases {
        let e = err(&with_backends(&[
            "address: 198.19.1.2",
            &format!("address: {address}"),
        ]));
        assert!(
            matches!(&e, ManifestError::InvalidAddress { field, problem, .. }
                    if field == "backends[1].address" && *problem == expected),
            "{address}: {e:?}"
        );
        let shown = format!("{:?}", address.trim_matches('"'));
        assert_mentions(&e, &["line 8", "backends[1].address", &shown]);
    }
}

#[test]
fn backend_cannot_be_the_vip() {
    let e = err(&with_backends(&["address: 198.18.0.10"]));
    assert!(
        matches!(&e, ManifestError::BackendIsVip { field, address, .. }
                if field == "backends[0].address" && *address == addr("198.18.0.10")),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &["line 7", "backends[0].address", "198.18.0.10", "own VIP"],
    );
}

// --- Ports ------------------------------------------------------------------------

#[test]
fn ports_cannot_be_empty() {
    let e = err("kind: Service\nname: web\nvip: 198.18.0.10\nports: []\n");
    assert!(matches!(e, ManifestError::NoPorts { .. }), "{e:?}");
    assert_mentions(
        &e,
        &[
            "document 1 (Service \"default/web\"), line 4",
            "ports:",
            "empty",
        ],
    );
}

#[test]
fn too_many_ports() {
    let ports: String = (1..=MAX_PORTS_PER_SERVICE + 1)
        .map(|p| format!("  - {{ port: {p}, protocol: TCP }}\n"))
        .collect();
    let e = err(&format!(
        "kind: Service\nname: web\nvip: 198.18.0.10\nports:\n{ports}"
    ));
    assert!(
        matches!(
            e,
            ManifestError::TooManyPorts {
                count: 65,
                max: 64,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &["document 1", "line 5", "ports:", "at most 64", "got 65"],
    );
}

#[test]
fn port_numbers_must_be_in_range() {
    for (replace, with, field, value) in [
        ("port: 80", "port: 0", "ports[0].port", "got 0"),
        ("port: 80", "port: 65536", "ports[0].port", "got 65536"),
        ("port: 80", "port: -1", "ports[0].port", "got -1"),
        ("TCP", "TCP, targetPort: 0", "ports[0].targetPort", "got 0"),
        (
            "TCP",
            "TCP, targetPort: 70000",
            "ports[0].targetPort",
            "got 70000",
        ),
    ] {
        let e = err(&MINIMAL.replace(replace, with));
        assert!(
            matches!(&e, ManifestError::PortOutOfRange { field: f, .. } if f == field),
            "{with}: {e:?}"
        );
        assert_mentions(
            &e,
            &["document 1", "line 5", field, "between 1 and 65535", value],
        );
    }
}

#[test]
fn unknown_protocols_are_rejected() {
    for protocol in ["SCTP", "tcp", "Udp"] {
        let e = err(&MINIMAL.replace("TCP", protocol));
        assert!(
            matches!(&e, ManifestError::UnknownProtocol { field, value, .. }
                    if field == "ports[0].protocol" && value == protocol),
            "{protocol}: {e:?}"
        );
        assert_mentions(
            &e,
            &[
                "line 5",
                "ports[0].protocol",
                &format!("{protocol:?}"),
                "\"TCP\"",
            ],
        );
    }
}

#[test]
fn duplicate_port_and_protocol_in_a_service() {
    let e = err(&format!(
        "{MINIMAL}  - {{ port: 80, protocol: TCP, targetPort: 8080 }}\n"
    ));
    assert!(
        matches!(&e, ManifestError::DuplicatePort { field, port: 80, protocol: Protocol::Tcp, first, .. }
                if field == "ports[1]" && first == "ports[0]"),
        "{e:?}"
    );
    assert_mentions(&e, &["line 6", "ports[1]", "80/TCP", "ports[0]"]);
}

// --- Algorithm and backends -------------------------------------------------------

#[test]
fn maglev_table_size_is_a_prime_and_only_for_maglev() {
    let maglev = format!("{MINIMAL}algorithm: maglev\n");
    assert_eq!(ok(&maglev).services[0].maglev_table_size, None);
    let sized = ok(&format!("{maglev}maglevTableSize: 65521\n"));
    assert_eq!(sized.services[0].maglev_table_size, Some(65_521));
    for (value, shown) in [
        ("65535", "65535"),
        ("65537", "65537"),
        ("1", "1"),
        ("-7", "-7"),
    ] {
        let e = err(&format!("{maglev}maglevTableSize: {value}\n"));
        assert_mentions(
            &e,
            &[
                "line 7",
                "maglevTableSize",
                "prime number no larger than 65521",
                shown,
            ],
        );
    }
    let e = err(&format!("{MINIMAL}maglevTableSize: 251\n"));
    assert_mentions(
        &e,
        &[
            "maglevTableSize",
            "only applies to algorithm maglev, not round-robin",
        ],
    );
}

#[test]
fn unknown_algorithm_lists_the_valid_ones() {
    let e = err(&format!("{MINIMAL}algorithm: random\n"));
    assert!(
        matches!(&e, ManifestError::UnknownAlgorithm { value, .. } if value == "random"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "line 6",
            "algorithm:",
            "\"random\"",
            "round-robin, weighted-round-robin, least-connections, weighted-least-connections, maglev",
        ],
    );
}

#[test]
fn weights_must_be_in_range() {
    for (weight, value) in [("0", 0), ("10001", 10_001), ("-3", -3)] {
        let e = err(&with_backends(&[
            "address: 198.19.1.2",
            &format!("address: 198.19.1.3, weight: {weight}"),
        ]));
        assert!(
            matches!(&e, ManifestError::WeightOutOfRange { field, value: v, .. }
                    if field == "backends[1].weight" && *v == value),
            "{weight}: {e:?}"
        );
        assert_mentions(
            &e,
            &[
                "web.yaml: document 1 (Service \"default/web\"), line 8",
                "backends[1].weight: must be between 1 and 10000",
                &format!("got {weight}"),
            ],
        );
    }
}

#[test]
fn duplicate_backend_address() {
    let e = err(&with_backends(&[
        "address: 198.19.1.2",
        "address: 198.19.1.3",
        "address: 198.19.1.2, weight: 2",
    ]));
    assert!(
        matches!(&e, ManifestError::DuplicateBackend { field, first, .. }
                if field == "backends[2].address" && first == "backends[0]"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &["line 9", "backends[2].address", "198.19.1.2", "backends[0]"],
    );
}

#[test]
fn too_many_backends() {
    let backends: Vec<String> = (0..=MAX_BACKENDS_PER_SERVICE)
        .map(|i| format!("address: 198.19.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let e = err(&with_backends(&backends));
    assert!(
        matches!(
            e,
            ManifestError::TooManyBackends {
                count: 4097,
                max: 4096,
                ..
            }
        ),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 1",
            "line 7",
            "backends:",
            "at most 4096",
            "got 4097",
        ],
    );
}

// --- Across documents -------------------------------------------------------------

#[test]
fn duplicate_service_names() {
    let second = MINIMAL.replace("port: 80", "port: 81");
    let e = err(&format!("{MINIMAL}---\n{second}"));
    assert!(
        matches!(&e, ManifestError::DuplicateService { name, first_document: 1, .. } if name == "web"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 2 (Service \"default/web\"), line 8",
            "name: Service \"default/web\" is already defined in document 1",
        ],
    );
}

#[test]
fn same_vip_port_and_protocol_in_two_services() {
    let second = format!(
        "{}  - {{ port: 80, protocol: TCP }}\n",
        MINIMAL
            .replace("name: web", "name: api")
            .replace("port: 80", "port: 81")
    );
    let e = err(&format!("{MINIMAL}---\n{second}"));
    assert!(
        matches!(&e, ManifestError::ListenerConflict { field, port: 80, other_service, other_document: 1, .. }
                if field == "ports[1]" && other_service == "default/web"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "document 2 (Service \"default/api\"), line 12",
            "ports[1]",
            "198.18.0.10:80/TCP",
            "already served by Service \"default/web\" (document 1)",
        ],
    );
}

#[test]
fn the_first_error_wins_and_nothing_partial_is_returned() {
    let bad_weight =
        with_backends(&["address: 198.19.1.2, weight: 0"]).replace("name: web", "name: a");
    let bad_kind = MINIMAL.replace("kind: Service", "kind: Pod");
    let e = err(&format!("{MINIMAL}---\n{bad_weight}---\n{bad_kind}"));
    assert!(matches!(e, ManifestError::WeightOutOfRange { .. }), "{e:?}");
    assert_mentions(&e, &["document 2 (Service \"default/a\")"]);
}

// --- load -------------------------------------------------------------------------

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("sluice-manifest-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("{}: {e}", dir.display());
    }
    let good = dir.join("good.yaml");
    let bad = dir.join("bad.yaml");
    for (path, text) in [
        (&good, MINIMAL.to_owned()),
        (&bad, format!("{MINIMAL}weigth: 1\n")),
    ] {
        if let Err(e) = std::fs::write(path, text) {
            panic!("{}: {e}", path.display());
        }
    }

    let loaded = load(&good);
    let bad_result = load(&bad);
    let missing = load(&dir.join("missing.yaml"));
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        matches!(&loaded, Ok(m) if m.services.len() == 1),
        "{loaded:?}"
    );
    match bad_result {
        Err(e) => assert_mentions(&e, &[&format!("{}: document 1", bad.display()), "weigth"]),
        Ok(m) => panic!("expected an error, got {m:?}"),
    }
    match missing {
        Err(e @ ManifestError::Read { .. }) => {
            assert_mentions(&e, &["missing.yaml", "cannot read manifest"]);
            assert!(e.position().is_none());
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}

// --- What only the control service does -------------------------------------------

#[test]
fn endpoints_and_grants_need_the_control_service() {
    for (kind, document) in [
        (
            ObjectKind::Endpoint,
            "kind: Endpoint\nname: web-1\naddress: 198.19.1.2\n",
        ),
        (
            ObjectKind::Grant,
            "kind: Grant\nname: a\nsubject: { user: a }\nrole: admin\nscope: \"*\"\n",
        ),
    ] {
        let e = err(&format!("{MINIMAL}---\n{document}"));
        assert!(
            matches!(&e, ManifestError::NeedsControlService { field, feature: ControlOnly::Kind { kind: k }, .. }
                if field == "kind" && *k == kind),
            "{e:?}"
        );
        assert_mentions(
            &e,
            &[
                "web.yaml: document 2, line 7",
                &format!("kind: {kind} objects need the control service"),
                "sluicectl apply -f",
                "understands only Service",
            ],
        );
        // The same file is fine for the control service.
        assert!(parse_objects("web.yaml", &format!("{MINIMAL}---\n{document}")).is_ok());
    }
}

#[test]
fn selectors_need_the_control_service() {
    let e = err(&format!("{MINIMAL}selector: {{ app: web }}\n"));
    assert!(
        matches!(&e, ManifestError::NeedsControlService { field, feature: ControlOnly::Selector, .. }
            if field == "selector"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "web.yaml: document 1 (Service \"default/web\"), line 6, column 1",
            "selector: selectors need the control service",
            "static backends only",
        ],
    );
    // Even an empty one: the agent would otherwise call it an unknown field.
    let e = err(&format!("{MINIMAL}selector:\n"));
    assert!(
        matches!(e, ManifestError::NeedsControlService { .. }),
        "{e:?}"
    );
}

#[test]
fn the_vip_stays_required() {
    let e = err(&MINIMAL.replace("vip: 198.18.0.10\n", ""));
    assert!(
        matches!(&e, ManifestError::MissingField { field, .. } if field == "vip"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "(Service \"default/web\"), line 1, column 1",
            "vip: missing required field",
        ],
    );
}

// --- Namespaces and labels --------------------------------------------------------

#[test]
fn namespaces_default_and_scope_names() {
    let in_shop = MINIMAL
        .replace("name: web", "namespace: shop\nname: web")
        .replace("port: 80", "port: 81");
    let manifest = ok(&format!("{MINIMAL}---\n{in_shop}"));
    let ids: Vec<(&str, &str)> = manifest
        .services
        .iter()
        .map(|s| (s.namespace.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(ids, [("default", "web"), ("shop", "web")]);

    let e = err(&MINIMAL.replace("name: web", "namespace: Shop\nname: web"));
    assert!(
        matches!(&e, ManifestError::Invalid { field, problem: Problem::InvalidNamespace { .. }, .. }
            if field == "namespace"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &["document 1, line 2", "namespace: \"Shop\"", "DNS-1123"],
    );
}

#[test]
fn listeners_conflict_across_namespaces() {
    let in_shop = MINIMAL.replace("name: web", "namespace: shop\nname: web");
    let e = err(&format!("{MINIMAL}---\n{in_shop}"));
    assert!(
        matches!(&e, ManifestError::ListenerConflict { other_service, .. } if other_service == "default/web"),
        "{e:?}"
    );
    assert_mentions(&e, &["document 2 (Service \"shop/web\"), line 12"]);
}

#[test]
fn labels_are_accepted_and_checked() {
    let manifest = ok(&format!("{MINIMAL}labels: {{ tier: frontend }}\n"));
    assert_eq!(manifest.services[0].labels["tier"], "frontend");

    let e = err(&format!("{MINIMAL}labels: {{ tier: \"front end\" }}\n"));
    assert!(
        matches!(&e, ManifestError::Invalid { field, problem: Problem::InvalidLabelValue { .. }, .. }
            if field == "labels.tier"),
        "{e:?}"
    );
    assert_mentions(
        &e,
        &[
            "(Service \"default/web\"), line 6",
            "labels.tier",
            "\"front end\"",
        ],
    );
}

// --- The shipped example ------------------------------------------------------------

/// The example the README and the demo use must stay valid.
#[test]
fn the_shipped_example_parses() {
    let text = include_str!("../../../../agent/manifests/web.yaml");
    let manifest = match parse("agent/manifests/web.yaml", text) {
        Ok(manifest) => manifest,
        Err(e) => panic!("example manifest: {e}"),
    };
    assert_eq!(manifest.services.len(), 1);
    assert_eq!(manifest.services[0].backends.len(), 3);
}

#[test]
fn standalone_agents_take_traffic_policies_but_not_zones() {
    let m = ok(&format!(
        "{MINIMAL}healthCheck: {{ tcp: {{ port: 9000 }} }}\nsessionAffinity: {{ clientIP: {{ timeoutSeconds: 60 }} }}\n\
         rollout: {{ to: v2, percent: 10 }}\ndrainTimeoutSeconds: 3\n"
    ));
    let traffic = &m.services[0].traffic;
    assert!(traffic.health_check.is_some() && traffic.rollout.is_some());
    assert_eq!(
        traffic.session_affinity.map(|a| a.timeout_seconds),
        Some(60)
    );
    // Static backends have no zone: topology awareness needs the control service.
    let e = err(&format!("{MINIMAL}topologyAware: true\n"));
    assert_mentions(
        &e,
        &["line 6", "topologyAware", "needs the control service"],
    );
}
