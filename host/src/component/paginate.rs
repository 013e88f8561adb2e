//! `http-request`'s `paginate`: every page of a list, each page one call through the
//! host's outbound machinery (so each page is an attempt in the log and the journal and
//! is retried by the same rules), collected into `{items, pages, truncated}`.
//!
//! Styles: `cursor` (Stripe: `has_more` and `starting_after` = the last item's id),
//! `link_header` (GitHub: `Link: <...>; rel="next"`), `next_url` (Salesforce:
//! `nextRecordsUrl`), `page` (a page number parameter, until a page comes back empty).
//! Paths are JMESPath over the response body.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ErrorKind, StageError};

/// Pages fetched when `max_pages` is not given: a bound on a list that never ends.
const DEFAULT_MAX_PAGES: u32 = 1000;

pub const STYLES: &[&str] = &["cursor", "link_header", "next_url", "page"];

/// Longest JMESPath a `paginate` block may hold (its parser recurses on nesting).
const MAX_PATH_LEN: usize = 512;

/// Most pages a plugin may ask the host to follow for one call.
pub const MAX_PLUGIN_PAGES: u32 = DEFAULT_MAX_PAGES;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paginate {
    pub style: String,
    /// Where a page's items are (`data`, `records`, `@`).
    pub items_path: String,
    /// `cursor`: whether there is another page (`has_more`); without it, a page with
    /// items is followed by another.
    #[serde(default)]
    pub has_more_path: Option<String>,
    /// `cursor`: the query parameter that carries the cursor (`starting_after`).
    #[serde(default)]
    pub cursor_param: Option<String>,
    /// `cursor`: where the next cursor is (`data[-1].id`, `next_cursor`).
    #[serde(default)]
    pub cursor_path: Option<String>,
    /// `next_url`: where the next page's URL is (`nextRecordsUrl`); relative URLs are
    /// resolved against the page's.
    #[serde(default)]
    pub next_url_path: Option<String>,
    /// `page`: the page number's query parameter, and the first number (1).
    #[serde(default)]
    pub page_param: Option<String>,
    #[serde(default)]
    pub start: Option<i64>,
    #[serde(default)]
    pub max_pages: Option<u32>,
    #[serde(default)]
    pub max_items: Option<u64>,
}

impl Paginate {
    /// Problems with a `paginate` block as written (paths relative to it).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let need = |field: &str, v: &Option<String>, out: &mut Vec<(String, String)>| {
            if v.is_none() {
                out.push((
                    field.to_string(),
                    format!("style {:?} needs {field}", self.style),
                ));
            }
        };
        match self.style.as_str() {
            "cursor" => {
                need("cursor_param", &self.cursor_param, &mut out);
                need("cursor_path", &self.cursor_path, &mut out);
            }
            "next_url" => need("next_url_path", &self.next_url_path, &mut out),
            "page" => need("page_param", &self.page_param, &mut out),
            "link_header" => {}
            other => out.push((
                "style".into(),
                format!("unknown style {other:?} (expected one of {STYLES:?})"),
            )),
        }
        for (field, path) in [
            ("items_path", Some(&self.items_path)),
            ("has_more_path", self.has_more_path.as_ref()),
            ("cursor_path", self.cursor_path.as_ref()),
            ("next_url_path", self.next_url_path.as_ref()),
        ] {
            if let Some(p) = path {
                if p.len() > MAX_PATH_LEN {
                    out.push((
                        field.into(),
                        format!("longer than {MAX_PATH_LEN} characters"),
                    ));
                } else if let Err(e) = jpx_core::compile(p) {
                    out.push((field.into(), format!("not a JMESPath expression: {e}")));
                }
            }
        }
        if self.max_pages == Some(0) {
            out.push(("max_pages".into(), "must be at least 1".into()));
        }
        out
    }
}

fn search(path: &str, field: &str, body: &Value) -> Result<Value, StageError> {
    let expr = jpx_core::compile(path)
        .map_err(|e| StageError::validation(format!("config.paginate.{field}: {e}")))?;
    expr.search(body).map_err(|e| {
        StageError::new(
            ErrorKind::Parse,
            format!("config.paginate.{field} ({path}): {e}"),
        )
    })
}

/// A URL with `param` set to `value` (replacing it if present).
fn with_param(url: &reqwest::Url, param: &str, value: &str) -> reqwest::Url {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != param)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut next = url.clone();
    {
        let mut q = next.query_pairs_mut();
        q.clear();
        for (k, v) in &kept {
            q.append_pair(k, v);
        }
        q.append_pair(param, value);
    }
    next
}

/// The `rel="next"` target of an RFC 8288 `Link` header.
pub fn link_next(header: &str) -> Option<&str> {
    header.split(',').find_map(|link| {
        let (target, params) = link.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .filter_map(|p| p.split_once('='))
            .any(|(k, v)| {
                k.trim().eq_ignore_ascii_case("rel")
                    && v.trim()
                        .trim_matches('"')
                        .split_ascii_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
            })
            .then_some(target)
    })
}

