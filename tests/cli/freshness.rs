//! Freshness: a second run executes nothing; a parameter change reruns exactly its
//! downstream cone; a change that leaves the output bytes equal stops there (early cutoff).

use std::collections::BTreeSet;

use crate::common::{Project, RecipeOpts, Shape, render, shape};

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn all_names(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("s{i:04}")).collect()
}

/// Run twice: the first run executes every stage, the second only hits, and the outputs
/// are left identical.
fn check_second_run_is_all_hits(sh: Shape, n: usize) {
    let (p, _) = Project::with_shape(sh, n, &RecipeOpts::default());
    let first = p.run_json(&[]);
    first.ok();
    assert_eq!(
        first.set_of("stage-started"),
        all_names(n),
        "{sh:?}: first run must start every stage"
    );
    assert_eq!(
        first.set_of("stage-finished"),
        all_names(n),
        "{sh:?}: every stage must finish"
    );
    assert!(
        first.set_of("stage-cached").is_empty(),
        "{sh:?}: nothing can be cached on a cold cache"
    );
    let outs1 = p.outs();
    assert_eq!(outs1.len(), n, "{sh:?}: one out file per stage");
    assert_eq!(
        p.exec_counts().values().copied().collect::<BTreeSet<_>>(),
        set_usize(&[1])
    );

    let second = p.run_json(&[]);
    second.ok();
    assert!(
        second.set_of("stage-started").is_empty(),
        "{sh:?}: second run started {:?}",
        second.set_of("stage-started")
    );
    assert_eq!(
        second.set_of("stage-cached"),
        all_names(n),
        "{sh:?}: second run must hit every stage"
    );
    assert_eq!(p.outs(), outs1, "{sh:?}: outputs changed on a no-op rerun");
    assert!(
        p.exec_counts().values().all(|&c| c == 1),
        "{sh:?}: a cached stage executed its command"
    );
}

fn set_usize(v: &[usize]) -> BTreeSet<usize> {
    v.iter().copied().collect()
}

#[test]
fn second_run_is_all_hits_chain() {
    check_second_run_is_all_hits(Shape::Chain, 6);
}

#[test]
fn second_run_is_all_hits_fan() {
    check_second_run_is_all_hits(Shape::Fan, 7);
}

#[test]
fn second_run_is_all_hits_layered() {
    check_second_run_is_all_hits(Shape::Layered, 9);
}

#[test]
fn deleted_out_is_restored_without_rerun() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    p.run_json(&[]).ok();
    let outs = p.outs();
    std::fs::remove_file(p.proj().join("out/s0001.txt")).unwrap();
    std::fs::write(p.proj().join("out/s0002.txt"), "tampered\n").unwrap();
    let r = p.run_json(&[]);
    r.ok();
    assert!(
        r.set_of("stage-started").is_empty(),
        "restoring outs must not rerun: {:?}",
        r.set_of("stage-started")
    );
    assert_eq!(
        p.outs(),
        outs,
        "missing and modified outs must be restored from the cache"
    );
}

#[test]
fn param_change_reruns_exactly_the_downstream_cone() {
    // Layered 9: width 3; layer 1 = s0003..s0005, layer 2 = s0006..s0008.
    // s0003 deps (s0000, s0001); s0004 deps (s0001, s0002); s0005 deps (s0002, s0000);
    // s0006 deps (s0003, s0004); s0007 deps (s0004, s0005); s0008 deps (s0005, s0003).
    let nodes = shape(Shape::Layered, 9);
    assert_eq!(
        nodes[6].deps,
        vec!["s0003", "s0004"],
        "the shape this test reasons about changed"
    );
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    let before = p.outs();

    opts.params.insert("s0004".into(), (2, 1));
    p.write_recipe(&render(&nodes, &opts));
    let r = p.run_json(&[]);
    r.ok();
    assert_eq!(r.set_of("stage-started"), set(&["s0004", "s0006", "s0007"]));
    assert_eq!(
        r.set_of("stage-cached"),
        set(&["s0000", "s0001", "s0002", "s0003", "s0005", "s0008"])
    );
    let after = p.outs();
    for (f, bytes) in &before {
        let changed = ["s0004.txt", "s0006.txt", "s0007.txt"].contains(&f.as_str());
        assert_eq!(
            after[f] != *bytes,
            changed,
            "{f}: changed={changed} expected"
        );
    }

    // Changing it back is a pure cache hit: the old entries are still there.
    opts.params.insert("s0004".into(), (1, 1));
    p.write_recipe(&render(&nodes, &opts));
    let back = p.run_json(&[]);
    back.ok();
    assert!(
        back.set_of("stage-started").is_empty(),
        "reverting a param must hit: {:?}",
        back.set_of("stage-started")
    );
    assert_eq!(p.outs(), before);
}

