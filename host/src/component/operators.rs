//! FlowMason's data operators that need no outbound call: `filter`, `variable_set` and
//! `loop` (batching).

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::flow::{Flow, Governs};
use super::{Checker, Component, ConfigProblem, StageContext};
use crate::error::StageError;
use crate::template::{Expression, truthy};

/// `filter`: `pass_fail` judges `data` as a whole; `filter_array` keeps the items of the
/// list `data` for which `condition` (over `item`) and `field_conditions` hold.
pub struct Filter;

#[async_trait::async_trait]
impl Component for Filter {
    fn name(&self) -> &str {
        "filter"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "data",
            "condition",
            "field_conditions",
            "pass_if_missing",
            "filter_mode",
            "invert",
        ])
        .required("data")
        .object("field_conditions")
        .one_of("filter_mode", &["pass_fail", "filter_array"]);
        if let Some(v) = c.get("condition") {
            match v.as_str().map(Expression::parse) {
                Some(Ok(_)) => {}
                Some(Err(e)) => c.problem(".condition", e),
                None => c.problem(".condition", format!("expected an expression, found {v}")),
            }
        }
        c.finish()
    }

    fn raw_fields(&self) -> &'static [&'static str] {
        &["condition"]
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Value, StageError> {
        let data = config.get("data").cloned().unwrap_or(Value::Null);
        let condition = match config.get("condition").and_then(Value::as_str) {
            Some(src) => Some(Expression::parse(src).map_err(|e| {
                StageError::validation(format!("{}: condition: {e}", ctx.stage_id))
            })?),
            None => None,
        };
        let fields = config
            .get("field_conditions")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let pass_if_missing = config.get("pass_if_missing").is_some_and(truthy);
        let invert = config.get("invert").is_some_and(truthy);
        let mut errors = 0usize;
        let mut judge = |subject: &Value, locals: Map<String, Value>| -> bool {
            let by_fields = fields.iter().all(|(k, want)| match subject.get(k) {
                Some(v) => v == want,
                None => pass_if_missing,
            });
            let by_condition = match &condition {
                None => true,
                Some(c) => match c.eval(&locals) {
                    Ok(v) => truthy(&v),
                    Err(_) => {
                        errors += 1;
                        pass_if_missing
                    }
                },
            };
            (by_fields && by_condition) != invert
        };
        let mode = config
            .get("filter_mode")
            .and_then(Value::as_str)
            .unwrap_or("pass_fail");
        if mode == "filter_array" {
            let Value::Array(items) = data else {
                return Err(StageError::validation(format!(
                    "{}: filter_mode filter_array needs data to be a list, found {}",
                    ctx.stage_id,
                    crate::template::type_name(&data)
                )));
            };
            let total = items.len();
            let kept: Vec<Value> = items
                .into_iter()
                .enumerate()
                .filter(|(i, item)| {
                    let mut l = Map::new();
                    l.insert("item".into(), item.clone());
                    l.insert("index".into(), (*i).into());
                    judge(item, l)
                })
                .map(|(_, item)| item)
                .collect();
            let removed = total - kept.len();
            return Ok(json!({
                "passed": !kept.is_empty(), "data": kept, "filtered_count": removed,
                "evaluation_errors": errors,
            }));
        }
        let mut l = Map::new();
        l.insert("data".into(), data.clone());
        l.insert("item".into(), data.clone());
        let passed = judge(&data, l);
        Ok(json!({
            "passed": passed,
            "data": if passed { data } else { Value::Null },
            "filtered_count": 0,
            "reason": if passed { "condition met" } else { "condition not met" },
            "evaluation_errors": errors,
        }))
    }
}

/// `variable_set`: `name` + `value`, or `variables: {...}`; later stages read them as
/// `{{context.NAME}}`.
pub struct VariableSet;

fn is_var_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

