//! JSON Schema compilation and validation, shared by the `schema-validate` stage and the
//! pipeline's `input`/`output` schemas. Drafts are detected from `$schema` (2020-12 by default; 7 works).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

pub use jsonschema::Validator;

/// Distinct schemas [`compile_cached`] keeps; past it the cache starts again.
const CACHED_SCHEMAS: usize = 256;
/// Larger schemas are compiled each time, not kept: a schema rendered from a run's
/// input must not let requests fill the cache (256 x 64 KiB at most).
const CACHED_SCHEMA_BYTES: usize = 64 << 10;

/// Compiles a schema, or says why it is not one.
pub fn compile(schema: &Value) -> Result<Validator, String> {
    jsonschema::validator_for(schema).map_err(|e| format!("invalid JSON Schema: {e}"))
}

/// Like [`compile`], remembering the result by the schema's text: a `schema-validate`
/// stage compiles its schema (and its `pattern` regexes) once per process, not once per
/// run. Compiling costs 50-100 µs; the lookup is one serialisation of the schema.
pub fn compile_cached(schema: &Value) -> Result<Arc<Validator>, String> {
    static CACHE: Mutex<Option<HashMap<String, Arc<Validator>>>> = Mutex::new(None);
    let key = serde_json::to_string(schema).unwrap_or_default();
    if key.len() > CACHED_SCHEMA_BYTES {
        return compile(schema).map(Arc::new);
    }
    if let Some(v) = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_default()
        .get(&key)
    {
        return Ok(v.clone());
    }
    let validator = Arc::new(compile(schema)?);
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_default();
    if cache.len() >= CACHED_SCHEMAS {
        cache.clear();
    }
    cache.insert(key, validator.clone());
    Ok(validator)
}

/// Every violation, each as `PATH: message` with PATH a JSON pointer into the instance.
pub fn violations(validator: &Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| {
            let path = e.instance_path().as_str();
            format!("{}: {e}", if path.is_empty() { "(root)" } else { path })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lists_every_violation_with_its_path() {
        let v = compile(&json!({
            "type": "object",
            "required": ["a"],
            "properties": {"b": {"type": "integer"}, "c": {"enum": ["x"]}}
        }))
        .unwrap();
        let errs = violations(&v, &json!({"b": "no", "c": "y"}));
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("(root): ") && e.contains("\"a\""))
        );
        assert!(errs.iter().any(|e| e.starts_with("/b: ")));
        assert!(errs.iter().any(|e| e.starts_with("/c: ")));
        assert!(compile(&json!({"type": 5})).is_err());
    }
}
