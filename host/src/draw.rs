//! Pictures of pipelines and runs: a pipeline's DAG as Mermaid or Graphviz dot
//! (`fmhost graph`), the same graph as JSON for the web console, and a run's stages and
//! attempts as a Mermaid Gantt chart (`fmhost runs show --timeline`).
//!
//! One model, [`Dag`], is built from a compiled [`Plan`] and drawn three ways, so the
//! command line and the console never disagree about a pipeline's shape.

use std::fmt::Write as _;

use serde::Serialize;

use crate::journal::RunDetail;
use crate::pipeline::Plan;

/// A pipeline's shape: its stages, one edge per dependency, the blocks that
/// control-flow stages run (loop bodies, try/catch/finally), and the branches they choose.
#[derive(Debug, Clone, Serialize)]
pub struct Dag {
    pub pipeline: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    pub blocks: Vec<BlockBox>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub id: String,
    pub component: String,
    /// Whether the component is a control-flow one (conditional, foreach, ...).
    pub control: bool,
    /// The index in `blocks` of the block it runs in; `None` for the pipeline's own DAG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `depends` for a dependency; for a branch, the config field that names it
    /// (`true_stages`, `routes.gold`).
    pub kind: String,
}

/// A block run by a controller: a loop body (once per item) or a try, catch or finally.
#[derive(Debug, Clone, Serialize)]
pub struct BlockBox {
    pub controller: String,
    /// The config field that lists its stages (`loop_stages`, `try_stages`).
    pub field: String,
    pub per_item: bool,
    /// The enclosing block, for nested blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<usize>,
}

/// The plan's shape. Branch lists are read from each controller's config as written.
pub fn dag(plan: &Plan) -> Dag {
    // Plan block 0 is the pipeline itself; the others become boxes 0.. in order.
    let boxed = |b: usize| (b > 0).then(|| b - 1);
    let blocks = plan.blocks[1..]
        .iter()
        .map(|b| BlockBox {
            controller: b
                .controller
                .map(|c| plan.stages[c].id.to_string())
                .unwrap_or_default(),
            field: b.field.to_string(),
            per_item: b.per_item,
            parent: b.controller.and_then(|c| boxed(plan.stages[c].block)),
        })
        .collect();
    let written: Vec<&serde_json::Value> = plan
        .source
        .get("stages")
        .and_then(|s| s.as_array())
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    let null = serde_json::Value::Null;
    let config_of = |id: &str| {
        written
            .iter()
            .find(|s| s.get("id").and_then(|i| i.as_str()) == Some(id))
            .and_then(|s| s.get("config"))
            .unwrap_or(&null)
    };
    for stage in &plan.stages {
        let (governs, _) = stage.component.governs(config_of(&stage.id));
        let control = !governs.branches.is_empty()
            || !governs.blocks.is_empty()
            || governs.pipeline.is_some()
            || crate::component::canonical_name(&stage.component_name) == "return";
        nodes.push(Node {
            id: stage.id.to_string(),
            component: stage.component_name.clone(),
            control,
            block: boxed(stage.block),
        });
        for &d in &stage.deps {
            // A branch a controller chooses is drawn as the branch, not twice.
            let chosen = |id: &str| {
                plan.stages[d]
                    .component
                    .governs(config_of(&plan.stages[d].id))
                    .0
                    .branches
                    .iter()
                    .any(|(_, ids)| ids.iter().any(|i| i == id))
            };
            // So is a controller's hold on the stages of its blocks.
            let runs_it = plan.blocks[stage.block].controller == Some(d);
            if chosen(&stage.id) || runs_it {
                continue;
            }
            edges.push(Edge {
                from: plan.stages[d].id.to_string(),
                to: stage.id.to_string(),
                kind: "depends".into(),
            });
        }
        for (field, ids) in &governs.branches {
            for id in ids.iter().filter(|id| plan.stage_index(id).is_some()) {
                edges.push(Edge {
                    from: stage.id.to_string(),
                    to: id.clone(),
                    kind: field.clone(),
                });
            }
        }
    }
    Dag {
        pipeline: plan.name.to_string(),
        nodes,
        edges,
        blocks,
    }
}

