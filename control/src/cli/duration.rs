//! Durations as admins type them (`30s`, `10m`, `2h`, `365d`, `1h30m`) and as
//! tables show them (`95s`, `45m`, `23h`, `364d`).
//!
//! Hand-written rather than `humantime::parse_duration` (2.4.0, tried): it
//! parses the same compact forms, but also accepts what the CLI refuses and
//! its tests assert as malformed — `1.5h` (5400 s), `10 m` (600 s), and more
//! units than ours (`500ms`, `1w`, `1M` as 30.44 days, `2y`), so a typo like
//! `1M` for a minute would silently mean a month; `0s` is `Ok(0)` and its
//! messages differ (`time unit needed, for example 10sec or 10ms`). Fencing
//! all of that in front of it would take more code than this parser.

use std::time::Duration;

const UNITS: [(char, u64); 4] = [('s', 1), ('m', 60), ('h', 3600), ('d', 86_400)];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "{value:?} is not a duration: expected numbers with units (s, m, h, d), as in 30s, 10m, 2h, 365d or 1h30m"
    )]
    Malformed { value: String },
    #[error("{value:?}: a duration must be more than zero")]
    Zero { value: String },
    #[error("{value:?}: too long")]
    TooLong { value: String },
}

/// Parses one or more `<number><unit>` groups; units are s, m, h and d.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed {
        value: value.to_owned(),
    };
    let too_long = || DurationError::TooLong {
        value: value.to_owned(),
    };
    if value.is_empty() {
        return Err(malformed());
    }
    let mut seconds: u64 = 0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(malformed)?;
        if digits == 0 {
            return Err(malformed());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        let mut after = rest[digits..].chars();
        let unit = after.next().ok_or_else(malformed)?;
        let (_, scale) = UNITS
            .into_iter()
            .find(|(name, _)| *name == unit)
            .ok_or_else(malformed)?;
        seconds = number
            .checked_mul(scale)
            .and_then(|s| seconds.checked_add(s))
            .ok_or_else(too_long)?;
        rest = after.as_str();
    }
    if seconds == 0 {
        return Err(DurationError::Zero {
            value: value.to_owned(),
        });
    }
    Ok(Duration::from_secs(seconds))
}

/// A coarse age for tables, in its largest sensible unit, as `kubectl` shows ages.
pub fn format_age(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7_200 => format!("{}m", s / 60),
        7_200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        let cases = [
            ("30s", 30),
            ("10m", 600),
            ("2h", 7_200),
            ("365d", 365 * 86_400),
            ("1h30m", 5_400),
            ("1d12h", 129_600),
            ("90s", 90),
        ];
        for (text, seconds) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(seconds)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_what_is_not_a_duration() {
        for text in ["", "10", "m", "10x", "1.5h", "-1h", "10 m", "h10", "10mm"] {
            assert_eq!(
                parse_duration(text),
                Err(DurationError::Malformed {
                    value: text.to_owned()
                }),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_duration("0s"),
            Err(DurationError::Zero {
                value: "0s".to_owned()
            })
        );
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::TooLong { .. })
        ));
        assert!(matches!(
            parse_duration("999999999999999d"),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn the_message_shows_the_expected_form() {
        let message = parse_duration("10").expect_err("no unit").to_string();
        assert_eq!(
            message,
            "\"10\" is not a duration: expected numbers with units (s, m, h, d), as in 30s, 10m, 2h, 365d or 1h30m"
        );
    }

    #[test]
    fn ages_use_the_largest_sensible_unit() {
        let age = |s| format_age(Duration::from_secs(s));
        assert_eq!(age(0), "0s");
        assert_eq!(age(119), "119s");
        assert_eq!(age(120), "2m");
        assert_eq!(age(7_199), "119m");
        assert_eq!(age(7_200), "2h");
        assert_eq!(age(172_800), "2d");
    }
}