/// Collects the pages: `fetch` sends one page's request and returns its output
/// (`{status_code, headers, body}`). With `resume` (the checkpoint of an earlier
/// attempt at the same list), it continues where that one stopped. A page that fails
/// after others were fetched fails with a checkpoint: the items so far and the page next.
pub async fn collect<F, Fut>(
    p: &Paginate,
    first: reqwest::Url,
    resume: Option<&Value>,
    mut fetch: F,
) -> Result<Value, StageError>
where
    F: FnMut(reqwest::Url) -> Fut,
    Fut: std::future::Future<Output = Result<Value, StageError>>,
{
    let max_pages = p.max_pages.unwrap_or(DEFAULT_MAX_PAGES);
    let max_items = p.max_items.map(|m| m as usize);
    let mut items: Vec<Value> = Vec::new();
    let mut pages = 0u32;
    let mut url = first.clone();
    let mut page_number = p.start.unwrap_or(1);
    if p.style == "page"
        && let Some(param) = &p.page_param
    {
        url = with_param(&first, param, &page_number.to_string());
    }
    if let Some(c) = resume.and_then(|c| c.get("paginate"))
        && let (Some(done), Some(n), Some(next)) = (
            c["items"].as_array(),
            c["pages"].as_u64(),
            c["next"]
                .as_str()
                .and_then(|u| reqwest::Url::parse(u).ok())
                .filter(|u| u.origin() == first.origin()),
        )
    {
        items = done.clone();
        pages = n as u32;
        url = next;
        page_number = c["page_number"].as_i64().unwrap_or(page_number);
        tracing::info!(target: "fmhost::progress", pages, items = items.len(), "continuing a paged list after page {pages} ({} items so far)", items.len());
    }
    let truncated = loop {
        let out = match fetch(url.clone()).await {
            Ok(out) => out,
            Err(mut e) if pages > 0 => {
                let mut at = list(items, pages, None);
                at["next"] = json!(url.as_str());
                at["page_number"] = json!(page_number);
                let mut checkpoint = serde_json::Map::new();
                checkpoint.insert("paginate".into(), at);
                e.checkpoint = Some(Box::new(Value::Object(checkpoint)));
                e.message = format!("page {}: {}", pages + 1, e.message);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        pages += 1;
        let body = &out["body"];
        let found = match search(&p.items_path, "items_path", body)? {
            Value::Array(a) => a,
            Value::Null => Vec::new(),
            other => {
                return Err(StageError::new(
                    ErrorKind::Parse,
                    format!(
                        "config.paginate.items_path ({}) on page {pages} is a {}, not a list",
                        p.items_path,
                        crate::template::type_name(&other)
                    ),
                ));
            }
        };
        let empty = found.is_empty();
        items.extend(found);
        let next: Option<reqwest::Url> = match p.style.as_str() {
            "cursor" => {
                let more = match &p.has_more_path {
                    Some(path) => crate::template::truthy(&search(path, "has_more_path", body)?),
                    None => !empty,
                };
                let cursor_path = p.cursor_path.as_deref().unwrap_or_default();
                match search(cursor_path, "cursor_path", body)? {
                    Value::Null => None,
                    _ if !more => None,
                    c => Some(with_param(
                        &first,
                        p.cursor_param.as_deref().unwrap_or_default(),
                        &crate::template::to_text(&c),
                    )),
                }
            }
            "link_header" => out["headers"]
                .as_object()
                .and_then(|h| {
                    h.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("link"))
                        .and_then(|(_, v)| v.as_str())
                })
                .and_then(link_next)
                .and_then(|n| url.join(n).ok()),
            "next_url" => {
                let path = p.next_url_path.as_deref().unwrap_or_default();
                match search(path, "next_url_path", body)? {
                    Value::String(n) if !n.is_empty() => url.join(&n).ok(),
                    _ => None,
                }
            }
            _ => {
                // `page`: numbers until a page comes back empty.
                page_number += 1;
                (!empty).then(|| {
                    with_param(
                        &first,
                        p.page_param.as_deref().unwrap_or_default(),
                        &page_number.to_string(),
                    )
                })
            }
        };
        // A vendor's next link must stay on the first page's origin: the stage's
        // headers, credentials among them, go with every page.
        if let Some(n) = &next
            && n.origin() != first.origin()
        {
            return Err(StageError::new(
                ErrorKind::Sandbox,
                format!(
                    "page {}: the next page is on {}, not on the first page's origin {}: not followed",
                    pages + 1,
                    n.origin().ascii_serialization(),
                    first.origin().ascii_serialization()
                ),
            ));
        }
        if let Some(m) = max_items
            && items.len() >= m
        {
            let more = items.len() > m || next.is_some();
            items.truncate(m);
            break more;
        }
        match next {
            None => break false,
            Some(_) if pages >= max_pages => break true,
            Some(n) => url = n,
        }
    };
    Ok(list(items, pages, Some(truncated)))
}

/// `{"items", "pages", "truncated"}`, the items moved in (`json!` would copy them).
fn list(items: Vec<Value>, pages: u32, truncated: Option<bool>) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("items".into(), Value::Array(items));
    out.insert("pages".into(), pages.into());
    if let Some(t) = truncated {
        out.insert("truncated".into(), t.into());
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers() {
        let h = r#"<https://api.github.com/x?page=2>; rel="next", <https://api.github.com/x?page=5>; rel="last""#;
        assert_eq!(link_next(h), Some("https://api.github.com/x?page=2"));
        assert_eq!(link_next(r#"<https://a/x?page=1>; rel="prev first""#), None);
        assert_eq!(link_next("<https://a/y>; rel=next"), Some("https://a/y"));
    }
}
