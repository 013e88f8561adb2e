//! Schema drift: the shape of a service's successful JSON answers, learned per endpoint
//! from the exchanges a pipeline records, and what a new answer lacks or has changed
//! (a field gone, a type changed) before a mapping breaks on it. Fields that appear
//! are learned, not flagged; a field once learned stays expected.
//!
//! An endpoint is the service, the method and the URL path with its identifiers as `*`
//! (`GET /contacts/*`): a path segment holding a digit is taken for an identifier.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::Value;

/// How deep a shape is followed; deeper values are not compared.
const MAX_DEPTH: usize = 8;
/// Endpoints learned per process.
const MAX_ENDPOINTS: usize = 4096;
/// Fields learned per object: one with more is a map keyed by data (ids, dates), whose
/// keys are not a shape; it is kept as "an object" only.
const MAX_FIELDS: usize = 256;
/// Departures reported per answer; the rest are counted in one more line.
const MAX_DEPARTURES: usize = 20;

#[derive(Debug, Clone, PartialEq)]
enum Shape {
    Null,
    Bool,
    Number,
    String,
    /// The shape of the items seen (`None`: only empty lists so far).
    Array(Option<Box<Shape>>),
    Object(BTreeMap<String, Shape>),
}

impl Shape {
    fn of(v: &Value, depth: usize) -> Shape {
        match v {
            Value::Null => Shape::Null,
            Value::Bool(_) => Shape::Bool,
            Value::Number(_) => Shape::Number,
            Value::String(_) => Shape::String,
            Value::Array(items) if depth < MAX_DEPTH => Shape::Array(
                items
                    .iter()
                    .map(|i| Shape::of(i, depth + 1))
                    .reduce(|a, b| a.merged(b))
                    .map(Box::new),
            ),
            Value::Object(m) if depth < MAX_DEPTH && m.len() <= MAX_FIELDS => Shape::Object(
                m.iter()
                    .map(|(k, v)| (k.clone(), Shape::of(v, depth + 1)))
                    .collect(),
            ),
            Value::Array(_) => Shape::Array(None),
            Value::Object(_) => Shape::Object(BTreeMap::new()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Shape::Null => "null",
            Shape::Bool => "boolean",
            Shape::Number => "number",
            Shape::String => "string",
            Shape::Array(_) => "array",
            Shape::Object(_) => "object",
        }
    }

    /// What both shapes allow: fields of either, and null where one was null.
    fn merged(self, other: Shape) -> Shape {
        match (self, other) {
            (Shape::Object(mut a), Shape::Object(b)) => {
                for (k, v) in b {
                    let merged = match a.remove(&k) {
                        Some(old) => old.merged(v),
                        None => v,
                    };
                    a.insert(k, merged);
                }
                // A map keyed by data (ids, dates) has no fields to expect: past the
                // bound, what was learned of it is dropped, so memory stays bounded.
                if a.len() > MAX_FIELDS {
                    a.clear();
                }
                Shape::Object(a)
            }
            (Shape::Array(a), Shape::Array(b)) => Shape::Array(match (a, b) {
                (Some(a), Some(b)) => Some(Box::new(a.merged(*b))),
                (a, b) => a.or(b),
            }),
            (Shape::Null, other) | (other, Shape::Null) => other,
            (a, _) => a,
        }
    }

    /// How `v` departs from this shape, as `path: what` lines.
    fn departures(&self, v: &Value, path: &str, out: &mut Vec<String>, depth: usize) {
        if depth >= MAX_DEPTH || v.is_null() || matches!(self, Shape::Null) {
            return;
        }
        let here = Shape::of(v, MAX_DEPTH);
        if here.name() != self.name() {
            out.push(format!(
                "{}: was {}, now {}",
                if path.is_empty() { "(body)" } else { path },
                self.name(),
                here.name()
            ));
            return;
        }
        match (self, v) {
            (Shape::Object(fields), Value::Object(m)) => {
                for (k, shape) in fields {
                    let at = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match m.get(k) {
                        None => out.push(format!("{at}: missing")),
                        Some(x) => shape.departures(x, &at, out, depth + 1),
                    }
                }
            }
            (Shape::Array(Some(item)), Value::Array(items)) => {
                if let Some(first) = items.first() {
                    item.departures(first, &format!("{path}[]"), out, depth + 1);
                }
            }
            _ => {}
        }
    }
}

/// `GET /contacts/*` for `GET https://api.intercom.io/contacts/cust_1?x=1`.
pub fn endpoint(method: &str, url: &str) -> String {
    // A recorded URL starts with the reference to its base URL secret: the path follows.
    let url = match url.strip_prefix("{{") {
        Some(rest) => rest.split_once("}}").map_or(url, |(_, path)| path),
        None => url,
    };
    let path = reqwest::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| url.split('?').next().unwrap_or(url).to_string());
    let normal: Vec<&str> = path
        .split('/')
        .map(|seg| {
            if seg.bytes().any(|b| b.is_ascii_digit()) {
                "*"
            } else {
                seg
            }
        })
        .collect();
    format!("{method} {}", normal.join("/"))
}

