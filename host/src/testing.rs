//! `fmhost test`: pipeline tests in FlowMason's `NAME.test.json` format, run offline.
//!
//! A test file names a pipeline (resolved beside it) and holds tests: an input, secrets,
//! mocks and assertions. Mocks keyed by a stage id, or a component name (every stage of
//! that component), give the stage's `output` or make it fail with an `error`; `mocks.http`
//! answers outbound calls, from `http-request` and plugins' `http.send` alike (first match
//! wins, `*` matches any run of characters). Nothing is sent: a call no mock answers fails
//! its stage and is named in the test's result. Assertions use FlowMason's operators on
//! paths such as `output.customer.profile.company` or `stages.fetch-stripe.status`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::component::Registry;
use crate::engine::{Engine, Reuse, RunOptions, RunReport};
use crate::error::StageError;
use crate::http::{HttpResponse, Offline};
use crate::pipeline::Plan;
use crate::secrets::Secrets;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    #[serde(default)]
    pub name: Option<String>,
    /// The pipeline file, relative to the test file.
    pub pipeline: String,
    #[serde(default)]
    pub description: Option<String>,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default = "empty_object")]
    pub input: Value,
    #[serde(default)]
    pub secrets: HashMap<String, String>,
    #[serde(default)]
    pub mocks: Map<String, Value>,
    #[serde(default)]
    pub assertions: Vec<Map<String, Value>>,
}

fn empty_object() -> Value {
    json!({})
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub file: PathBuf,
    pub suite: String,
    pub name: String,
    pub failures: Vec<String>,
    pub duration: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpMock {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default = "ok")]
    status: u16,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    body: Value,
}

fn ok() -> u16 {
    200
}

/// `mocks.http`: first match wins; what nothing answered is kept for the report.
struct Mocks {
    http: Vec<HttpMock>,
    unanswered: Mutex<Vec<String>>,
}

impl Offline for Mocks {
    fn answer(
        &self,
        _stage: &str,
        method: &str,
        url: &str,
        _body: Option<&[u8]>,
    ) -> Option<HttpResponse> {
        let found = self.http.iter().find(|m| {
            m.method
                .as_deref()
                .is_none_or(|x| x.eq_ignore_ascii_case(method))
                && glob(&m.url, url)
        });
        let Some(m) = found else {
            let call = format!("{method} {url}");
            let mut u = self.unanswered.lock().expect("mocks lock");
            if !u.contains(&call) {
                u.push(call);
            }
            return None;
        };
        let mut headers: Vec<(String, String)> = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_ascii_lowercase(),
                    crate::template::to_text(v).into_owned(),
                )
            })
            .collect();
        let body = match &m.body {
            Value::Null => Vec::new(),
            Value::String(s) if !headers.iter().any(|(k, _)| k == "content-type") => {
                headers.push(("content-type".into(), "text/plain".into()));
                s.clone().into_bytes()
            }
            Value::String(s) => s.clone().into_bytes(),
            other => {
                if !headers.iter().any(|(k, _)| k == "content-type") {
                    headers.push(("content-type".into(), "application/json".into()));
                }
                serde_json::to_vec(other).unwrap_or_default()
            }
        };
        Some(HttpResponse {
            status: m.status,
            headers,
            body,
        })
    }
}

/// What stands in for secret `name` in a recording replayed offline (`fmhost record`,
/// shadow replay): a URL on a reserved domain when a recorded URL starts with it (it is
/// a base URL), else a plain marker. Never the value.
pub fn placeholder(name: &str, recorded_urls: &[&str]) -> String {
    let reference = format!("{{{{secrets.{name}}}}}");
    if recorded_urls.iter().any(|u| u.starts_with(&reference)) {
        format!(
            "https://{}.recorded.invalid",
            name.to_ascii_lowercase().replace('_', "-")
        )
    } else {
        format!("recorded-{name}")
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Every `*.test.json` under `paths` (files are taken as given), sorted.
pub fn find(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if !p
                    .file_name()
                    .is_some_and(|n| n == "target" || n.to_string_lossy().starts_with('.'))
                {
                    walk(&p, out)?;
                }
            } else if p.to_string_lossy().ends_with(".test.json") {
                out.push(p);
            }
        }
        Ok(())
    }
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(format!("{}: no such file or directory", p.display()));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Runs every test of one file. A file that cannot be read, or whose pipeline does not
/// load, is one failed outcome saying why.
pub async fn run_file(path: &Path, registry: &Registry) -> Vec<Outcome> {
    let failed = |suite: &str, why: String| {
        vec![Outcome {
            file: path.to_path_buf(),
            suite: suite.to_string(),
            name: "(file)".into(),
            failures: vec![why],
            duration: Duration::ZERO,
        }]
    };
    let shown = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return failed(&shown, format!("{shown}: {e}")),
    };
    let file: TestFile = match serde_json::from_str::<Value>(&text)
        .map_err(|e| format!("{shown}:{}:{}: invalid JSON: {e}", e.line(), e.column()))
        .and_then(|v| {
            serde_path_to_error::deserialize(v)
                .map_err(|e| format!("{shown}: {}: {}", e.path(), e.inner()))
        }) {
        Ok(f) => f,
        Err(e) => return failed(&shown, e),
    };
    let pipeline = path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(&file.pipeline);
    let plan = match crate::pipeline::load(&pipeline, registry) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            return failed(
                &shown,
                format!("{shown}: pipeline {}: {e}", pipeline.display()),
            );
        }
    };
    let suite = file.name.clone().unwrap_or_else(|| plan.name.to_string());
    let mut out = Vec::new();
    for case in &file.tests {
        let started = Instant::now();
        let failures = match run_case(&plan, case).await {
            Ok(f) => f,
            Err(e) => vec![e],
        };
        out.push(Outcome {
            file: path.to_path_buf(),
            suite: suite.clone(),
            name: case.name.clone(),
            failures,
            duration: started.elapsed(),
        });
    }
    out
}

