//! A service's credentials, declared once in `services.NAME.auth` and attached by the
//! host to every call that goes to the service's `base_url` origin, from `http-request`
//! and from plugins alike, and to no other origin. Plugins never see them.
//!
//! OAuth2 tokens are fetched by the host, kept per service until shortly before they
//! expire, fetched once for all concurrent callers (single flight), and fetched again
//! once when the service answers 401. Tokens are never journaled, logged or handed to a
//! plugin; a response that echoes one has it masked.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{ErrorKind, StageError};
use crate::secrets::Secrets;

/// `services.NAME.auth`, as written; strings may hold `{{secrets.NAME}}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    /// `Authorization: Bearer TOKEN`.
    Bearer { token: String },
    /// `Authorization: Basic base64(username:password)`.
    Basic { username: String, password: String },
    /// A key in a header (`header: "X-Api-Key"`) or a query parameter (`query: "key"`).
    ApiKey {
        #[serde(default)]
        header: Option<String>,
        #[serde(default)]
        query: Option<String>,
        value: String,
    },
    /// OAuth2 client credentials grant (RFC 6749 4.4).
    #[serde(rename = "oauth2_client_credentials")]
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        audience: Option<String>,
        /// How the client authenticates to the token endpoint (default `post`).
        #[serde(default)]
        client_auth: ClientAuth,
    },
    /// OAuth2 refresh token grant (RFC 6749 6), from a stored refresh token.
    #[serde(rename = "oauth2_refresh_token")]
    RefreshToken {
        token_url: String,
        client_id: String,
        #[serde(default)]
        client_secret: Option<String>,
        refresh_token: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        client_auth: ClientAuth,
    },
}

/// How an OAuth2 client sends its credentials to the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    #[default]
    #[serde(rename = "post", alias = "client_secret_post")]
    Post,
    /// `Authorization: Basic` with the form-encoded id and secret.
    #[serde(rename = "basic", alias = "client_secret_basic")]
    Basic,
}

/// Longest token endpoint answer read.
const MAX_TOKEN_ANSWER: usize = 1 << 20;

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl AuthSpec {
    /// Every string setting, with its field name, for checking and `secrets check`.
    pub fn fields(&self) -> Vec<(&'static str, &str)> {
        fn opt<'a>(name: &'static str, v: &'a Option<String>) -> Option<(&'static str, &'a str)> {
            v.as_deref().map(|v| (name, v))
        }
        match self {
            AuthSpec::Bearer { token } => vec![("token", token)],
            AuthSpec::Basic { username, password } => {
                vec![("username", username), ("password", password)]
            }
            AuthSpec::ApiKey {
                header,
                query,
                value,
            } => [
                opt("header", header),
                opt("query", query),
                Some(("value", value)),
            ]
            .into_iter()
            .flatten()
            .collect(),
            AuthSpec::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
                audience,
                ..
            } => [
                Some(("token_url", token_url.as_str())),
                Some(("client_id", client_id)),
                Some(("client_secret", client_secret)),
                opt("scope", scope),
                opt("audience", audience),
            ]
            .into_iter()
            .flatten()
            .collect(),
            AuthSpec::RefreshToken {
                token_url,
                client_id,
                client_secret,
                refresh_token,
                scope,
                ..
            } => [
                Some(("token_url", token_url.as_str())),
                Some(("client_id", client_id)),
                opt("client_secret", client_secret),
                Some(("refresh_token", refresh_token)),
                opt("scope", scope),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }
    }

    /// Problems with the settings, as `(field, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let AuthSpec::ApiKey { header, query, .. } = self
            && header.is_some() == query.is_some()
        {
            out.push((
                "auth".into(),
                "an api_key goes in a header or a query parameter: give one of `header` and `query`"
                    .into(),
            ));
        }
        for (field, value) in self.fields() {
            if let Err(e) = crate::secrets::secret_refs(value) {
                out.push((format!("auth.{field}"), e));
            }
        }
        out
    }

    fn is_oauth2(&self) -> bool {
        matches!(
            self,
            AuthSpec::ClientCredentials { .. } | AuthSpec::RefreshToken { .. }
        )
    }
}

/// A token the host holds for a service.
#[derive(Clone)]
struct Token {
    value: String,
    /// When to fetch the next one: a little before it expires.
    renew_at: Instant,
    /// Counts fetches, so a 401 renews only the token it was given.
    generation: u64,
}