/// Mermaid `flowchart` text.
pub fn mermaid(dag: &Dag) -> String {
    let key = |id: &str| -> String {
        let i = dag.nodes.iter().position(|n| n.id == id).unwrap_or(0);
        format!("s{i}")
    };
    let label = |s: &str| {
        s.replace('&', "#amp;")
            .replace('"', "#quot;")
            .replace('<', "#lt;")
            .replace('>', "#gt;")
    };
    let mut out = String::from("flowchart TD\n");
    let node_line = |out: &mut String, indent: &str, i: usize, n: &Node| {
        let text = format!(
            "{}<br/><small>{}</small>",
            label(&n.id),
            label(&n.component)
        );
        let _ = if n.control {
            writeln!(out, "{indent}s{i}{{\"{text}\"}}")
        } else {
            writeln!(out, "{indent}s{i}[\"{text}\"]")
        };
    };
    // Boxes nest: draw each block with its own stages and its child blocks inside.
    fn draw_block(
        dag: &Dag,
        b: Option<usize>,
        depth: usize,
        out: &mut String,
        node_line: &dyn Fn(&mut String, &str, usize, &Node),
    ) {
        let indent = "  ".repeat(depth + 1);
        for (i, n) in dag.nodes.iter().enumerate().filter(|(_, n)| n.block == b) {
            node_line(out, &indent, i, n);
        }
        for (bi, bx) in dag
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, x)| x.parent == b && !empty(dag, *i))
        {
            let title = format!(
                "{}: {}{}",
                bx.controller,
                bx.field,
                if bx.per_item { " (per item)" } else { "" }
            );
            let _ = writeln!(
                out,
                "{indent}subgraph b{bi}[\"{}\"]",
                title.replace('"', "#quot;")
            );
            draw_block(dag, Some(bi), depth + 1, out, node_line);
            let _ = writeln!(out, "{indent}end");
        }
    }
    draw_block(dag, None, 0, &mut out, &node_line);
    for e in &dag.edges {
        let _ = if e.kind == "depends" {
            writeln!(out, "  {} --> {}", key(&e.from), key(&e.to))
        } else {
            writeln!(
                out,
                "  {} -.->|{}| {}",
                key(&e.from),
                label(&e.kind),
                key(&e.to)
            )
        };
    }
    for (bi, bx) in dag.blocks.iter().enumerate() {
        if !empty(dag, bi) {
            let _ = writeln!(out, "  {} -.->|{}| b{bi}", key(&bx.controller), bx.field);
        }
    }
    out
}

/// Whether a block has no stages, directly or in blocks within it.
fn empty(dag: &Dag, b: usize) -> bool {
    !dag.nodes.iter().any(|n| n.block == Some(b))
        && dag
            .blocks
            .iter()
            .enumerate()
            .all(|(i, x)| x.parent != Some(b) || empty(dag, i))
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Graphviz `dot` text.
pub fn dot(dag: &Dag) -> String {
    let q = |s: &str| format!("\"{}\"", esc(s));
    let mut out = format!(
        "digraph {} {{\n  rankdir=TB;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n",
        q(&dag.pipeline)
    );
    fn draw_block(
        dag: &Dag,
        b: Option<usize>,
        depth: usize,
        out: &mut String,
        q: &dyn Fn(&str) -> String,
    ) {
        let indent = "  ".repeat(depth + 1);
        for n in dag.nodes.iter().filter(|n| n.block == b) {
            let shape = if n.control {
                ", shape=diamond, style=\"\""
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{indent}{} [label=\"{}\\n{}\"{shape}];",
                q(&n.id),
                esc(&n.id),
                esc(&n.component)
            );
        }
        for (bi, bx) in dag
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, x)| x.parent == b && !empty(dag, *i))
        {
            let _ = writeln!(out, "{indent}subgraph cluster_{bi} {{");
            let _ = writeln!(
                out,
                "{indent}  label={}; style=dashed;",
                q(&format!(
                    "{}: {}{}",
                    bx.controller,
                    bx.field,
                    if bx.per_item { " (per item)" } else { "" }
                ))
            );
            draw_block(dag, Some(bi), depth + 1, out, q);
            let _ = writeln!(out, "{indent}}}");
        }
    }
    draw_block(dag, None, 0, &mut out, &q);
    for e in &dag.edges {
        let _ = if e.kind == "depends" {
            writeln!(out, "  {} -> {};", q(&e.from), q(&e.to))
        } else {
            writeln!(
                out,
                "  {} -> {} [style=dashed, label={}];",
                q(&e.from),
                q(&e.to),
                q(&e.kind)
            )
        };
    }
    out.push_str("}\n");
    out
}

/// A Mermaid `gantt` of a journaled run: a section per stage with its bar, then one
/// bar per outbound attempt, on a millisecond axis from the run's start.
pub fn gantt(d: &RunDetail) -> String {
    let s = &d.summary;
    let clean = |t: &str| t.replace([':', ';', '#'], " ");
    let mut out = String::from("gantt\n");
    let _ = writeln!(
        out,
        "  title {} {} ({}{})",
        clean(&s.pipeline),
        s.run_id,
        s.status,
        s.duration_ms
            .map(|m| format!(", {m} ms"))
            .unwrap_or_default()
    );
    out.push_str("  dateFormat x\n  axisFormat %S.%L s\n");
    let mut n = 0;
    for st in &d.stages {
        let r = &st.report;
        let Some(start) = r.started_ms else { continue };
        let end = start + r.duration_ms.unwrap_or(0).max(1);
        let tag = match r.status.as_str() {
            "succeeded" => "done, ",
            "failed" => "crit, ",
            "running" => "active, ",
            _ => "",
        };
        let _ = writeln!(out, "  section {}", clean(&r.id));
        let _ = writeln!(
            out,
            "  {} ({}) :{tag}t{n}, {start}, {end}",
            clean(&r.id),
            r.status.as_str()
        );
        n += 1;
        for a in &st.calls {
            let a_end = (a.at_ms - s.started_at_ms).max(0) as u64;
            let a_start = a_end.saturating_sub(a.duration_ms);
            let outcome = a
                .status
                .map(|c| c.to_string())
                .or(a.error_kind.clone())
                .unwrap_or_default();
            let tag = if a.error_kind.is_some() || a.status.is_some_and(|c| c >= 400) {
                "crit, "
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {} {} try {} {} :{tag}t{n}, {a_start}, {}",
                a.method,
                clean(&a.service),
                a.attempt,
                clean(&outcome),
                a_end.max(a_start + 1)
            );
            n += 1;
        }
    }
    out
}
