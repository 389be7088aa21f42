//! Times as the control service and `sluicectl` show them: RFC 3339, and
//! the milliseconds since the Unix epoch the API carries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// RFC 3339, with the fraction of a second the time has.
pub fn rfc3339(time: SystemTime) -> String {
    OffsetDateTime::from(time)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{time:?}"))
}

/// RFC 3339 to the millisecond (flow-log times).
pub fn rfc3339_ms(time: SystemTime) -> String {
    let t = OffsetDateTime::from(time);
    let t = t
        .replace_nanosecond(u32::from(t.millisecond()) * 1_000_000)
        .unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_rfc3339() {
        let t = from_unix_ms(1_735_732_800_123);
        assert_eq!(rfc3339(t), "2025-01-01T12:00:00.123Z");
        assert_eq!(
            rfc3339_ms(t + Duration::from_nanos(456)),
            "2025-01-01T12:00:00.123Z"
        );
        assert_eq!(
            rfc3339(from_unix_ms(1_735_732_800_000)),
            "2025-01-01T12:00:00Z"
        );
        assert_eq!(unix_ms(t), 1_735_732_800_123);
    }
}
