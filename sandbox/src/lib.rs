//! A sandbox of the vendor APIs in the seed's customer-360 example: Salesforce, Stripe,
//! Intercom, an internal usage API, a config API and an OpenAI-compatible LLM, on one
//! loopback port, with realistic payloads and the seed's latencies (200/180/150/80 ms).
//!
//! Each vendor checks its bearer token ([`TOKENS`]), so a demo run proves that secrets
//! reach the upstream. `POST /_sandbox/intercom-version` with `{"version": "2.11"}`
//! switches Intercom to a newer response shape with renamed fields, as vendors do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The bearer token each fake vendor accepts, by secret name.
pub const TOKENS: &[(&str, &str)] = &[
    ("CONFIG_TOKEN", "sandbox-config-token"),
    ("SALESFORCE_TOKEN", "sandbox-salesforce-token"),
    ("STRIPE_SECRET_KEY", "sk_test_sandbox_51H8"),
    ("INTERCOM_TOKEN", "sandbox-intercom-token"),
    ("INTERNAL_TOKEN", "sandbox-internal-token"),
    ("OPENAI_API_KEY", "sk-sandbox-openai"),
];

/// The customer the sandbox knows.
pub const CUSTOMER_ID: &str = "cust_abc123def456gh";

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Multiplies every latency; 0 serves at once.
    pub latency_scale: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { latency_scale: 1.0 }
    }
}

struct Inner {
    options: Options,
    intercom_version: Mutex<String>,
    hits: Mutex<HashMap<&'static str, u64>>,
    requests: AtomicU64,
}

/// A running sandbox; it stops with the runtime that started it.
#[derive(Clone)]
pub struct Sandbox {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Sandbox {
    pub async fn start(options: Options) -> std::io::Result<Sandbox> {
        Sandbox::start_on("127.0.0.1:0", options).await
    }

