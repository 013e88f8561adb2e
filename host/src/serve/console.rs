//! The web console at `/`: a page and a script, embedded in the binary, that read and
//! act through the same `/v1` API as every other client (runs, a run's DAG and timeline,
//! plugins, the dead-letter queue, services, triggers; live updates from `/v1/events`).
//!
//! Signing in ([`auth::Sessions`]): `/?code=CODE` spends the one-time code `fmhost serve`
//! printed, and the sign-in form trades an API token, for a session cookie (HttpOnly,
//! SameSite=Strict) with that code's or token's scope. The page gets the session's CSRF
//! token in a `<meta>` tag and sends it with every change; no token is ever stored where
//! script, let alone another origin, can read it. Strict headers (CSP without inline
//! script, no framing, no referrer beyond this origin) keep the page itself from being turned against it.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::auth::{self, Guard, SESSION_COOKIE};

const INDEX: &str = include_str!("console/index.html");
const SIGN_IN: &str = include_str!("console/signin.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

pub fn routes(guard: Arc<Guard>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/console/login", post(login))
        .route("/console/logout", post(logout))
        .route("/console/app.js", get(|| asset("text/javascript", APP_JS)))
        .route("/console/app.css", get(|| asset("text/css", APP_CSS)))
        .with_state(guard)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response();
    harden(&mut r);
    r
}

/// Headers every console response carries.
fn harden(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

fn page(status: StatusCode, html: String) -> Response {
    let mut r = (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response();
    harden(&mut r);
    r
}

fn sign_in_page(status: StatusCode, message: &str) -> Response {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    page(status, SIGN_IN.replace("{{message}}", &message))
}

/// A redirect to the console that sets (or clears) the session cookie.
fn to_console(cookie: String) -> Response {
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    harden(&mut r);
    r
}

fn session_cookie(id: &str) -> String {
    format!("{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200")
}

async fn index(
    State(g): State<Arc<Guard>>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(code) = q.get("code") {
        return match g.sessions.redeem(code) {
            Some(scope) => to_console(session_cookie(&g.sessions.open(scope))),
            None => sign_in_page(
                StatusCode::UNAUTHORIZED,
                "That sign-in link was used already or has expired. Sign in with an API token.",
            ),
        };
    }
    match auth::session_cookie(&headers).and_then(|id| g.sessions.get(id)) {
        Some(s) => page(
            StatusCode::OK,
            INDEX
                .replace("{{csrf}}", &s.csrf)
                .replace("{{scope}}", s.scope.as_str()),
        ),
        None => sign_in_page(StatusCode::OK, ""),
    }
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

async fn login(State(g): State<Arc<Guard>>, Form(f): Form<Login>) -> Response {
    match g.tokens.scope_of(f.token.trim()) {
        Some(scope) => to_console(session_cookie(&g.sessions.open(scope))),
        None => sign_in_page(
            StatusCode::UNAUTHORIZED,
            &format!(
                "That is not an API token of this server (see {}).",
                g.tokens.source
            ),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Logout {
    csrf: String,
}

async fn logout(
    State(g): State<Arc<Guard>>,
    headers: HeaderMap,
    Form(f): Form<Logout>,
) -> Response {
    if let Some(id) = auth::session_cookie(&headers)
        && g.sessions.get(id).is_some_and(|s| s.csrf == f.csrf)
    {
        g.sessions.close(id);
    }
    to_console(format!(
        "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
    ))
}
