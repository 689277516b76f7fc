//! `pipeline explain` and `pipeline plan`: every reason a stage would rerun, in text and
//! in `--json`.

use serde_json::Value;

use crate::common::{Project, RecipeOpts, Shape, explained_param, render, shape};

fn explain(p: &Project, stage: &str, json: bool) -> crate::common::RunResult {
    let recipe = p.recipe();
    let mut args = Vec::new();
    if json {
        args.push("--json");
    }
    args.extend(["explain", recipe.to_str().unwrap(), stage]);
    p.run(&args)
}

/// The stage's line in the plan table (first whitespace-separated column is the name).
fn plan_line(stdout: &str, stage: &str) -> String {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(stage))
        .unwrap_or_else(|| panic!("no plan line for `{stage}` in:\n{stdout}"))
        .to_owned()
}

/// The status column (hit/run/maybe) of `stage` in the plan table.
fn plan_status(stdout: &str, stage: &str) -> String {
    let line = plan_line(stdout, stage);
    line.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

fn setup_changed() -> Project {
    let nodes = shape(Shape::Chain, 4);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    opts.params.insert("s0001".into(), (1, 5)); // q: 1 -> 5
    p.write_recipe(&render(&nodes, &opts));
    p
}

#[test]
fn explain_names_the_changed_param_with_old_and_new_values() {
    let p = setup_changed();
    let (line, out) = explained_param(&explain(&p, "s0001", false), "q");
    assert!(
        line.contains('1') && line.contains('5'),
        "old and new value of `q` missing: {line}\n{out}"
    );
    assert!(
        !out.contains("`p`"),
        "`p` did not change and must not be listed:\n{out}"
    );
}

#[test]
fn explain_of_an_unchanged_stage_says_hit() {
    let p = setup_changed();
    let r = explain(&p, "s0000", false);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr).to_lowercase();
    assert!(
        out.contains("hit") || out.contains("up to date") || out.contains("fresh"),
        "s0000 is unchanged:\n{out}"
    );
    assert!(
        !out.contains("`q`"),
        "s0000's params did not change:\n{out}"
    );
}

#[test]
fn explain_downstream_of_a_changed_output_names_the_upstream() {
    let nodes = shape(Shape::Chain, 3);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    opts.params.insert("s0000".into(), (9, 1)); // p reaches the output
    p.write_recipe(&render(&nodes, &opts));
    // Run only s0000 so that s0001's input really changed and is known.
    p.run_json(&["--only", "s0000"]).ok();
    let r = explain(&p, "s0001", false);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        out.contains("deps") && out.contains("s0000"),
        "expected input `deps` changed because of `s0000`:\n{out}"
    );
}

#[test]
fn explain_of_a_never_run_stage_says_so() {
    let nodes = shape(Shape::Chain, 3);
    let p = Project::new(&render(&nodes[..2], &RecipeOpts::default()));
    p.run_json(&[]).ok();
    p.write_recipe(&render(&nodes, &RecipeOpts::default()));
    let r = explain(&p, "s0002", false);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr).to_lowercase();
    assert!(
        out.contains("never run") || out.contains("no previous run"),
        "s0002 never ran:\n{out}"
    );
}

#[test]
fn explain_json_carries_the_param_diff() {
    let p = setup_changed();
    let r = explain(&p, "s0001", true);
    r.ok();
    // One JSON document (possibly pretty-printed) or JSON Lines.
    let values: Vec<Value> = serde_json::from_str::<Value>(&r.stdout).map_or_else(
        |_| {
            r.stdout
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    serde_json::from_str(l)
                        .unwrap_or_else(|e| panic!("explain --json line is not JSON ({e}): {l}"))
                })
                .collect()
        },
        |v| vec![v],
    );
    assert!(
        !values.is_empty(),
        "explain --json printed nothing; stderr:\n{}",
        r.stderr
    );
    let mut changes = Vec::new();
    for v in &values {
        collect_param_changes(v, &mut changes);
    }
    let q = changes
        .iter()
        .find(|c| {
            c["path"]
                .as_str()
                .is_some_and(|p| p == "q" || p.ends_with(".q"))
        })
        .unwrap_or_else(|| panic!("no `param-changed` reason for `q` in: {}", r.stdout));
    assert_eq!(q["old"], 1, "{q}");
    assert_eq!(q["new"], 5, "{q}");
    assert!(
        !changes.iter().any(|c| c["path"]
            .as_str()
            .is_some_and(|p| p == "p" || p.ends_with(".p"))),
        "`p` did not change: {}",
        r.stdout
    );
}

#[test]
fn plan_marks_hit_run_and_maybe() {
    let nodes = shape(Shape::Chain, 4);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    let recipe = p.recipe();
    let cold = p.run(&["plan", recipe.to_str().unwrap()]);
    cold.ok();
    assert_eq!(plan_status(&cold.stdout, "s0000"), "run", "{}", cold.stdout);
    // s0001's input is not known before s0000 runs.
    assert!(
        ["run", "maybe"].contains(&plan_status(&cold.stdout, "s0001").as_str()),
        "{}",
        cold.stdout
    );

    p.run_json(&[]).ok();
    let warm = p.run(&["plan", recipe.to_str().unwrap()]);
    warm.ok();
    for n in &nodes {
        assert_eq!(plan_status(&warm.stdout, &n.name), "hit", "{}", warm.stdout);
    }

    opts.params.insert("s0001".into(), (3, 1));
    p.write_recipe(&render(&nodes, &opts));
    let changed = p.run(&["plan", recipe.to_str().unwrap()]);
    changed.ok();
    assert_eq!(
        plan_status(&changed.stdout, "s0000"),
        "hit",
        "{}",
        changed.stdout
    );
    assert_eq!(
        plan_status(&changed.stdout, "s0001"),
        "run",
        "{}",
        changed.stdout
    );
    let l1 = plan_line(&changed.stdout, "s0001");
    assert!(
        l1.contains('p') && l1.contains('3'),
        "the reason for s0001 names `p` → 3: {l1}"
    );
    assert_eq!(
        plan_status(&changed.stdout, "s0002"),
        "maybe",
        "{}",
        changed.stdout
    );
    assert_eq!(
        plan_status(&changed.stdout, "s0003"),
        "maybe",
        "{}",
        changed.stdout
    );
    // plan runs nothing.
    assert_eq!(p.exec_counts()["s0001"], 1, "plan must not execute stages");
}

/// Every object tagged `"reason": "param-changed"` anywhere in `v`.
fn collect_param_changes(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            if m.get("reason").and_then(Value::as_str) == Some("param-changed") {
                out.push(v.clone());
            }
            m.values().for_each(|x| collect_param_changes(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_param_changes(x, out)),
        _ => {}
    }
}

#[test]
fn explain_names_a_changed_external_file() {
    let (p, _) = crate::common::Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    p.run_json(&[]).ok();
    std::fs::write(p.proj().join("seed.txt"), "another seed\n").unwrap();
    let r = explain(&p, "s0000", false);
    r.ok();
    let out = format!("{}{}", r.stdout, r.stderr);
    assert!(
        out.contains("seed.txt") && out.contains("changed"),
        "expected `file `seed.txt` changed`:\n{out}"
    );
    let down = explain(&p, "s0001", false);
    down.ok();
    let out = format!("{}{}", down.stdout, down.stderr);
    assert!(
        out.contains("maybe") || out.contains("s0000"),
        "s0001 depends on a rerunning stage:\n{out}"
    );
}
