//! Evaluation of parsed expressions against a [`Scope`].

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::Scope;
use super::parse::{CmpOp, Expr, Path, Segment};

pub(super) fn eval<'a>(expr: &'a Expr, scope: &Scope<'a>) -> Result<Cow<'a, Value>, String> {
    match expr {
        Expr::Literal(v) => Ok(Cow::Borrowed(v)),
        Expr::List(items) => items
            .iter()
            .map(|e| eval(e, scope).map(Cow::into_owned))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Cow::Owned(Value::Array(v))),
        Expr::Path(p) => resolve(p, scope).map(Cow::Borrowed),
        Expr::Call { name, args } => call(name, args, scope),
        Expr::Filter { input, name, args } => {
            if name == "default" {
                // `default` is the one place a missing reference is not an error.
                let fallback = || match args.first() {
                    Some(a) => eval(a, scope),
                    None => Ok(Cow::Owned(Value::Null)),
                };
                return match eval(input, scope) {
                    Ok(v) if !v.is_null() => Ok(v),
                    _ => fallback(),
                };
            }
            let value = eval(input, scope)?;
            let args = args
                .iter()
                .map(|a| eval(a, scope))
                .collect::<Result<Vec<_>, _>>()?;
            filter(name, value, &args).map(Cow::Owned)
        }
        Expr::Compare { op, left, right } => {
            let (l, r) = (eval(left, scope)?, eval(right, scope)?);
            let result = match op {
                CmpOp::In => contains(&r, &l)?,
                CmpOp::NotIn => !contains(&r, &l)?,
                op => compare(*op, &l, &r)?,
            };
            Ok(Cow::Owned(Value::Bool(result)))
        }
        Expr::And(l, r) => Ok(Cow::Owned(Value::Bool(
            truthy(&*eval(l, scope)?) && truthy(&*eval(r, scope)?),
        ))),
        Expr::Or(l, r) => {
            let left = eval(l, scope)?;
            if truthy(&left) {
                Ok(left)
            } else {
                eval(r, scope)
            }
        }
        Expr::Not(e) => Ok(Cow::Owned(Value::Bool(!truthy(&*eval(e, scope)?)))),
    }
}

/// JavaScript-like truthiness: `false`, `null`, `0`, `""`, `[]` and `{}` are false.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn resolve<'a>(path: &'a Path, scope: &Scope<'a>) -> Result<&'a Value, String> {
    let (base, rest): (&'a Value, &'a [Segment]) = match path.root.as_str() {
        "input" => (scope.input, &path.segments[..]),
        "output" => match scope.output {
            Some(v) => (v, &path.segments[..]),
            None => return Err("`output` is only available in a retry condition".into()),
        },
        "run" => (scope.run, &path.segments[..]),
        // What fired the run; the engine keeps it beside the run's id.
        "trigger" => (&scope.run["trigger"], &path.segments[..]),
        "context" => {
            let name = match path.segments.first() {
                Some(Segment::Field(name)) => name,
                _ => return Err("expected `context.NAME`".into()),
            };
            let v = scope
                .stages
                .context(name)
                .ok_or_else(|| format!("`context.{name}` is not set here"))?;
            (v, &path.segments[1..])
        }
        "secrets" => {
            let name = match path.segments.first() {
                Some(Segment::Field(name)) => name,
                _ => return Err("expected `secrets.NAME`".into()),
            };
            return match scope.secrets.value(name) {
                Some(v) if path.segments.len() == 1 => Ok(v),
                Some(_) => Err(format!("secret {name} is a string and has no fields")),
                None => Err(format!(
                    "secret {name} is not set (pass --secrets FILE or set FMHOST_SECRET_{name})"
                )),
            };
        }
        "stages" => {
            let (id, field) = match path.segments.as_slice() {
                [Segment::Field(id), Segment::Field(field), ..] => (id, field),
                _ => return Err(format!("expected `stages.ID.output`, found `{path}`")),
            };
            let base = scope.stages.stage_field(id, field).ok_or_else(|| {
                match scope.stages.has_stage(id) {
                    true if field != "output" && field != "error" => {
                        format!(
                            "`{}`: a stage has `output` and `error`",
                            path.display_upto(2)
                        )
                    }
                    true => format!("`{}`: stage {id} has not produced it", path.display_upto(2)),
                    false => format!("`{}`: no stage {id} has run", path.display_upto(1)),
                }
            })?;
            (base, &path.segments[2..])
        }
        other => match scope.locals.and_then(|l| l.get(other)) {
            Some(v) => (v, &path.segments[..]),
            None => {
                return Err(format!(
                    "unknown name `{other}` (expected input, stages, context, secrets or run)"
                ));
            }
        },
    };
    let offset = path.segments.len() - rest.len();
    let mut cur = base;
    for (i, seg) in rest.iter().enumerate() {
        let next = match (seg, cur) {
            (Segment::Field(f), Value::Object(map)) => map.get(f),
            (Segment::Index(idx), Value::Array(items)) => items.get(*idx),
            _ => None,
        };
        cur = next.ok_or_else(|| {
            let at = path.display_upto(offset + i);
            match (seg, cur) {
                (Segment::Field(f), Value::Object(_)) => {
                    format!("`{path}`: `{at}` has no field `{f}`")
                }
                (Segment::Index(idx), Value::Array(a)) => {
                    format!(
                        "`{path}`: index {idx} is out of bounds (`{at}` has {} items)",
                        a.len()
                    )
                }
                (_, other) => format!(
                    "`{path}`: `{at}` is {}, not {}",
                    type_name(other),
                    match seg {
                        Segment::Field(_) => "an object",
                        Segment::Index(_) => "an array",
                    }
                ),
            }
        })?;
    }
    Ok(cur)
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const FUNCTIONS: &str = "now(), len(x), str(x), int(x), float(x), bool(x)";

