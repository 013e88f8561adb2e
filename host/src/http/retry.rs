//! Retry policy: *whether* an outcome is worth another attempt is decided apart from
//! *when* that attempt happens (backoff, jitter, `Retry-After`, the stage's budget).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

/// Evaluates a pipeline's retry `condition` against an attempt's `output`.
pub type Condition = Arc<dyn Fn(&Value) -> Result<bool, String> + Send + Sync>;

#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts in all, including the first; 1 disables retries.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub base_delay: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// Cap on a single backoff delay.
    pub max_delay: Duration,
    /// Cap on how long a `Retry-After` may make us wait.
    pub max_retry_after: Duration,
    /// When set, decides alone whether to retry (see [`RetryPolicy::should_retry`]).
    pub condition: Option<Condition>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("base_delay", &self.base_delay)
            .field("multiplier", &self.multiplier)
            .field("max_delay", &self.max_delay)
            .field("condition", &self.condition.is_some())
            .finish()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::no_retry()
    }
}

impl RetryPolicy {
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            base_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            condition: None,
        }
    }

    /// Whether an attempt that produced `output` (`{status_code, headers, body}`, or
    /// `{status_code: null, error}` when no response arrived) deserves another try.
    ///
    /// A condition decides alone, so it can also poll a 2xx until it says done. Without
    /// one: timeouts, broken connections, 408, 429 and 5xx are retried; other 4xx,
    /// parse errors and successes are not.
    pub fn should_retry(
        &self,
        status: Option<u16>,
        transient_error: bool,
        output: &Value,
    ) -> Result<bool, String> {
        if let Some(condition) = &self.condition {
            return condition(output);
        }
        Ok(match status {
            Some(s) => s == 408 || s == 429 || (500..600).contains(&s),
            None => transient_error,
        })
    }

    /// The delay after failed attempt number `attempt` (1-based): exponential, with
    /// 0-25% jitter added on top so that gaps still grow and never undercut the base,
    /// or the server's `Retry-After`, capped.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_retry_after);
        }
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(30) as i32);
        let nominal = self.base_delay.as_secs_f64() * exp;
        let jittered = nominal * (1.0 + rand::random::<f64>() * 0.25);
        Duration::from_secs_f64(jittered.min(self.max_delay.as_secs_f64()))
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_bounded_jitter() {
        let p = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::no_retry()
        };
        for _ in 0..100 {
            let (d1, d2, d3) = (p.delay(1, None), p.delay(2, None), p.delay(3, None));
            assert!(d1 >= Duration::from_secs(1) && d1 <= Duration::from_millis(1250));
            assert!(d2 > d1 && d3 > d2);
        }
        let capped = RetryPolicy {
            max_delay: Duration::from_secs(3),
            ..p.clone()
        };
        assert_eq!(capped.delay(10, None), Duration::from_secs(3));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(600))),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn whether_is_classification_unless_a_condition_decides() {
        let p = RetryPolicy::no_retry();
        let out = Value::Null;
        assert!(p.should_retry(Some(503), false, &out).unwrap());
        assert!(p.should_retry(Some(429), false, &out).unwrap());
        assert!(!p.should_retry(Some(404), false, &out).unwrap());
        assert!(p.should_retry(None, true, &out).unwrap());
        let only_429 = RetryPolicy {
            condition: Some(Arc::new(|o: &Value| Ok(o["status_code"] == 429))),
            ..RetryPolicy::no_retry()
        };
        assert!(
            !only_429
                .should_retry(Some(503), false, &serde_json::json!({"status_code": 503}))
                .unwrap()
        );
        assert!(
            only_429
                .should_retry(Some(429), false, &serde_json::json!({"status_code": 429}))
                .unwrap()
        );
    }
}
