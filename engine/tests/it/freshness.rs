//! Freshness: what reruns after which edit, and the reasons given.

use crate::{CHAIN, Project};

#[test]
fn second_run_is_all_hits() {
    let p = Project::new();
    let first = p.run(CHAIN);
    assert_eq!(first.ran(), ["a", "b", "c"]);
    assert_eq!(
        first.rerun_lines(),
        [
            "[RERUN] a: never run",
            "[RERUN] b: never run",
            "[RERUN] c: never run"
        ]
    );
    assert_eq!(p.value("c"), "p=1\np=2\np=3\n");
    let second = p.run(CHAIN);
    assert!(second.ran().is_empty());
    assert_eq!(second.cached(), ["a", "b", "c"]);
    assert_eq!(second.summary.exit_code(), 0);
}

#[test]
fn param_edit_reruns_the_downstream_cone_with_reasons() {
    let p = Project::new();
    p.run(CHAIN);
    let edited = CHAIN.replacen("p = 2", "p = 20", 1);
    let out = p.run(&edited);
    assert_eq!(out.cached(), ["a"]);
    assert_eq!(out.ran(), ["b", "c"]);
    assert_eq!(
        out.rerun_lines(),
        [
            "[RERUN] b: param `p` changed (2 → 20)",
            "[CASCADE] c: input `deps` changed (upstream `b` reran)"
        ]
    );
    assert_eq!(p.value("c"), "p=1\np=20\np=3\n");
}

#[test]
fn cosmetic_edit_stops_at_the_edited_stage() {
    // `q` is keyed but does not change the output: b reruns, c is an early-cutoff hit.
    let p = Project::new();
    p.run(CHAIN);
    let edited = CHAIN.replacen("p = 2", "p = 2\nq = 7", 1);
    let out = p.run(&edited);
    assert_eq!(out.ran(), ["b"]);
    assert_eq!(out.cached(), ["a", "c"]);
    assert_eq!(out.rerun_lines(), ["[RERUN] b: param `q` changed (0 → 7)"]);
}

#[test]
fn reverting_an_edit_hits_the_earlier_entry() {
    let p = Project::new();
    p.run(CHAIN);
    p.run(&CHAIN.replacen("p = 1", "p = 5", 1));
    let back = p.run(CHAIN);
    assert!(back.ran().is_empty(), "{:?}", back.ran());
    assert_eq!(p.value("c"), "p=1\np=2\np=3\n");
}

#[test]
fn force_reruns_only_the_named_stage_when_bytes_are_equal() {
    let p = Project::new();
    let recipe = p.load(CHAIN, &[]);
    p.run_with(&recipe, &p.options());
    let mut opts = p.options();
    opts.force.insert(recipe.index_of("a").unwrap());
    let out = p.run_with(&recipe, &opts);
    assert_eq!(out.ran(), ["a"]);
    assert_eq!(out.rerun_lines(), ["[RERUN] a: forced"]);
    assert_eq!(out.cached(), ["b", "c"]);
}

#[test]
fn seed_and_env_changes_are_reasons() {
    let p = Project::new();
    p.run(CHAIN);
    let recipe = p.load(CHAIN, &["experiment.seed=2"]);
    let mut opts = p.options();
    opts.env.env.insert("PIPELINE_DEVICE".into(), "cuda".into());
    let out = p.run_with(&recipe, &opts);
    let first = &out.rerun_lines()[0];
    assert!(first.starts_with("[RERUN] a: seed changed ("), "{first}");
    assert!(
        first.ends_with("; env `PIPELINE_DEVICE` changed (unset → cuda)"),
        "{first}"
    );
}

#[test]
fn deleted_outputs_are_reported_and_rebuilt() {
    let p = Project::new();
    p.run(CHAIN);
    // Remove every stored copy of the outputs (objects and the trees linked from them): a
    // hit must never hand out missing data.
    remove_writable(&p.path(".pipeline/v1/objects"));
    remove_writable(&p.path(".pipeline/v1/trees"));
    let out = p.run(CHAIN);
    assert_eq!(out.ran(), ["a", "b", "c"]);
    assert_eq!(out.rerun_lines()[0], "[RERUN] a: outputs missing");
    assert_eq!(p.value("c"), "p=1\np=2\np=3\n");
}

#[test]
fn a_hit_is_checked_on_the_files_it_hands_out() {
    let p = Project::new();
    p.run(CHAIN);
    // Objects gone, trees intact: a run's hits use (and verify) the trees, whose files are
    // the same inodes, so nothing is missing from what they hand out.
    remove_writable(&p.path(".pipeline/v1/objects"));
    let out = p.run(CHAIN);
    assert_eq!(out.cached(), ["a", "b", "c"]);
    assert_eq!(p.value("c"), "p=1\np=2\np=3\n");
    // A changed tree file is caught (by its size here: this process has verified the tree
    // before; a fresh one compares content through the stat cache) and, with no object left
    // to rebuild the tree from, the stage reruns.
    let tree_file = walk_files(&p.path(".pipeline/v1/trees"))
        .into_iter()
        .find(|f| std::fs::read_to_string(f).is_ok_and(|t| t == "p=1\n"))
        .expect("a's output in its tree");
    set_writable(&tree_file);
    std::fs::write(&tree_file, "p=99\n").unwrap();
    let out = p.run(CHAIN);
    assert_eq!(out.ran(), ["a"]);
    assert_eq!(out.cached(), ["b", "c"]);
    assert_eq!(p.value("c"), "p=1\np=2\np=3\n");
}

/// Every file under `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files
}

fn set_writable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o200)).unwrap();
}

/// Empty a store directory whose subdirectories are read-only (trees are); the directory
/// itself stays, as an open cache expects.
fn remove_writable(dir: &std::path::Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        set_writable(&d);
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        std::fs::remove_dir_all(e.path()).unwrap();
    }
}

#[test]
fn selection_uses_cached_upstream_and_refuses_uncached_one() {
    let p = Project::new();
    let recipe = p.load(CHAIN, &[]);
    let mut opts = p.options();
    opts.selected = Some([recipe.index_of("b").unwrap()].into());
    let out = p.run_with(&recipe, &opts);
    assert!(out.ran().is_empty());
    assert_eq!(out.summary.failed.len(), 1, "{:?}", out.summary);
    assert!(
        out.summary.failed[0]
            .1
            .contains("`a` is not cached and not selected"),
        "{:?}",
        out.summary.failed
    );
    assert_eq!(out.summary.exit_code(), 1);
    p.run_with(&recipe, &p.options());
    let edited = p.load(&CHAIN.replacen("p = 2", "p = 9", 1), &[]);
    let out = p.run_with(&edited, &opts);
    assert_eq!(out.ran(), ["b"]);
}
