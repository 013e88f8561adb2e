//! Templates: `{{ ... }}` expressions inside strings, and JSON trees that contain them.
//!
//! A string that is exactly one template renders to the JSON value itself (an object
//! stays an object); any other string interpolates. Templates are parsed once, when a
//! pipeline is loaded, and rendered per run. This module knows nothing of stages or
//! scheduling: the engine hands it a [`Scope`].

mod eval;
mod parse;
#[cfg(test)]
mod proptests;

use std::borrow::Cow;

use serde_json::{Map, Value};

pub use eval::{truthy, type_name};
pub use parse::{Expr, Path, Segment};

use crate::secrets::Secrets;

/// Read access to stage results, implemented by the engine.
pub trait StageLookup {
    /// `field` is `output`, `error` or `status`; `None` when the stage has not produced it.
    fn stage_field(&self, id: &str, field: &str) -> Option<&Value>;
    fn has_stage(&self, id: &str) -> bool;
    /// A `{{context.NAME}}` variable: a loop's item and index, a `variable_set`'s value.
    fn context(&self, _name: &str) -> Option<&Value> {
        None
    }
}

/// A lookup with no stages, for templates that may only read the input.
pub struct NoStages;

impl StageLookup for NoStages {
    fn stage_field(&self, _: &str, _: &str) -> Option<&Value> {
        None
    }
    fn has_stage(&self, _: &str) -> bool {
        false
    }
}

/// Everything a template may read.
pub struct Scope<'a> {
    pub input: &'a Value,
    pub stages: &'a dyn StageLookup,
    pub secrets: &'a Secrets,
    /// The result being judged, in a retry condition only.
    pub output: Option<&'a Value>,
    /// `{id, pipeline}` of the current run.
    pub run: &'a Value,
    /// A fixed clock for reproducible runs (`FMHOST_NOW`); `None` reads the system clock.
    pub now: Option<&'a str>,
    /// Leave `{{secrets.*}}` unrendered, for configs handed to untrusted plugins:
    /// the host substitutes them itself when the plugin asks it to make a call.
    pub keep_secrets: bool,
    /// Extra names an expression evaluated by a component may read (`item`, `data`, `value`).
    pub locals: Option<&'a Map<String, Value>>,
}

impl Scope<'_> {
    fn now(&self) -> String {
        match self.now {
            Some(fixed) => fixed.to_string(),
            None => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Expr {
        expr: Expr,
        source: String,
        reads_secrets: bool,
    },
}

/// A string with zero or more `{{ ... }}` parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses a string; `Ok(None)` when it holds no template at all.
    pub fn parse(src: &str) -> Result<Option<Template>, String> {
        if !src.contains("{{") {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let body_start = start + 2;
            let end = find_close(&rest[body_start..])
                .ok_or_else(|| format!("unterminated template `{}`", abbreviate(&rest[start..])))?;
            let body = &rest[body_start..body_start + end];
            let expr = parse::parse_expr(body).map_err(|e| format!("in `{{{{{body}}}}}`: {e}"))?;
            let mut paths = Vec::new();
            expr.paths(&mut paths);
            let reads_secrets = paths.iter().any(|p| p.root == "secrets");
            parts.push(Part::Expr {
                expr,
                source: rest[start..body_start + end + 2].to_string(),
                reads_secrets,
            });
            rest = &rest[body_start + end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Some(Template { parts }))
    }

    /// Every path the template reads, for static checks.
    pub fn paths(&self) -> Vec<&Path> {
        let mut out = Vec::new();
        for part in &self.parts {
            if let Part::Expr { expr, .. } = part {
                expr.paths(&mut out);
            }
        }
        out
    }

    /// Renders to a JSON value: typed when the string is exactly one template.
    pub fn render(&self, scope: &Scope<'_>) -> Result<Value, String> {
        if let [
            Part::Expr {
                expr,
                source,
                reads_secrets,
            },
        ] = self.parts.as_slice()
        {
            let _ = source;
            if *reads_secrets && scope.keep_secrets {
                return kept_secret(expr, scope);
            }
            let mut v = eval::eval(expr, scope)?.into_owned();
            if scope.keep_secrets {
                // Data bound for a plugin may hold a secret an upstream echoed: masked
                // as it is substituted, while what the pipeline's author wrote stays.
                scope.secrets.redact_value(&mut v);
            }
            return Ok(v);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Expr {
                    expr,
                    reads_secrets: true,
                    ..
                } if scope.keep_secrets => out.push_str(&to_text(&kept_secret(expr, scope)?)),
                Part::Expr { expr, .. } if scope.keep_secrets => {
                    out.push_str(&scope.secrets.redact(&to_text(&*eval::eval(expr, scope)?)))
                }
                Part::Expr { expr, .. } => out.push_str(&to_text(&*eval::eval(expr, scope)?)),
            }
        }
        Ok(Value::String(out))
    }

    /// Checks that every secret this template reads is in a form a plugin's config may
    /// hold: `{{secrets.NAME}}` or `{{secrets.NAME | default(...)}}` with a default that
    /// reads no secret.
    pub fn plugin_secret_forms(&self) -> Result<(), String> {
        for part in &self.parts {
            if let Part::Expr {
                expr,
                source,
                reads_secrets: true,
            } = part
                && secret_form(expr).is_none()
            {
                return Err(format!("`{source}`: {PLUGIN_SECRET_FORMS}"));
            }
        }
        Ok(())
    }

    /// The secret names this template reads.
    pub fn secret_names(&self) -> Vec<&str> {
        self.paths()
            .into_iter()
            .filter(|p| p.root == "secrets")
            .filter_map(|p| match p.segments.first() {
                Some(Segment::Field(name)) => Some(name.as_str()),
                _ => None,
            })
            .collect()
    }
}

