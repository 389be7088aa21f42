//! Object, namespace, node, zone and user names.

use super::*;

/// Object names (Service, Endpoint, Grant): RFC 1035 label syntax, lower case only, as
/// Kubernetes requires of Service names. Names end up in metric labels and status
/// output, where one spelling per object matters.
pub fn validate_name(name: &str) -> Result<(), Problem> {
    dns_1035_label(name).map_err(|problem| Problem::InvalidName {
        name: name.to_owned(),
        problem,
    })
}

/// Namespaces: DNS-1123 labels (may start with a digit), as in Kubernetes.
pub fn validate_namespace(namespace: &str) -> Result<(), Problem> {
    dns_1123_label(namespace).map_err(|problem| Problem::InvalidNamespace {
        namespace: namespace.to_owned(),
        problem,
    })
}

/// The node an endpoint runs on: a DNS-1123 subdomain, so host names fit.
pub fn validate_node(node: &str) -> Result<(), Problem> {
    dns_1123_subdomain(node).map_err(|problem| Problem::InvalidNode {
        value: node.to_owned(),
        problem,
    })
}

/// A zone (`eu-west-1a`): label value syntax, and not empty (an unknown zone is left out).
pub fn validate_zone(zone: &str) -> Result<(), Problem> {
    let problem = if zone.is_empty() {
        LabelProblem::Empty
    } else {
        match label_token(zone) {
            Ok(()) => return Ok(()),
            Err(problem) => problem,
        }
    };
    Err(Problem::InvalidZone {
        value: zone.to_owned(),
        problem,
    })
}

/// A grant's user or group. Wider than a DNS name so that e-mail addresses and
/// `system:`-style group names fit; no spaces, slashes or control characters, so a
/// subject prints unambiguously in audit lines.
pub fn validate_subject(subject: &str) -> Result<(), Problem> {
    let invalid = |problem| Problem::InvalidSubject {
        value: subject.to_owned(),
        problem,
    };
    let len = subject.chars().count();
    if len == 0 {
        return Err(invalid(NameProblem::Empty));
    }
    if len > SUBJECT_MAX_LEN {
        return Err(invalid(NameProblem::TooLong { len }));
    }
    if let Some(ch) = subject
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | ':' | '-')))
    {
        return Err(invalid(NameProblem::InvalidChar { ch }));
    }
    if !subject.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(NameProblem::BadStartAlnum));
    }
    if !subject.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(invalid(NameProblem::BadEnd));
    }
    Ok(())
}

pub(super) fn dns_1035_label(name: &str) -> Result<(), NameProblem> {
    label_chars(name)?;
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameProblem::BadStart);
    }
    if name.ends_with('-') {
        return Err(NameProblem::BadEnd);
    }
    Ok(())
}

pub(super) fn dns_1123_label(name: &str) -> Result<(), NameProblem> {
    label_chars(name)?;
    if name.starts_with('-') {
        return Err(NameProblem::BadStartAlnum);
    }
    if name.ends_with('-') {
        return Err(NameProblem::BadEnd);
    }
    Ok(())
}

/// 1 to 63 of a-z, 0-9 and '-': what DNS-1035 and DNS-1123 labels share.
pub(super) fn label_chars(name: &str) -> Result<(), NameProblem> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameProblem::Empty);
    }
    if len > LABEL_MAX_LEN {
        return Err(NameProblem::TooLong { len });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameProblem::InvalidChar { ch });
    }
    Ok(())
}

pub(super) fn dns_1123_subdomain(name: &str) -> Result<(), NameProblem> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameProblem::Empty);
    }
    if len > SUBDOMAIN_MAX_LEN {
        return Err(NameProblem::TooLong { len });
    }
    for part in name.split('.') {
        match dns_1123_label(part) {
            Ok(()) => {}
            Err(NameProblem::Empty) => return Err(NameProblem::EmptyPart),
            Err(problem) => return Err(problem),
        }
    }
    Ok(())
}
