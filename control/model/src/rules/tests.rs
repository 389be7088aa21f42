use super::*;

fn name_problem(result: Result<(), Problem>) -> Option<NameProblem> {
    match result {
        Ok(()) => None,
        Err(
            Problem::InvalidName { problem, .. }
            | Problem::InvalidNamespace { problem, .. }
            | Problem::InvalidNode { problem, .. }
            | Problem::InvalidSubject { problem, .. },
        ) => Some(problem),
        Err(other) => panic!("unexpected problem {other:?}"),
    }
}

fn label_problem(result: Result<(), Problem>) -> Option<LabelProblem> {
    match result {
        Ok(()) => None,
        Err(
            Problem::InvalidLabelKey { problem, .. }
            | Problem::InvalidLabelValue { problem, .. }
            | Problem::InvalidZone { problem, .. },
        ) => Some(problem),
        Err(other) => panic!("unexpected problem {other:?}"),
    }
}

#[test]
fn names_are_dns_1035_labels() {
    let long = "a".repeat(64);
    for (name, expected) in [
        ("web", None),
        ("a", None),
        ("web-2", None),
        (&"a".repeat(63), None),
        ("", Some(NameProblem::Empty)),
        (&long, Some(NameProblem::TooLong { len: 64 })),
        ("Web", Some(NameProblem::InvalidChar { ch: 'W' })),
        ("web.api", Some(NameProblem::InvalidChar { ch: '.' })),
        ("1web", Some(NameProblem::BadStart)),
        ("-web", Some(NameProblem::BadStart)),
        ("web-", Some(NameProblem::BadEnd)),
    ] {
        assert_eq!(name_problem(validate_name(name)), expected, "{name:?}");
    }
}

#[test]
fn namespaces_are_dns_1123_labels() {
    for (namespace, expected) in [
        ("default", None),
        ("2024-tests", None),
        ("", Some(NameProblem::Empty)),
        ("Shop", Some(NameProblem::InvalidChar { ch: 'S' })),
        ("shop_eu", Some(NameProblem::InvalidChar { ch: '_' })),
        ("-shop", Some(NameProblem::BadStartAlnum)),
        ("shop-", Some(NameProblem::BadEnd)),
        (&"a".repeat(64), Some(NameProblem::TooLong { len: 64 })),
    ] {
        assert_eq!(
            name_problem(validate_namespace(namespace)),
            expected,
            "{namespace:?}"
        );
    }
}

#[test]
fn node_names_are_dns_1123_subdomains() {
    for (node, expected) in [
        ("node-1", None),
        ("node-1.eu-west.example", None),
        ("", Some(NameProblem::Empty)),
        ("node..1", Some(NameProblem::EmptyPart)),
        (".node", Some(NameProblem::EmptyPart)),
        ("node.-a", Some(NameProblem::BadStartAlnum)),
        ("Node", Some(NameProblem::InvalidChar { ch: 'N' })),
        (&"a.".repeat(127), Some(NameProblem::TooLong { len: 254 })),
    ] {
        assert_eq!(name_problem(validate_node(node)), expected, "{node:?}");
    }
}

#[test]
fn subjects_allow_email_and_system_names() {
    for (subject, expected) in [
        ("alice", None),
        ("alice@example.com", None),
        ("system:admins", None),
        ("Bob_2", None),
        ("", Some(NameProblem::Empty)),
        ("alice smith", Some(NameProblem::InvalidChar { ch: ' ' })),
        ("a/b", Some(NameProblem::InvalidChar { ch: '/' })),
        ("@alice", Some(NameProblem::BadStartAlnum)),
        ("alice.", Some(NameProblem::BadEnd)),
        (&"a".repeat(254), Some(NameProblem::TooLong { len: 254 })),
    ] {
        assert_eq!(
            name_problem(validate_subject(subject)),
            expected,
            "{subject:?}"
        );
    }
}

