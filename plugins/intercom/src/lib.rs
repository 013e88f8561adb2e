//! `intercom`: a contact and its conversation statistics, mapped to the canonical
//! support fields (`source`, `last_seen`, `total_conversations`, `avg_response_time`,
//! `open_tickets`, `tags`, `custom_attributes`). Reads the Intercom-Version 2.10 shape
//! and fails loudly, naming the field, when the API answers in another shape.

use fmhost_plugin_sdk::{
    Descriptor, Guest, PluginError, PluginKind, RetryPolicy, config_str, export_connector, field,
    get_json, parse_config,
};
use serde_json::{Value, json};

struct Intercom;

const API_VERSION: &str = "2.10";

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["contact_id"],
  "properties": {
    "contact_id": {"type": "string"},
    "base_url": {"type": "string", "description": "Defaults to https://api.intercom.io"},
    "secret": {"type": "string", "description": "Name of the secret holding the access token (INTERCOM_TOKEN)"}
  },
  "additionalProperties": false
}"#;

impl Guest for Intercom {
    fn describe() -> Descriptor {
        Descriptor {
            name: "intercom".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Connector,
            description: format!("Intercom contact and support statistics (API {API_VERSION})"),
            config_schema: SCHEMA.into(),
            allowed_hosts: vec!["api.intercom.io".into()],
        }
    }

    fn invoke(config: String, _input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        let id = config_str(&config, "contact_id", None)?;
        let base = config_str(&config, "base_url", Some("https://api.intercom.io"))?;
        let secret = config_str(&config, "secret", Some("INTERCOM_TOKEN"))?;
        let url = format!("{}/contacts/{id}", base.trim_end_matches('/'));
        let auth = format!("Bearer {{{{secrets.{secret}}}}}");
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_delay_ms: 2000,
            backoff_multiplier: 2.0,
        };
        let c = get_json(
            &url,
            &[
                ("authorization", &auth),
                ("intercom-version", API_VERSION),
                ("accept", "application/json"),
            ],
            Some(retry),
        )?;
        let tags: Vec<Value> = field(&c, "tags.data", "intercom")?
            .as_array()
            .map(|t| t.iter().map(|t| t["name"].clone()).collect())
            .unwrap_or_default();
        Ok(json!({
            "source": "intercom",
            "last_seen": field(&c, "last_seen_at", "intercom")?,
            "total_conversations": field(&c, "statistics.total_conversations", "intercom")?,
            "avg_response_time": field(&c, "statistics.avg_first_response_time", "intercom")?,
            "open_tickets": field(&c, "statistics.open_tickets", "intercom")?,
            "tags": tags,
            "custom_attributes": c.get("custom_attributes").cloned().unwrap_or(Value::Null),
        })
        .to_string())
    }
}

export_connector!(Intercom);
