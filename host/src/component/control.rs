//! FlowMason's control-flow components: `conditional`, `router`, `foreach`, `trycatch`,
//! `subpipeline` and `return`. Each reads its rendered config and answers with a
//! [`Flow`] directive; the engine carries it out. Every published spelling of a field
//! is accepted (`true_branch` or `true_branch_stages`, `default` or `default_route`, ...);
//! `docs/pipeline-format.md` is the reference.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::flow::{BlockDecl, BlockRef, Flow, FrameOutcome, FrameSpec, Governs, RunBlock};
use super::{Checker, Component, ConfigProblem, StageContext};
use crate::error::{ErrorKind, StageError};
use crate::template::{Expression, truthy};

/// The first of `keys` present in `config`, with the key it was found under.
fn field<'a>(config: &'a Value, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
    keys.iter().find_map(|k| config.get(*k).map(|v| (*k, v)))
}

/// A conditional's or router's decision again, from the `stages_to_skip` its output lists.
fn replay_skips(output: &Value) -> Flow {
    let stages = output
        .get("stages_to_skip")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Flow::Skip {
        output: Value::Null,
        stages,
    }
}

/// A stage id or a list of them, as written.
fn ids(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if s.contains("{{") => {
            Err("stage ids must be written out, not templates".into())
        }
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) if !s.contains("{{") => Ok(s.clone()),
                other => Err(format!("expected a stage id, found {other}")),
            })
            .collect(),
        other => Err(format!(
            "expected a stage id or a list of them, found {other}"
        )),
    }
}

/// Reads a stage-id list at one of `keys` into `out`, reporting a malformed one.
fn id_field(
    config: &Value,
    keys: &[&'static str],
    problems: &mut Vec<ConfigProblem>,
) -> (String, Vec<String>) {
    match field(config, keys) {
        None => (keys[0].to_string(), Vec::new()),
        Some((k, v)) => match ids(v) {
            Ok(list) => (k.to_string(), list),
            Err(message) => {
                problems.push(ConfigProblem {
                    path: format!(".{k}"),
                    message,
                });
                (k.to_string(), Vec::new())
            }
        },
    }
}

fn stage_list(config: &Value, keys: &[&'static str]) -> Vec<String> {
    field(config, keys)
        .and_then(|(_, v)| ids(v).ok())
        .unwrap_or_default()
}

fn bool_field(config: &Value, key: &str, default: bool) -> bool {
    config.get(key).map_or(default, truthy)
}

/// A field that must be a bare expression (checked before any run).
fn check_expression(c: &mut Checker<'_>, key: &str) {
    if let Some(v) = c.get(key) {
        match v.as_str().map(Expression::parse) {
            Some(Ok(_)) => {}
            Some(Err(e)) => c.problem(&format!(".{key}"), e),
            None => c.problem(
                &format!(".{key}"),
                format!("expected an expression, found {v}"),
            ),
        }
    }
}

/// A condition written as plain text is always true: almost certainly a missing `{{ }}`.
fn check_condition(c: &mut Checker<'_>, key: &str) {
    if let Some(Value::String(text)) = c.get(key)
        && !text.contains("{{")
    {
        c.problem(
                &format!(".{key}"),
                format!("{text:?} is plain text, so it is always true; write an expression in braces, such as \"{{{{input.score > 0.8}}}}\""),
            );
    }
}

/// Evaluates an optional expression field over `locals`.
fn eval_expression(
    config: &Value,
    key: &str,
    locals: Map<String, Value>,
) -> Option<Result<Value, String>> {
    let src = config.get(key)?.as_str()?;
    Some(Expression::parse(src).and_then(|e| e.eval(&locals)))
}

fn locals(pairs: &[(&str, &Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).clone()))
        .collect()
}

fn invalid(stage: &str, message: impl std::fmt::Display) -> StageError {
    StageError::validation(format!("{stage}: {message}"))
}

// ---------------------------------------------------------------------------------------

/// `conditional`: `condition` (any template; its truthiness decides) or
/// `condition_expression` over `value`; runs `true_branch` or `false_branch` (one id or a
/// list, also spelled `*_stages`) and skips the other.
pub struct Conditional;

const TRUE_KEYS: &[&str] = &["true_branch", "true_branch_stages"];
const FALSE_KEYS: &[&str] = &["false_branch", "false_branch_stages"];

#[async_trait::async_trait]
impl Component for Conditional {
    fn name(&self) -> &str {
        "conditional"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "condition",
            "condition_expression",
            "true_branch",
            "true_branch_stages",
            "false_branch",
            "false_branch_stages",
            "pass_data",
        ]);
        if c.get("condition").is_none() && c.get("condition_expression").is_none() {
            c.problem(".condition", "required field is missing");
        }
        check_condition(&mut c, "condition");
        check_expression(&mut c, "condition_expression");
        c.finish()
    }

    fn raw_fields(&self) -> &'static [&'static str] {
        &["condition_expression"]
    }

    fn replay(&self, output: &Value) -> Flow {
        replay_skips(output)
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let t = id_field(config, TRUE_KEYS, &mut problems);
        let f = id_field(config, FALSE_KEYS, &mut problems);
        let governs = Governs {
            branches: vec![t, f],
            ..Governs::default()
        };
        (governs, problems)
    }

    async fn run(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let value = config.get("condition").cloned().unwrap_or(Value::Null);
        let result = match eval_expression(
            &config,
            "condition_expression",
            locals(&[("value", &value)]),
        ) {
            None => truthy(&value),
            Some(Ok(v)) => truthy(&v),
            Some(Err(e)) => {
                return Err(invalid(&ctx.stage_id, format!("condition_expression: {e}")));
            }
        };
        let (taken, skipped) = if result {
            (TRUE_KEYS, FALSE_KEYS)
        } else {
            (FALSE_KEYS, TRUE_KEYS)
        };
        let skip: Vec<String> = stage_list(&config, skipped)
            .into_iter()
            .filter(|s| !stage_list(&config, taken).contains(s))
            .collect();
        Ok(Flow::Skip {
            output: json!({
                "branch_taken": if result { "true" } else { "false" },
                "condition_value": value,
                "condition_result": result,
                "data": config.get("pass_data").cloned().unwrap_or(Value::Null),
                "stages_to_skip": skip,
            }),
            stages: skip,
        })
    }
}

