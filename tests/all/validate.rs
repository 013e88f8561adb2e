//! `fmhost validate` against golden files: every problem at once, each with its place.
//! Rewrite the expected files with `FMHOST_BLESS=1 cargo test`.

use crate::support;

async fn check_golden(name: &str) {
    let rel = format!("tests/golden/validate/{name}.pipeline.json");
    let mut cmd = support::fmhost();
    cmd.args(["validate", &rel]);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(
        ran.code, 2,
        "validate must exit 2 for {name}:\n{}",
        ran.stderr
    );
    let golden = support::root().join(format!("tests/golden/validate/{name}.stderr"));
    if std::env::var_os("FMHOST_BLESS").is_some() {
        std::fs::write(&golden, &ran.stderr).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    assert_eq!(
        ran.stderr,
        expected,
        "stderr differs from {} (FMHOST_BLESS=1 rewrites it)",
        golden.display()
    );
}

#[tokio::test]
async fn reports_every_problem_with_its_place() {
    check_golden("many-problems").await;
}

#[tokio::test]
async fn json_syntax_errors_give_line_and_column() {
    check_golden("syntax-error").await;
}

#[tokio::test]
async fn a_valid_pipeline_passes() {
    let mut cmd = support::fmhost();
    cmd.args(["validate", "pipelines/parallel-fetch.pipeline.json"]);
    let ran: support::Ran = support::output(cmd).await.into();
    assert_eq!(ran.code, 0, "{}", ran.stderr);
}

/// A stage with bad fields still has its other fields and its config checked, and the
/// stages that depend on it do not get a false "unknown stage".
#[tokio::test]
async fn a_broken_stage_is_checked_whole_and_its_dependents_still_find_it() {
    check_golden("broken-stage").await;
}
