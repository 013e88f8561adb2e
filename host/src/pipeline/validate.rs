//! Checks a pipeline document whole and compiles it into a [`Plan`].
//! Every problem is collected; compilation succeeds only when there are none.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Diagnostic, Plan, PlannedStage, RetryPlan, RetrySpec, control, graph};
use crate::component::Registry;
use crate::template::{Path, Segment, Template, ValueTemplate};

/// Most stages in one pipeline.
pub const MAX_STAGES: usize = 10_000;
/// Most `depends_on` entries in one pipeline.
pub const MAX_EDGES: usize = 100_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineDoc {
    /// Unique name, used by `serve` routes and the journal.
    name: String,
    /// FlowMason's loader fields, accepted and not used.
    #[serde(default, rename = "$schema")]
    _schema: Option<Value>,
    #[serde(default, rename = "id")]
    _id: Option<Value>,
    #[serde(default, rename = "category")]
    _category: Option<Value>,
    #[serde(default, rename = "tags")]
    _tags: Option<Value>,
    #[serde(default, rename = "sample_input")]
    _sample_input: Option<Value>,
    /// FlowMason's inheritance and embedded compositions: refused with a clear error.
    #[serde(default)]
    extends: Option<Value>,
    #[serde(default)]
    compositions: Option<Value>,
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    description: Option<String>,
    /// JSON Schema of the run's input (FlowMason's loader: `input_schema`).
    #[serde(default, alias = "input_schema")]
    input: Option<Value>,
    /// JSON Schema of the run's output (`output_schema`).
    #[serde(default, alias = "output_schema")]
    output: Option<Value>,
    /// The stage whose output is the run's output; by default the single sink, or an
    /// object keyed by sink id when there are several (`output_stage_id`).
    #[serde(default, alias = "output_stage_id")]
    output_stage: Option<String>,
    /// Per-service policies (rate limit, bulkhead, circuit breaker), keyed by service name.
    #[serde(default)]
    services: Map<String, Value>,
    /// What starts runs from outside (`fmhost serve`): webhooks.
    #[serde(default)]
    triggers: Vec<Value>,
    /// Whom to tell when something goes wrong (`fmhost serve`).
    #[serde(default)]
    alerts: Vec<Value>,
    /// The whole run's request budget.
    #[serde(default)]
    budget: Option<Value>,
    /// Record every outbound exchange in the journal.
    #[serde(default)]
    record: bool,
    stages: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageDoc {
    /// Unique within the pipeline; letters, digits, `-` and `_`.
    id: String,
    /// A built-in or plugin name; `_` and `-` are interchangeable.
    component: String,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    retry: Option<Value>,
    /// Milliseconds, or a duration such as `"5s"` (FlowMason: `timeout_ms`).
    #[serde(default, alias = "timeout_ms")]
    timeout: Option<Value>,
    /// A failure yields `null` and lets dependents run.
    #[serde(default)]
    optional: bool,
    /// Hosts (`host`, `*.domain`, `host:port`) a plugin in this stage may reach beyond its own list.
    #[serde(default)]
    allowed_hosts: Vec<String>,
    /// Secrets a plugin in this stage may have the host substitute, beyond those its
    /// config references as `{{secrets.NAME}}`; bound to the stage's granted hosts.
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// Studio's canvas position; not used.
    #[serde(default)]
    position: Option<Value>,
    /// FlowMason's per-stage LLM settings; the generator plugin takes its own config.
    #[serde(default)]
    llm_settings: Option<Value>,
    /// The stage's request budget.
    #[serde(default)]
    budget: Option<Value>,
    /// A service in the pipeline's `services` whose origin the stage's plugin may reach.
    #[serde(default)]
    service: Option<String>,
}

struct Parsed {
    doc: StageDoc,
    /// Its `component` was missing or not a string (already reported).
    component_missing: bool,
    loc: String,
    config: Value,
    retry: Option<(Value, &'static str)>,
}

/// Checks `text` as a pipeline and compiles it, or lists every problem. Sub-pipelines
/// are looked for in the current directory.
pub fn compile(text: &str, registry: &Registry) -> Result<Plan, Vec<Diagnostic>> {
    compile_in(text, registry, &super::Origin::default())
}

/// Like [`compile`], for a pipeline read from `origin` (sub-pipelines resolve beside it).
pub fn compile_in(
    text: &str,
    registry: &Registry,
    origin: &super::Origin,
) -> Result<Plan, Vec<Diagnostic>> {
    let source: Value = serde_json::from_str(text).map_err(|e| {
        vec![Diagnostic {
            location: String::new(),
            line_col: Some((e.line(), e.column())),
            message: format!("invalid JSON: {}", strip_position(&e.to_string())),
        }]
    })?;
    let doc: PipelineDoc = serde_path_to_error::deserialize(&source).map_err(|e| {
        let path = e.path().to_string();
        vec![Diagnostic::new(
            if path == "." { String::new() } else { path },
            e.inner().to_string(),
        )]
    })?;
    let mut diags = Vec::new();
    if doc.extends.is_some() {
        diags.push(Diagnostic::new(
            "extends",
            "pipeline inheritance is not supported; copy the stages, or run the shared part as a subpipeline stage",
        ));
    }
    if doc.compositions.is_some() {
        diags.push(Diagnostic::new(
            "compositions",
            "compositions are not supported; run the pipeline with a subpipeline stage (pipeline_id, input_data)",
        ));
    }
    let edges: usize = doc
        .stages
        .iter()
        .filter_map(|s| s.get("depends_on").and_then(Value::as_array))
        .map(Vec::len)
        .sum();
    if doc.stages.len() > MAX_STAGES || edges > MAX_EDGES {
        // Checked first and alone: the rest of validation is not worth its cost here.
        return Err(vec![Diagnostic::new(
            "stages",
            format!(
                "{} stages and {edges} dependencies; fmhost runs at most {MAX_STAGES} stages and {MAX_EDGES} dependencies per pipeline",
                doc.stages.len()
            ),
        )]);
    }
    if doc.stages.is_empty() {
        diags.push(Diagnostic::new(
            "stages",
            "a pipeline needs at least one stage",
        ));
    }

    let mut services = Vec::new();
    for (name, raw) in &doc.services {
        match serde_path_to_error::deserialize::<_, crate::http::ServicePolicy>(raw) {
            Ok(policy) => {
                for (field, message) in policy.problems() {
                    diags.push(Diagnostic::new(format!("services.{name}.{field}"), message));
                }
                services.push((name.clone(), policy));
            }
            Err(e) => {
                let at = error_at(e.path(), ".");
                diags.push(Diagnostic::new(
                    format!("services.{name}{at}"),
                    e.inner().to_string(),
                ));
            }
        }
    }
    let budget = doc
        .budget
        .as_ref()
        .and_then(|b| budget_of(b, "budget", &mut diags));
    let triggers = super::triggers::parse(&doc.triggers, origin.dir.as_deref(), &mut diags);
    let alerts = super::triggers::parse_alerts(&doc.alerts, &mut diags);
    let input_schema = compile_schema(doc.input.as_ref(), "input", &mut diags);
    let output_schema = compile_schema(doc.output.as_ref(), "output", &mut diags);

    // Pass 1: each stage's own shape.
    let mut parsed: Vec<Option<Parsed>> = Vec::with_capacity(doc.stages.len());
    for (i, raw) in doc.stages.iter().enumerate() {
        parsed.push(parse_stage(i, raw, &mut diags));
    }

    // Pass 2: ids and edges.
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, p) in parsed.iter().enumerate() {
        let Some(p) = p else { continue };
        if let Some(&first) = index.get(p.doc.id.as_str()) {
            diags.push(Diagnostic::new(
                p.loc.clone(),
                format!("duplicate stage id (also stages[{first}])"),
            ));
        } else {
            index.insert(&p.doc.id, i);
        }
    }
    for p in parsed.iter().flatten() {
        if let Some(name) = &p.doc.service
            && !services.iter().any(|(n, _)| n == name)
        {
            diags.push(Diagnostic::new(
                format!("{}: service", p.loc),
                if services.is_empty() {
                    format!("unknown service \"{name}\" (the pipeline declares no `services`)")
                } else {
                    format!(
                        "unknown service \"{name}\"{}",
                        suggest(name, services.iter().map(|(n, _)| n.as_str()))
                    )
                },
            ));
        }
    }
    let mut deps: Vec<Vec<usize>> = vec![Vec::new(); parsed.len()];
    for (i, p) in parsed.iter().enumerate() {
        let Some(p) = p else { continue };
        for (j, dep) in p.doc.depends_on.iter().enumerate() {
            match index.get(dep.as_str()) {
                Some(&d) if deps[i].contains(&d) => diags.push(Diagnostic::new(
                    format!("{}: depends_on[{j}]", p.loc),
                    format!("\"{dep}\" is listed twice"),
                )),
                Some(&d) => deps[i].push(d),
                None => diags.push(Diagnostic::new(
                    format!("{}: depends_on[{j}]", p.loc),
                    format!(
                        "unknown stage \"{dep}\"{}",
                        suggest(dep, index.keys().copied())
                    ),
                )),
            }
        }
    }
    let id_of = |i: usize| {
        parsed[i]
            .as_ref()
            .map(|p| p.doc.id.clone())
            .unwrap_or_else(|| format!("stages[{i}]"))
    };
    for cycle in graph::cycles(&deps) {
        // depends_on points upstream; name the cycle in the direction data flows.
        let names: Vec<String> = cycle.iter().rev().map(|&i| id_of(i)).collect();
        diags.push(Diagnostic::new(
            format!("stage \"{}\"", id_of(cycle[0])),
            format!("cycle: {}", names.join(" -> ")),
        ));
    }
    let upstream = graph::upstream_sets(&deps);
    if let Some(out) = &doc.output_stage
        && !index.contains_key(out.as_str())
    {
        diags.push(Diagnostic::new(
            "output_stage",
            format!(
                "unknown stage \"{out}\"{}",
                suggest(out, index.keys().copied())
            ),
        ));
    }

    // Pass 3: control flow: what each controller governs, blocks, crossing edges.
    let all_ids: Vec<String> = (0..parsed.len()).map(id_of).collect();
    let locs: Vec<String> = parsed
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.as_ref()
                .map(|p| p.loc.clone())
                .unwrap_or_else(|| format!("stages[{i}]"))
        })
        .collect();
    let resolved: Vec<Option<Arc<dyn crate::component::Component>>> = parsed
        .iter()
        .map(|p| {
            p.as_ref()
                .and_then(|p| registry.get(&p.doc.component).cloned())
        })
        .collect();
    let configs: Vec<Value> = parsed
        .iter()
        .map(|p| p.as_ref().map(|p| p.config.clone()).unwrap_or(Value::Null))
        .collect();
    let structure = control::analyse(
        &all_ids, &locs, &resolved, &configs, &deps, &upstream, &index, &mut diags,
    );

    // Pass 4: components, configs and templates.
    let mut stages = Vec::with_capacity(parsed.len());
    for (i, p) in parsed.iter().enumerate() {
        let Some(p) = p else { continue };
        let component = registry.get(&p.doc.component);
        if component.is_none() && !p.component_missing {
            let known: Vec<&str> = registry.names().collect();
            diags.push(Diagnostic::new(
                format!("{}: component", p.loc),
                format!(
                    "unknown component \"{}\"{} (known: {})",
                    p.doc.component,
                    suggest(&p.doc.component, known.iter().copied()),
                    known.join(", ")
                ),
            ));
        }
        if let Some(c) = component {
            for problem in c.check_config(&p.config) {
                diags.push(Diagnostic::new(
                    format!("{}: config{}", p.loc, problem.path),
                    problem.message,
                ));
            }
        }
        let check_refs = |path: &str,
                          t: &Template,
                          allow_output: bool,
                          diags: &mut Vec<Diagnostic>| {
            for r in t.paths() {
                let checked = match (r.root.as_str(), r.segments.first()) {
                    ("context", Some(Segment::Field(name))) => {
                        if control::context_allows(&structure, &upstream, i, name) {
                            Ok(())
                        } else {
                            Err(format!(
                                "`{r}`: nothing sets `{name}` for this stage (no enclosing foreach names it, no variable_set upstream sets it)"
                            ))
                        }
                    }
                    ("context", _) => Err(format!("`{r}`: expected `context.NAME`")),
                    _ => check_reference(r, allow_output, &index, &upstream[i], &p.doc.id)
                        .and_then(|()| match (r.root.as_str(), r.segments.first()) {
                            ("stages", Some(Segment::Field(id))) => match index.get(id.as_str()) {
                                Some(&t) => structure
                                    .hidden(i, t, &all_ids)
                                    .map_or(Ok(()), |why| Err(format!("`{r}`: {why}"))),
                                None => Ok(()),
                            },
                            _ => Ok(()),
                        }),
                };
                if let Err(message) = checked {
                    diags.push(Diagnostic::new(format!("{}: {path}", p.loc), message));
                }
            }
        };
        let plugin_stage = component.is_some_and(|c| !c.sees_secrets());
        let mut secret_grants: Vec<String> = p.doc.secrets.clone();
        // Fields a component evaluates itself (per item) are kept as written.
        let raw_keys = component.map(|c| c.raw_fields()).unwrap_or(&[]);
        let mut templated = p.config.clone();
        let mut raw = Vec::new();
        if let Some(obj) = templated.as_object_mut() {
            for k in raw_keys {
                if let Some(v) = obj.remove(*k) {
                    raw.push((k.to_string(), v));
                }
            }
        }
        let config = match ValueTemplate::compile(&templated).map(|t| with_raw(t, raw)) {
            Ok(t) => {
                for (path, template) in t.templates() {
                    check_refs(&format!("config{path}"), template, false, &mut diags);
                    if plugin_stage && let Err(message) = template.plugin_secret_forms() {
                        diags.push(Diagnostic::new(format!("{}: config{path}", p.loc), message));
                    }
                    for name in template.secret_names() {
                        if !secret_grants.iter().any(|n| n == name) {
                            secret_grants.push(name.to_string());
                        }
                    }
                }
                t
            }
            Err(errors) => {
                for e in errors {
                    diags.push(Diagnostic::new(
                        format!("{}: config{}", p.loc, e.path),
                        e.message,
                    ));
                }
                ValueTemplate::Literal(Value::Null)
            }
        };
        let retry = p.retry.as_ref().and_then(|(raw, origin)| {
            let spec: RetrySpec = match serde_path_to_error::deserialize(raw) {
                Ok(s) => s,
                Err(e) => {
                    let at = error_at(e.path(), ".");
                    diags.push(Diagnostic::new(
                        format!("{}: {origin}{at}", p.loc),
                        e.inner().to_string(),
                    ));
                    return None;
                }
            };
            if spec.max_attempts == 0 {
                diags.push(Diagnostic::new(
                    format!("{}: {origin}.max_attempts", p.loc),
                    "must be at least 1",
                ));
            }
            if !(spec.delay_seconds.is_finite() && spec.delay_seconds >= 0.0) {
                diags.push(Diagnostic::new(
                    format!("{}: {origin}.delay_seconds", p.loc),
                    "must be a non-negative number",
                ));
            }
            if !(spec.backoff_multiplier.is_finite() && spec.backoff_multiplier >= 1.0) {
                diags.push(Diagnostic::new(
                    format!("{}: {origin}.backoff_multiplier", p.loc),
                    "must be at least 1",
                ));
            }
            let condition = match spec.condition.as_deref().map(Template::parse) {
                None => None,
                Some(Ok(Some(t))) => {
                    check_refs(&format!("{origin}.condition"), &t, true, &mut diags);
                    Some(t)
                }
                Some(Ok(None)) => {
                    diags.push(Diagnostic::new(
                        format!("{}: {origin}.condition", p.loc),
                        "expected a template such as \"{{output.status_code == 429}}\"",
                    ));
                    None
                }
                Some(Err(e)) => {
                    diags.push(Diagnostic::new(format!("{}: {origin}.condition", p.loc), e));
                    None
                }
            };
            Some(RetryPlan { spec, condition })
        });
        let timeout = p
            .doc
            .timeout
            .as_ref()
            .and_then(|t| match parse_duration(t) {
                Ok(d) => Some(d),
                Err(e) => {
                    diags.push(Diagnostic::new(format!("{}: timeout", p.loc), e));
                    None
                }
            });
        let shape = &structure.stages[i];
        let subplan = match &shape.pipeline {
            Some((field, id)) => match origin.resolve(id, registry) {
                Ok(plan) => Some(plan),
                Err(message) => {
                    diags.push(Diagnostic::new(
                        format!("{}: config.{field}", p.loc),
                        message,
                    ));
                    None
                }
            },
            None => None,
        };
        if let Some(component) = component {
            stages.push(PlannedStage {
                block: shape.block,
                wait_on: shape.wait_on.clone(),
                wakes: Vec::new(),
                blocks: shape.blocks.clone(),
                subplan,
                id: Arc::from(p.doc.id.as_str()),
                component_name: p.doc.component.clone(),
                component: component.clone(),
                deps: deps[i].clone(),
                dependents: Vec::new(),
                config,
                retry,
                timeout,
                optional: p.doc.optional,
                allowed_hosts: p.doc.allowed_hosts.clone().into(),
                secret_grants: secret_grants.into(),
                trusted_base_url: trusted_base_url(&p.config),
                service_base_url: service_base_url(&p.doc, &p.config, &services),
                budget: p
                    .doc
                    .budget
                    .as_ref()
                    .and_then(|b| budget_of(b, &format!("{}: budget", p.loc), &mut diags)),
            });
        }
    }
    if !diags.is_empty() {
        return Err(diags);
    }
    for i in 0..stages.len() {
        for d in stages[i].deps.clone() {
            stages[d].dependents.push(i);
        }
        for d in stages[i].wait_on.clone() {
            stages[d].wakes.push(i);
        }
    }
    let sinks = match &doc.output_stage {
        Some(out) => stages
            .iter()
            .position(|s| &*s.id == out.as_str())
            .into_iter()
            .collect(),
        None => (0..stages.len())
            .filter(|&i| stages[i].block == 0 && stages[i].wakes.is_empty())
            .collect(),
    };
    let index = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let version = doc.version.map(|v| match v {
        Value::String(s) => s,
        other => other.to_string(),
    });
    Ok(Plan {
        name: Arc::from(doc.name.as_str()),
        version,
        description: doc.description,
        input_schema,
        output_schema,
        stages,
        sinks,
        blocks: structure.blocks,
        index,
        services,
        triggers,
        alerts,
        budget,
        record: doc.record,
        source,
        document: Default::default(),
    })
}

