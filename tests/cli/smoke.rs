//! Smoke tests of the read-only subcommands: `dag`, `kinds`, `plan`, `--help`.

use crate::common::{Project, RecipeOpts, Shape, shape};

/// Map each stage name to its node id in a dot graph (`n3 [label="s0003\nshell"]`), so
/// edges can be checked whatever the id scheme; a name used directly as id maps to itself.
fn dot_ids(dot: &str, names: &[String]) -> std::collections::BTreeMap<String, String> {
    let mut ids = std::collections::BTreeMap::new();
    for name in names {
        let id = dot
            .lines()
            .map(str::trim)
            .find_map(|l| {
                let (id, rest) = l.split_once(' ')?;
                let label = rest.split("label=\"").nth(1)?;
                let first = label.split(['"', '\\']).next()?;
                (first == name && !l.contains("->")).then(|| id.trim_matches('"').to_owned())
            })
            .unwrap_or_else(|| name.clone());
        ids.insert(name.clone(), id);
    }
    ids
}

#[test]
fn dag_dot_lists_every_stage_and_edge() {
    let (p, nodes) = Project::with_shape(Shape::Layered, 9, &RecipeOpts::default());
    let recipe = p.recipe();
    let r = p.run(&["dag", recipe.to_str().unwrap()]);
    r.ok();
    let dot = &r.stdout;
    assert!(
        dot.trim_start().starts_with("digraph"),
        "default format is dot:\n{dot}"
    );
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    for n in &names {
        assert!(dot.contains(n.as_str()), "stage {n} missing:\n{dot}");
    }
    let ids = dot_ids(dot, &names);
    let edges: std::collections::BTreeSet<(String, String)> = dot
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once("->")?;
            let b = b.trim().split([' ', ';', '[']).next()?;
            Some((
                a.trim().trim_matches('"').to_owned(),
                b.trim_matches('"').to_owned(),
            ))
        })
        .collect();
    let mut expected = std::collections::BTreeSet::new();
    for n in &nodes {
        for d in &n.deps {
            expected.insert((ids[d].clone(), ids[&n.name].clone()));
        }
    }
    assert_eq!(
        edges, expected,
        "the dot edges must be exactly the dependencies:\n{dot}"
    );
    assert_eq!(p.exec_counts().len(), 0, "dag must not run anything");
}

#[test]
fn dag_mermaid() {
    let (p, nodes) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    let recipe = p.recipe();
    let r = p.run(&["dag", recipe.to_str().unwrap(), "--format", "mermaid"]);
    r.ok();
    let first = r.stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("graph") || first.starts_with("flowchart"),
        "mermaid header expected:\n{}",
        r.stdout
    );
    assert_eq!(r.stdout.matches("-->").count(), 2, "{}", r.stdout);
    for n in &nodes {
        assert!(r.stdout.contains(&n.name));
    }
}