// ---------------------------------------------------------------------------------------

/// `router`: picks the route whose key equals `value` (after `value_expression`, and
/// ignoring case with `case_insensitive`), else `default`/`default_route`, and skips the
/// stages of every other route.
pub struct Router;

const DEFAULT_KEYS: &[&str] = &["default", "default_route"];

impl Router {
    fn routes(config: &Value) -> Vec<(String, Vec<String>)> {
        config
            .get("routes")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), ids(v).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Component for Router {
    fn name(&self) -> &str {
        "router"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "value",
            "value_expression",
            "routes",
            "default",
            "default_route",
            "case_insensitive",
            "pass_data",
        ])
        .required("value")
        .required("routes")
        .object("routes");
        check_expression(&mut c, "value_expression");
        c.finish()
    }

    fn raw_fields(&self) -> &'static [&'static str] {
        &["value_expression"]
    }

    fn replay(&self, output: &Value) -> Flow {
        replay_skips(output)
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let mut branches = Vec::new();
        if let Some(routes) = config.get("routes").and_then(Value::as_object) {
            for (k, v) in routes {
                match ids(v) {
                    Ok(list) => branches.push((format!("routes.{k}"), list)),
                    Err(message) => problems.push(ConfigProblem {
                        path: format!(".routes[{}]", Value::String(k.clone())),
                        message,
                    }),
                }
            }
        }
        branches.push(id_field(config, DEFAULT_KEYS, &mut problems));
        (
            Governs {
                branches,
                ..Governs::default()
            },
            problems,
        )
    }

    async fn run(
        &self,
        _ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let original = config.get("value").cloned().unwrap_or(Value::Null);
        // FlowMason keeps the original value when the expression fails.
        let value =
            match eval_expression(&config, "value_expression", locals(&[("value", &original)])) {
                Some(Ok(v)) => v,
                _ => original.clone(),
            };
        let key = crate::template::to_text(&value).into_owned();
        let insensitive = bool_field(&config, "case_insensitive", false);
        let routes = Self::routes(&config);
        let chosen = routes
            .iter()
            .find(|(k, _)| *k == key)
            .or_else(|| {
                insensitive
                    .then(|| {
                        routes
                            .iter()
                            .find(|(k, _)| k.to_lowercase() == key.to_lowercase())
                    })
                    .flatten()
            })
            .cloned();
        let default = stage_list(&config, DEFAULT_KEYS);
        let (taken, run) = match chosen {
            Some((k, stages)) => (k, stages),
            None => ("default".to_string(), default.clone()),
        };
        let mut skip: Vec<String> = Vec::new();
        for s in routes.iter().flat_map(|(_, v)| v).chain(&default) {
            if !run.contains(s) && !skip.contains(s) {
                skip.push(s.clone());
            }
        }
        Ok(Flow::Skip {
            output: json!({
                "route_taken": taken,
                "original_value": original,
                "matched_value": value,
                "stages_to_execute": run,
                "stages_to_skip": skip,
                "data": config.get("pass_data").cloned().unwrap_or(Value::Null),
            }),
            stages: skip,
        })
    }
}

