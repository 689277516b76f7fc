//! `pipeline gc` keeps exactly what the recipes reference; `pipeline exec` runs exactly one
//! stage whose inputs are cached (what a Slurm job calls).

use crate::common::{Project, RecipeOpts, Shape, render, shape};

fn entries(p: &Project) -> usize {
    std::fs::read_dir(p.cache().join("v1/entries")).map_or(0, |rd| rd.flatten().count())
}

#[test]
fn gc_removes_only_unreferenced_entries() {
    let nodes = shape(Shape::Chain, 3);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    opts.params.insert("s0002".into(), (2, 1));
    p.write_recipe(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    assert_eq!(entries(&p), 4, "three current entries plus s0002's old one");
    let recipe = p.recipe();
    let recipe = recipe.to_str().unwrap();

    let dry = p.run(&["gc", recipe, "--dry-run"]);
    dry.ok();
    assert!(dry.stdout.contains("would remove 1 "), "{}", dry.stdout);
    assert_eq!(entries(&p), 4, "--dry-run must not remove anything");

    let gc = p.run(&["gc", recipe]);
    gc.ok();
    assert!(gc.stdout.contains("removed 1 entries"), "{}", gc.stdout);
    assert_eq!(entries(&p), 3);

    let again = p.run_json(&[]);
    again.ok();
    assert!(
        again.set_of("stage-started").is_empty(),
        "gc removed a referenced entry: {:?}",
        again.set_of("stage-started")
    );
    assert_eq!(p.exec_counts()["s0002"], 2);

    // The collected entry is gone for real: reverting the edit recomputes it.
    opts.params.insert("s0002".into(), (1, 1));
    p.write_recipe(&render(&nodes, &opts));
    let revert = p.run_json(&[]);
    revert.ok();
    assert_eq!(revert.set_of("stage-started"), ["s0002".to_owned()].into());
}

#[test]
fn exec_runs_exactly_one_stage_with_cached_inputs() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    let recipe = p.recipe();
    let recipe = recipe.to_str().unwrap();

    // s0001's input is not cached: a failure naming the stage to run first, nothing run.
    let early = p.run(&["--json", "exec", recipe, "s0001"]);
    assert_ne!(early.code, 0, "exec with a missing input must fail");
    assert!(
        early.stdout.contains("s0000") || early.stderr.contains("s0000"),
        "must name `s0000`:\n{}",
        early.stderr
    );
    assert!(
        p.exec_counts().is_empty(),
        "exec must not run the missing upstream"
    );

    let first = p.run(&["--json", "exec", recipe, "s0000"]);
    first.ok();
    assert_eq!(first.set_of("stage-finished"), ["s0000".to_owned()].into());
    let second = p.run(&["--json", "exec", recipe, "s0001"]);
    second.ok();
    assert_eq!(second.set_of("stage-finished"), ["s0001".to_owned()].into());
    assert_eq!(p.exec_counts().len(), 2, "s0002 must not have run");

    // What exec committed is what run finds.
    let run = p.run_json(&[]);
    run.ok();
    assert_eq!(run.set_of("stage-started"), ["s0002".to_owned()].into());
}
