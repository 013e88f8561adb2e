//! The `intercom` connector, fixed for Intercom-Version 2.11 (where `statistics`
//! became `conversation_stats` and `last_seen_at` became `last_seen`): the version an
//! operator hot-swaps in when the vendor changes its API. Same name, same output.

use fmhost_plugin_sdk::{
    Descriptor, Guest, PluginError, PluginKind, config_str, export_connector, field, get_json,
    parse_config,
};
use serde_json::{Value, json};

struct Intercom;

const API_VERSION: &str = "2.11";

impl Guest for Intercom {
    fn describe() -> Descriptor {
        Descriptor {
            name: "intercom".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Connector,
            description: format!("Intercom contact and support statistics (API {API_VERSION})"),
            config_schema: r#"{"type":"object","required":["contact_id"],"properties":{"contact_id":{"type":"string"},"base_url":{"type":"string"},"secret":{"type":"string"}},"additionalProperties":false}"#.into(),
            allowed_hosts: vec!["api.intercom.io".into()],
        }
    }

    fn invoke(config: String, _input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        let id = config_str(&config, "contact_id", None)?;
        let base = config_str(&config, "base_url", Some("https://api.intercom.io"))?;
        let secret = config_str(&config, "secret", Some("INTERCOM_TOKEN"))?;
        let auth = format!("Bearer {{{{secrets.{secret}}}}}");
        let c = get_json(
            &format!("{}/contacts/{id}", base.trim_end_matches('/')),
            &[("authorization", &auth), ("intercom-version", API_VERSION)],
            None,
        )?;
        let tags: Vec<Value> = field(&c, "tags.data", "intercom")?
            .as_array()
            .map(|t| t.iter().map(|t| t["name"].clone()).collect())
            .unwrap_or_default();
        Ok(json!({
            "source": "intercom",
            "last_seen": field(&c, "last_seen", "intercom")?,
            "total_conversations": field(&c, "conversation_stats.total", "intercom")?,
            "avg_response_time": field(&c, "conversation_stats.avg_first_response_seconds", "intercom")?,
            "open_tickets": field(&c, "conversation_stats.open_count", "intercom")?,
            "tags": tags,
            "custom_attributes": c.get("custom_attributes").cloned().unwrap_or(Value::Null),
        })
        .to_string())
    }
}

export_connector!(Intercom);