#[async_trait::async_trait]
impl Component for VariableSet {
    fn name(&self) -> &str {
        "variable_set"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "name",
            "value",
            "variables",
            "scope",
            "overwrite",
            "extract_path",
        ])
        .string("name")
        .object("variables");
        if c.get("name").is_none() && c.get("variables").is_none() {
            c.problem("", "needs `name` and `value`, or `variables`");
        }
        if c.get("name").is_some() && c.get("value").is_none() {
            c.problem(".value", "required field is missing");
        }
        if let Some(n) = c.get("name").and_then(Value::as_str)
            && !n.contains("{{")
            && !is_var_name(n)
        {
            c.problem(".name", format!("{n:?} is not a variable name"));
        }
        if let Some(vars) = c.get("variables").and_then(Value::as_object) {
            for k in vars.keys().filter(|k| !is_var_name(k)) {
                c.problem(".variables", format!("{k:?} is not a variable name"));
            }
        }
        c.finish()
    }

    fn governs(&self, config: &Value) -> (Governs, Vec<ConfigProblem>) {
        let mut g = Governs::default();
        match config.get("name").and_then(Value::as_str) {
            Some(n) if n.contains("{{") => g.sets_dynamic_vars = true,
            Some(n) => g.sets_vars.push(n.to_string()),
            None => {}
        }
        if let Some(vars) = config.get("variables").and_then(Value::as_object) {
            g.sets_vars.extend(vars.keys().cloned());
        }
        (g, Vec::new())
    }

    fn replay(&self, output: &Value) -> Flow {
        let vars = output
            .get("variables")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        Flow::Vars {
            output: Value::Null,
            vars,
        }
    }

    async fn run(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Flow, StageError> {
        let mut vars = config
            .get("variables")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if let Some(name) = config.get("name") {
            let Some(name) = name.as_str().filter(|n| is_var_name(n)) else {
                return Err(StageError::validation(format!(
                    "{}: name {name} is not a variable name",
                    ctx.stage_id
                )));
            };
            let mut value = config.get("value").cloned().unwrap_or(Value::Null);
            if let Some(path) = config.get("extract_path").and_then(Value::as_str) {
                for seg in path.split('.').filter(|s| !s.is_empty()) {
                    value = match &value {
                        Value::Object(m) => m.get(seg).cloned().unwrap_or(Value::Null),
                        Value::Array(a) => seg
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| a.get(i).cloned())
                            .unwrap_or(Value::Null),
                        _ => Value::Null,
                    };
                }
            }
            vars.insert(name.to_string(), value);
        }
        let (name, value) = match vars.iter().next() {
            Some((k, v)) if vars.len() == 1 => (Value::String(k.clone()), v.clone()),
            _ => (Value::Null, Value::Null),
        };
        Ok(Flow::Vars {
            output: json!({
                "name": name, "value": value, "previous_value": null, "was_set": true,
                "variables": vars.clone(),
            }),
            vars,
        })
    }
}

/// `loop` (FlowMason's batching operator): splits `items` into `batches` of `batch_size`.
pub struct Loop;

#[async_trait::async_trait]
impl Component for Loop {
    fn name(&self) -> &str {
        "loop"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&[
            "items",
            "batch_size",
            "max_iterations",
            "start_index",
            "include_metadata",
        ])
        .required("items")
        .integer("batch_size", 1)
        .integer("max_iterations", 1)
        .integer("start_index", 0);
        if let Some(n) = c.get("batch_size").and_then(Value::as_u64)
            && n > 1000
        {
            c.problem(".batch_size", format!("at most 1000, found {n}"));
        }
        c.finish()
    }

    async fn invoke(
        &self,
        ctx: &StageContext,
        config: Value,
        _: Arc<Value>,
    ) -> Result<Value, StageError> {
        let items = match config.get("items") {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::Null) | None => Vec::new(),
            Some(other) => {
                return Err(StageError::validation(format!(
                    "{}: items must be a list, found {}",
                    ctx.stage_id,
                    crate::template::type_name(other)
                )));
            }
        };
        let size = config
            .get("batch_size")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 1000) as usize;
        let start = config
            .get("start_index")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        let max = config
            .get("max_iterations")
            .and_then(Value::as_u64)
            .map(|n| n as usize);
        let rest = items.get(start.min(items.len())..).unwrap_or_default();
        let mut batches: Vec<Value> = rest
            .chunks(size)
            .map(|c| Value::Array(c.to_vec()))
            .collect();
        let all = batches.len();
        if let Some(m) = max {
            batches.truncate(m);
        }
        let processed: usize = batches
            .iter()
            .map(|b| b.as_array().map_or(0, Vec::len))
            .sum();
        let mut out = json!({
            "batches": batches,
            "total_items": items.len(),
            "total_batches": all.min(max.unwrap_or(usize::MAX)),
            "has_more": all > max.unwrap_or(usize::MAX),
        });
        if config.get("include_metadata").is_none_or(truthy) {
            out["metadata"] = json!({
                "start_index": start, "batch_size": size, "items_processed": processed,
                "items_remaining": rest.len() - processed,
            });
        }
        Ok(out)
    }
}