/// The stage ids a mock key stands for: the stage itself, or every stage of the
/// component it names.
fn mocked_stages(plan: &Plan, key: &str) -> Vec<String> {
    if plan.stage_index(key).is_some() {
        return vec![key.to_string()];
    }
    let wanted = crate::component::canonical_name(key);
    plan.stages
        .iter()
        .filter(|s| crate::component::canonical_name(&s.component_name) == wanted)
        .map(|s| s.id.to_string())
        .collect()
}

fn kind_of(name: &str) -> Option<crate::error::ErrorKind> {
    serde_json::from_value(Value::String(name.to_string()))
        .ok()
        .or_else(|| {
            crate::component::control::error_kinds_for(name)?
                .first()
                .copied()
        })
}

async fn run_case(plan: &Arc<Plan>, case: &TestCase) -> Result<Vec<String>, String> {
    let mut reuse = Reuse {
        from_run: "mock".into(),
        every_iteration: true,
        ..Reuse::default()
    };
    let mut http: Vec<HttpMock> = Vec::new();
    for (key, mock) in &case.mocks {
        if key == "http" {
            http = serde_path_to_error::deserialize(mock.clone())
                .map_err(|e| format!("mocks.http{}: {}", at(e.path()), e.inner()))?;
            continue;
        }
        let stages = mocked_stages(plan, key);
        if stages.is_empty() {
            return Err(format!(
                "mocks.{key}: names no stage or component of pipeline {}",
                plan.name
            ));
        }
        match (mock.get("output"), mock.get("error")) {
            (Some(output), None) => {
                let output = Arc::new(output.clone());
                for s in stages {
                    reuse.outputs.insert(s, output.clone());
                }
            }
            (None, Some(error)) => {
                let kind_name = error
                    .get("kind")
                    .or_else(|| error.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("internal");
                let kind = kind_of(kind_name)
                    .ok_or_else(|| format!("mocks.{key}.error.kind: unknown kind {kind_name:?}"))?;
                let message = error
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("mocked failure")
                    .to_string();
                for s in stages {
                    reuse
                        .errors
                        .insert(s, StageError::new(kind, message.clone()));
                }
            }
            _ => {
                return Err(format!(
                    "mocks.{key}: give the stage's \"output\" or its \"error\" ({{\"kind\": \"timeout\"}})"
                ));
            }
        }
    }
    let secrets = Secrets::from_pairs(case.secrets.clone());
    // A recorded URL keeps secrets as references: they match the test's own values.
    for (i, m) in http.iter_mut().enumerate() {
        m.url = secrets
            .expand(&m.url)
            .map_err(|e| format!("mocks.http[{i}].url: {e} (add it to the test's secrets)"))?;
    }
    let mocks = Arc::new(Mocks {
        http,
        unanswered: Mutex::new(Vec::new()),
    });
    let mut engine = Engine::new(secrets);
    engine.outbound.offline = Some(mocks.clone());
    engine.fixed_now = std::env::var("FMHOST_NOW").ok().map(Arc::from);
    let opts = RunOptions {
        reuse: Some(Arc::new(reuse)),
        ..RunOptions::default()
    };
    let report = engine
        .run(plan.clone(), case.input.clone(), opts)
        .await
        .map_err(|e| format!("the run did not start: {e}"))?;
    let doc = document(&report);
    let mut failures: Vec<String> = Vec::new();
    for (i, a) in case.assertions.iter().enumerate() {
        if let Err(why) = assert_one(&doc, a) {
            failures.push(format!("assertions[{i}] {why}"));
        }
    }
    for call in mocks.unanswered.lock().expect("mocks lock").iter() {
        failures.push(format!("unmocked call: {call} (add it to mocks.http)"));
    }
    Ok(failures)
}

fn at(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        format!(".{p}")
    }
}

