//! `stripe`: a Stripe customer with subscriptions, mapped to the canonical billing
//! fields (`source`, `email`, `currency`, `balance`, `subscriptions`, `total_spent`,
//! `payment_method`).

use fmhost_plugin_sdk::{
    Descriptor, Guest, PluginError, PluginKind, RetryPolicy, config_str, export_connector, field,
    get_json, parse_config,
};
use serde_json::{Value, json};

struct Stripe;

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["customer_id"],
  "properties": {
    "customer_id": {"type": "string"},
    "base_url": {"type": "string", "description": "Defaults to https://api.stripe.com"},
    "api_version": {"type": "string", "description": "Stripe-Version header"},
    "secret": {"type": "string", "description": "Name of the secret holding the API key (STRIPE_SECRET_KEY)"}
  },
  "additionalProperties": false
}"#;

impl Guest for Stripe {
    fn describe() -> Descriptor {
        Descriptor {
            name: "stripe".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            kind: PluginKind::Connector,
            description: "Stripe customer, subscriptions and lifetime value".into(),
            config_schema: SCHEMA.into(),
            allowed_hosts: vec!["api.stripe.com".into()],
        }
    }

    fn invoke(config: String, _input: String) -> Result<String, PluginError> {
        let config = parse_config(&config)?;
        let id = config_str(&config, "customer_id", None)?;
        let base = config_str(&config, "base_url", Some("https://api.stripe.com"))?;
        let version = config_str(&config, "api_version", Some("2023-10-16"))?;
        let secret = config_str(&config, "secret", Some("STRIPE_SECRET_KEY"))?;
        let url = format!(
            "{}/v1/customers/{id}?expand[]=subscriptions&expand[]=invoice_settings",
            base.trim_end_matches('/')
        );
        let auth = format!("Bearer {{{{secrets.{secret}}}}}");
        // Stripe asks clients to back off on 429; reads are safe to retry.
        let retry = RetryPolicy {
            max_attempts: 3,
            initial_delay_ms: 1000,
            backoff_multiplier: 2.0,
        };
        let c = get_json(
            &url,
            &[("authorization", &auth), ("stripe-version", version)],
            Some(retry),
        )?;
        let subscriptions: Vec<Value> = field(&c, "subscriptions.data", "stripe")?
            .as_array()
            .map(|subs| {
                subs.iter()
                    .map(|s| {
                        json!({
                            "id": s["id"], "status": s["status"],
                            "plan": s["plan"]["nickname"], "amount": s["plan"]["amount"], "interval": s["plan"]["interval"],
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        // `metadata.lifetime_value` is a string in Stripe metadata; 0 when absent.
        let total_spent = match c.pointer("/metadata/lifetime_value") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                .ok()
                .filter(Value::is_number)
                .unwrap_or(json!(0)),
            Some(n @ Value::Number(_)) => n.clone(),
            _ => json!(0),
        };
        Ok(json!({
            "source": "stripe",
            "email": field(&c, "email", "stripe")?,
            "currency": c["currency"],
            "balance": c["balance"],
            "subscriptions": subscriptions,
            "total_spent": total_spent,
            "payment_method": c["invoice_settings"]["default_payment_method"],
        })
        .to_string())
    }
}

export_connector!(Stripe);