#[test]
fn early_cutoff_when_output_bytes_are_equal() {
    let nodes = shape(Shape::Chain, 4);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    let before = p.outs();

    // `q` is in the key but not in the command's output.
    opts.params.insert("s0001".into(), (1, 7));
    p.write_recipe(&render(&nodes, &opts));
    let r = p.run_json(&[]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started"),
        set(&["s0001"]),
        "only the stage whose key changed reruns"
    );
    assert_eq!(
        r.set_of("stage-cached"),
        set(&["s0000", "s0002", "s0003"]),
        "dependents of equal bytes must hit"
    );
    assert_eq!(p.outs(), before);
    assert_eq!(p.exec_counts()["s0001"], 2);
    assert_eq!(p.exec_counts()["s0002"], 1);
}

#[test]
fn seed_file_change_reruns_everything_downstream() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    p.run_json(&[]).ok();
    std::fs::write(p.proj().join("seed.txt"), "seed 43\n").unwrap();
    let r = p.run_json(&[]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started"),
        all_names(3),
        "a changed external file must rerun its stage and cascade"
    );
}

#[test]
fn force_reruns_the_stage_and_cuts_off_equal_outputs() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    p.run_json(&[]).ok();
    let r = p.run_json(&["--force", "s0001"]);
    r.ok();
    assert_eq!(
        r.set_of("stage-started"),
        set(&["s0001"]),
        "--force reruns the stage; equal bytes keep s0002 cached"
    );
    assert_eq!(p.exec_counts()["s0001"], 2);
}

#[test]
fn summary_line_counts_ran_and_cached() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    let recipe = p.recipe();
    let first = p.run(&["--no-progress", "run", recipe.to_str().unwrap()]);
    first.ok();
    assert!(
        first
            .stderr
            .contains("Summary 3 stages: 3 ran, 0 cached, 0 failed"),
        "stderr:\n{}",
        first.stderr
    );
    let second = p.run(&["--no-progress", "run", recipe.to_str().unwrap()]);
    second.ok();
    assert!(
        second
            .stderr
            .contains("Summary 3 stages: 0 ran, 3 cached, 0 failed"),
        "stderr:\n{}",
        second.stderr
    );
    assert!(
        second
            .stderr
            .lines()
            .any(|l| l.trim_start().starts_with("Cached s0000")),
        "stderr:\n{}",
        second.stderr
    );
}

#[test]
fn verbose_run_prints_rerun_cascade_and_hit_lines() {
    let nodes = shape(Shape::Chain, 3);
    let mut opts = RecipeOpts::default();
    let p = Project::new(&render(&nodes, &opts));
    p.run_json(&[]).ok();
    // `p` reaches s0001's output, so s0002 cascades.
    opts.params.insert("s0001".into(), (2, 1));
    p.write_recipe(&render(&nodes, &opts));
    let recipe = p.recipe();
    let r = p.run(&["-v", "--no-progress", "run", recipe.to_str().unwrap()]);
    r.ok();
    let err = &r.stderr;
    let rerun = err.lines().position(|l| {
        l.contains("[RERUN] s0001") && l.contains("`p`") && l.contains('1') && l.contains('2')
    });
    let cascade = err
        .lines()
        .position(|l| l.contains("[CASCADE] s0002") && l.contains("s0001"));
    assert!(
        rerun.is_some(),
        "missing `[RERUN] s0001: param `p` changed (1 → 2)`:\n{err}"
    );
    assert!(
        cascade.is_some(),
        "missing `[CASCADE] s0002 ... upstream `s0001``:\n{err}"
    );
    assert!(
        rerun < cascade,
        "roots must be listed before cascades:\n{err}"
    );
    assert!(
        err.lines().any(|l| l.contains("[HIT] s0000")),
        "missing `[HIT] s0000`:\n{err}"
    );
}

#[test]
fn set_override_reruns_like_an_edit() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    p.run_json(&[]).ok();
    let r = p.run_json(&["--set", "s0001.params.p=2"]);
    r.ok();
    assert_eq!(r.set_of("stage-started"), set(&["s0001", "s0002"]));
    // The override is not persisted: without it, everything is a hit again.
    let back = p.run_json(&[]);
    back.ok();
    assert!(
        back.set_of("stage-started").is_empty(),
        "{:?}",
        back.set_of("stage-started")
    );
}