const PLUGIN_SECRET_FORMS: &str = "a plugin's config may use a secret only as {{secrets.NAME}} or {{secrets.NAME | default(...)}}: the host substitutes the value, the plugin never holds it";

/// `secrets.NAME` alone, or with `| default(x)` where `x` reads no secret.
fn secret_form(expr: &Expr) -> Option<(&str, Option<&Expr>)> {
    fn name(e: &Expr) -> Option<&str> {
        match e {
            Expr::Path(p) if p.root == "secrets" => match p.segments.as_slice() {
                [Segment::Field(n)] => Some(n.as_str()),
                _ => None,
            },
            _ => None,
        }
    }
    match expr {
        Expr::Filter {
            input,
            name: f,
            args,
        } if f == "default" && args.len() == 1 => {
            let mut paths = Vec::new();
            args[0].paths(&mut paths);
            if paths.iter().any(|p| p.root == "secrets") {
                return None;
            }
            name(input).map(|n| (n, Some(&args[0])))
        }
        e => name(e).map(|n| (n, None)),
    }
}

/// What a plugin's config holds where the pipeline wrote a secret: the reference in its
/// one canonical form when the secret is set, else the (trusted) default's value.
fn kept_secret(expr: &Expr, scope: &Scope<'_>) -> Result<Value, String> {
    let Some((name, default)) = secret_form(expr) else {
        return Err(PLUGIN_SECRET_FORMS.to_string());
    };
    match (scope.secrets.get(name), default) {
        (Some(_), _) => Ok(Value::String(format!("{{{{secrets.{name}}}}}"))),
        (None, Some(d)) => eval::eval(d, scope).map(Cow::into_owned),
        (None, None) => eval::eval(expr, scope).map(Cow::into_owned),
    }
}

/// An expression a component evaluates itself, once per item or value (a filter's
/// `condition` over `item`, a router's `value_expression` over `value`): written bare
/// (`item.price > 10`, as FlowMason does) or in braces. It reads only the names it is
/// given; it has no access to secrets, stages or the host.
#[derive(Debug, Clone)]
pub struct Expression {
    expr: Expr,
}

impl Expression {
    pub fn parse(src: &str) -> Result<Expression, String> {
        let body = src.trim();
        let body = match body.strip_prefix("{{").and_then(|b| b.strip_suffix("}}")) {
            Some(inner) if !inner.contains("{{") => inner,
            _ => body,
        };
        parse::parse_expr(body).map(|expr| Expression { expr })
    }

    /// Evaluates with `locals` as the only names in scope.
    pub fn eval(&self, locals: &Map<String, Value>) -> Result<Value, String> {
        let secrets = Secrets::default();
        let scope = Scope {
            input: &Value::Null,
            stages: &NoStages,
            secrets: &secrets,
            output: None,
            run: &Value::Null,
            now: None,
            keep_secrets: false,
            locals: Some(locals),
        };
        eval::eval(&self.expr, &scope).map(Cow::into_owned)
    }
}

/// How a value reads when interpolated into a string: strings raw, the rest as JSON.
pub fn to_text(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(serde_json::to_string(other).unwrap_or_default()),
    }
}

/// Finds the `}}` closing a template body, skipping quoted strings inside it.
fn find_close(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'}' && bytes.get(i + 1) == Some(&b'}') => return Some(i),
            None => {}
        }
        i += 1;
    }
    None
}

