//! Who may use `fmhost serve`'s API: bearer tokens with scopes, and requests that come
//! to this server by a name it answers to (`Host`) and not from a foreign web page
//! (`Origin`). Webhook routes keep their signatures; `/healthz` and `/readyz` stay open.
//!
//! The web console signs in as Jupyter does: the server prints a URL carrying a one-time
//! code ([`Sessions::issue_code`]); the page trades it (or an API token typed into its
//! form) for a session in an HttpOnly, SameSite=Strict cookie with the token's scope.
//! A request that authenticates by that cookie and changes anything must also carry the
//! session's CSRF token in `X-CSRF-Token`, which only the server's own page can read.
//!
//! Tokens come from `--api-token-file FILE`, else `FMHOST_API_TOKEN` (an admin token),
//! else `STATE/api-tokens`, which the first start writes (mode 0600) with one admin and
//! one read token and names on stdout, as Jupyter does. A token file holds one token per
//! line, `SCOPE TOKEN` (`read`, `run` or `admin`; a bare token is admin); `#` comments.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// What a token allows; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Runs, outputs, the dead-letter queue and the plugin list.
    Read,
    /// Also start runs.
    Run,
    /// Also replay, retry and drop dead letters, swap and roll back plugins.
    Admin,
}

impl Scope {
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "run" => Some(Scope::Run),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Run => "run",
            Scope::Admin => "admin",
        }
    }
}

/// The accepted tokens, kept only as SHA-256 digests.
pub struct Tokens {
    entries: Vec<(Scope, [u8; 32])>,
    /// Where they came from, for the start-up message.
    pub source: String,
}

/// Where a first start writes its tokens.
pub fn default_token_file(state: &Path) -> PathBuf {
    state.join("api-tokens")
}

/// Minimum length of a configured token, so a guessable one is refused at start.
const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    /// `--api-token-file`, else `FMHOST_API_TOKEN`, else the state directory's file,
    /// written now if it does not exist. `created` says whether it was.
    pub fn load(
        file: Option<&Path>,
        env_token: Option<String>,
        state: &Path,
    ) -> Result<(Tokens, bool), String> {
        if let Some(path) = file {
            return Ok((Self::read(path)?, false));
        }
        if let Some(t) = env_token.filter(|t| !t.trim().is_empty()) {
            let t = t.trim();
            check_len(t, "FMHOST_API_TOKEN")?;
            return Ok((
                Tokens {
                    entries: vec![(Scope::Admin, digest(t))],
                    source: "FMHOST_API_TOKEN".into(),
                },
                false,
            ));
        }
        let path = default_token_file(state);
        if path.exists() {
            return Ok((Self::read(&path)?, false));
        }
        let text = format!(
            "# fmhost serve API tokens: SCOPE TOKEN (read, run or admin)\nadmin {}\nread {}\n",
            random_token(),
            random_token()
        );
        write_private(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((Self::read(&path)?, true))
    }

    fn read(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("api token file {}: {e}", path.display()))?;
        let entries =
            parse(&text).map_err(|e| format!("api token file {}: {e}", path.display()))?;
        Ok(Tokens {
            entries,
            source: path.display().to_string(),
        })
    }

    /// The scope of a presented token. Every entry is compared, in constant time.
    pub fn scope_of(&self, presented: &str) -> Option<Scope> {
        let d = digest(presented);
        let mut best = None;
        for (scope, want) in &self.entries {
            let diff = want
                .iter()
                .zip(d.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                best = best.max(Some(*scope));
            }
        }
        best
    }
}

fn check_len(token: &str, what: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "{what}: a token must be at least {MIN_TOKEN_LEN} characters"
        ));
    }
    Ok(())
}

fn parse(text: &str) -> Result<Vec<(Scope, [u8; 32])>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (scope, token) = match line.split_once([' ', ':', '\t']) {
            Some((s, t)) if Scope::parse(s.trim()).is_some() => {
                (Scope::parse(s.trim()).unwrap_or(Scope::Read), t.trim())
            }
            Some((s, _)) => {
                return Err(format!(
                    "line {}: unknown scope {s:?} (read, run or admin)",
                    n + 1
                ));
            }
            None => (Scope::Admin, line),
        };
        check_len(token, &format!("line {}", n + 1))?;
        out.push((scope, digest(token)));
    }
    if out.is_empty() {
        return Err("holds no token".into());
    }
    Ok(out)
}