fn parse_stage(i: usize, raw: &Value, diags: &mut Vec<Diagnostic>) -> Option<Parsed> {
    let loc = match raw.get("id").and_then(Value::as_str) {
        Some(id) => format!("stage \"{id}\""),
        None => format!("stages[{i}]"),
    };
    // The seed writes `retry` inside an http-request's config; it means the stage's policy.
    let mut raw = raw.clone();
    // FlowMason's loader reads `component_type` as well as `component`; the former wins.
    if let Some(obj) = raw.as_object_mut()
        && let Some(t) = obj.remove("component_type")
    {
        obj.insert("component".into(), t);
    }
    // FlowMason applies `input_mapping` after `config`, overriding it key by key.
    if let Some(obj) = raw.as_object_mut()
        && let Some(Value::Object(mapping)) = obj.remove("input_mapping")
    {
        let config = obj
            .entry("config")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(c) = config.as_object_mut() {
            c.extend(mapping);
        }
    }
    let mut retry = None;
    if let Some(r) = raw
        .get_mut("config")
        .and_then(Value::as_object_mut)
        .and_then(|c| c.remove("retry"))
    {
        retry = Some((r, "config.retry"));
    }
    // A bad field is reported and left out, and the rest is read again, so one mistake
    // neither hides the stage's other problems nor makes its dependents' references to
    // it look unknown.
    let mut component_missing = false;
    let doc: StageDoc = loop {
        match serde_path_to_error::deserialize(&raw) {
            Ok(d) => break d,
            Err(e) => {
                let at = error_at(e.path(), ": ");
                diags.push(Diagnostic::new(format!("{loc}{at}"), e.inner().to_string()));
                let message = e.inner().to_string();
                let field = match e.path().iter().next() {
                    Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
                    _ => message
                        .strip_prefix("unknown field `")
                        .and_then(|r| r.split('`').next())
                        .map(str::to_string),
                };
                let obj = raw.as_object_mut()?;
                match field.as_deref() {
                    Some("id") | None if !message.starts_with("missing field `component`") => {
                        return None;
                    }
                    Some("component") | None => {
                        obj.insert("component".into(), Value::String(String::new()));
                        component_missing = true;
                    }
                    Some(f) => {
                        obj.remove(f)?;
                    }
                }
            }
        }
    };
    if doc.id.is_empty()
        || !doc
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        diags.push(Diagnostic::new(
            format!("{loc}: id"),
            "a stage id uses only letters, digits, '-' and '_'",
        ));
    }
    if let Some(r) = &doc.retry {
        if retry.is_some() {
            diags.push(Diagnostic::new(
                format!("{loc}: retry"),
                "retry is given both on the stage and in config.retry",
            ));
        }
        retry = Some((r.clone(), "retry"));
    }
    for (j, name) in doc.secrets.iter().enumerate() {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            diags.push(Diagnostic::new(
                format!("{loc}: secrets[{j}]"),
                format!("{name:?} is not a secret name (letters, digits, '_' and '-')"),
            ));
        }
    }
    for (j, h) in doc.allowed_hosts.iter().enumerate() {
        if crate::http::HostPattern::parse(h).is_none() {
            diags.push(Diagnostic::new(
                format!("{loc}: allowed_hosts[{j}]"),
                format!("{h:?} is not a host, *.domain or host:port"),
            ));
        }
    }
    let config = doc
        .config
        .clone()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let _ = (
        &doc.name,
        &doc.description,
        &doc.position,
        &doc.llm_settings,
    );
    Some(Parsed {
        doc,
        component_missing,
        loc,
        config,
        retry,
    })
}

