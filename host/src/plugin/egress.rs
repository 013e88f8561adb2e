//! What a plugin's request may reach and which credentials it may carry there.
//!
//! Plugin code is untrusted; the pipeline author and the operator are trusted. A
//! plugin's own `describe().allowed_hosts` is a request, never a grant. A stage's
//! [`Grant`] is built only from trusted sources:
//!
//! - hosts: the stage's `allowed_hosts`, the host of its config's `base_url` when the
//!   pipeline file wrote it (a literal URL or `{{secrets.NAME}}`, not a value taken from
//!   data), the origin of the declared service the stage names (`"service"`), the host
//!   of a granted secret that holds a URL, and what the operator's policy grants the
//!   plugin;
//! - secrets: the `{{secrets.NAME}}` references in the stage's config and its `secrets`
//!   list (bound to the stage's hosts), and the policy's secrets (bound to the
//!   policy's hosts).
//!
//! A credential is named in a request only in a slot this module recognises with a
//! fixed pattern, never the template parser: `{{secrets.NAME}}` opening the URL (its
//! base), or a header value that is `{{secrets.NAME}}` or `SCHEME {{secrets.NAME}}`.
//! Anywhere else `{{` is literal text, so an id taken from input never becomes a
//! credential.

use std::net::SocketAddr;

use super::policy::Policy;
use crate::secrets::Secrets;

pub use crate::http::HostPattern;

pub use crate::secrets::secret_token;

/// The secret a header value names as a whole (`{{secrets.NAME}}` or
/// `SCHEME {{secrets.NAME}}`): the scheme prefix (with its space) and the name.
pub fn header_secret(value: &str) -> Option<(&str, &str)> {
    let (prefix, token) = match value.find("{{") {
        Some(0) => ("", value),
        Some(i) => {
            let scheme = value[..i].strip_suffix(' ')?;
            let token_chars = |c: char| c.is_ascii_alphanumeric() || "-_.!#$%&'*+^`|~".contains(c);
            if scheme.is_empty() || !scheme.chars().all(token_chars) {
                return None;
            }
            (&value[..i], &value[i..])
        }
        None => return None,
    };
    let (name, len) = secret_token(token)?;
    (len == token.len()).then_some((prefix, name))
}

/// Whether a header's name says it carries a credential (`Authorization`, `X-Api-Key`,
/// `X-Auth-Token`, ...). Only such headers are credential slots, so a value taken from
/// data that happens to read `{{secrets.NAME}}` in, say, `X-Customer-Id` stays text.
pub fn is_credential_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || [
        "key",
        "token",
        "secret",
        "auth",
        "signature",
        "password",
        "credential",
        "session",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// Why a request was refused, in words that name the secret (never its value) and the host.
pub type Refusal = String;

/// A secret a trusted party granted to a stage, and the hosts it may be sent to.
#[derive(Debug, Clone)]
struct Binding {
    name: String,
    hosts: Vec<HostPattern>,
}

/// What one stage of one plugin may reach, and which secrets it may carry where.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// Hosts granted by the pipeline or the operator.
    hosts: Vec<HostPattern>,
    bindings: Vec<Binding>,
    /// Addresses of this process's own server, refused unless a grant names them exactly.
    own: Vec<SocketAddr>,
    /// What the plugin asked for in `describe()` and nobody granted, for the refusal text.
    declared_only: Vec<String>,
}

/// The trusted facts about a stage that a [`Grant`] is built from.
pub struct StageGrants<'a> {
    /// The stage's `allowed_hosts`.
    pub allowed_hosts: &'a [String],
    /// Secrets the stage's config references and its `secrets` list names.
    pub secrets: &'a [String],
    /// The config's `base_url` as the pipeline wrote it: a literal URL or a secret reference.
    pub base_url: Option<&'a str>,
    /// The `base_url` of the service the stage names, as the pipeline declared it.
    pub service_base_url: Option<&'a str>,
}