/// Learned shapes, per service and endpoint.
#[derive(Default)]
pub struct Shapes {
    learned: Mutex<HashMap<(String, String), Shape>>,
}

impl Shapes {
    /// Compares a successful JSON answer with what was learned for its endpoint, learns
    /// what is new, and returns the departures (empty the first time).
    pub fn observe(&self, service: &str, endpoint: &str, body: &Value) -> Vec<String> {
        let mut learned = self.learned.lock().expect("drift lock");
        let key = (service.to_string(), endpoint.to_string());
        let mut out = Vec::new();
        match learned.remove(&key) {
            Some(shape) => {
                shape.departures(body, "", &mut out, 0);
                let merged = shape.merged(Shape::of(body, 0));
                learned.insert(key, merged);
            }
            None if learned.len() < MAX_ENDPOINTS => {
                learned.insert(key, Shape::of(body, 0));
            }
            None => {}
        }
        if out.len() > MAX_DEPARTURES {
            let more = out.len() - MAX_DEPARTURES;
            out.truncate(MAX_DEPARTURES);
            out.push(format!("... and {more} more"));
        }
        out
    }

    /// Learns from an answer given before (the journal's, when a server starts).
    pub fn learn(&self, service: &str, endpoint: &str, body: &Value) {
        self.observe(service, endpoint, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn departures_are_fields_gone_and_types_changed() {
        let s = Shapes::default();
        let e = endpoint("GET", "https://api.intercom.io/contacts/cust_123?x=1");
        assert_eq!(e, "GET /contacts/*");
        assert_eq!(
            endpoint("GET", "{{secrets.INTERCOM_URL}}/contacts/cust_9"),
            e
        );
        let v210 = json!({"id": "c1", "custom_attributes": {"health_score": 78}, "tags": {"data": [{"name": "a"}]}});
        assert!(s.observe("intercom", &e, &v210).is_empty());
        assert!(s.observe("intercom", &e, &v210).is_empty());
        let v211 = json!({"id": "c1", "custom_attributes": {"health": {"score": 78}}, "tags": [{"name": "a"}], "new": 1});
        let d = s.observe("intercom", &e, &v211);
        assert_eq!(
            d,
            vec![
                "custom_attributes.health_score: missing".to_string(),
                "tags: was object, now array".to_string()
            ]
        );
        // A map keyed by data does not grow the shape without bound.
        let big: serde_json::Map<String, Value> =
            (0..300).map(|i| (format!("k{i}"), json!(i))).collect();
        let m = endpoint("GET", "https://x.example/maps");
        s.observe("x", &m, &Value::Object(big.clone()));
        assert!(
            s.observe("x", &m, &json!({})).is_empty(),
            "not 300 fields missing"
        );
        // A field once learned stays expected.
        assert_eq!(s.observe("intercom", &e, &v211).len(), 2);
    }
}
