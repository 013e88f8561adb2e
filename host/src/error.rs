//! The error taxonomy shared by stages, outbound calls, logs and metrics.
//!
//! Every failure a stage can report carries an [`ErrorKind`]; the kind is what
//! operators filter on, so it is a closed set with stable kebab-case names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What class of failure happened. Stable names: they appear in logs, reports and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The call or the stage ran out of time.
    Timeout,
    /// No connection could be made, or it broke before a response arrived.
    Connect,
    /// The upstream answered 4xx (other than 429).
    #[serde(rename = "http-4xx")]
    Http4xx,
    /// The upstream answered 5xx.
    #[serde(rename = "http-5xx")]
    Http5xx,
    /// The upstream answered 429.
    RateLimited,
    /// The service's circuit breaker is open; no request was sent.
    CircuitOpen,
    /// A response or value could not be parsed.
    Parse,
    /// Data did not match a schema, or a stage's rendered config was invalid.
    Validation,
    /// A plugin trapped, hit a limit, or was refused something by the sandbox.
    Sandbox,
    /// A template referenced something missing or could not be evaluated.
    Template,
    /// The run's or the stage's request budget is spent.
    Budget,
    /// The run was cancelled before the stage finished.
    Cancelled,
    /// A bug or an unexpected condition in the host or a component.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::Http4xx => "http-4xx",
            ErrorKind::Http5xx => "http-5xx",
            ErrorKind::RateLimited => "rate-limited",
            ErrorKind::CircuitOpen => "circuit-open",
            ErrorKind::Parse => "parse",
            ErrorKind::Validation => "validation",
            ErrorKind::Sandbox => "sandbox",
            ErrorKind::Template => "template",
            ErrorKind::Budget => "budget",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether a run that failed with this kind (as journaled, `as_str`) may succeed if
    /// it is simply tried again later: the upstream was down, slow, busy or cut off.
    pub fn is_transient(kind: &str) -> bool {
        [
            ErrorKind::Timeout,
            ErrorKind::Connect,
            ErrorKind::Http5xx,
            ErrorKind::RateLimited,
            ErrorKind::CircuitOpen,
            ErrorKind::Cancelled,
        ]
        .iter()
        .any(|k| k.as_str() == kind)
            // A run the host stopped during (`serve` dead-letters it at start).
            || kind == "interrupted"
    }
}

#[cfg(test)]
#[test]
fn serde_names_match_as_str() {
    for kind in [
        ErrorKind::Http4xx,
        ErrorKind::Http5xx,
        ErrorKind::RateLimited,
        ErrorKind::CircuitOpen,
    ] {
        assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a stage failed: a kind, a human message, and the HTTP status when there was one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct StageError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How far a stage that stopped halfway got (a paginated request's pages so far),
    /// journaled with the error so that a replay or a resumed run continues from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Box<serde_json::Value>>,
}

impl StageError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        StageError {
            kind,
            message: message.into(),
            status: None,
            checkpoint: None,
        }
    }
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }
    pub fn template(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Template, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}