impl Grant {
    pub fn new(
        plugin: &str,
        declared: &[String],
        stage: &StageGrants<'_>,
        secrets: &Secrets,
        policy: &Policy,
        own: &[SocketAddr],
    ) -> Grant {
        let mut stage_hosts: Vec<HostPattern> = stage
            .allowed_hosts
            .iter()
            .filter_map(|h| HostPattern::parse(h))
            .collect();
        for base in [stage.base_url, stage.service_base_url]
            .into_iter()
            .flatten()
        {
            let url = match secret_token(base) {
                Some((name, len)) if len == base.len() => secrets.get(name).map(str::to_string),
                Some(_) => None,
                None => Some(base.to_string()),
            };
            stage_hosts.extend(url.as_deref().and_then(HostPattern::of_url));
        }
        // A granted secret that holds a URL is a base the operator chose: its exact host.
        for name in stage.secrets {
            if let Some(p) = secrets.get(name).and_then(HostPattern::of_url) {
                stage_hosts.push(p);
            }
        }
        let mut bindings: Vec<Binding> = stage
            .secrets
            .iter()
            .map(|name| Binding {
                name: name.clone(),
                hosts: stage_hosts.clone(),
            })
            .collect();
        let mut hosts = stage_hosts;
        if let Some(g) = policy.plugins.get(plugin) {
            let policy_hosts: Vec<HostPattern> = g
                .hosts
                .iter()
                .flat_map(|h| {
                    if h == super::policy::DECLARED {
                        return declared
                            .iter()
                            .filter_map(|d| HostPattern::parse(d))
                            .collect();
                    }
                    match secret_token(h) {
                        // The host of the URL the operator keeps in that secret, if set.
                        Some((name, _)) => secrets
                            .get(name)
                            .and_then(HostPattern::of_url)
                            .into_iter()
                            .collect(),
                        None => HostPattern::parse(h).into_iter().collect::<Vec<_>>(),
                    }
                })
                .collect();
            for name in &g.secrets {
                bindings.push(Binding {
                    name: name.clone(),
                    hosts: policy_hosts.clone(),
                });
            }
            hosts.extend(policy_hosts);
        }
        if let Some(approved) = policy.approved.get(plugin) {
            hosts.extend(approved.iter().filter_map(|h| HostPattern::parse(h)));
        }
        let declared_only = declared
            .iter()
            .filter(|d| HostPattern::parse(d).is_some_and(|d| !hosts.contains(&d)))
            .cloned()
            .collect();
        Grant {
            hosts,
            bindings,
            own: own.to_vec(),
            declared_only,
        }
    }