/// The live credentials of one service.
pub struct Credentials {
    pub spec: AuthSpec,
    token: Mutex<Option<Token>>,
    /// A refresh token the server rotated (it replaces the stored one).
    rotated_refresh: Mutex<Option<String>>,
    /// Held while fetching: one fetch at a time, whoever asks.
    fetching: tokio::sync::Mutex<()>,
    /// Tokens fetched so far (for logs and tests).
    pub fetches: std::sync::atomic::AtomicU64,
}

/// What an attempt carries: the header or query parameter, and what must be masked if
/// the service echoes it.
pub struct Applied {
    pub header: Option<(String, String)>,
    pub query: Option<(String, String)>,
    /// The OAuth2 token's generation, when one was used (a 401 renews it once).
    pub generation: Option<u64>,
    /// An OAuth2 token: not a configured secret, so masked here when echoed.
    pub token: Option<String>,
}

fn auth_error(service: &str, message: String) -> StageError {
    StageError::new(
        ErrorKind::Validation,
        format!("service {service}: auth: {message}"),
    )
}

impl Credentials {
    pub fn new(spec: AuthSpec) -> Credentials {
        Credentials {
            spec,
            token: Mutex::new(None),
            rotated_refresh: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            fetches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn is_oauth2(&self) -> bool {
        self.spec.is_oauth2()
    }

    /// The credential for one attempt. `stale` is the generation of a token the service
    /// just refused: a newer one is fetched unless someone already did.
    pub async fn apply(
        &self,
        service: &str,
        client: &reqwest::Client,
        secrets: &Secrets,
        stale: Option<u64>,
    ) -> Result<Applied, StageError> {
        let expand = |v: &str| secrets.expand(v).map_err(|e| auth_error(service, e));
        let none = Applied {
            header: None,
            query: None,
            generation: None,
            token: None,
        };
        Ok(match &self.spec {
            AuthSpec::Bearer { token } => Applied {
                header: Some(("authorization".into(), format!("Bearer {}", expand(token)?))),
                ..none
            },
            AuthSpec::Basic { username, password } => {
                let pair = format!("{}:{}", expand(username)?, expand(password)?);
                Applied {
                    header: Some((
                        "authorization".into(),
                        format!(
                            "Basic {}",
                            base64::engine::general_purpose::STANDARD.encode(pair)
                        ),
                    )),
                    ..none
                }
            }
            AuthSpec::ApiKey {
                header,
                query,
                value,
            } => {
                let value = expand(value)?;
                match (header, query) {
                    (Some(h), _) => Applied {
                        header: Some((h.to_ascii_lowercase(), value)),
                        ..none
                    },
                    (None, Some(q)) => Applied {
                        query: Some((q.clone(), value)),
                        ..none
                    },
                    (None, None) => none,
                }
            }
            AuthSpec::ClientCredentials { .. } | AuthSpec::RefreshToken { .. } => {
                let token = self.token(service, client, secrets, stale).await?;
                Applied {
                    header: Some(("authorization".into(), format!("Bearer {}", token.value))),
                    generation: Some(token.generation),
                    token: Some(token.value),
                    query: None,
                }
            }
        })
    }

    fn current(&self, stale: Option<u64>) -> Option<Token> {
        let held = self.token.lock().expect("token lock").clone()?;
        let fresh = Instant::now() < held.renew_at;
        let newer = stale.is_none_or(|g| held.generation > g);
        (fresh && newer).then_some(held)
    }

    async fn token(
        &self,
        service: &str,
        client: &reqwest::Client,
        secrets: &Secrets,
        stale: Option<u64>,
    ) -> Result<Token, StageError> {
        if let Some(t) = self.current(stale) {
            return Ok(t);
        }
        let _one = self.fetching.lock().await;
        // Whoever held the lock before may have fetched what we need.
        if let Some(t) = self.current(stale) {
            return Ok(t);
        }
        let (value, expires_in, refresh) = self.fetch(service, client, secrets).await?;
        if let Some(r) = refresh {
            *self.rotated_refresh.lock().expect("refresh lock") = Some(r);
        }
        let generation = self
            .fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        // Renewed a tenth of its life early, at most 30 s: never used at its last moment.
        let margin = (expires_in / 10).min(Duration::from_secs(30));
        let token = Token {
            value,
            renew_at: Instant::now() + expires_in.saturating_sub(margin),
            generation,
        };
        *self.token.lock().expect("token lock") = Some(token.clone());
        tracing::info!(target: "fmhost::http", service, generation, expires_in_s = expires_in.as_secs_f64(), "service {service}: fetched an access token (expires in {:.0} s)", expires_in.as_secs_f64());
        Ok(token)
    }

    async fn fetch(
        &self,
        service: &str,
        client: &reqwest::Client,
        secrets: &Secrets,
    ) -> Result<(String, Duration, Option<String>), StageError> {
        let expand = |v: &str| secrets.expand(v).map_err(|e| auth_error(service, e));
        let (token_url, mut form, client_auth) = match &self.spec {
            AuthSpec::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
                audience,
                client_auth,
            } => {
                let mut form = vec![
                    ("grant_type", "client_credentials".to_string()),
                    ("client_id", expand(client_id)?),
                    ("client_secret", expand(client_secret)?),
                ];
                if let Some(s) = scope {
                    form.push(("scope", expand(s)?));
                }
                if let Some(a) = audience {
                    form.push(("audience", expand(a)?));
                }
                (expand(token_url)?, form, *client_auth)
            }
            AuthSpec::RefreshToken {
                token_url,
                client_id,
                client_secret,
                refresh_token,
                scope,
                client_auth,
            } => {
                let rotated = self.rotated_refresh.lock().expect("refresh lock").clone();
                let refresh = match rotated {
                    Some(r) => r,
                    None => expand(refresh_token)?,
                };
                let mut form = vec![
                    ("grant_type", "refresh_token".to_string()),
                    ("refresh_token", refresh),
                    ("client_id", expand(client_id)?),
                ];
                if let Some(s) = client_secret {
                    form.push(("client_secret", expand(s)?));
                }
                if let Some(s) = scope {
                    form.push(("scope", expand(s)?));
                }
                (expand(token_url)?, form, *client_auth)
            }
            _ => return Err(StageError::internal("not an OAuth2 service")),
        };
        // With `basic`, the id and secret go in the Authorization header, not the form.
        let basic = match client_auth {
            ClientAuth::Post => None,
            ClientAuth::Basic => {
                let take = |form: &mut Vec<(&str, String)>, name: &str| {
                    form.iter()
                        .position(|(k, _)| *k == name)
                        .map(|i| form.remove(i).1)
                        .unwrap_or_default()
                };
                let id = take(&mut form, "client_id");
                let secret = take(&mut form, "client_secret");
                let pair = format!("{}:{}", form_encode(&id), form_encode(&secret));
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
        };
        let shown = secrets.redact(&token_url).into_owned();
        let failed = |kind: ErrorKind, why: String| {
            StageError::new(
                kind,
                format!(
                    "service {service}: token request to {shown} failed: {}",
                    secrets.redact(&why)
                ),
            )
        };
        let mut request = client.post(&token_url).header("accept", "application/json");
        if let Some(b) = basic {
            request = request.header("authorization", b);
        }
        let resp = request
            .form(&form)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Connect
                };
                failed(kind, e.to_string())
            })?;
        let status = resp.status().as_u16();
        // A token answer is small; one that is not is read no further.
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| failed(ErrorKind::Connect, e.to_string()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_TOKEN_ANSWER {
                return Err(failed(
                    ErrorKind::Parse,
                    format!("the answer is longer than {MAX_TOKEN_ANSWER} bytes"),
                ));
            }
        }
        if !(200..300).contains(&status) {
            let kind = match status {
                429 => ErrorKind::RateLimited,
                500.. => ErrorKind::Http5xx,
                _ => ErrorKind::Http4xx,
            };
            let mut e = failed(kind, format!("http {status}: {}", super::snippet(&body)));
            e.status = Some(status);
            return Err(e);
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: String,
            #[serde(default)]
            expires_in: Option<f64>,
            #[serde(default)]
            refresh_token: Option<String>,
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            failed(
                ErrorKind::Parse,
                format!("the answer has no access_token ({e})"),
            )
        })?;
        let expires_in = answer
            .expires_in
            .filter(|s| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(86_400.0 * 365.0)))
            .unwrap_or(Duration::from_secs(3600));
        Ok((answer.access_token, expires_in, answer.refresh_token))
    }
}
