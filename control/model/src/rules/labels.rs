//! Label keys and values, and how many an object or selector may carry.

use super::*;

pub fn validate_label_count(count: usize) -> Result<(), Problem> {
    if count > MAX_LABELS {
        return Err(Problem::TooManyLabels {
            count,
            max: MAX_LABELS,
        });
    }
    Ok(())
}

/// A selector, when given, names 1..=[`MAX_LABELS`] labels (see [`Problem::EmptySelector`]).
pub fn validate_selector_count(count: usize) -> Result<(), Problem> {
    if count == 0 {
        return Err(Problem::EmptySelector);
    }
    validate_label_count(count)
}

pub fn validate_label_key(key: &str) -> Result<(), Problem> {
    let invalid = |problem| Problem::InvalidLabelKey {
        key: key.to_owned(),
        problem,
    };
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            dns_1123_subdomain(prefix).map_err(|problem| {
                invalid(LabelProblem::BadPrefix {
                    prefix: prefix.to_owned(),
                    problem,
                })
            })?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(invalid(LabelProblem::Empty));
    }
    label_token(name).map_err(invalid)
}

pub fn validate_label_value(value: &str) -> Result<(), Problem> {
    if value.is_empty() {
        return Ok(());
    }
    label_token(value).map_err(|problem| Problem::InvalidLabelValue {
        value: value.to_owned(),
        problem,
    })
}

/// A non-empty label name or value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both
/// ends.
pub(super) fn label_token(token: &str) -> Result<(), LabelProblem> {
    let len = token.chars().count();
    if len > LABEL_MAX_LEN {
        return Err(LabelProblem::TooLong {
            len,
            max: LABEL_MAX_LEN,
        });
    }
    if let Some(ch) = token
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(LabelProblem::InvalidChar { ch });
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if !(token.starts_with(alnum) && token.ends_with(alnum)) {
        return Err(LabelProblem::BadEnds);
    }
    Ok(())
}