// ---------------------------------------------------------------------------------------

/// `return`: when `condition` (default true) holds, ends the run successfully with
/// `return_value` as its output.
pub struct Return;

#[async_trait::async_trait]
impl Component for Return {
    fn name(&self) -> &str {
        "return"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "condition",
            "condition_expression",
            "return_value",
            "message",
            "status",
        ])
        .one_of("status", &["completed", "cancelled", "failed"]);
        check_condition(&mut c, "condition");
        check_expression(&mut c, "condition_expression");
        c.finish()
    }

    fn raw_fields(&self) -> &'static [&'static str] {
        &["condition_expression"]
    }

    fn replay(&self, output: &Value) -> Flow {
        match output.get("should_return").and_then(Value::as_bool) {
            Some(true) => Flow::Return {
                output: Value::Null,
                value: output.get("return_value").cloned().unwrap_or(Value::Null),
            },
            _ => Flow::Output(Value::Null),
        }
    }

    async fn run(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let condition = config
            .get("condition")
            .cloned()
            .unwrap_or(Value::Bool(true));
        let should = match eval_expression(
            &config,
            "condition_expression",
            locals(&[("value", &condition)]),
        ) {
            None => truthy(&condition),
            Some(Ok(v)) => truthy(&v),
            Some(Err(e)) => {
                return Err(invalid(&ctx.stage_id, format!("condition_expression: {e}")));
            }
        };
        let value = config.get("return_value").cloned().unwrap_or(Value::Null);
        let message = config.get("message").cloned().unwrap_or(Value::Null);
        if !should {
            return Ok(Flow::Output(json!({
                "should_return": false, "return_value": value, "message": message, "status": "running"
            })));
        }
        let status = config
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("completed");
        if status != "completed" {
            // FlowMason's `failed`/`cancelled` end the run without success.
            let kind = if status == "failed" {
                ErrorKind::Validation
            } else {
                ErrorKind::Cancelled
            };
            let text = crate::template::to_text(&message).into_owned();
            return Err(StageError::new(
                kind,
                format!("return with status {status}: {text}"),
            ));
        }
        Ok(Flow::Return {
            output: json!({
                "should_return": true, "return_value": value, "message": message, "status": "completed"
            }),
            value,
        })
    }
}

// ---------------------------------------------------------------------------------------

/// Iterations of one loop running at once, at most (a templated `max_parallel` is clamped).
pub const MAX_PARALLEL: usize = 1024;

/// `foreach`: runs `loop_stages` once per item of `items`, in order or `parallel` up to
/// `max_parallel` at once; each iteration has its own `{{context.ITEM}}`.
pub struct Foreach;

