//! The hand-written baselines: the same upstream calls as customer-360, with no
//! orchestration. `concurrent` is what a careful tokio + reqwest programmer writes (the
//! practical limit); `sequential` is the script the seed complains about.

use serde_json::{Value, json};

async fn get(client: &reqwest::Client, url: String, token: &str, extra: &[(&str, &str)]) -> Value {
    let mut req = client.get(url).bearer_auth(token);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.send()
        .await
        .expect("upstream reachable")
        .error_for_status()
        .expect("2xx")
        .json()
        .await
        .expect("json")
}

fn merge(sf: &Value, st: &Value, ic: &Value, int: &Value, customer_id: &str) -> Value {
    json!({
        "customer_id": customer_id,
        "profile": {"company": sf["Name"], "industry": sf["Industry"], "size": sf["NumberOfEmployees"], "email": st["email"]},
        "financial": {
            "subscription_status": st["subscriptions"]["data"][0]["status"],
            "mrr": st["subscriptions"]["data"][0]["plan"]["amount"],
            "total_spent": st["metadata"]["lifetime_value"].as_str().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
            "currency": st["currency"],
        },
        "engagement": {"last_seen": ic["last_seen_at"], "support_tickets": ic["statistics"]["open_tickets"], "health_score": int["computed"]["health_score"], "active_days": int["usage"]["active_days_30d"]},
        "sales": {"deal_stage": sf["StageName"], "owner": sf["Owner"]["Name"]},
        "sources_fetched": ["salesforce", "stripe", "intercom", "internal"],
    })
}

async fn enrich(client: &reqwest::Client, base: &str, customer: &Value) -> Value {
    let body = json!({"model": "gpt-4", "messages": [{"role": "user", "content": format!("Analyze this customer:\n\n{customer}")}]});
    let answer: Value = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-sandbox-openai")
        .json(&body)
        .send()
        .await
        .expect("llm reachable")
        .json()
        .await
        .expect("json");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    let inner = content
        .trim()
        .trim_start_matches("```json")
        .trim_end_matches("```");
    serde_json::from_str(inner).unwrap_or(json!({"text": content}))
}

/// All independent calls at once, then the LLM.
pub async fn concurrent(client: &reqwest::Client, base: &str, customer_id: &str) -> Value {
    let (_cfg, sf, st, ic, int) = tokio::join!(
        get(
            client,
            format!("{base}/integrations/customer-360"),
            "sandbox-config-token",
            &[]
        ),
        get(
            client,
            format!("{base}/services/data/v58.0/sobjects/Account/{customer_id}"),
            "sandbox-salesforce-token",
            &[]
        ),
        get(
            client,
            format!(
                "{base}/v1/customers/{customer_id}?expand[]=subscriptions&expand[]=invoice_settings"
            ),
            "sk_test_sandbox_51H8",
            &[]
        ),
        get(
            client,
            format!("{base}/contacts/{customer_id}"),
            "sandbox-intercom-token",
            &[("intercom-version", "2.10")]
        ),
        get(
            client,
            format!("{base}/customers/{customer_id}/usage"),
            "sandbox-internal-token",
            &[]
        ),
    );
    let customer = merge(&sf, &st, &ic, &int, customer_id);
    let insights = enrich(client, base, &customer).await;
    json!({"customer": customer, "insights": insights})
}

/// One call after another, as a hand-written script does.
pub async fn sequential(client: &reqwest::Client, base: &str, customer_id: &str) -> Value {
    let _cfg = get(
        client,
        format!("{base}/integrations/customer-360"),
        "sandbox-config-token",
        &[],
    )
    .await;
    let sf = get(
        client,
        format!("{base}/services/data/v58.0/sobjects/Account/{customer_id}"),
        "sandbox-salesforce-token",
        &[],
    )
    .await;
    let st = get(
        client,
        format!(
            "{base}/v1/customers/{customer_id}?expand[]=subscriptions&expand[]=invoice_settings"
        ),
        "sk_test_sandbox_51H8",
        &[],
    )
    .await;
    let ic = get(
        client,
        format!("{base}/contacts/{customer_id}"),
        "sandbox-intercom-token",
        &[("intercom-version", "2.10")],
    )
    .await;
    let int = get(
        client,
        format!("{base}/customers/{customer_id}/usage"),
        "sandbox-internal-token",
        &[],
    )
    .await;
    let customer = merge(&sf, &st, &ic, &int, customer_id);
    let insights = enrich(client, base, &customer).await;
    json!({"customer": customer, "insights": insights})
}