/// The `base_url` of the service a stage names, as the pipeline wrote it: the stage's
/// `service`, or its config's `service` when that is literal text naming a declared
/// service (a name taken from data names nothing). The service is written in the
/// pipeline file, so its origin is the pipeline's grant to the stage's plugin.
fn service_base_url(
    doc: &StageDoc,
    config: &Value,
    services: &[(String, crate::http::ServicePolicy)],
) -> Option<Arc<str>> {
    let name = doc
        .service
        .as_deref()
        .or_else(|| config.get("service").and_then(Value::as_str))?;
    services
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, policy)| policy.base_url.as_deref())
        .map(Arc::from)
}

/// Whether the config's `base_url` was chosen by the pipeline file itself (literal text,
/// or secrets with literal defaults), so its host may be granted; a base URL built from
/// input or upstream data grants nothing.
fn trusted_base_url(config: &Value) -> bool {
    match config.get("base_url") {
        Some(Value::String(s)) => match Template::parse(s) {
            Ok(None) => true,
            Ok(Some(t)) => t.paths().iter().all(|p| p.root == "secrets"),
            Err(_) => false,
        },
        _ => false,
    }
}

/// Checks that a template path reads something that will exist when it is rendered.
fn check_reference(
    path: &Path,
    allow_output: bool,
    index: &HashMap<&str, usize>,
    upstream: &[bool],
    own_id: &str,
) -> Result<(), String> {
    match path.root.as_str() {
        "input" | "run" | "trigger" => Ok(()),
        "output" if allow_output => Ok(()),
        "output" => Err(format!(
            "`{path}`: `output` is only available in a retry condition"
        )),
        "secrets" => match path.segments.as_slice() {
            [Segment::Field(_)] => Ok(()),
            _ => Err(format!("`{path}`: expected `secrets.NAME`")),
        },
        "stages" => {
            let Some(Segment::Field(id)) = path.segments.first() else {
                return Err(format!("`{path}`: expected `stages.ID.output`"));
            };
            match path.segments.get(1) {
                Some(Segment::Field(f)) if f == "output" || f == "error" || f == "status" => {}
                _ => return Err(format!("`{path}`: expected `stages.{id}.output`")),
            }
            match index.get(id.as_str()) {
                None => Err(format!(
                    "`{path}`: unknown stage \"{id}\"{}",
                    suggest(id, index.keys().copied())
                )),
                Some(_) if id == own_id => {
                    Err(format!("`{path}`: a stage cannot read its own output"))
                }
                Some(&i) if !upstream[i] => Err(format!(
                    "`{path}`: stage \"{id}\" is not upstream of this stage; add it to depends_on"
                )),
                Some(_) => Ok(()),
            }
        }
        other => Err(format!(
            "`{path}`: unknown name `{other}` (expected input, stages, upstream, context, secrets or run)"
        )),
    }
}

