//! Rate-limit headroom: what a service says is left of its limit, read from every
//! response (`X-RateLimit-Limit/Remaining/Reset`, the IETF `RateLimit-*` fields and the
//! combined `RateLimit: limit=.., remaining=.., reset=..`). It is exported per service
//! (`/metrics`, `--metrics`, `/v1/services`), and the service's calls are slowed when
//! little is left: spread over what remains of the window, and held until the reset
//! when nothing is.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Below this share of the limit, calls are spread out.
const LOW: f64 = 0.1;
/// Longest a call is held for a reset.
const MAX_HOLD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headroom {
    pub remaining: u64,
    pub limit: Option<u64>,
    /// When the window resets.
    pub reset: Option<Instant>,
}

/// Reads the headroom a response reports, if it reports any.
pub fn parse(headers: &[(String, String)], now: SystemTime) -> Option<Headroom> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let num = |v: &str| v.split([',', ';']).next()?.trim().parse::<f64>().ok();
    let (mut remaining, mut limit, mut reset) = (None, None, None);
    if let Some(combined) = get("ratelimit") {
        for part in combined.split([',', ';']) {
            if let Some((k, v)) = part.split_once('=') {
                match k.trim() {
                    "remaining" | "r" => remaining = num(v),
                    "limit" | "l" => limit = num(v),
                    "reset" | "t" => reset = num(v),
                    _ => {}
                }
            }
        }
    }
    for prefix in ["x-ratelimit-", "ratelimit-", "x-rate-limit-"] {
        remaining = remaining.or_else(|| get(&format!("{prefix}remaining")).and_then(num));
        limit = limit.or_else(|| get(&format!("{prefix}limit")).and_then(num));
        reset = reset.or_else(|| get(&format!("{prefix}reset")).and_then(num));
    }
    let remaining = remaining?;
    let unix = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    // A reset past 10^9 is a Unix time (GitHub); a smaller one is seconds from now.
    let reset = reset.filter(|r| r.is_finite() && *r >= 0.0).map(|r| {
        let secs = if r > 1e9 { (r - unix).max(0.0) } else { r };
        Instant::now() + Duration::from_secs_f64(secs.min(3600.0))
    });
    Some(Headroom {
        remaining: remaining.max(0.0) as u64,
        limit: limit.filter(|l| *l > 0.0).map(|l| l as u64),
        reset,
    })
}

/// A service's last reported headroom, and the pacing it implies.
#[derive(Default)]
pub struct Pacer {
    last: Mutex<Option<Headroom>>,
    /// The earliest the next call may go while spreading out.
    next_slot: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn record(&self, h: Headroom) {
        *self.last.lock().expect("headroom lock") = Some(h);
    }

    pub fn last(&self) -> Option<Headroom> {
        *self.last.lock().expect("headroom lock")
    }

    /// How long the next call should wait, given what the service last reported.
    pub fn delay(&self) -> Duration {
        let Some(h) = self.last() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let Some(reset) = h.reset.filter(|r| *r > now) else {
            return Duration::ZERO;
        };
        let window = reset - now;
        if h.remaining == 0 {
            return window.min(MAX_HOLD);
        }
        let low = match h.limit {
            Some(l) => (h.remaining as f64) < (l as f64) * LOW,
            None => false,
        };
        if !low {
            return Duration::ZERO;
        }
        // Spread what is left over the rest of the window.
        let interval = window / (h.remaining as u32 + 1);
        let mut next = self.next_slot.lock().expect("headroom lock");
        let slot = next.map_or(now, |n| n.max(now));
        *next = Some(slot + interval);
        (slot - now).min(MAX_HOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_spellings() {
        let now = SystemTime::now();
        let h = |pairs: &[(&str, &str)]| {
            parse(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<Vec<_>>(),
                now,
            )
        };
        let gh = h(&[
            ("X-RateLimit-Limit", "5000"),
            ("X-RateLimit-Remaining", "4999"),
        ])
        .unwrap();
        assert_eq!((gh.remaining, gh.limit), (4999, Some(5000)));
        let ietf = h(&[
            ("RateLimit-Limit", "100"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "30"),
        ])
        .unwrap();
        assert_eq!(ietf.remaining, 0);
        assert!(ietf.reset.is_some());
        let combined = h(&[("RateLimit", "limit=10, remaining=3, reset=5")]).unwrap();
        assert_eq!((combined.remaining, combined.limit), (3, Some(10)));
        assert!(h(&[("Content-Type", "x")]).is_none());
    }
}
