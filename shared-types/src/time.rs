//! `google.protobuf.Timestamp` conversions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// The current wall-clock time as a protobuf timestamp.
pub fn now() -> Timestamp {
    from_system(SystemTime::now())
}

/// A `SystemTime` as a protobuf timestamp (times before 1970 clamp to the epoch).
pub fn from_system(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Milliseconds since the Unix epoch as a protobuf timestamp.
pub fn from_unix_millis(ms: u64) -> Timestamp {
    from_system(UNIX_EPOCH + Duration::from_millis(ms))
}

/// A protobuf timestamp as a `SystemTime`; negative or malformed ones clamp
/// to the epoch.
pub fn to_system(ts: &Timestamp) -> SystemTime {
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos.clamp(0, 999_999_999)).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// Milliseconds on a monotonic clock shared by the whole process, counted
/// from its first use and never 0 (so 0 can mean "never").
pub fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let ms = EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: SystemTime) -> u64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_millis() {
        let ts = from_unix_millis(1_700_000_000_123);
        assert_eq!(ts.seconds, 1_700_000_000);
        assert_eq!(ts.nanos, 123_000_000);
        assert_eq!(unix_millis(to_system(&ts)), 1_700_000_000_123);
    }

    #[test]
    fn malformed_timestamps_clamp() {
        let ts = Timestamp {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(to_system(&ts), UNIX_EPOCH);
    }
}