#[async_trait::async_trait]
impl Component for Foreach {
    fn name(&self) -> &str {
        "foreach"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "items",
            "loop_stages",
            "item_variable",
            "index_variable",
            "parallel",
            "max_parallel",
            "break_on_error",
            "collect_results",
            "filter_expression",
        ])
        .required("items")
        .required("loop_stages")
        .string("item_variable")
        .string("index_variable")
        .integer("max_parallel", 1);
        if let Some(n) = c.get("max_parallel").and_then(Value::as_u64)
            && n > MAX_PARALLEL as u64
        {
            c.problem(
                ".max_parallel",
                format!("at most {MAX_PARALLEL}, found {n}"),
            );
        }
        for key in ["item_variable", "index_variable"] {
            if let Some(name) = c.get(key).and_then(Value::as_str)
                && (name.is_empty()
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
            {
                c.problem(
                    &format!(".{key}"),
                    format!("{name:?} is not a variable name"),
                );
            }
        }
        if let Some(v) = c
            .get("items")
            .filter(|v| !v.is_array() && !crate::component::check::is_template(v))
        {
            c.problem(
                ".items",
                format!("expected a list or a template, found {v}"),
            );
        }
        check_expression(&mut c, "filter_expression");
        c.finish()
    }

    fn raw_fields(&self) -> &'static [&'static str] {
        &["filter_expression"]
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let (_, stages) = id_field(config, &["loop_stages"], &mut problems);
        let var = |k: &str, d: &str| {
            config
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or(d)
                .to_string()
        };
        let governs = Governs {
            blocks: vec![BlockDecl {
                field: "loop_stages",
                stages,
                per_item: true,
                vars: vec![
                    var("item_variable", "item"),
                    var("index_variable", "index"),
                    "loop_item".into(),
                    "loop_index".into(),
                ],
            }],
            ..Governs::default()
        };
        (governs, problems)
    }

    async fn run(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let stage = ctx.stage_id.to_string();
        let items = match config.get("items") {
            Some(Value::Array(items)) => items.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                return Err(invalid(
                    &stage,
                    format!(
                        "items must be a list, found {}",
                        crate::template::type_name(other)
                    ),
                ));
            }
        };
        let item_var = config
            .get("item_variable")
            .and_then(Value::as_str)
            .unwrap_or("item")
            .to_string();
        let index_var = config
            .get("index_variable")
            .and_then(Value::as_str)
            .unwrap_or("index")
            .to_string();
        let parallel = bool_field(&config, "parallel", false);
        let max_parallel = config
            .get("max_parallel")
            .and_then(Value::as_u64)
            .unwrap_or(5)
            .clamp(1, MAX_PARALLEL as u64) as usize;
        let break_on_error = bool_field(&config, "break_on_error", true);
        let collect = bool_field(&config, "collect_results", true);
        let filter = match config.get("filter_expression").and_then(Value::as_str) {
            Some(src) => Some(
                Expression::parse(src)
                    .map_err(|e| invalid(&stage, format!("filter_expression: {e}")))?,
            ),
            None => None,
        };
        let total = items.len();
        // The items that pass the filter, by index; their frames are made as they start.
        let kept: Vec<usize> = match &filter {
            None => (0..total).collect(),
            Some(f) => (0..total)
                .filter(|&i| {
                    let mut l = Map::new();
                    l.insert("item".into(), items[i].clone());
                    l.insert(item_var.clone(), items[i].clone());
                    l.insert("index".into(), i.into());
                    // FlowMason skips an item whose filter raises.
                    f.eval(&l).is_ok_and(|v| truthy(&v))
                })
                .collect(),
        };
        let items = Arc::new(items);
        let kept = Arc::new(kept);
        let (its, ks) = (items.clone(), kept.clone());
        let (iv, xv) = (item_var.clone(), index_var.clone());
        let frames = (0..kept.len()).map(move |k| {
            let i = ks[k];
            let item = &its[i];
            let mut vars = Map::new();
            vars.insert(iv.clone(), item.clone());
            vars.insert(xv.clone(), i.into());
            vars.insert("loop_item".into(), item.clone());
            vars.insert("loop_index".into(), i.into());
            let mut seen = Map::new();
            seen.insert("current_item".into(), item.clone());
            seen.insert("current_index".into(), i.into());
            seen.insert(iv.clone(), item.clone());
            seen.insert(xv.clone(), i.into());
            seen.insert("total_items".into(), total.into());
            FrameSpec {
                suffix: format!("[{i}]"),
                vars,
                controller_output: Some(Value::Object(seen)),
                input: None,
            }
        });
        let skipped_items = total - kept.len();
        let count = kept.len();
        let then = Box::new(move |outcomes: Vec<FrameOutcome>| {
            let mut results = Vec::new();
            let mut failed = Vec::new();
            let processed = outcomes.len();
            for o in outcomes {
                let index = kept.get(o.index).copied().unwrap_or_default();
                match o.result {
                    Ok(v) => results.push(v),
                    Err(e) if break_on_error => {
                        let mut error = e.error;
                        error.message =
                            format!("item {index} (stage \"{}\"): {}", e.stage, error.message);
                        return Err(error);
                    }
                    Err(e) => failed.push(json!({
                        "index": index, "item": items.get(index).cloned().unwrap_or(Value::Null),
                        "stage": e.stage, "error": e.error,
                    })),
                }
            }
            let mut out = Map::new();
            if collect {
                out.insert("results".into(), Value::Array(results));
            }
            out.insert("processed_items".into(), processed.into());
            out.insert("total_items".into(), total.into());
            out.insert("skipped_items".into(), skipped_items.into());
            out.insert("failed_count".into(), failed.len().into());
            out.insert("failed_items".into(), Value::Array(failed));
            out.insert("is_complete".into(), true.into());
            Ok(Flow::Output(Value::Object(out)))
        });
        Ok(Flow::Run(Box::new(RunBlock {
            block: BlockRef::Field("loop_stages"),
            frames: Box::new(frames),
            total: count,
            max_parallel: if parallel { max_parallel } else { 1 },
            stop_on_error: break_on_error,
            timeout: None,
            then,
        })))
    }
}