/// What assertions read: the run's `status`, `error`, `output`, and `stages.ID.{status,
/// output, error, attempts}`.
fn document(report: &RunReport) -> Value {
    let stages: Map<String, Value> = report
        .stages
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                json!({
                    "status": s.status.as_str(),
                    "component": s.component,
                    "output": s.output.as_deref().cloned().unwrap_or(Value::Null),
                    "error": s.error.as_ref().map(|e| json!({"kind": e.kind.as_str(), "message": e.message})),
                    "attempts": s.attempts,
                    "mocked": s.reused_from.as_deref() == Some("mock"),
                }),
            )
        })
        .collect();
    json!({
        "status": report.status.as_str(),
        "error": report.error,
        "output": report.output,
        "stages": stages,
    })
}

/// The value at `path` (`output.items[0].id`, `output.summary.length`), if any.
pub fn lookup<'a>(doc: &'a Value, path: &str) -> Option<std::borrow::Cow<'a, Value>> {
    use std::borrow::Cow;
    let mut cur: Cow<'a, Value> = Cow::Borrowed(doc);
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            let next = match &cur {
                Cow::Borrowed(v) => match v.get(key) {
                    Some(x) => Cow::Borrowed(x),
                    None if key == "length" => Cow::Owned(length(v)?.into()),
                    None => return None,
                },
                Cow::Owned(v) => match v.get(key) {
                    Some(x) => Cow::Owned(x.clone()),
                    None if key == "length" => Cow::Owned(length(v)?.into()),
                    None => return None,
                },
            };
            cur = next;
        }
        for idx in indices.split('[').filter(|s| !s.is_empty()) {
            let n: i64 = idx.trim_end_matches(']').trim().parse().ok()?;
            let arr = cur.as_array()?;
            let i = if n < 0 { arr.len() as i64 + n } else { n };
            let item = arr.get(usize::try_from(i).ok()?)?.clone();
            cur = Cow::Owned(item);
        }
    }
    Some(cur)
}

fn length(v: &Value) -> Option<u64> {
    match v {
        Value::Array(a) => Some(a.len() as u64),
        Value::String(s) => Some(s.chars().count() as u64),
        Value::Object(m) => Some(m.len() as u64),
        _ => None,
    }
}

/// JSON equality where `1` and `1.0` are the same number.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        format!("{}...", &s[..s.floor_char_boundary(200)])
    } else {
        s
    }
}

/// One assertion: `{path, OP: expected}` (several operators may share a path).
fn assert_one(doc: &Value, a: &Map<String, Value>) -> Result<(), String> {
    let path = a
        .get("path")
        .and_then(Value::as_str)
        .ok_or("needs a \"path\"")?;
    let actual = lookup(doc, path);
    let mut checked = 0;
    for (op, want) in a {
        if matches!(op.as_str(), "path" | "message" | "description" | "name") {
            continue;
        }
        checked += 1;
        let got = actual.as_deref();
        let fail = |what: String| {
            Err(format!(
                "{path}: expected {op} {}, got {}{}",
                short(want),
                got.map(short)
                    .unwrap_or_else(|| "nothing (no such path)".into()),
                if what.is_empty() {
                    String::new()
                } else {
                    format!(" ({what})")
                }
            ))
        };
        let num = |v: Option<&Value>| v.and_then(Value::as_f64);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let ok = match op.as_str() {
            "exists" => got.is_some_and(|v| !v.is_null()) == want.as_bool().unwrap_or(true),
            "equals" | "deepEquals" | "eq" => got.is_some_and(|g| same(g, want)),
            "notEquals" => !got.is_some_and(|g| same(g, want)),
            "type" => got.is_some_and(|g| {
                let t = want.as_str().unwrap_or_default();
                crate::template::type_name(g) == t
                    || (t == "number" && g.is_number())
                    || (t == "integer" && (g.is_i64() || g.is_u64()))
                    || (t == "list" && g.is_array())
                    || (t == "dict" && g.is_object())
            }),
            "greaterThan" => matches!((num(got), want.as_f64()), (Some(g), Some(w)) if g > w),
            "greaterThanOrEqual" => {
                matches!((num(got), want.as_f64()), (Some(g), Some(w)) if g >= w)
            }
            "lessThan" => matches!((num(got), want.as_f64()), (Some(g), Some(w)) if g < w),
            "lessThanOrEqual" => matches!((num(got), want.as_f64()), (Some(g), Some(w)) if g <= w),
            "contains" | "includes" => match got {
                Some(Value::String(s)) => want.as_str().is_some_and(|w| s.contains(w)),
                Some(Value::Array(items)) => items.iter().any(|i| same(i, want)),
                Some(Value::Object(m)) => want.as_str().is_some_and(|w| m.contains_key(w)),
                _ => false,
            },
            "includesAll" => match (got, want) {
                (Some(Value::Array(items)), Value::Array(wanted)) => {
                    wanted.iter().all(|w| items.iter().any(|i| same(i, w)))
                }
                _ => false,
            },
            "startsWith" => {
                matches!((text(got), want.as_str()), (Some(g), Some(w)) if g.starts_with(w))
            }
            "endsWith" => {
                matches!((text(got), want.as_str()), (Some(g), Some(w)) if g.ends_with(w))
            }
            "matches" => {
                let Some(pattern) = want.as_str() else {
                    return fail("the pattern is not a string".into());
                };
                let re = regex::Regex::new(pattern)
                    .map_err(|e| format!("{path}: matches: invalid regex: {e}"))?;
                text(got).is_some_and(|g| re.is_match(&g))
            }
            "hasLength" => {
                matches!((got.and_then(length), want.as_u64()), (Some(g), Some(w)) if g == w)
            }
            "hasMinLength" => {
                matches!((got.and_then(length), want.as_u64()), (Some(g), Some(w)) if g >= w)
            }
            "hasMaxLength" => {
                matches!((got.and_then(length), want.as_u64()), (Some(g), Some(w)) if g <= w)
            }
            other => return Err(format!("{path}: unknown operator {other:?}")),
        };
        if !ok {
            return fail(String::new());
        }
    }
    if checked == 0 {
        return Err(format!(
            "{path}: names no operator (equals, contains, exists, ...)"
        ));
    }
    Ok(())
}

