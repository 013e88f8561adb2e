//! W3C Trace Context: the ids that tie a run, its stages and every outbound attempt into
//! one distributed trace, and the `traceparent` header that carries them.
//!
//! Every run belongs to a trace: the caller's, when a webhook or API request brought a
//! `traceparent`, else a new one. The run has its own span; a stage's span id is derived
//! from the run's span and the stage id, a plugin invocation's from its stage's, so the
//! engine, the outbound machinery and the exporter ([`crate::otel`]) agree on them
//! without passing state around. Each attempt gets a fresh span id, sent upstream in its
//! `traceparent`, so the vendor's spans become children of that attempt.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// A parent span in a trace: what a `traceparent` header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanRef {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

impl SpanRef {
    /// Parses a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`). All-zero ids, an
    /// unknown version `ff` and malformed fields are refused, as the spec says.
    pub fn parse(header: &str) -> Option<SpanRef> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || flags.len() != 2 {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        hex::decode(version).ok()?;
        hex::decode(flags).ok()?;
        let trace_id: TraceId = decode_lower(trace)?;
        let span_id: SpanId = decode_lower(span)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanRef { trace_id, span_id })
    }

    /// The `traceparent` value naming this span as the parent (sampled).
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-01",
            hex::encode(self.trace_id),
            hex::encode(self.span_id)
        )
    }

    /// A child of this span, its id derived from this one's and `name`.
    pub fn child(&self, name: &str) -> SpanRef {
        SpanRef {
            trace_id: self.trace_id,
            span_id: derive(&self.span_id, name),
        }
    }

    /// A child of this span with a fresh random id (an outbound attempt).
    pub fn fresh_child(&self) -> SpanRef {
        SpanRef {
            trace_id: self.trace_id,
            span_id: random_span_id(),
        }
    }
}

fn decode_lower<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

fn derive(parent: &SpanId, name: &str) -> SpanId {
    let mut h = Sha256::new();
    h.update(parent);
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

pub fn random_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// A run's place in its trace, kept in its report and journal row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunTrace {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// The run's own span.
    pub span_id: String,
    /// The caller's span, when the run joined a trace (`traceparent` on the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_span_id: Option<String>,
}

impl RunTrace {
    /// A run's trace: a new span in the caller's trace, or in the run's own, whose id
    /// follows from the run id (so every start of one run is in one trace).
    pub fn start(run_id: &str, caller: Option<SpanRef>) -> RunTrace {
        let own = || {
            let d = Sha256::digest(format!("fmhost trace {run_id}").as_bytes());
            let mut id: TraceId = [0; 16];
            id.copy_from_slice(&d[..16]);
            if id == [0; 16] {
                id[15] = 1;
            }
            id
        };
        RunTrace {
            trace_id: hex::encode(caller.map_or_else(own, |c| c.trace_id)),
            span_id: hex::encode(random_span_id()),
            parent_span_id: caller.map(|c| hex::encode(c.span_id)),
        }
    }

    /// The run's span.
    pub fn span(&self) -> Option<SpanRef> {
        Some(SpanRef {
            trace_id: decode_lower(&self.trace_id)?,
            span_id: decode_lower(&self.span_id)?,
        })
    }

    /// A stage's span: the same for every update of one stage in one run.
    pub fn stage_span(&self, stage_id: &str) -> Option<SpanRef> {
        self.span().map(|s| s.child(stage_id))
    }
}

/// The span of a plugin's invocation within its stage's span.
pub fn plugin_span(stage: &SpanRef) -> SpanRef {
    stage.child("plugin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_refusals() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let r = SpanRef::parse(h).unwrap();
        assert_eq!(r.header(), h);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(SpanRef::parse(bad).is_none(), "{bad}");
        }
        // A later version may add fields.
        assert!(
            SpanRef::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some()
        );
        let t = RunTrace::start("run_1", Some(r));
        assert_eq!(
            RunTrace::start("run_1", None).trace_id,
            RunTrace::start("run_1", None).trace_id
        );
        assert_ne!(
            RunTrace::start("run_1", None).span_id,
            RunTrace::start("run_1", None).span_id
        );
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(t.stage_span("a"), t.stage_span("a"));
        assert_ne!(t.stage_span("a"), t.stage_span("b"));
    }
}