// ---------------------------------------------------------------------------------------

/// `trycatch`: runs `try_stages`; on an error whose kind is in `catch_error_types`
/// (all when empty), `catch_stages`; always `finally_stages`. With `error_scope:
/// continue` a caught error is recovered, with `propagate` (the default) it fails the stage.
pub struct TryCatch;

/// Error-type spellings accepted in `catch_error_types`, mapped to fmhost's kinds.
/// FlowMason matched Python class names; fmhost matches its own taxonomy.
pub fn error_kinds_for(name: &str) -> Option<Vec<ErrorKind>> {
    use ErrorKind::*;
    let all = [
        Timeout,
        Connect,
        Http4xx,
        Http5xx,
        RateLimited,
        CircuitOpen,
        Parse,
        Validation,
        Sandbox,
        Template,
        Budget,
        Internal,
    ];
    let normal = name.trim().to_ascii_lowercase().replace('_', "-");
    let kinds = match normal.as_str() {
        "*"
        | "all"
        | "any"
        | "error"
        | "exception"
        | "baseexception"
        | "componentexecutionerror"
        | "executionerror" => all.to_vec(),
        "timeout" | "timeouterror" | "timeoutexecutionerror" | "asyncio.timeouterror" => {
            vec![Timeout]
        }
        "connect" | "connection" | "connectionerror" | "connecterror" | "connection-error" => {
            vec![Connect]
        }
        "http-4xx" | "http4xx" | "client-error" => vec![Http4xx],
        "http-5xx" | "http5xx" | "server-error" => vec![Http5xx],
        "http" | "http-error" | "httperror" | "httpstatuserror" => {
            vec![Http4xx, Http5xx, RateLimited]
        }
        "rate-limited" | "rate-limit" | "ratelimiterror" | "ratelimited" => vec![RateLimited],
        "circuit-open" | "circuitopen" | "circuitopenerror" | "circuitbreakeropen" => {
            vec![CircuitOpen]
        }
        "parse" | "parseerror" | "jsondecodeerror" | "valueerror" => vec![Parse],
        "validation" | "validationerror" | "validationexecutionerror" => vec![Validation],
        "sandbox" | "sandboxerror" => vec![Sandbox],
        "template" | "templateerror" | "mappingexecutionerror" | "keyerror" => vec![Template],
        "budget" | "budgeterror" | "budgetexceeded" => vec![Budget],
        "internal" | "runtimeerror" => vec![Internal],
        _ => return None,
    };
    Some(kinds)
}

struct TrySettings {
    catch: Vec<ErrorKind>,
    propagate: bool,
    has_catch: bool,
    has_finally: bool,
}

impl TryCatch {
    fn catches(s: &TrySettings, kind: ErrorKind) -> bool {
        s.catch.is_empty() || s.catch.contains(&kind)
    }

    fn block(field: &'static str, controller_output: Value, then: super::flow::Then) -> Flow {
        Flow::Run(Box::new(RunBlock {
            block: BlockRef::Field(field),
            frames: Box::new(std::iter::once(FrameSpec {
                controller_output: Some(controller_output),
                ..FrameSpec::default()
            })),
            total: 1,
            max_parallel: 1,
            stop_on_error: true,
            timeout: None,
            then,
        }))
    }

