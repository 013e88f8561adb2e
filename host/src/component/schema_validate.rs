//! `schema-validate`: checks `config.data` against `config.schema` (JSON Schema, drafts
//! 2020-12 and 7) and outputs the data unchanged; a failure lists every violation.

use serde_json::Value;

use super::check::contains_template;
use super::{Checker, Component, ConfigProblem, StageContext};
use crate::error::StageError;
use crate::schema;

pub struct SchemaValidate;

#[async_trait::async_trait]
impl Component for SchemaValidate {
    fn name(&self) -> &str {
        "schema-validate"
    }

    fn check_config(&self, config: &Value) -> Vec<ConfigProblem> {
        let mut c = Checker::new(config);
        c.only(&["data", "schema", "json_schema"])
            .required("data")
            .object("schema")
            .object("json_schema");
        if c.get("schema").is_none() && c.get("json_schema").is_none() {
            c.problem(
                ".schema",
                "required field is missing (also spelled json_schema)",
            );
        }
        let mut problems = c.finish();
        if let Some(s) = config
            .get("schema")
            .or_else(|| config.get("json_schema"))
            .filter(|s| s.is_object() && !contains_template(s))
            && let Err(e) = schema::compile(s)
        {
            problems.push(ConfigProblem {
                path: ".schema".into(),
                message: e,
            });
        }
        problems
    }

    async fn invoke(
        &self,
        _ctx: &StageContext,
        config: Value,
        _upstream: std::sync::Arc<Value>,
    ) -> Result<Value, StageError> {
        let Value::Object(mut config) = config else {
            return Err(StageError::validation("config must be an object"));
        };
        let data = config
            .remove("data")
            .ok_or_else(|| StageError::validation("config.data: required field is missing"))?;
        let schema = config
            .remove("schema")
            .or_else(|| config.remove("json_schema"))
            .ok_or_else(|| StageError::validation("config.schema: required field is missing"))?;
        let validator = schema::compile_cached(&schema)
            .map_err(|e| StageError::validation(format!("config.schema: {e}")))?;
        let violations = schema::violations(&validator, &data);
        if violations.is_empty() {
            Ok(data)
        } else {
            Err(StageError::validation(format!(
                "{} schema violation{}: {}",
                violations.len(),
                if violations.len() == 1 { "" } else { "s" },
                violations.join("; ")
            )))
        }
    }
}
