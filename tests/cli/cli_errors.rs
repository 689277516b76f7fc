//! What the user sees when the recipe or the command line is wrong: exit code 2, an error
//! on stderr naming the file and place, never a panic. The rendered output is snapshotted
//! (insta) so that a change to it is a reviewed decision; the recipe-level diagnostics
//! themselves are snapshotted in the engine's own tests.

use crate::common::{Project, RunResult, redact};

/// Run `pipeline <args>` (relative recipe path, so snapshots carry no temp path) and
/// render exit code + stderr for a snapshot.
fn failing(p: &Project, args: &[&str]) -> (RunResult, String) {
    let r = p.run(args);
    let text = format!("exit: {}\n--- stderr\n{}", r.code, redact(p, &r.stderr));
    assert!(
        !r.stderr.contains("panicked"),
        "must not panic:\n{}",
        r.stderr
    );
    assert!(
        r.stdout.trim().is_empty() || !r.stdout.contains("stage-finished"),
        "nothing may run:\n{}",
        r.stdout
    );
    assert!(
        p.exec_counts().is_empty(),
        "a bad recipe must not execute any stage"
    );
    (r, text)
}

fn bad_recipe(name: &str, recipe: &str, must_mention: &[&str]) {
    let p = Project::new(recipe);
    let (r, text) = failing(&p, &["--no-progress", "run", "proj/recipe.toml"]);
    assert_eq!(r.code, 2, "an invalid recipe exits 2:\n{text}");
    assert!(
        r.stderr.contains("recipe.toml"),
        "the error must name the file:\n{text}"
    );
    for m in must_mention {
        assert!(
            r.stderr.contains(m),
            "the error must mention `{m}`:\n{text}"
        );
    }
    insta::assert_snapshot!(name, text);
}

const OK_STAGE: &str = r#"[experiment]
name = "bad"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "mkdir -p out && cat ${deps} > ${outs}"
outs = ["out/a.txt"]
"#;

#[test]
fn unknown_kind_suggests_the_closest() {
    bad_recipe(
        "unknown_kind",
        &format!(
            "{OK_STAGE}\n[stages.b]\nkind = \"shel\"\ndeps = [\"@a\"]\ncmd = \"true\"\nouts = []\n"
        ),
        &["shel", "shell"],
    );
}

#[test]
fn reference_to_a_missing_stage() {
    bad_recipe(
        "missing_ref",
        &format!(
            "{OK_STAGE}\n[stages.b]\nkind = \"shell\"\ndeps = [\"@nope\"]\ncmd = \"true\"\nouts = [\"out/b.txt\"]\n"
        ),
        &["nope"],
    );
}

#[test]
fn cycle_is_named() {
    let recipe = r#"[experiment]
name = "cycle"

[stages.a]
kind = "shell"
deps = ["@b"]
cmd = "cat ${deps} > ${outs}"
outs = ["a.txt"]

[stages.b]
kind = "shell"
deps = ["@a"]
cmd = "cat ${deps} > ${outs}"
outs = ["b.txt"]
"#;
    bad_recipe("cycle", recipe, &["cycle"]);
}

#[test]
fn toml_syntax_error_points_at_the_line() {
    bad_recipe(
        "toml_syntax",
        "[experiment]\nname = \"x\n\n[stages.a]\nkind = \"shell\"\n",
        &[":2"],
    );
}

#[test]
fn unknown_stage_key_is_rejected() {
    bad_recipe(
        "unknown_key",
        &OK_STAGE.replace("outs = [", "outz = [\"x\"]\nouts = ["),
        &["outz"],
    );
}

#[test]
fn missing_recipe_file() {
    let p = Project::new(OK_STAGE);
    let (r, text) = failing(&p, &["run", "proj/nope.toml"]);
    assert_eq!(r.code, 2, "{text}");
    assert!(r.stderr.contains("nope.toml"), "{text}");
    insta::assert_snapshot!("missing_recipe_file", text);
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let p = Project::new(OK_STAGE);
    let (r, text) = failing(&p, &["run", "proj/recipe.toml", "--frobnicate"]);
    assert_eq!(r.code, 2, "{text}");
    assert!(r.stderr.contains("--frobnicate"), "{text}");
}

#[test]
fn explain_of_an_unknown_stage() {
    let p = Project::new(OK_STAGE);
    let (r, text) = failing(&p, &["explain", "proj/recipe.toml", "b"]);
    assert_eq!(r.code, 2, "{text}");
    assert!(
        r.stderr.contains("`b`") || r.stderr.contains("\"b\"") || r.stderr.contains(" b"),
        "{text}"
    );
    insta::assert_snapshot!("explain_unknown_stage", text);
}

#[test]
fn bad_set_override() {
    let p = Project::new(OK_STAGE);
    let (r, text) = failing(&p, &["run", "proj/recipe.toml", "--set", "no-equals-sign"]);
    assert_eq!(r.code, 2, "{text}");
    assert!(
        r.stderr.contains("no-equals-sign"),
        "the error must quote the bad override:\n{text}"
    );
}

#[test]
fn json_mode_emits_recipe_errors_as_an_error_event() {
    let p = Project::new(&format!(
        "{OK_STAGE}\n[stages.b]\nkind = \"shel\"\ncmd = \"true\"\n"
    ));
    let r = p.run(&["--json", "run", "proj/recipe.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let events = r.events();
    let last = events.last().expect("an error event on stdout");
    assert_eq!(last["type"], "error", "{}", r.stdout);
    assert_eq!(last["data"]["exit_code"], 2);
    // The recipe's individual errors, with their labels, are in the diagnostic.
    let related = last["data"]["diagnostic"]["related"].to_string();
    assert!(related.contains("shel"), "{related}");
    assert!(related.contains("shell"), "did-you-mean kept: {related}");
    // Human output stays on stderr.
    assert!(r.stderr.contains("recipe.toml"), "{}", r.stderr);
    assert!(p.exec_counts().is_empty());
}