    /// After try (and catch): the finally block, then the trycatch's own result.
    fn finish(
        s: Arc<TrySettings>,
        error: Option<super::flow::FrameError>,
        caught: bool,
    ) -> Result<Flow, StageError> {
        let has_finally = s.has_finally;
        let seen = error_view(error.as_ref());
        let result = move || -> Result<Flow, StageError> {
            match &error {
                None => Ok(Flow::Output(json!({
                    "status": "success", "error_occurred": false, "error_message": null,
                    "error_type": null, "error_stage": null, "recovered": false,
                }))),
                Some(e) if caught && !s.propagate => Ok(Flow::Output(json!({
                    "status": "caught", "error_occurred": true, "error_message": e.error.message,
                    "error_type": e.error.kind, "error_stage": e.stage, "recovered": true,
                }))),
                Some(e) => Err(e.error.clone()),
            }
        };
        if !has_finally {
            return result();
        }
        Ok(Self::block(
            "finally_stages",
            seen,
            Box::new(
                move |o: Vec<FrameOutcome>| match o.into_iter().next().map(|o| o.result) {
                    Some(Err(e)) => Err(e.error),
                    _ => result(),
                },
            ),
        ))
    }
}

/// What catch and finally stages read as `{{stages.TRY.output}}`.
fn error_view(error: Option<&super::flow::FrameError>) -> Value {
    match error {
        None => {
            json!({"error_occurred": false, "error": null, "error_type": null, "error_stage": null, "error_message": null})
        }
        Some(e) => json!({
            "error_occurred": true,
            "error": e.error.message,
            "error_message": e.error.message,
            "error_type": e.error.kind,
            "error_stage": e.stage,
            "error_status": e.error.status,
        }),
    }
}

#[async_trait::async_trait]
impl Component for TryCatch {
    fn name(&self) -> &str {
        "trycatch"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "try_stages",
            "catch_stages",
            "finally_stages",
            "error_scope",
            "on_error",
            "catch_error_types",
            "max_retries",
            "retry_delay_ms",
            "pass_data",
        ])
        .required("try_stages")
        .one_of("error_scope", &["propagate", "continue"])
        .one_of("on_error", &["propagate", "continue"]);
        match c.get("catch_error_types") {
            None => {}
            Some(Value::Array(types)) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        Some(name) if error_kinds_for(name).is_some() => {}
                        _ => c.problem(
                            &format!(".catch_error_types[{i}]"),
                            format!("unknown error type {t} (use fmhost's kinds: timeout, connect, http-4xx, http-5xx, rate-limited, circuit-open, parse, validation, sandbox, template, budget, internal)"),
                        ),
                    }
                }
            }
            Some(other) => c.problem(
                ".catch_error_types",
                format!("expected a list, found {other}"),
            ),
        }
        c.finish()
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        let mut blocks = Vec::new();
        for key in ["try_stages", "catch_stages", "finally_stages"] {
            let (_, stages) = id_field(config, &[key], &mut problems);
            blocks.push(BlockDecl {
                field: key,
                stages,
                per_item: false,
                vars: Vec::new(),
            });
        }
        (
            Governs {
                blocks,
                ..Governs::default()
            },
            problems,
        )
    }

    async fn run(
        &self,
        _ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let scope = config
            .get("error_scope")
            .or_else(|| config.get("on_error"))
            .and_then(Value::as_str)
            .unwrap_or("propagate");
        let catch = config
            .get("catch_error_types")
            .and_then(Value::as_array)
            .map(|types| {
                types
                    .iter()
                    .filter_map(Value::as_str)
                    .filter_map(error_kinds_for)
                    .flatten()
                    .collect()
            })
            .unwrap_or_default();
        let s = Arc::new(TrySettings {
            catch,
            propagate: !scope.eq_ignore_ascii_case("continue"),
            has_catch: !stage_list(&config, &["catch_stages"]).is_empty(),
            has_finally: !stage_list(&config, &["finally_stages"]).is_empty(),
        });
        Ok(Self::block(
            "try_stages",
            error_view(None),
            Box::new(move |o: Vec<FrameOutcome>| {
                let error = match o.into_iter().next().map(|o| o.result) {
                    Some(Err(e)) => e,
                    _ => return Self::finish(s, None, false),
                };
                if !Self::catches(&s, error.error.kind) {
                    return Self::finish(s, Some(error), false);
                }
                if !s.has_catch {
                    return Self::finish(s, Some(error), true);
                }
                let seen = error_view(Some(&error));
                Ok(Self::block(
                    "catch_stages",
                    seen,
                    Box::new(move |o: Vec<FrameOutcome>| {
                        match o.into_iter().next().map(|o| o.result) {
                            // An error inside catch propagates (after finally).
                            Some(Err(e)) => Self::finish(
                                Arc::new(TrySettings {
                                    propagate: true,
                                    ..clone_settings(&s)
                                }),
                                Some(e),
                                false,
                            ),
                            _ => Self::finish(s, Some(error), true),
                        }
                    }),
                ))
            }),
        ))
    }
}

