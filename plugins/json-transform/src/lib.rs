//! `json-transform`: applies a JMESPath expression to `config.data` (or, without
//! `data`, to the stage's input). The whole JMESPath spec, through `jpx-core`.

wit_bindgen::generate!({ world: "transform", path: "../../wit" });

use exports::fmhost::plugin::plugin::Guest;
use fmhost::plugin::types::{Descriptor, ErrorKind, PluginError, PluginKind};
use serde_json::Value;

struct JsonTransform;

const CONFIG_SCHEMA: &str = r#"{
  "type": "object",
  "oneOf": [{"required": ["expression"]}, {"required": ["jmespath_expression"]}],
  "properties": {
    "expression": {"type": "string", "description": "A JMESPath expression"},
    "jmespath_expression": {"type": "string", "description": "FlowMason's spelling of expression"},
    "data": {"description": "The document to search; the stage input when absent"}
  },
  "additionalProperties": false
}"#;

fn error(kind: ErrorKind, message: String) -> PluginError {
    PluginError {
        kind,
        message,
        retryable: false,
    }
}

impl Guest for JsonTransform {
    fn describe() -> Descriptor {
        Descriptor {
            name: "json-transform".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Transform,
            description: "Reshape JSON with a JMESPath expression".into(),
            config_schema: CONFIG_SCHEMA.into(),
            allowed_hosts: Vec::new(),
        }
    }

    fn invoke(config: String, input: String) -> Result<String, PluginError> {
        let mut config: Value = serde_json::from_str(&config)
            .map_err(|e| error(ErrorKind::InvalidConfig, format!("config is not JSON: {e}")))?;
        let key = if config.get("expression").is_some() {
            "expression"
        } else {
            "jmespath_expression"
        };
        let expression = match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(error(
                    ErrorKind::InvalidConfig,
                    format!("config.{key}: expected a string, found {other}"),
                ));
            }
            None => {
                return Err(error(
                    ErrorKind::InvalidConfig,
                    "config.expression: required field is missing".into(),
                ));
            }
        };
        let data = match config.get_mut("data") {
            Some(data) => data.take(),
            None => serde_json::from_str(&input)
                .map_err(|e| error(ErrorKind::InvalidInput, format!("input is not JSON: {e}")))?,
        };
        let compiled = jpx_core::compile(&expression)
            .map_err(|e| error(ErrorKind::InvalidConfig, format!("config.expression: {e}")))?;
        let result = compiled
            .search(&data)
            .map_err(|e| error(ErrorKind::InvalidInput, format!("config.expression: {e}")))?;
        let text = serde_json::to_string(&result).map_err(|e| {
            error(
                ErrorKind::Internal,
                format!("the result cannot be written: {e}"),
            )
        })?;
        // The instance is thrown away after this call, its memory with it: freeing the
        // documents node by node first would only cost time.
        std::mem::forget((config, data, result));
        Ok(text)
    }
}

export!(JsonTransform);