/// The admin token of a token file, for the CLI's `--server` commands.
pub fn admin_token_from_file(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| match l.split_once([' ', ':', '\t']) {
            Some(("admin", t)) => Some(t.trim().to_string()),
            None => Some(l.to_string()),
            _ => None,
        })
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    hex::encode(bytes)
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The console's cookie.
pub const SESSION_COOKIE: &str = "fmhost_session";
/// How long a console session or a sign-in code lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
const CODE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Sessions and codes held at once; the oldest go first.
const MAX_SESSIONS: usize = 1024;

/// A signed-in console.
#[derive(Clone)]
pub struct Session {
    pub scope: Scope,
    /// Sent back by the page in `X-CSRF-Token` with every change it asks for.
    pub csrf: String,
    expires: Instant,
}

/// Console sessions and one-time sign-in codes, kept as SHA-256 digests, in memory:
/// a restart signs everyone out.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    codes: Mutex<HashMap<[u8; 32], (Scope, Instant)>>,
}

fn prune<V>(map: &mut HashMap<[u8; 32], V>, expires: impl Fn(&V) -> Instant) {
    let now = Instant::now();
    map.retain(|_, v| expires(v) > now);
    while map.len() >= MAX_SESSIONS {
        let Some(oldest) = map.iter().min_by_key(|(_, v)| expires(v)).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&oldest);
    }
}

impl Sessions {
    /// A code that signs one browser in with `scope`, once.
    pub fn issue_code(&self, scope: Scope) -> String {
        let code = random_token();
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        prune(&mut codes, |v| v.1);
        codes.insert(digest(&code), (scope, Instant::now() + CODE_TTL));
        code
    }

    /// Spends a code: the scope it grants, if it is valid and unused.
    pub fn redeem(&self, code: &str) -> Option<Scope> {
        let mut codes = self.codes.lock().unwrap_or_else(|e| e.into_inner());
        codes
            .remove(&digest(code))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(scope, _)| scope)
    }

    /// A new session; returns its cookie value.
    pub fn open(&self, scope: Scope) -> String {
        let id = random_token();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        prune(&mut sessions, |s| s.expires);
        sessions.insert(
            digest(&id),
            Session {
                scope,
                csrf: random_token(),
                expires: Instant::now() + SESSION_TTL,
            },
        );
        id
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&digest(id))
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    pub fn close(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(&digest(id));
    }
}

/// The session cookie a request carries, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE).then_some(v.trim())
        })
}

/// Equal in constant time (for equal lengths).
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Everything the guard needs: the tokens, the names this server answers to.
pub struct Guard {
    pub tokens: Tokens,
    /// The web console's sessions and sign-in codes.
    pub sessions: Sessions,
    /// The address it listens on.
    pub listen: SocketAddr,
    /// Extra host names it answers to (`--allowed-host`), lowercase, with or without port.
    pub names: Vec<String>,
    /// Whether `/metrics` needs a read token.
    pub metrics_need_token: bool,
}

impl Guard {
    /// Whether a `Host` (or an `Origin`'s authority) names this server: its listen
    /// address, any IP literal on its port (DNS rebinding needs a name), `localhost`
    /// on its port, or a configured name.
    fn answers_to(&self, authority: &str) -> bool {
        let a = authority.trim().to_ascii_lowercase();
        let (host, port) = match a.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(p) => (h.to_string(), Some(p)),
                Err(_) => (a.clone(), None),
            },
            _ => (a.clone(), None),
        };
        if self.names.iter().any(|n| *n == a || *n == host) {
            return true;
        }
        let ours = port == Some(self.listen.port()) || (port.is_none() && self.listen.port() == 80);
        let ip_literal = host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok();
        ours && (ip_literal || host == "localhost")
    }

    /// The scope a request needs, or `None` when it is open.
    fn needs(&self, method: &Method, path: &str) -> Option<Scope> {
        if path == "/metrics" {
            return self.metrics_need_token.then_some(Scope::Read);
        }
        let rest = path.strip_prefix("/v1/")?;
        let reading = matches!(*method, Method::GET | Method::HEAD);
        Some(if reading {
            Scope::Read
        } else if rest.starts_with("pipelines/") && rest.ends_with("/runs") {
            Scope::Run
        } else {
            Scope::Admin
        })
    }
}