fn call<'a>(name: &str, args: &'a [Expr], scope: &Scope<'a>) -> Result<Cow<'a, Value>, String> {
    match (name, args) {
        ("now", []) => Ok(Cow::Owned(Value::String(scope.now()))),
        ("now", _) => Err("now() takes no arguments".into()),
        ("len" | "str" | "int" | "float" | "bool", [arg]) => {
            let v = eval(arg, scope)?;
            convert(name, &v).map(Cow::Owned)
        }
        ("len" | "str" | "int" | "float" | "bool", _) => {
            Err(format!("{name}() takes one argument"))
        }
        _ => Err(format!(
            "unknown function `{name}()` (available: {FUNCTIONS})"
        )),
    }
}

/// Python's `len`, `str`, `int`, `float` and `bool`, on JSON values.
fn convert(name: &str, v: &Value) -> Result<Value, String> {
    let bad = || format!("{name}() cannot convert {}", type_name(v));
    Ok(match name {
        "len" => filter("length", Cow::Borrowed(v), &[])?,
        "str" => Value::String(super::to_text(v).into_owned()),
        "bool" => Value::Bool(truthy(v)),
        "int" => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => v.clone(),
            Value::Number(n) => match n.as_f64().map(f64::trunc) {
                Some(f) if f.abs() < 9.0e15 => Value::from(f as i64),
                _ => return Err(bad()),
            },
            Value::Bool(b) => Value::from(i64::from(*b)),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("int() cannot parse {s:?}"))?,
            _ => return Err(bad()),
        },
        _ => match v {
            Value::Number(n) => n
                .as_f64()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(bad)?,
            Value::Bool(b) => Value::from(f64::from(u8::from(*b))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| format!("float() cannot parse {s:?}"))?,
            _ => return Err(bad()),
        },
    })
}

/// `needle in haystack`: an array element, a substring, or an object key.
fn contains(haystack: &Value, needle: &Value) -> Result<bool, String> {
    match (haystack, needle) {
        (Value::Array(items), n) => Ok(items.iter().any(|i| i == n)),
        (Value::String(s), Value::String(n)) => Ok(s.contains(n.as_str())),
        (Value::Object(o), Value::String(k)) => Ok(o.contains_key(k)),
        (Value::Null, _) => Ok(false),
        (h, n) => Err(format!(
            "cannot test whether {} is in {}",
            type_name(n),
            type_name(h)
        )),
    }
}

const FILTERS: &str = "tojson, default, length, lower, upper, trim, string";

fn filter(name: &str, value: Cow<'_, Value>, args: &[Cow<'_, Value>]) -> Result<Value, String> {
    let no_args = |v: Value| {
        if args.is_empty() {
            Ok(v)
        } else {
            Err(format!("filter `{name}` takes no arguments"))
        }
    };
    match name {
        "tojson" | "json" => no_args(Value::String(
            serde_json::to_string(&*value).unwrap_or_default(),
        )),
        "string" => no_args(Value::String(super::to_text(&value).into_owned())),
        "length" => no_args(match &*value {
            Value::Array(a) => a.len().into(),
            Value::Object(o) => o.len().into(),
            Value::String(s) => s.chars().count().into(),
            other => {
                return Err(format!(
                    "filter `length` needs an array, object or string, not {}",
                    type_name(other)
                ));
            }
        }),
        "lower" | "upper" | "trim" => {
            let Value::String(s) = &*value else {
                return Err(format!(
                    "filter `{name}` needs a string, not {}",
                    type_name(&value)
                ));
            };
            no_args(Value::String(match name {
                "lower" => s.to_lowercase(),
                "upper" => s.to_uppercase(),
                _ => s.trim().to_string(),
            }))
        }
        other => Err(format!("unknown filter `{other}` (available: {FILTERS})")),
    }
}

fn compare(op: CmpOp, l: &Value, r: &Value) -> Result<bool, String> {
    let ordering = match (l, r) {
        (Value::Number(a), Value::Number(b)) => a
            .as_f64()
            .zip(b.as_f64())
            .and_then(|(a, b)| a.partial_cmp(&b)),
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        (a, b) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Some(if a == b {
            Ordering::Equal
        } else {
            Ordering::Less
        }),
        (a, b) => {
            return Err(format!(
                "cannot compare {} with {} using `{}`",
                type_name(a),
                type_name(b),
                op.as_str()
            ));
        }
    };
    let Some(ord) = ordering else {
        return Ok(matches!(op, CmpOp::Ne));
    };
    Ok(match op {
        CmpOp::Eq => ord == Ordering::Equal,
        CmpOp::Ne => ord != Ordering::Equal,
        CmpOp::Lt => ord == Ordering::Less,
        CmpOp::Le => ord != Ordering::Greater,
        CmpOp::Gt => ord == Ordering::Greater,
        CmpOp::Ge => ord != Ordering::Less,
        CmpOp::In | CmpOp::NotIn => unreachable!("membership is not an ordering"),
    })
}