    /// Whether a request may go to `url`: a granted host, and not this server's own
    /// address unless a grant names it exactly. Checked for every redirect hop too.
    pub fn may_reach(&self, url: &reqwest::Url) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default();
        let granted = &self.hosts;
        if self.is_own(url) && !granted.iter().any(|p| p.is_exact() && p.matches_url(url)) {
            return Err(format!(
                "host {host}:{} is this fmhost server's own address; no plugin may call it unless a grant names it exactly",
                port.unwrap_or_default()
            ));
        }
        if granted.iter().any(|p| p.matches(host, port)) {
            return Ok(());
        }
        let shown: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        let asked = if self.declared_only.is_empty() {
            String::new()
        } else {
            format!(
                "; the plugin declares {} but declaring is not granting: the operator's policy or the stage's allowed_hosts must grant it",
                self.declared_only.join(", ")
            )
        };
        Err(format!(
            "host {host}{} is not granted (granted: {}){asked}; if it should be, add it to the stage's allowed_hosts (`host`, `*.domain`, or `host:port`; a host without a port matches every port) or name the declared service it belongs to in the stage's \"service\"",
            port.map(|p| format!(":{p}")).unwrap_or_default(),
            if shown.is_empty() {
                "none".to_string()
            } else {
                shown.join(", ")
            }
        ))
    }

    fn is_own(&self, url: &reqwest::Url) -> bool {
        let Some(port) = url.port_or_known_default() else {
            return false;
        };
        let host = url.host_str().unwrap_or_default();
        let ips: Vec<std::net::IpAddr> = match host.trim_matches(['[', ']']).parse() {
            Ok(ip) => vec![ip],
            Err(_) if host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost") => {
                vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()]
            }
            Err(_) => return false,
        };
        self.own.iter().any(|a| {
            a.port() == port
                && ips.iter().any(|ip| {
                    *ip == a.ip()
                        || a.ip().is_unspecified()
                        || (ip.is_loopback() && a.ip().is_loopback())
                })
        })
    }

    /// Whether `secret` may be sent to `url`'s host.
    fn may_carry(&self, secret: &str, url: &reqwest::Url) -> Result<(), Refusal> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default();
        let mut granted = false;
        for b in self.bindings.iter().filter(|b| b.name == secret) {
            granted = true;
            if b.hosts.iter().any(|h| h.matches(host, port)) {
                return Ok(());
            }
        }
        let at = format!(
            "{host}{}",
            port.map(|p| format!(":{p}")).unwrap_or_default()
        );
        if granted {
            Err(format!("secret {secret} is not bound to host {at}"))
        } else {
            Err(format!(
                "secret {secret} was not granted to this stage (name it in the stage's config as {{{{secrets.{secret}}}}} or in its \"secrets\" list)"
            ))
        }
    }
}

/// A plugin's request with its credentials substituted, and which headers carry them.
pub struct Prepared {
    pub url: String,
    pub headers: Vec<(String, String)>,
    /// Names of headers whose value came from a secret: dropped if a redirect leaves the host.
    pub credential_headers: Vec<String>,
}

