//! Secrets: loaded from a file (JSON object or dotenv) and `FMHOST_SECRET_*` variables,
//! resolved by `{{secrets.NAME}}`, and redacted from every log line, error and output.
//!
//! Secret values live only here and in rendered requests; nothing in this module writes them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

const ENV_PREFIX: &str = "FMHOST_SECRET_";
const MASK: &str = "***";
/// Values shorter than this are not redacted: masking every "1" or "ok" would destroy
/// logs without protecting anything worth the name.
const MIN_REDACT_LEN: usize = 4;

#[derive(Debug, Default, Clone)]
pub struct Secrets {
    values: HashMap<String, Value>,
    /// `(value, name)`, longest value first, so a secret that contains another is masked whole.
    redact: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets file {path}: {message}")]
    File { path: String, message: String },
}

impl Secrets {
    /// File entries win over `FMHOST_SECRET_*` variables: the file is named on the command line.
    pub fn load(file: Option<&Path>) -> Result<Secrets, SecretsError> {
        let mut pairs: Vec<(String, String)> = std::env::vars()
            .filter_map(|(k, v)| k.strip_prefix(ENV_PREFIX).map(|name| (name.to_string(), v)))
            .collect();
        if let Some(path) = file {
            pairs.extend(read_file(path)?);
        }
        Ok(Self::from_pairs(pairs))
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Secrets {
        let values: HashMap<String, Value> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), Value::String(v.into())))
            .collect();
        let mut redact: Vec<(String, String)> = values
            .iter()
            .filter_map(|(k, v)| Some((v.as_str()?.to_string(), k.clone())))
            .filter(|(v, _)| v.len() >= MIN_REDACT_LEN)
            .collect();
        redact.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.cmp(b)));
        redact.dedup_by(|a, b| a.0 == b.0);
        Secrets { values, redact }
    }

    /// The secret as a JSON string, for templates.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(Value::as_str)
    }

    /// Masks every secret value that occurs in `text`.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        self.replace_values(text, |_| MASK.to_string())
    }

    fn replace_values<'a>(&self, text: &'a str, with: impl Fn(&str) -> String) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for (secret, name) in &self.redact {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), &with(name)));
            }
        }
        out
    }

    /// Masks secret values anywhere inside a JSON value (strings and keys).
    pub fn redact_value(&self, value: &mut Value) {
        if !self.redact.is_empty() {
            map_strings(value, &|s| self.redact(s));
        }
    }

    /// Replaces secret values inside a JSON value by `{{secrets.NAME}}`, so what is
    /// stored (the run journal) holds no secret yet can be restored by [`Self::restore_value`].
    pub fn to_references(&self, value: &mut Value) {
        if !self.redact.is_empty() {
            map_strings(value, &|s| {
                self.replace_values(s, |name| format!("{{{{secrets.{name}}}}}"))
            });
        }
    }

    /// [`Self::to_references`] on a shared value: the same `Arc` when no secret value
    /// occurs in it (the usual case), so journaling an output does not copy it.
    pub fn with_references(&self, value: &std::sync::Arc<Value>) -> std::sync::Arc<Value> {
        if !self.occurs_in(value) {
            return value.clone();
        }
        let mut v = (**value).clone();
        self.to_references(&mut v);
        std::sync::Arc::new(v)
    }

    fn occurs_in(&self, value: &Value) -> bool {
        let hit = |s: &str| {
            self.redact
                .iter()
                .any(|(secret, _)| s.contains(secret.as_str()))
        };
        match value {
            Value::String(s) => hit(s),
            Value::Array(items) => items.iter().any(|v| self.occurs_in(v)),
            Value::Object(map) => map.iter().any(|(k, v)| hit(k) || self.occurs_in(v)),
            _ => false,
        }
    }

    /// Puts the current secret values back where [`Self::to_references`] left references.
    pub fn restore_value(&self, value: &mut Value) {
        map_strings(value, &|s| {
            if !s.contains("{{secrets.") {
                return Cow::Borrowed(s);
            }
            let mut out = s.to_string();
            for (name, v) in &self.values {
                if let Some(v) = v.as_str() {
                    out = out.replace(&format!("{{{{secrets.{name}}}}}"), v);
                }
            }
            Cow::Owned(out)
        });
    }
}

/// Applies `f` to every string and object key in `value`.
fn map_strings(value: &mut Value, f: &dyn Fn(&str) -> Cow<'_, str>) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(changed) = f(s) {
                *s = changed;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| map_strings(v, f)),
        Value::Object(map) => {
            if map.keys().any(|k| matches!(f(k), Cow::Owned(_))) {
                let old = std::mem::take(map);
                for (k, v) in old {
                    map.insert(f(&k).into_owned(), v);
                }
            }
            map.values_mut().for_each(|v| map_strings(v, f));
        }
        _ => {}
    }
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>, SecretsError> {
    let err = |message: String| SecretsError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    if text.trim_start().starts_with('{') {
        let map: serde_json::Map<String, Value> = serde_json::from_str(&text)
            .map_err(|e| err(format!("line {} column {}: {e}", e.line(), e.column())))?;
        return map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                Value::Number(n) => Ok((k, n.to_string())),
                Value::Bool(b) => Ok((k, b.to_string())),
                _ => Err(err(format!("{k}: a secret must be a string"))),
            })
            .collect();
    }
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| err(format!("line {}: expected NAME=value", n + 1)))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn redacts_longest_first_everywhere() {
        let s = Secrets::from_pairs([("A", "token-123"), ("B", "token-123456"), ("C", "ok")]);
        assert_eq!(s.redact("x token-123456 y token-123 ok"), "x *** y *** ok");
        let mut v = json!({"k": ["Bearer token-123"], "token-123": 1});
        s.redact_value(&mut v);
        assert_eq!(v, json!({"k": ["Bearer ***"], "***": 1}));
    }

    #[test]
    fn references_stand_in_for_values_and_restore_them() {
        let s = Secrets::from_pairs([("URL", "http://10.0.0.7:9000"), ("KEY", "sk-secret-9")]);
        let original = json!({"api": "http://10.0.0.7:9000/v1", "echo": ["Bearer sk-secret-9"]});
        let mut stored = original.clone();
        s.to_references(&mut stored);
        assert_eq!(
            stored,
            json!({"api": "{{secrets.URL}}/v1", "echo": ["Bearer {{secrets.KEY}}"]})
        );
        s.restore_value(&mut stored);
        assert_eq!(stored, original);
    }

    #[test]
    fn dotenv_and_json_files() {
        let dir = std::env::temp_dir().join(format!("fmhost-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = dir.join("s.env");
        std::fs::write(&env, "# c\nexport A=\"one two\"\nB='x=y'\n").unwrap();
        let s = Secrets::load(Some(&env)).unwrap();
        assert_eq!((s.get("A"), s.get("B")), (Some("one two"), Some("x=y")));
        let js = dir.join("s.json");
        std::fs::write(&js, r#"{"A": "v", "N": 5}"#).unwrap();
        assert_eq!(Secrets::load(Some(&js)).unwrap().get("N"), Some("5"));
        std::fs::write(&js, r#"{"A": "#).unwrap();
        assert!(
            Secrets::load(Some(&js))
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
    }
}
