//! Time as fmhost records and reads it: unix milliseconds, RFC 3339, and ages such as `3d`.

use std::time::SystemTime;

/// Unix milliseconds.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// RFC 3339 (UTC, seconds) for unix milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `3d`, `12h` (that long ago), `2026-11-17` (midnight UTC) or RFC 3339.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return Ok(unix_ms(SystemTime::now() - ago));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    humantime::parse_rfc3339_weak(&full)
        .map(unix_ms)
        .map_err(|_| {
            format!("{s:?} is not a time: use RFC 3339 (2026-11-17T09:00:00Z), a date (2026-11-17) or an age (3d, 12h)")
        })
}