fn abbreviate(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// A JSON tree whose strings may hold templates; subtrees without any are kept as-is.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueTemplate {
    Literal(Value),
    Template(Template),
    Array(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
}

/// A problem found while compiling or rendering, with the JSON path where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateError {
    /// JSON path relative to the compiled value, e.g. `.headers.Authorization`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl ValueTemplate {
    /// Compiles a JSON value, reporting every malformed template with its path.
    pub fn compile(value: &Value) -> Result<ValueTemplate, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let compiled = compile_at(value, &mut String::new(), &mut errors);
        if errors.is_empty() {
            Ok(compiled)
        } else {
            Err(errors)
        }
    }

    /// Every template in the tree with its JSON path, for static checks.
    pub fn templates(&self) -> Vec<(String, &Template)> {
        let mut out = Vec::new();
        collect(self, &mut String::new(), &mut out);
        out
    }

    pub fn render(&self, scope: &Scope<'_>) -> Result<Value, TemplateError> {
        match self {
            ValueTemplate::Literal(v) => Ok(v.clone()),
            ValueTemplate::Template(t) => t.render(scope).map_err(|message| TemplateError {
                path: String::new(),
                message,
            }),
            ValueTemplate::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| item.render(scope).map_err(|e| prefix(e, &format!("[{i}]"))))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            ValueTemplate::Object(fields) => {
                let mut map = Map::with_capacity(fields.len());
                for (key, field) in fields {
                    map.insert(
                        key.clone(),
                        field.render(scope).map_err(|e| prefix(e, &key_path(key)))?,
                    );
                }
                Ok(Value::Object(map))
            }
        }
    }
}

fn prefix(mut e: TemplateError, seg: &str) -> TemplateError {
    e.path = format!("{seg}{}", e.path);
    e
}

fn key_path(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        format!(".{key}")
    } else {
        format!("[{}]", Value::String(key.to_string()))
    }
}

fn compile_at(value: &Value, path: &mut String, errors: &mut Vec<TemplateError>) -> ValueTemplate {
    match value {
        Value::String(s) => match Template::parse(s) {
            Ok(Some(t)) => ValueTemplate::Template(t),
            Ok(None) => ValueTemplate::Literal(value.clone()),
            Err(message) => {
                errors.push(TemplateError {
                    path: path.clone(),
                    message,
                });
                ValueTemplate::Literal(value.clone())
            }
        },
        Value::Array(items) => {
            let compiled: Vec<_> = items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    with_segment(path, &format!("[{i}]"), |p| compile_at(item, p, errors))
                })
                .collect();
            if compiled
                .iter()
                .all(|c| matches!(c, ValueTemplate::Literal(_)))
            {
                ValueTemplate::Literal(value.clone())
            } else {
                ValueTemplate::Array(compiled)
            }
        }
        Value::Object(map) => {
            let compiled: Vec<_> = map
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        with_segment(path, &key_path(k), |p| compile_at(v, p, errors)),
                    )
                })
                .collect();
            if compiled
                .iter()
                .all(|(_, c)| matches!(c, ValueTemplate::Literal(_)))
            {
                ValueTemplate::Literal(value.clone())
            } else {
                ValueTemplate::Object(compiled)
            }
        }
        other => ValueTemplate::Literal(other.clone()),
    }
}

fn with_segment<T>(path: &mut String, seg: &str, f: impl FnOnce(&mut String) -> T) -> T {
    let len = path.len();
    path.push_str(seg);
    let out = f(path);
    path.truncate(len);
    out
}

