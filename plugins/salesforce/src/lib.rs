//! `salesforce`: an Account record, mapped to the canonical CRM fields (`source`,
//! `company_name`, `industry`, `employee_count`, `annual_revenue`, `deal_stage`,
//! `owner`, `created_at`). The instance URL is per customer, so it comes from
//! `config.base_url` or the operator's secret `SALESFORCE_URL`.

use fmhost_plugin_sdk::{
    Descriptor, Guest, PluginError, PluginKind, RetryPolicy, config_str, export_connector, field,
    get_json, parse_config,
};
use serde_json::json;

struct Salesforce;

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["account_id"],
  "properties": {
    "account_id": {"type": "string"},
    "base_url": {"type": "string", "description": "Instance URL; defaults to the secret SALESFORCE_URL"},
    "api_version": {"type": "string", "description": "REST API version, v58.0 by default"},
    "secret": {"type": "string", "description": "Name of the secret holding the OAuth token (SALESFORCE_TOKEN)"}
  },
  "additionalProperties": false
}"#;

impl Guest for Salesforce {
    fn describe() -> Descriptor {
        Descriptor {
            name: "salesforce".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Connector,
            description: "Salesforce Account: company, industry, deal stage, owner".into(),
            config_schema: SCHEMA.into(),
            allowed_hosts: vec!["*.salesforce.com".into(), "*.force.com".into()],
        }
    }

    fn invoke(config: String, _input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        let id = config_str(&config, "account_id", None)?;
        let base = config_str(&config, "base_url", Some("{{secrets.SALESFORCE_URL}}"))?;
        let version = config_str(&config, "api_version", Some("v58.0"))?;
        let secret = config_str(&config, "secret", Some("SALESFORCE_TOKEN"))?;
        let url = format!(
            "{}/services/data/{version}/sobjects/Account/{id}",
            base.trim_end_matches('/')
        );
        let auth = format!("Bearer {{{{secrets.{secret}}}}}");
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_delay_ms: 1000,
            backoff_multiplier: 2.0,
        };
        let a = get_json(&url, &[("authorization", &auth)], Some(retry))?;
        Ok(json!({
            "source": "salesforce",
            "company_name": field(&a, "Name", "salesforce")?,
            "industry": a["Industry"],
            "employee_count": a["NumberOfEmployees"],
            "annual_revenue": a["AnnualRevenue"],
            "deal_stage": a["StageName"],
            "owner": a["Owner"]["Name"],
            "created_at": a["CreatedDate"],
        })
        .to_string())
    }
}

export_connector!(Salesforce);