    pub async fn start_on(addr: &str, options: Options) -> std::io::Result<Sandbox> {
        let inner = Arc::new(Inner {
            options,
            intercom_version: Mutex::new("2.10".into()),
            hits: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/integrations/customer-360", get(config_api))
            .route(
                "/services/data/{version}/sobjects/Account/{id}",
                get(salesforce),
            )
            .route("/v1/customers/{id}", get(stripe))
            .route("/contacts/{id}", get(intercom))
            .route("/customers/{id}/usage", get(internal))
            .route("/v1/chat/completions", post(llm))
            .route("/_sandbox/intercom-version", post(set_intercom_version))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sandbox { addr, inner })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The secrets a pipeline needs to run against this sandbox.
    pub fn secrets(&self) -> Value {
        secrets_for(&self.url())
    }

    /// The seed's sample input, pointed at this sandbox.
    pub fn input(&self) -> Value {
        input_for(&self.url())
    }

    /// Requests served per vendor (`salesforce`, `stripe`, `intercom`, `internal`, `config`, `llm`).
    pub fn hits(&self, vendor: &str) -> u64 {
        self.inner
            .hits
            .lock()
            .unwrap()
            .get(vendor)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    pub fn set_intercom_version(&self, version: &str) {
        *self.inner.intercom_version.lock().unwrap() = version.to_string();
    }
}

/// The secrets a pipeline needs to run against a sandbox at `url`.
pub fn secrets_for(url: &str) -> Value {
    let mut s: serde_json::Map<String, Value> = TOKENS
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    for key in ["SALESFORCE_URL", "STRIPE_URL", "INTERCOM_URL"] {
        s.insert(key.into(), json!(url));
    }
    s.insert("OPENAI_BASE_URL".into(), json!(format!("{url}/v1")));
    Value::Object(s)
}

/// The seed's sample input, pointed at a sandbox at `url`.
pub fn input_for(url: &str) -> Value {
    json!({"customer_id": CUSTOMER_ID, "include_history": true, "enrichment_level": "full", "config_api": url, "internal_api": url})
}

type Reply = Result<Json<Value>, Response>;

/// Latency, hit counting and the bearer check every vendor shares.
async fn serve(
    inner: &Inner,
    vendor: &'static str,
    latency_ms: u64,
    headers: &HeaderMap,
    secret: &str,
) -> Result<(), Response> {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    *inner.hits.lock().unwrap().entry(vendor).or_default() += 1;
    let scaled = (latency_ms as f64 * inner.options.latency_scale).max(0.0);
    if scaled > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(scaled / 1000.0)).await;
    }
    let expected = TOKENS
        .iter()
        .find(|(k, _)| *k == secret)
        .map(|(_, v)| format!("Bearer {v}"))
        .unwrap_or_default();
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if got != expected {
        return Err((
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": format!("{vendor}: invalid or missing bearer token")})),
        )
            .into_response());
    }
    Ok(())
}

fn not_found(what: &str, id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no {what} {id}")})),
    )
        .into_response()
}

async fn config_api(State(s): State<Arc<Inner>>, headers: HeaderMap) -> Reply {
    serve(&s, "config", 30, &headers, "CONFIG_TOKEN").await?;
    Ok(Json(json!({
        "integration": "customer-360",
        "version": 7,
        "sources": ["salesforce", "stripe", "intercom", "internal"],
        "field_mappings": {"salesforce.Name": "profile.company", "stripe.email": "profile.email"},
        "updated_at": "2024-01-10T08:00:00Z"
    })))
}

async fn salesforce(
    State(s): State<Arc<Inner>>,
    Path((_version, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Reply {
    serve(&s, "salesforce", 200, &headers, "SALESFORCE_TOKEN").await?;
    if id != CUSTOMER_ID {
        return Err(not_found("Account", &id));
    }
    Ok(Json(json!({
        "attributes": {"type": "Account", "url": format!("/services/data/v58.0/sobjects/Account/{id}")},
        "Id": id,
        "IsDeleted": false,
        "MasterRecordId": null,
        "Name": "Acme Corp",
        "Type": "Customer - Direct",
        "ParentId": null,
        "BillingStreet": "500 Market Street",
        "BillingCity": "San Francisco",
        "BillingState": "CA",
        "BillingPostalCode": "94105",
        "BillingCountry": "USA",
        "Phone": "(415) 555-0100",
        "Website": "https://acme.example",
        "Industry": "Technology",
        "AnnualRevenue": 25000000,
        "NumberOfEmployees": 250,
        "Ownership": "Private",
        "Rating": "Warm",
        "StageName": "Customer",
        "OwnerId": "0055e000001AbCdAAK",
        "Owner": {"attributes": {"type": "User"}, "Name": "Sarah Johnson", "Email": "sarah.johnson@acme-vendor.example"},
        "CreatedDate": "2021-03-15T09:00:00.000+0000",
        "LastModifiedDate": "2024-01-12T16:42:10.000+0000",
        "SystemModstamp": "2024-01-12T16:42:10.000+0000",
        "LastActivityDate": "2024-01-11",
        "CustomerPriority__c": "High",
        "SLA__c": "Gold",
        "NumberofLocations__c": 4
    })))
}

async fn stripe(
    State(s): State<Arc<Inner>>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Reply {
    serve(&s, "stripe", 180, &headers, "STRIPE_SECRET_KEY").await?;
    if id != CUSTOMER_ID {
        return Err(not_found("customer", &id));
    }
    let expand: Vec<&str> = q
        .iter()
        .filter(|(k, _)| k == "expand[]")
        .map(|(_, v)| v.as_str())
        .collect();
    let mut customer = json!({
        "id": id,
        "object": "customer",
        "address": null,
        "balance": 0,
        "created": 1615798800,
        "currency": "usd",
        "default_source": null,
        "delinquent": false,
        "description": "Acme Corp",
        "email": "[email protected]",
        "invoice_prefix": "ACME01",
        "invoice_settings": {"custom_fields": null, "default_payment_method": "pm_1OaBcD2eZvKYlo2C", "footer": null},
        "livemode": false,
        "metadata": {"lifetime_value": "598800", "account_tier": "enterprise"},
        "name": "Acme Corp",
        "preferred_locales": ["en"],
        "tax_exempt": "none"
    });
    // Like Stripe, subscriptions are only included when asked for with expand[].
    if expand.contains(&"subscriptions") {
        customer["subscriptions"] = json!({
            "object": "list",
            "data": [{
                "id": "sub_1OaBcE2eZvKYlo2C",
                "object": "subscription",
                "status": "active",
                "current_period_end": 1707955200,
                "plan": {"id": "price_enterprise_monthly", "object": "plan", "nickname": "Enterprise", "amount": 49900, "currency": "usd", "interval": "month"}
            }],
            "has_more": false,
            "url": format!("/v1/customers/{id}/subscriptions")
        });
    }
    Ok(Json(customer))
}

async fn intercom(
    State(s): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    serve(&s, "intercom", 150, &headers, "INTERCOM_TOKEN").await?;
    if id != CUSTOMER_ID {
        return Err(not_found("contact", &id));
    }
    let version = s.intercom_version.lock().unwrap().clone();
    let tags = json!({"type": "list", "data": [{"type": "tag", "id": "81", "name": "enterprise"}, {"type": "tag", "id": "92", "name": "priority-support"}]});
    let custom = json!({"plan_tier": "enterprise", "csm": "Sarah Johnson", "onboarded": true});
    let contact = if version == "2.10" {
        json!({
            "type": "contact", "id": id, "role": "user", "email": "[email protected]",
            "last_seen_at": "2024-01-14T18:30:00Z",
            "statistics": {"total_conversations": 14, "avg_first_response_time": 3600, "open_tickets": 2},
            "tags": tags,
            "custom_attributes": custom
        })
    } else {
        // 2.11: statistics moved under `conversation_stats`, `open_tickets` became
        // `open_count`, and `last_seen_at` became `last_seen`.
        json!({
            "type": "contact", "id": id, "role": "user", "email": "[email protected]",
            "last_seen": "2024-01-14T18:30:00Z",
            "conversation_stats": {"total": 14, "avg_first_response_seconds": 3600, "open_count": 2},
            "tags": tags,
            "custom_attributes": custom
        })
    };
    Ok(Json(contact))
}

async fn internal(
    State(s): State<Arc<Inner>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    serve(&s, "internal", 80, &headers, "INTERNAL_TOKEN").await?;
    if id != CUSTOMER_ID {
        return Err(not_found("customer", &id));
    }
    Ok(Json(json!({
        "customer_id": id,
        "usage": {
            "active_days_30d": 22,
            "features": {"dashboards": 0.82, "api": 0.61, "exports": 0.45, "sso": 1.0},
            "api_calls": 184230,
            "last_login": "2024-01-14T17:55:00Z"
        },
        "computed": {"health_score": 78, "health_score_30d_ago": 85}
    })))
}

async fn llm(State(s): State<Arc<Inner>>, headers: HeaderMap, Json(body): Json<Value>) -> Reply {
    serve(&s, "llm", 300, &headers, "OPENAI_API_KEY").await?;
    if body["messages"].as_array().is_none_or(|m| m.is_empty()) {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "messages is required"}})),
        )
            .into_response());
    }
    let insights = json!({
        "risk_level": "medium",
        "risk_reasoning": "2 open support tickets and health score declined from 85 to 78",
        "opportunities": [
            "Schedule QBR - no exec engagement in 90 days",
            "Offer training - feature adoption at 45%",
            "Address support backlog - 2 tickets open > 5 days"
        ],
        "churn_indicators": [
            "Health score trending down (-7 points in 30 days)",
            "Login frequency decreased 20% vs previous month"
        ]
    });
    let content = format!(
        "```json\n{}\n```",
        serde_json::to_string_pretty(&insights).unwrap_or_default()
    );
    Ok(Json(json!({
        "id": "chatcmpl-sandbox-1",
        "object": "chat.completion",
        "created": 1705314600,
        "model": body["model"].as_str().unwrap_or("gpt-4"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 412, "completion_tokens": 118, "total_tokens": 530}
    })))
}

async fn set_intercom_version(State(s): State<Arc<Inner>>, Json(body): Json<Value>) -> Response {
    match body["version"].as_str() {
        Some(v @ ("2.10" | "2.11")) => {
            *s.intercom_version.lock().unwrap() = v.to_string();
            Json(json!({"version": v})).into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "version must be 2.10 or 2.11"})),
        )
            .into_response(),
    }
}