fn compile_schema(
    schema: Option<&Value>,
    at: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::schema::Validator> {
    match crate::schema::compile(schema?) {
        Ok(v) => Some(v),
        Err(e) => {
            diags.push(Diagnostic::new(at, e));
            None
        }
    }
}

/// Where inside the value a deserialisation error is, prefixed by `sep`; empty at the root.
fn error_at(path: &serde_path_to_error::Path, sep: &str) -> String {
    let path = path.to_string();
    if path == "." {
        String::new()
    } else {
        format!("{sep}{path}")
    }
}

/// serde_json appends "at line L column C", which the diagnostic already carries.
fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

/// Milliseconds as a number, or a humane string (`"5s"`, `"250ms"`).
pub fn parse_duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                "expected a positive number of milliseconds, found {n}"
            )),
        },
        Value::String(s) => {
            humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
        }
        other => Err(format!(
            "expected milliseconds or a duration such as \"5s\", found {other}"
        )),
    }
}

/// A config with the fields a component evaluates itself put back, unrendered.
fn with_raw(t: ValueTemplate, raw: Vec<(String, Value)>) -> ValueTemplate {
    if raw.is_empty() {
        return t;
    }
    let mut fields = match t {
        ValueTemplate::Object(fields) => fields,
        ValueTemplate::Literal(Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| (k, ValueTemplate::Literal(v)))
            .collect(),
        other => return other,
    };
    fields.extend(raw.into_iter().map(|(k, v)| (k, ValueTemplate::Literal(v))));
    ValueTemplate::Object(fields)
}

/// ` (did you mean "x"?)` when a known name is one or two edits away.
pub(super) fn suggest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (edit_distance(name, k), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| format!(" (did you mean \"{k}\"?)"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != *cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A `budget` block, or its problems added to `diags` under `at`.
fn budget_of(
    raw: &Value,
    at: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<crate::http::budget::BudgetSpec> {
    match serde_path_to_error::deserialize::<_, crate::http::budget::BudgetSpec>(raw) {
        Ok(b) => {
            let problems = b.problems();
            for (field, message) in &problems {
                let field = field.strip_prefix("budget").unwrap_or(field);
                diags.push(Diagnostic::new(format!("{at}{field}"), message.clone()));
            }
            problems.is_empty().then_some(b)
        }
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." {
                String::new()
            } else {
                format!(".{path}")
            };
            diags.push(Diagnostic::new(
                format!("{at}{path}"),
                e.inner().to_string(),
            ));
            None
        }
    }
}
