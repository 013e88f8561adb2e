//! Request budgets: `"budget": {"max_requests", "max_seconds"}` for a whole run (the
//! pipeline's) and for one stage. Every outbound attempt, a retry or a page included,
//! takes one request from each budget that applies; a budget that is spent fails the
//! stage with kind `budget`. Nothing is silently cut short.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{ErrorKind, StageError};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// Outbound requests at most (every attempt counts).
    #[serde(default)]
    pub max_requests: Option<u64>,
    /// Wall-clock seconds at most, from the start of the run or stage.
    #[serde(default)]
    pub max_seconds: Option<f64>,
}

impl BudgetSpec {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.max_requests.is_none() && self.max_seconds.is_none() {
            out.push((
                "budget".into(),
                "give max_requests, max_seconds or both".into(),
            ));
        }
        if let Some(s) = self.max_seconds
            && !(s.is_finite() && s > 0.0)
        {
            out.push((
                "budget.max_seconds".into(),
                "must be a positive number".into(),
            ));
        }
        out
    }
}

/// One budget being spent.
#[derive(Debug)]
pub struct Budget {
    /// `run` or `stage ID`, for messages.
    pub scope: String,
    spec: BudgetSpec,
    used: AtomicU64,
    started: Instant,
}

impl Budget {
    pub fn new(scope: String, spec: BudgetSpec, started: Instant) -> Budget {
        Budget {
            scope,
            spec,
            used: AtomicU64::new(0),
            started,
        }
    }

    pub fn requests(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Fails once the time is spent.
    pub fn check_time(&self) -> Result<(), StageError> {
        if let Some(max) = self.spec.max_seconds {
            let spent = self.started.elapsed();
            if spent > Duration::from_secs_f64(max) {
                return Err(StageError::new(
                    ErrorKind::Budget,
                    format!(
                        "the {}'s budget of {max} s is spent ({:.1} s elapsed)",
                        self.scope,
                        spent.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Takes one request, or fails when none is left (or the time is spent).
    pub fn take(&self) -> Result<(), StageError> {
        self.check_time()?;
        if let Some(max) = self.spec.max_requests {
            let n = self.used.fetch_add(1, Ordering::Relaxed) + 1;
            if n > max {
                self.used.fetch_sub(1, Ordering::Relaxed);
                return Err(StageError::new(
                    ErrorKind::Budget,
                    format!(
                        "the {}'s budget of {max} request{} is spent",
                        self.scope,
                        if max == 1 { "" } else { "s" }
                    ),
                ));
            }
        } else {
            self.used.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}