fn collect<'a>(t: &'a ValueTemplate, path: &mut String, out: &mut Vec<(String, &'a Template)>) {
    match t {
        ValueTemplate::Literal(_) => {}
        ValueTemplate::Template(t) => out.push((path.clone(), t)),
        ValueTemplate::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                with_segment(path, &format!("[{i}]"), |p| collect(item, p, out));
            }
        }
        ValueTemplate::Object(fields) => {
            for (k, v) in fields {
                with_segment(path, &key_path(k), |p| collect(v, p, out));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    struct Stages(HashMap<String, Value>);
    impl StageLookup for Stages {
        fn stage_field(&self, id: &str, field: &str) -> Option<&Value> {
            (field == "output").then(|| self.0.get(id)).flatten()
        }
        fn has_stage(&self, id: &str) -> bool {
            self.0.contains_key(id)
        }
    }

    fn render(src: Value, input: Value, stages: Value) -> Result<Value, TemplateError> {
        let stages = Stages(serde_json::from_value(stages).unwrap());
        let secrets = Secrets::from_pairs([("TOKEN", "s3cr3t-value")]);
        let run = json!({"id": "run-1"});
        let scope = Scope {
            input: &input,
            stages: &stages,
            secrets: &secrets,
            output: None,
            run: &run,
            now: Some("2024-01-15T10:30:00Z"),
            keep_secrets: false,
            locals: None,
        };
        ValueTemplate::compile(&src).unwrap().render(&scope)
    }

    #[test]
    fn whole_template_keeps_its_type_and_partial_interpolates() {
        let stages = json!({"fetch-salesforce": {"body": {"Name": "Acme", "n": [1, {"y": 7}]}}});
        let out = render(
            json!({
                "data": "{{stages.fetch-salesforce.output.body}}",
                "n": "{{stages.fetch-salesforce.output.body.n[1].y}}",
                "msg": "hello {{input.who}} at {{now()}}: {{stages.fetch-salesforce.output.body.n | tojson}}",
                "nested": [{"deep": "{{input.who | upper}}"}],
                "auth": "Bearer {{secrets.TOKEN}}",
            }),
            json!({"who": "ada"}),
            stages,
        )
        .unwrap();
        assert_eq!(out["data"], json!({"Name": "Acme", "n": [1, {"y": 7}]}));
        assert_eq!(out["n"], json!(7));
        assert_eq!(
            out["msg"],
            json!("hello ada at 2024-01-15T10:30:00Z: [1,{\"y\":7}]")
        );
        assert_eq!(out["nested"][0]["deep"], json!("ADA"));
        assert_eq!(out["auth"], json!("Bearer s3cr3t-value"));
    }

    #[test]
    fn missing_references_name_the_path() {
        let err = render(
            json!({"a": {"b": ["{{input.x.y}}"]}}),
            json!({"x": {}}),
            json!({}),
        )
        .unwrap_err();
        assert_eq!(err.path, ".a.b[0]");
        assert!(
            err.message.contains("`input.x` has no field `y`"),
            "{}",
            err.message
        );
        let err = render(json!("{{stages.nope.output}}"), json!({}), json!({})).unwrap_err();
        assert!(err.message.contains("no stage nope"), "{}", err.message);
        let with_default = render(
            json!("{{input.x.y | default('n/a')}}"),
            json!({"x": {}}),
            json!({}),
        )
        .unwrap();
        assert_eq!(with_default, json!("n/a"));
    }

    #[test]
    fn braces_of_jmespath_are_not_templates() {
        let out = render(
            json!("{customer_id: '{{input.id}}', fetched_at: '{{now()}}'}"),
            json!({"id": "cust_1"}),
            json!({}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!("{customer_id: 'cust_1', fetched_at: '2024-01-15T10:30:00Z'}")
        );
    }

    #[test]
    fn conditions_compare_typed_values() {
        let secrets = Secrets::default();
        let run = json!({});
        let output = json!({"status_code": 429});
        let scope = Scope {
            input: &Value::Null,
            stages: &NoStages,
            secrets: &secrets,
            output: Some(&output),
            run: &run,
            now: None,
            keep_secrets: false,
            locals: None,
        };
        let t = Template::parse("{{output.status_code == 429}}")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!(true));
        let t = Template::parse("{{output.status_code >= 500 or output.status_code == 408}}")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!(false));
    }

    #[test]
    fn flowmason_expressions() {
        let out = render(
            json!({
                "long": "{{len(input.text) > 3}}",
                "member": "{{stages.fetch.output.kind in ['premium', 'gold']}}",
                "not_member": "{{'x' not in input.text}}",
                "key": "{{'text' in input}}",
                "count": "{{len(upstream.fetch.items)}}",
                "int": "{{int('42') == 42}}",
                "float": "{{float(input.n) >= 2.5}}",
                "str": "{{str(input.n)}}",
                "py": "{{not None and True}}",
            }),
            json!({"text": "hello", "n": 2.5}),
            json!({"fetch": {"items": [1, 2, 3], "kind": "premium"}}),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"long": true, "member": true, "not_member": true, "key": true, "count": 3,
                   "int": true, "float": true, "str": "2.5", "py": true})
        );
    }

    #[test]
    fn kept_secrets_stay_templates() {
        let secrets = Secrets::from_pairs([("TOKEN", "s3cr3t-value")]);
        let run = json!({});
        let scope = Scope {
            input: &Value::Null,
            stages: &NoStages,
            secrets: &secrets,
            output: None,
            run: &run,
            now: None,
            keep_secrets: true,
            locals: None,
        };
        let t = Template::parse("Bearer {{ secrets.TOKEN }}")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!("Bearer {{secrets.TOKEN}}"));
        let t = Template::parse("{{secrets.NOPE | default('https://api.example')}}")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!("https://api.example"));
        let t = Template::parse("{{secrets.TOKEN | upper}}")
            .unwrap()
            .unwrap();
        assert!(t.plugin_secret_forms().is_err());
        assert!(t.render(&scope).is_err());
        // Data substituted into a plugin's config is masked; the author's text is not.
        let input = json!({"echo": "got s3cr3t-value", "whole": {"k": "s3cr3t-value"}});
        let scope = Scope {
            input: &input,
            ..scope
        };
        let t = Template::parse("s3cr3t-value: {{input.echo}}")
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!("s3cr3t-value: got ***"));
        let t = Template::parse("{{input.whole}}").unwrap().unwrap();
        assert_eq!(t.render(&scope).unwrap(), json!({"k": "***"}));
    }
}