/// Substitutes the credential slots of a plugin's request, checking each against `grant`.
pub fn prepare(
    grant: &Grant,
    url: &str,
    headers: &[(String, String)],
    secrets: &Secrets,
) -> Result<Prepared, (bool, Refusal)> {
    // The URL's base: only a token that opens it.
    let full_url = match secret_token(url) {
        Some((name, len)) => {
            if !grant.bindings.iter().any(|b| b.name == name) {
                return Err((
                    true,
                    format!(
                        "url: secret {name} was not granted to this stage (name it in the stage's config or its \"secrets\" list)"
                    ),
                ));
            }
            let value = secrets
                .get(name)
                .ok_or_else(|| (false, format!("url: secret {name} is not set")))?;
            format!("{value}{}", &url[len..])
        }
        None => url.to_string(),
    };
    let parsed = reqwest::Url::parse(&full_url)
        .map_err(|e| (false, format!("url {}: {e}", secrets.redact(&full_url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err((
            true,
            format!("url scheme {} is not http or https", parsed.scheme()),
        ));
    }
    grant.may_reach(&parsed).map_err(|e| (true, e))?;
    // The base's own secret must be bound to where the request ends up, too.
    if let Some((name, _)) = secret_token(url) {
        grant
            .may_carry(name, &parsed)
            .map_err(|e| (true, format!("url: {e}")))?;
    }
    let mut out = Vec::with_capacity(headers.len());
    let mut credential_headers = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("host") {
            return Err((true, "header Host: a plugin may not choose the Host header; the URL decides where a request goes".into()));
        }
        match header_secret(value).filter(|_| is_credential_header(name)) {
            Some((prefix, secret)) => {
                grant
                    .may_carry(secret, &parsed)
                    .map_err(|e| (true, format!("header {name}: {e}")))?;
                let v = secrets
                    .get(secret)
                    .ok_or_else(|| (false, format!("header {name}: secret {secret} is not set")))?;
                out.push((name.clone(), format!("{prefix}{v}")));
                credential_headers.push(name.to_ascii_lowercase());
            }
            None => out.push((name.clone(), value.clone())),
        }
    }
    Ok(Prepared {
        url: full_url,
        headers: out,
        credential_headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(
        secrets: &Secrets,
        stage_secrets: &[&str],
        hosts: &[&str],
        base: Option<&str>,
    ) -> Grant {
        let secrets_list: Vec<String> = stage_secrets.iter().map(|s| s.to_string()).collect();
        let allowed: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
        Grant::new(
            "p",
            &["declared.example".into()],
            &StageGrants {
                allowed_hosts: &allowed,
                secrets: &secrets_list,
                base_url: base,
                service_base_url: None,
            },
            secrets,
            &Policy::default(),
            &["127.0.0.1:8080".parse().unwrap()],
        )
    }

    #[test]
    fn tokens_are_a_fixed_pattern() {
        assert_eq!(secret_token("{{secrets.A_B}}/x"), Some(("A_B", 15)));
        assert_eq!(secret_token("{{ secrets.A }}"), Some(("A", 15)));
        assert_eq!(secret_token("{{secrets.A | upper}}"), None);
        assert_eq!(secret_token("{{secrets.}}"), None);
        assert_eq!(
            header_secret("Bearer {{secrets.K}}"),
            Some(("Bearer ", "K"))
        );
        assert_eq!(header_secret("{{secrets.K}}"), Some(("", "K")));
        assert_eq!(header_secret("x {{secrets.K}} y"), None);
        assert_eq!(header_secret("a b {{secrets.K}}"), None);
        assert_eq!(header_secret("{{secrets.K | default('x')}}"), None);
    }

    #[test]
    fn credentials_go_only_where_they_are_bound() {
        let s = Secrets::from_pairs([
            ("BASE", "http://127.0.0.1:4010"),
            ("KEY", "k-123456"),
            ("OTHER", "o-999999"),
        ]);
        let g = grant(&s, &["BASE", "KEY"], &["api.example:443"], None);
        let h = |v: &str| vec![("authorization".to_string(), v.to_string())];
        let ok = prepare(&g, "{{secrets.BASE}}/v1", &h("Bearer {{secrets.KEY}}"), &s).unwrap();
        assert_eq!(ok.url, "http://127.0.0.1:4010/v1");
        assert_eq!(ok.headers[0].1, "Bearer k-123456");
        assert!(prepare(&g, "https://api.example/x", &h("{{secrets.KEY}}"), &s).is_ok());
        let err = |url: &str, v: &str| prepare(&g, url, &h(v), &s).err().unwrap().1;
        assert!(err("https://api.example/x", "{{secrets.OTHER}}").contains("not granted"));
        assert!(err("https://declared.example/", "x").contains("declaring is not granting"));
        let host = vec![("Host".to_string(), "evil.example".to_string())];
        assert!(
            prepare(&g, "https://api.example/", &host, &s)
                .err()
                .unwrap()
                .1
                .contains("Host header")
        );
        assert!(err("http://127.0.0.1:8080/v1/runs", "x").contains("own address"));
        // `{{` outside a slot is literal text, never a secret.
        let lit = prepare(
            &g,
            "https://api.example/c/{{secrets.KEY}}",
            &h("a b {{secrets.KEY}}"),
            &s,
        )
        .unwrap();
        assert!(!lit.url.contains("k-123456") && lit.headers[0].1 == "a b {{secrets.KEY}}");
        let id = vec![("x-customer-id".to_string(), "{{secrets.KEY}}".to_string())];
        assert_eq!(
            prepare(&g, "https://api.example/", &id, &s)
                .unwrap()
                .headers[0]
                .1,
            "{{secrets.KEY}}"
        );
        assert!(err("{{secrets.OTHER}}/x", "x").contains("not granted"));
        assert!(
            prepare(
                &g,
                "{{secrets.UNSET | default('http://evil')}}/x",
                &h("x"),
                &s
            )
            .is_err()
        );
    }
}
