//! Which hosts a plugin may reach, and host-side secret substitution.
//!
//! Plugin code is untrusted; the pipeline author and the operator are trusted. A plugin
//! may reach the hosts it declares, plus hosts the trusted parties name for its stage:
//! the stage's `allowed_hosts`, a `base_url` in its config, or a base URL held in a secret.

use serde_json::Value;

use crate::secrets::Secrets;
use crate::template::{NoStages, Scope, Template};

/// `host`, `*.domain` or `host:port` (no port means any port).
#[derive(Debug, Clone, PartialEq)]
pub struct HostPattern {
    host: String,
    port: Option<u16>,
}

impl HostPattern {
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.split("://").last()?.trim_end_matches('/');
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse() {
                Ok(port) => (h.to_string(), Some(port)),
                Err(_) if p == "*" => (h.to_string(), None),
                Err(_) => return None,
            },
            _ => (s.to_string(), None),
        };
        (!host.is_empty()).then_some(HostPattern { host, port })
    }

    /// The host and port of a URL, as a pattern that matches exactly them.
    pub fn of_url(url: &str) -> Option<HostPattern> {
        let u = reqwest::Url::parse(url).ok()?;
        Some(HostPattern {
            host: u.host_str()?.to_ascii_lowercase(),
            port: u.port_or_known_default(),
        })
    }

    pub fn matches(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => host == self.host,
        };
        host_ok && (self.port.is_none() || self.port == port)
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// Renders `{{secrets.NAME}}` (and its `| default(...)` form) in a plugin-supplied value.
/// Anything other than secrets is refused: the plugin has no business reading the run.
pub fn substitute(value: &str, secrets: &Secrets) -> Result<String, String> {
    let Some(t) = Template::parse(value).map_err(|e| format!("malformed template: {e}"))? else {
        return Ok(value.to_string());
    };
    if let Some(p) = t.paths().into_iter().find(|p| p.root != "secrets") {
        return Err(format!(
            "only {{{{secrets.NAME}}}} is substituted in requests, found `{p}`"
        ));
    }
    let run = Value::Null;
    let scope = Scope {
        input: &Value::Null,
        stages: &NoStages,
        secrets,
        output: None,
        run: &run,
        now: None,
        keep_secrets: false,
    };
    t.render(&scope)
        .map(|v| crate::template::to_text(&v).into_owned())
}

/// The hosts a plugin's stage may reach.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    pub allowed: Vec<HostPattern>,
}

impl Egress {
    /// Builds the allow-list from the plugin's declaration and the trusted parties' additions.
    pub fn new(
        declared: &[String],
        stage_allowed: &[String],
        config: &Value,
        secrets: &Secrets,
    ) -> Egress {
        let mut allowed: Vec<HostPattern> = declared
            .iter()
            .chain(stage_allowed)
            .filter_map(|h| HostPattern::parse(h))
            .collect();
        if let Some(base) = config.get("base_url").and_then(Value::as_str) {
            if let Some(p) = substitute(base, secrets)
                .ok()
                .and_then(|u| HostPattern::of_url(&u))
            {
                allowed.push(p);
            }
        }
        Egress { allowed }
    }

    /// Whether `url` (after substitution) may be called; `raw` is what the plugin wrote.
    pub fn check(&self, raw: &str, url: &reqwest::Url, secrets: &Secrets) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default();
        if self.allowed.iter().any(|p| p.matches(host, port)) {
            return Ok(());
        }
        // A base URL that a secret supplies was chosen by the operator, so its host is trusted,
        // but only that exact host: `{{secrets.BASE}}.evil.com` does not qualify.
        if raw.trim_start().starts_with("{{secrets.") {
            if let Some(end) = raw.find("}}") {
                let from_secret = substitute(&raw[..end + 2], secrets)
                    .ok()
                    .and_then(|u| HostPattern::of_url(&u));
                if from_secret.is_some_and(|p| p.matches(host, port)) {
                    return Ok(());
                }
            }
        }
        let allowed: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
        Err(format!(
            "host {host}{} is not allowed (allowed: {}); add it to the stage's allowed_hosts if it should be",
            port.map(|p| format!(":{p}")).unwrap_or_default(),
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn patterns_and_trusted_additions() {
        let secrets = Secrets::from_pairs([("BASE", "http://127.0.0.1:4010"), ("KEY", "k-123456")]);
        let e = Egress::new(
            &["api.stripe.com".into(), "*.salesforce.com".into()],
            &["localhost:9000".into()],
            &json!({"base_url": "http://10.0.0.1:8080/v1"}),
            &secrets,
        );
        let ok = |raw: &str| {
            let url = reqwest::Url::parse(&substitute(raw, &secrets).unwrap()).unwrap();
            e.check(raw, &url, &secrets)
        };
        assert!(ok("https://api.stripe.com/v1/customers").is_ok());
        assert!(ok("https://acme.my.salesforce.com/x").is_ok());
        assert!(ok("https://salesforce.com/x").is_err());
        assert!(ok("http://localhost:9000/").is_ok());
        assert!(ok("http://localhost:9001/").is_err());
        assert!(ok("http://10.0.0.1:8080/other").is_ok());
        assert!(ok("{{secrets.BASE}}/v1/chat").is_ok());
        assert!(
            ok("http://evil.example/{{secrets.BASE}}")
                .unwrap_err()
                .contains("evil.example")
        );
        assert_eq!(
            substitute("Bearer {{secrets.KEY}}", &secrets).unwrap(),
            "Bearer k-123456"
        );
        assert_eq!(
            substitute(
                "{{secrets.NOPE | default('https://api.openai.com/v1')}}",
                &secrets
            )
            .unwrap(),
            "https://api.openai.com/v1"
        );
        assert!(substitute("{{input.x}}", &secrets).is_err());
    }
}
