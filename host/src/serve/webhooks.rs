//! Webhook triggers: signature verification and event identity.
//!
//! A delivery is verified (HMAC-SHA256, constant-time), stored in the journal with a
//! full sync, and only then acknowledged; the run happens afterwards. An event id seen
//! before is acknowledged again without running twice. Deliveries whose run has not
//! finished are picked up again when the server starts, so nothing accepted is lost.

use std::time::SystemTime;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::pipeline::{Signature, Webhook as Trigger};

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, PartialEq, Eq)]
pub enum Rejection {
    Missing(&'static str),
    Invalid(&'static str),
    TooOld { age_seconds: i64, tolerance: u64 },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Missing(h) => write!(f, "missing {h} header"),
            Rejection::Invalid(h) => write!(f, "invalid signature in {h}"),
            Rejection::TooOld {
                age_seconds,
                tolerance,
            } => {
                write!(
                    f,
                    "signature timestamp is {age_seconds} s from now, outside the {tolerance} s tolerance"
                )
            }
        }
    }
}

fn mac(secret: &str, parts: &[&[u8]]) -> HmacSha256 {
    let mut m =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m
}

/// Checks a delivery's signature against `secret` by the trigger's scheme.
pub fn verify(
    trigger: &Trigger,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), Rejection> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(Rejection::Missing(name))
    };
    match trigger.signature {
        Signature::Github => {
            let value = header("x-hub-signature-256")?;
            let hex_sig = value
                .strip_prefix("sha256=")
                .ok_or(Rejection::Invalid("x-hub-signature-256"))?;
            let sig =
                hex::decode(hex_sig).map_err(|_| Rejection::Invalid("x-hub-signature-256"))?;
            mac(secret, &[body])
                .verify_slice(&sig)
                .map_err(|_| Rejection::Invalid("x-hub-signature-256"))
        }
        Signature::Stripe => {
            let value = header("stripe-signature")?;
            let mut timestamp = None;
            let mut candidates = Vec::new();
            for part in value.split(',') {
                match part.trim().split_once('=') {
                    Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
                    Some(("v1", s)) => candidates.extend(hex::decode(s).ok()),
                    _ => {}
                }
            }
            let t = timestamp.ok_or(Rejection::Invalid("stripe-signature"))?;
            let expected = mac(secret, &[t.to_string().as_bytes(), b".", body]);
            // Check the signature before the clock, so a forged request learns nothing.
            if !candidates
                .iter()
                .any(|c| expected.clone().verify_slice(c).is_ok())
            {
                return Err(Rejection::Invalid("stripe-signature"));
            }
            let now = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64;
            let age = now - t;
            if age.unsigned_abs() > trigger.tolerance_seconds {
                return Err(Rejection::TooOld {
                    age_seconds: age,
                    tolerance: trigger.tolerance_seconds,
                });
            }
            Ok(())
        }
    }
}

/// A delivery's identity: the vendor's event id, else a digest of the body.
pub fn event_id(trigger: &Trigger, headers: &HeaderMap, payload: &Value, body: &[u8]) -> String {
    let from_header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let id = match trigger.signature {
        Signature::Github => from_header("x-github-delivery"),
        Signature::Stripe => payload
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    let id = id
        .or_else(|| from_header("idempotency-key"))
        .unwrap_or_else(|| format!("sha256-{}", &crate::plugin::content_hash(body)[..32]));
    // Event ids appear in logs and URLs: keep them tame.
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

/// Signs a body the way Stripe does, for clients and tests: `t=...,v1=...`.
pub fn stripe_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let sig = mac(secret, &[timestamp.to_string().as_bytes(), b".", body])
        .finalize()
        .into_bytes();
    format!("t={timestamp},v1={}", hex::encode(sig))
}

/// Signs a body the way GitHub does: `sha256=...`.
pub fn github_signature(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, &[body]).finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn trigger(signature: Signature) -> Trigger {
        Trigger {
            path: "/hooks/x".into(),
            secret: "s".into(),
            signature,
            tolerance_seconds: 300,
        }
    }

    #[test]
    fn stripe_and_github_schemes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let body = br#"{"id":"evt_1"}"#;
        let mut h = HeaderMap::new();
        let t = trigger(Signature::Stripe);
        assert_eq!(
            verify(&t, "whsec", &h, body, now),
            Err(Rejection::Missing("stripe-signature"))
        );
        h.insert(
            "stripe-signature",
            stripe_signature("whsec", 1_700_000_000, body)
                .parse()
                .unwrap(),
        );
        assert_eq!(verify(&t, "whsec", &h, body, now), Ok(()));
        assert_eq!(
            verify(&t, "other", &h, body, now),
            Err(Rejection::Invalid("stripe-signature"))
        );
        assert_eq!(
            verify(&t, "whsec", &h, b"tampered", now),
            Err(Rejection::Invalid("stripe-signature"))
        );
        h.insert(
            "stripe-signature",
            stripe_signature("whsec", 1_700_000_000 - 301, body)
                .parse()
                .unwrap(),
        );
        assert!(matches!(
            verify(&t, "whsec", &h, body, now),
            Err(Rejection::TooOld { .. })
        ));

        let g = trigger(Signature::Github);
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            github_signature("gh", body).parse().unwrap(),
        );
        assert_eq!(verify(&g, "gh", &h, body, now), Ok(()));
        assert_eq!(
            verify(&g, "gh", &h, b"x", now),
            Err(Rejection::Invalid("x-hub-signature-256"))
        );
    }
}