#[test]
fn label_keys_follow_kubernetes_syntax() {
    for (key, expected) in [
        ("app", None),
        ("App.Tier_2", None),
        ("app.kubernetes.io/name", None),
        (&"a".repeat(63), None),
        ("", Some(LabelProblem::Empty)),
        ("example.com/", Some(LabelProblem::Empty)),
        (
            &"a".repeat(64),
            Some(LabelProblem::TooLong { len: 64, max: 63 }),
        ),
        ("app name", Some(LabelProblem::InvalidChar { ch: ' ' })),
        ("a/b/c", Some(LabelProblem::InvalidChar { ch: '/' })),
        ("-app", Some(LabelProblem::BadEnds)),
        ("app.", Some(LabelProblem::BadEnds)),
        (
            "Example.com/app",
            Some(LabelProblem::BadPrefix {
                prefix: "Example.com".to_owned(),
                problem: NameProblem::InvalidChar { ch: 'E' },
            }),
        ),
        (
            "/app",
            Some(LabelProblem::BadPrefix {
                prefix: String::new(),
                problem: NameProblem::Empty,
            }),
        ),
    ] {
        assert_eq!(label_problem(validate_label_key(key)), expected, "{key:?}");
    }
}

#[test]
fn label_values_may_be_empty_but_not_malformed() {
    for (value, expected) in [
        ("", None),
        ("web", None),
        ("v1.2_rc-3", None),
        (
            &"v".repeat(64),
            Some(LabelProblem::TooLong { len: 64, max: 63 }),
        ),
        ("a/b", Some(LabelProblem::InvalidChar { ch: '/' })),
        ("_web", Some(LabelProblem::BadEnds)),
    ] {
        assert_eq!(
            label_problem(validate_label_value(value)),
            expected,
            "{value:?}"
        );
    }
}

#[test]
fn zones_use_label_value_syntax_but_not_empty() {
    assert_eq!(label_problem(validate_zone("eu-west-1a")), None);
    assert_eq!(label_problem(validate_zone("")), Some(LabelProblem::Empty));
    assert_eq!(
        label_problem(validate_zone("eu west")),
        Some(LabelProblem::InvalidChar { ch: ' ' })
    );
}

#[test]
fn counts_and_ranges() {
    assert_eq!(validate_label_count(MAX_LABELS), Ok(()));
    assert_eq!(
        validate_label_count(MAX_LABELS + 1),
        Err(Problem::TooManyLabels { count: 65, max: 64 })
    );
    assert_eq!(validate_selector_count(0), Err(Problem::EmptySelector));
    assert_eq!(validate_port_count(0), Err(Problem::NoPorts));
    assert_eq!(validate_port(65_535), Ok(65_535));
    assert_eq!(validate_port(0), Err(Problem::PortOutOfRange { value: 0 }));
    assert_eq!(validate_weight(MAX_WEIGHT.into()), Ok(MAX_WEIGHT));
    assert_eq!(
        validate_weight(0),
        Err(Problem::WeightOutOfRange { value: 0 })
    );
}

#[test]
fn scopes_are_star_or_a_namespace() {
    assert_eq!(validate_scope("*"), Ok(Scope::All));
    assert_eq!(
        validate_scope("shop"),
        Ok(Scope::Namespace("shop".to_owned()))
    );
    let e = validate_scope("**").err().map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|m| m.contains("\"**\"") && m.contains("\"*\"")),
        "{e:?}"
    );
}

#[test]
fn permissions_only_with_role_custom() {
    assert_eq!(
        validate_permission_count(Role::Custom, 0),
        Err(Problem::NoPermissions)
    );
    assert_eq!(validate_permission_count(Role::Custom, 2), Ok(()));
    assert_eq!(validate_permission_count(Role::Viewer, 0), Ok(()));
    assert_eq!(
        validate_permission_count(Role::Admin, 1),
        Err(Problem::PermissionsNotCustom { role: Role::Admin })
    );
}

#[test]
fn messages_list_what_is_accepted() {
    for (problem, parts) in [
        (
            validate_role("owner").err(),
            &["\"owner\"", "viewer, editor, admin, custom"][..],
        ),
        (
            validate_verb("patch").err(),
            &["\"patch\"", "get, list, watch, create, update, delete, *"][..],
        ),
        (
            validate_resource("pods").err(),
            &[
                "\"pods\"",
                "services, endpoints, grants, networkpolicies, nodes, tokens, users, *",
            ][..],
        ),
    ] {
        let message = problem.map(|p| p.to_string()).unwrap_or_default();
        for part in parts {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
    }
}