fn clone_settings(s: &TrySettings) -> TrySettings {
    TrySettings {
        catch: s.catch.clone(),
        propagate: s.propagate,
        has_catch: s.has_catch,
        has_finally: s.has_finally,
    }
}

// ---------------------------------------------------------------------------------------

/// `subpipeline`: runs another pipeline inside this run, with `input_data` as its input.
pub struct Subpipeline;

const PIPELINE_KEYS: &[&str] = &["pipeline_id", "pipeline"];

#[async_trait::async_trait]
impl Component for Subpipeline {
    fn name(&self) -> &str {
        "subpipeline"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "pipeline_id",
            "pipeline",
            "pipeline_version",
            "input_data",
            "timeout_ms",
            "on_error",
            "default_result",
            "async_execution",
            "wait_for_completion",
            "inherit_context",
            "isolated",
        ])
        .integer("timeout_ms", 1)
        .one_of("on_error", &["propagate", "ignore", "default"]);
        match field(config, PIPELINE_KEYS) {
            None => c.problem(".pipeline_id", "required field is missing"),
            Some((k, v)) if !v.is_string() || crate::component::check::is_template(v) => c.problem(
                &format!(".{k}"),
                "must name a pipeline (its name or a path), written out so it can be checked before any run",
            ),
            _ => {}
        }
        c.finish()
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let pipeline = field(config, PIPELINE_KEYS)
            .and_then(|(k, v)| v.as_str().map(|s| (k.to_string(), s.to_string())));
        (
            Governs {
                pipeline,
                ..Governs::default()
            },
            Vec::new(),
        )
    }

    async fn run(
        &self,
        _ctx: &StageContext,
        config: Value,
        upstream: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let id = field(&config, PIPELINE_KEYS)
            .and_then(|(_, v)| v.as_str())
            .unwrap_or_default()
            .to_string();
        let input = config
            .get("input_data")
            .cloned()
            .unwrap_or_else(|| (*upstream).clone());
        let timeout = Duration::from_millis(
            config
                .get("timeout_ms")
                .and_then(Value::as_u64)
                .unwrap_or(60_000),
        );
        let on_error = config
            .get("on_error")
            .and_then(Value::as_str)
            .unwrap_or("propagate")
            .to_string();
        let default = config.get("default_result").cloned().unwrap_or(Value::Null);
        let shown = id.clone();
        Ok(Flow::Run(Box::new(RunBlock {
            block: BlockRef::Pipeline(id),
            frames: Box::new(std::iter::once(FrameSpec {
                input: Some(input),
                ..FrameSpec::default()
            })),
            total: 1,
            max_parallel: 1,
            stop_on_error: true,
            timeout: Some(timeout),
            then: Box::new(move |o: Vec<FrameOutcome>| {
                let result = o
                    .into_iter()
                    .next()
                    .map(|o| o.result)
                    .unwrap_or_else(|| Ok(Value::Null));
                match (result, on_error.as_str()) {
                    (Ok(v), _) => Ok(Flow::Output(
                        json!({"pipeline_id": shown, "status": "succeeded", "result": v}),
                    )),
                    (Err(e), "ignore") => Ok(Flow::Output(json!({
                        "pipeline_id": shown, "status": "failed", "result": null, "error": e.error, "error_stage": e.stage,
                    }))),
                    (Err(e), "default") => Ok(Flow::Output(json!({
                        "pipeline_id": shown, "status": "defaulted", "result": default, "error": e.error, "error_stage": e.stage,
                    }))),
                    (Err(e), _) => {
                        let mut error = e.error;
                        error.message = format!(
                            "sub-pipeline {shown}, stage \"{}\": {}",
                            e.stage, error.message
                        );
                        Err(error)
                    }
                }
            }),
        })))
    }
}
