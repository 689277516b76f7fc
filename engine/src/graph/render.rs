//! DOT and Mermaid renderings of a [`Graph`].
//!
//! Output is a pure function of the recipe: nodes in run order named `n<index>`, the
//! expansions of one `foreach`/`matrix` stage grouped in a cluster, one edge per
//! (producer, consumer) pair labelled with the consumer's parameters (joined by `, `), and
//! `after` edges dashed. Snapshot tests rely on this stability.

use super::Graph;

/// One drawn edge: producer, consumer, label, dashed (`after` only).
struct Drawn {
    from: usize,
    to: usize,
    label: String,
    dashed: bool,
}

/// Edges merged per (producer, consumer), in consumer order then producer order.
fn edges(g: &Graph<'_>) -> Vec<Drawn> {
    let mut out = Vec::new();
    for (to, stage) in g.recipe.stages.iter().enumerate() {
        let mut per_from: Vec<(usize, Vec<String>, bool)> = Vec::new();
        let mut add = |from: usize, label: String, data: bool| match per_from
            .iter_mut()
            .find(|(f, _, _)| *f == from)
        {
            Some((_, labels, d)) => {
                if !labels.contains(&label) {
                    labels.push(label);
                }
                *d |= data;
            }
            None => per_from.push((from, vec![label], data)),
        };
        for input in &stage.inputs {
            add(input.stage, input.param.clone(), true);
        }
        for &a in &stage.after {
            add(a, "after".to_string(), false);
        }
        per_from.sort_by_key(|(f, _, _)| *f);
        out.extend(per_from.into_iter().map(|(from, labels, data)| Drawn {
            from,
            to,
            label: labels.join(", "),
            dashed: !data,
        }));
    }
    out
}

/// Runs of consecutive stages sharing a base name (`None` for plain stages).
fn groups<'a>(g: &Graph<'a>) -> Vec<(Option<&'a str>, Vec<usize>)> {
    let mut out: Vec<(Option<&str>, Vec<usize>)> = Vec::new();
    for (i, s) in g.recipe.stages.iter().enumerate() {
        let base = (s.base != s.name).then_some(s.base.as_str());
        match out.last_mut() {
            Some((Some(b), members)) if base == Some(*b) => members.push(i),
            _ => out.push((base, vec![i])),
        }
    }
    out
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

pub(super) fn dot(g: &Graph<'_>) -> String {
    let mut s = String::from(
        "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n",
    );
    let node = |s: &mut String, i: usize, indent: &str| {
        let st = &g.recipe.stages[i];
        s.push_str(&format!(
            "{indent}n{i} [label=\"{}\\n{}\"];\n",
            dot_escape(&st.name),
            dot_escape(&st.kind)
        ));
    };
    for (k, (base, members)) in groups(g).into_iter().enumerate() {
        match base {
            Some(b) => {
                s.push_str(&format!(
                    "  subgraph cluster_{k} {{\n    label=\"{}\";\n",
                    dot_escape(b)
                ));
                for i in members {
                    node(&mut s, i, "    ");
                }
                s.push_str("  }\n");
            }
            None => node(&mut s, members[0], "  "),
        }
    }
    for e in edges(g) {
        let style = if e.dashed { ", style=dashed" } else { "" };
        s.push_str(&format!(
            "  n{} -> n{} [label=\"{}\"{style}];\n",
            e.from,
            e.to,
            dot_escape(&e.label)
        ));
    }
    s.push_str("}\n");
    s
}

/// Mermaid labels are quoted; a quote inside is written as the entity `#quot;`.
fn mermaid_escape(s: &str) -> String {
    s.replace('"', "#quot;")
}

pub(super) fn mermaid(g: &Graph<'_>) -> String {
    let mut s = String::from("flowchart LR\n");
    let node = |s: &mut String, i: usize, indent: &str| {
        let st = &g.recipe.stages[i];
        s.push_str(&format!(
            "{indent}n{i}[\"{}<br/>{}\"]\n",
            mermaid_escape(&st.name),
            mermaid_escape(&st.kind)
        ));
    };
    for (k, (base, members)) in groups(g).into_iter().enumerate() {
        match base {
            Some(b) => {
                s.push_str(&format!("  subgraph g{k}[\"{}\"]\n", mermaid_escape(b)));
                for i in members {
                    node(&mut s, i, "    ");
                }
                s.push_str("  end\n");
            }
            None => node(&mut s, members[0], "  "),
        }
    }
    for e in edges(g) {
        let arrow = if e.dashed { "-.->" } else { "-->" };
        s.push_str(&format!(
            "  n{} {arrow}|\"{}\"| n{}\n",
            e.from,
            mermaid_escape(&e.label),
            e.to
        ));
    }
    s
}
