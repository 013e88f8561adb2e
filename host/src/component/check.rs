//! Static checks of a stage's config, before templates are rendered: a value that
//! is a template may stand for anything, so only literal values are type-checked.

use serde_json::{Map, Value};

/// A problem in a stage's config; `path` is relative to `config` (e.g. `.retry.max_attempts`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

pub fn is_template(v: &Value) -> bool {
    matches!(v, Value::String(s) if s.contains("{{"))
}

/// Whether a template appears anywhere inside a JSON value.
pub fn contains_template(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.iter().any(contains_template),
        Value::Object(o) => o.values().any(contains_template),
        other => is_template(other),
    }
}

/// Collects problems while walking a config object.
pub struct Checker<'a> {
    map: Option<&'a Map<String, Value>>,
    pub problems: Vec<ConfigProblem>,
}

impl<'a> Checker<'a> {
    pub fn new(config: &'a Value) -> Checker<'a> {
        let mut c = Checker {
            map: config.as_object(),
            problems: Vec::new(),
        };
        if c.map.is_none() {
            c.problem("", "config must be an object");
        }
        c
    }

    pub fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            path: path.to_string(),
            message: message.into(),
        });
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key))
    }

    /// Reports keys outside `known`, which are usually typos.
    pub fn only(&mut self, known: &[&str]) -> &mut Self {
        let unknown: Vec<String> = self
            .map
            .map(|m| {
                m.keys()
                    .filter(|k| !known.contains(&k.as_str()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for k in unknown {
            self.problem(
                &format!(".{k}"),
                format!("unknown field (expected one of: {})", known.join(", ")),
            );
        }
        self
    }

    pub fn required(&mut self, key: &str) -> &mut Self {
        if self.map.is_some() && self.get(key).is_none() {
            self.problem(&format!(".{key}"), "required field is missing");
        }
        self
    }

    /// The field, when present, is a string.
    pub fn string(&mut self, key: &str) -> &mut Self {
        self.typed(key, "a string", Value::is_string)
    }

    pub fn object(&mut self, key: &str) -> &mut Self {
        self.typed(key, "an object", Value::is_object)
    }

    /// The field, when present, is an integer of at least `min`.
    pub fn integer(&mut self, key: &str, min: i64) -> &mut Self {
        if let Some(v) = self.get(key).filter(|v| !is_template(v)) {
            match v.as_i64() {
                Some(n) if n >= min => {}
                _ => self.problem(
                    &format!(".{key}"),
                    format!("expected an integer of at least {min}, found {v}"),
                ),
            }
        }
        self
    }

    /// The field, when a literal, is one of `allowed` (case-insensitive).
    pub fn one_of(&mut self, key: &str, allowed: &[&str]) -> &mut Self {
        if let Some(v) = self.get(key).filter(|v| !is_template(v)) {
            let ok = v
                .as_str()
                .is_some_and(|s| allowed.iter().any(|a| a.eq_ignore_ascii_case(s)));
            if !ok {
                self.problem(
                    &format!(".{key}"),
                    format!("expected one of {}, found {v}", allowed.join(", ")),
                );
            }
        }
        self
    }

    fn typed(&mut self, key: &str, what: &str, ok: fn(&Value) -> bool) -> &mut Self {
        if let Some(v) = self.get(key).filter(|v| !is_template(v))
            && !ok(v)
        {
            self.problem(&format!(".{key}"), format!("expected {what}, found {v}"));
        }
        self
    }

    pub fn finish(&mut self) -> Vec<ConfigProblem> {
        std::mem::take(&mut self.problems)
    }
}