fn refuse(status: StatusCode, title: &str, detail: String) -> Response {
    let mut r = super::problem(status, title, detail);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"fmhost\""),
        );
    }
    r
}

/// The middleware in front of every route.
pub async fn guard(State(g): State<std::sync::Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers: &HeaderMap = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    match host {
        Some(h) if g.answers_to(h) => {}
        Some(h) => {
            return refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown host",
                format!(
                    "this server does not answer to Host {h:?}; start it with --allowed-host NAME if it should"
                ),
            );
        }
        None => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "no host",
                "the request has no Host header".into(),
            );
        }
    }
    // A browser names the page that sent a request; only this server's own pages may.
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or("");
        if !g.answers_to(authority) {
            return refuse(
                StatusCode::FORBIDDEN,
                "foreign origin",
                format!("requests from pages at {origin:?} are refused"),
            );
        }
    }
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site")
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "foreign origin",
            "cross-site requests are refused".into(),
        );
    }
    if let Some(need) = g.needs(req.method(), req.uri().path()) {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        // Without a bearer token, the console's session cookie; a change it asks for
        // must carry the session's CSRF token, which a foreign page cannot read.
        let from_session = match (presented, session_cookie(headers)) {
            (None, Some(id)) => match g.sessions.get(id) {
                Some(s) => {
                    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
                    let csrf = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
                    if !reading && !csrf.is_some_and(|c| same(c, &s.csrf)) {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            "csrf token missing",
                            format!(
                                "{} {} from a console session needs its X-CSRF-Token",
                                req.method(),
                                req.uri().path()
                            ),
                        );
                    }
                    Some(s.scope)
                }
                None => None,
            },
            _ => None,
        };
        match from_session.or_else(|| presented.and_then(|t| g.tokens.scope_of(t))) {
            None => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "authentication required",
                    format!(
                        "{} needs a bearer token (Authorization: Bearer TOKEN); the tokens are in {}",
                        req.uri().path(),
                        g.tokens.source
                    ),
                );
            }
            Some(has) if has < need => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "insufficient scope",
                    format!(
                        "{} {} needs a token with scope {}; this one has {}",
                        req.method(),
                        req.uri().path(),
                        need.as_str(),
                        has.as_str()
                    ),
                );
            }
            Some(_) => {}
        }
    }
    next.run(req).await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_scopes_and_names() {
        let entries = parse(
            "# c\nadmin aaaaaaaaaaaaaaaaaaaa\nread: rrrrrrrrrrrrrrrrrrrr\nbbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        let t = Tokens {
            entries,
            source: "t".into(),
        };
        assert_eq!(t.scope_of("aaaaaaaaaaaaaaaaaaaa"), Some(Scope::Admin));
        assert_eq!(t.scope_of("rrrrrrrrrrrrrrrrrrrr"), Some(Scope::Read));
        assert_eq!(t.scope_of("bbbbbbbbbbbbbbbbbbbb"), Some(Scope::Admin));
        assert_eq!(t.scope_of("nope"), None);
        assert!(parse("admin short").is_err());
        assert!(parse("root xxxxxxxxxxxxxxxxxxxxxxx").is_err());
        let g = Guard {
            tokens: t,
            sessions: Sessions::default(),
            listen: "127.0.0.1:8080".parse().unwrap(),
            names: vec!["hooks.example.com".into()],
            metrics_need_token: true,
        };
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "hooks.example.com",
            "HOOKS.example.com:443",
        ] {
            assert!(g.answers_to(ok), "{ok}");
        }
        for no in [
            "evil.example:8080",
            "127.0.0.1:9090",
            "localhost.evil.example:8080",
            "rebind.example",
        ] {
            assert!(!g.answers_to(no), "{no}");
        }
        assert_eq!(g.needs(&Method::GET, "/v1/runs"), Some(Scope::Read));
        assert_eq!(
            g.needs(&Method::POST, "/v1/pipelines/p/runs"),
            Some(Scope::Run)
        );
        assert_eq!(g.needs(&Method::PUT, "/v1/plugins/x"), Some(Scope::Admin));
        assert_eq!(
            g.needs(&Method::POST, "/v1/runs/r/replay"),
            Some(Scope::Admin)
        );
        assert_eq!(g.needs(&Method::POST, "/hooks/stripe"), None);
        assert_eq!(g.needs(&Method::GET, "/healthz"), None);
    }
}