#[test]
fn dag_rejects_an_unknown_format() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    let r = p.run(&["dag", p.recipe().to_str().unwrap(), "--format", "png"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn kinds_documents_the_shell_kind() {
    let p = Project::new("");
    let r = p.run(&["kinds"]);
    r.ok();
    let out = &r.stdout;
    assert!(out.contains("shell"), "{out}");
    for param in ["deps", "cmd", "outs", "params"] {
        assert!(
            out.contains(param),
            "`shell` parameter `{param}` undocumented:\n{out}"
        );
    }
}

#[test]
fn plan_lists_every_stage_once_and_runs_nothing() {
    let (p, _) = Project::with_shape(Shape::Fan, 6, &RecipeOpts::default());
    let r = p.run(&["plan", p.recipe().to_str().unwrap()]);
    r.ok();
    for n in shape(Shape::Fan, 6) {
        let count = r
            .stdout
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(n.name.as_str()))
            .count();
        assert_eq!(
            count, 1,
            "{} must have exactly one plan line:\n{}",
            n.name, r.stdout
        );
    }
    assert!(!p.proj().join("out").exists(), "plan must not create outs");
    assert!(p.exec_counts().is_empty(), "plan must not execute commands");
}

#[test]
fn help_lists_the_subcommands() {
    let p = Project::new("");
    let r = p.run(&["--help"]);
    r.ok();
    for sub in ["run", "plan", "explain", "dag", "exec", "kinds", "gc"] {
        assert!(
            r.stdout.lines().any(|l| l.trim_start().starts_with(sub)),
            "`{sub}` missing from --help:\n{}",
            r.stdout
        );
    }
}

#[test]
fn only_runs_exactly_the_selected_stages() {
    let (p, _) = Project::with_shape(Shape::Chain, 4, &RecipeOpts::default());
    // On a cold cache, s0001's upstream is not selected and not cached: a clear failure
    // naming the stage to include, never a silent run of s0000.
    let cold = p.run_json(&["--only", "s0001"]);
    assert_ne!(cold.code, 0, "s0000 is neither selected nor cached");
    assert!(
        !cold.set_of("stage-started").contains("s0000"),
        "--only must not run unselected stages"
    );
    assert!(
        cold.stderr.contains("s0000") || cold.stdout.contains("s0000"),
        "the error must name `s0000`:\n{}",
        cold.stderr
    );

    p.run_json(&["--only", "s0000"]).ok();
    let r = p.run_json(&["--only", "s0001"]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started"),
        ["s0001".to_owned()].into(),
        "--only runs exactly s0001"
    );
    assert_eq!(
        p.exec_counts().get("s0002"),
        None,
        "--only must not run downstream"
    );
}

#[test]
fn until_stops_after_the_stage() {
    let (p, _) = Project::with_shape(Shape::Chain, 4, &RecipeOpts::default());
    let r = p.run_json(&["--until", "s0001"]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started"),
        ["s0000".to_owned(), "s0001".to_owned()].into()
    );
}

#[test]
fn recipe_named_relative_to_the_current_directory() {
    // `pipeline run recipe.toml` from the recipe's own directory: the recipe directory is
    // then the empty path, which must mean `.` (commands run there, outs restored there).
    let (p, _) = Project::with_shape(Shape::Chain, 2, &RecipeOpts::default());
    let mut c = p.cmd(&["--json", "run", "recipe.toml"]);
    c.current_dir(p.proj());
    let r = crate::common::run_cmd(c);
    r.ok();
    assert_eq!(r.set_of("stage-finished").len(), 2);
    assert!(
        p.proj().join("out/s0001.txt").is_file(),
        "outs must land next to the recipe"
    );
}

#[test]
fn plan_names_every_missing_input_and_exits_1() {
    let p = Project::new(
        r#"[experiment]
name = "missing"

[stages.a]
kind = "shell"
deps = ["data/raw.txt"]
cmd = "cat ${deps} > ${outs}"
outs = ["a.txt"]

[stages.b]
kind = "shell"
deps = ["@a", "weights.bin"]
cmd = "cat ${deps} > ${outs}"
outs = ["b.txt"]
"#,
    );
    let r = p.run(&["plan", p.recipe().to_str().unwrap()]);
    assert_eq!(
        r.code, 1,
        "a plan with stages that cannot run exits 1:\n{}",
        r.stdout
    );
    // Both files are named with the OS's reason, including the one below a broken stage.
    let missing = r.stdout.split("missing inputs:").nth(1).unwrap_or_default();
    for f in [
        "`data/raw.txt` (param `deps`)",
        "`weights.bin` (param `deps`)",
    ] {
        assert!(
            missing.contains(f),
            "missing inputs lack {f}:\n{}",
            r.stdout
        );
    }
    assert!(
        r.stdout.contains("No such file or directory"),
        "{}",
        r.stdout
    );
    std::fs::create_dir_all(p.proj().join("data")).unwrap();
    std::fs::write(p.proj().join("data/raw.txt"), "x\n").unwrap();
    std::fs::write(p.proj().join("weights.bin"), "w\n").unwrap();
    let r = p.run(&["plan", p.recipe().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(!r.stdout.contains("missing inputs"), "{}", r.stdout);
}
