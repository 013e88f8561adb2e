//! Generated pipelines, templates and expressions, balanced bombs included, thrown at the
//! parser, the validator and the renderer: each returns a value or a clean error, never
//! a panic or a stack overflow. `cargo xtask fuzz --minutes N` runs these longer
//! (`PROPTEST_CASES`); CI runs the default number of cases.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::{NoStages, Scope, Template, ValueTemplate};
use crate::secrets::Secrets;

/// Pieces that template and expression text is made of, so generated text reaches deep
/// into the grammar instead of failing at the first character.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("secrets.KEY".to_string()),
        Just("input.a.b[0]".to_string()),
        Just("stages.s-1.output".to_string()),
        Just(" | default('x')".to_string()),
        Just(" | upper".to_string()),
        Just(" | tojson".to_string()),
        Just("not ".to_string()),
        Just(" and ".to_string()),
        Just(" or ".to_string()),
        Just(" == ".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("now()".to_string()),
        Just("len(".to_string()),
        Just(",".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("1.5".to_string()),
        "[a-z{}()|' .\\[\\]0-9-]{0,8}",
    ]
}

fn template_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(piece(), 0..40).prop_map(|p| p.concat()),
        // Balanced and unbalanced bombs, far past every bound.
        1 => (1usize..20_000, prop::bool::ANY, 0usize..3).prop_map(|(n, balanced, kind)| {
            let (open, close) = match kind {
                0 => ("(", ")"),
                1 => ("not (", ")"),
                _ => ("len(", ")"),
            };
            let tail = if balanced { close.repeat(n) } else { String::new() };
            format!("{{{{{}x{tail}}}}}", open.repeat(n))
        }),
        1 => (1usize..20_000).prop_map(|n| format!("{{{{x{}}}}}", " | upper".repeat(n))),
        1 => (1usize..5_000).prop_map(|n| "{{".repeat(n)),
    ]
}

fn render_all(text: &str) {
    let secrets = Secrets::from_pairs([("KEY", "k-1234")]);
    let input = json!({"a": {"b": [1, "two"]}});
    let run = json!({"id": "r"});
    for keep_secrets in [false, true] {
        let scope = Scope {
            input: &input,
            stages: &NoStages,
            secrets: &secrets,
            output: None,
            run: &run,
            now: Some("2024-01-01T00:00:00Z"),
            keep_secrets,
            locals: None,
        };
        if let Ok(Some(t)) = Template::parse(text) {
            let _ = t.render(&scope);
            let _ = t.plugin_secret_forms();
        }
    }
}

proptest! {
    #[test]
    fn templates_parse_and_render_or_fail_cleanly(text in template_text()) {
        render_all(&text);
    }

    #[test]
    fn pipelines_validate_or_fail_cleanly(
        texts in prop::collection::vec(template_text(), 1..4),
        deps in prop::collection::vec(0usize..4, 0..4),
        raw in "[\\[\\]{}\":,a-z0-9 ]{0,200}",
    ) {
        let registry = crate::component::Registry::builtins();
        let stages: Vec<Value> = texts.iter().enumerate().map(|(i, t)| json!({
            "id": format!("s{i}"),
            "component": if i % 2 == 0 { "http-request" } else { "logger" },
            "depends_on": deps.iter().filter(|d| **d != i && **d < texts.len()).map(|d| format!("s{d}")).collect::<Vec<_>>(),
            "config": {"url": t, "message": t, "headers": {"x": t}},
        })).collect();
        let doc = json!({"name": "p", "stages": stages});
        let _ = crate::pipeline::compile(&doc.to_string(), &registry);
        let _ = crate::pipeline::compile(&raw, &registry);
        let _ = ValueTemplate::compile(&doc);
    }
}

#[test]
fn json_nested_past_the_parser_limit_is_an_error() {
    let registry = crate::component::Registry::builtins();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let doc = format!(
        r#"{{"name": "p", "stages": [{{"id": "a", "component": "logger", "config": {{"message": {deep}}}}}]}}"#
    );
    assert!(crate::pipeline::compile(&doc, &registry).is_err());
}

#[test]
fn pipelines_past_the_size_bounds_are_one_clear_error() {
    let registry = crate::component::Registry::builtins();
    let stages: Vec<Value> = (0..10_001)
        .map(|i| json!({"id": format!("s{i}"), "component": "logger", "config": {"message": "x"}}))
        .collect();
    let errors = crate::pipeline::compile(
        &json!({"name": "p", "stages": stages}).to_string(),
        &registry,
    )
    .err()
    .unwrap();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].message.contains("at most 10000 stages"),
        "{}",
        errors[0].message
    );
}