/// The results as JUnit XML, one `testsuite` per file.
pub fn junit(outcomes: &[Outcome]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let mut by_file: Vec<(&Path, Vec<&Outcome>)> = Vec::new();
    for o in outcomes {
        match by_file.iter_mut().find(|(f, _)| *f == o.file.as_path()) {
            Some((_, list)) => list.push(o),
            None => by_file.push((o.file.as_path(), vec![o])),
        }
    }
    let failures = outcomes.iter().filter(|o| !o.passed()).count();
    let total: f64 = outcomes.iter().map(|o| o.duration.as_secs_f64()).sum();
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"fmhost\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">\n",
        outcomes.len()
    );
    for (file, list) in by_file {
        let f = list.iter().filter(|o| !o.passed()).count();
        let t: f64 = list.iter().map(|o| o.duration.as_secs_f64()).sum();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" file=\"{}\" tests=\"{}\" failures=\"{f}\" errors=\"0\" time=\"{t:.3}\">\n",
            esc(&list[0].suite),
            esc(&file.display().to_string()),
            list.len()
        ));
        for o in list {
            out.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                esc(&o.suite),
                esc(&o.name),
                o.duration.as_secs_f64()
            ));
            if o.passed() {
                out.push_str("/>\n");
            } else {
                out.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    esc(&o.failures[0]),
                    esc(&o.failures.join("\n"))
                ));
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_paths() {
        assert!(glob(
            "https://api.stripe.com/v1/customers/*",
            "https://api.stripe.com/v1/customers/cus_1?expand[]=x"
        ));
        assert!(!glob(
            "https://api.stripe.com/v1/customers/*",
            "https://evil.example/v1/customers/x"
        ));
        assert!(glob("*/a/*/b", "x/a/y/z/b"));
        assert!(!glob("a*c", "abd"));
        let doc = json!({"output": {"items": [1, 2, 3], "name": "abc"}});
        assert_eq!(*lookup(&doc, "output.items.length").unwrap(), json!(3));
        assert_eq!(*lookup(&doc, "output.items[-1]").unwrap(), json!(3));
        assert_eq!(*lookup(&doc, "output.name.length").unwrap(), json!(3));
        assert!(lookup(&doc, "output.nope").is_none());
        let a = |v: Value| assert_one(&doc, v.as_object().unwrap());
        assert!(a(json!({"path": "output.items", "hasMinLength": 2, "includes": 2})).is_ok());
        assert!(a(json!({"path": "output.name", "matches": "^a.c$", "startsWith": "ab"})).is_ok());
        assert!(a(json!({"path": "output.items[0]", "equals": 1.0})).is_ok());
        assert!(a(json!({"path": "output.items[0]", "greaterThan": 1})).is_err());
        assert!(a(json!({"path": "output.missing", "exists": false})).is_ok());
    }
}
