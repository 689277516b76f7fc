//! The `--json` wire format: every stdout line is a `{type, data}` envelope of a known
//! kebab-case type, in a sensible order, for successful and failing runs alike.

use crate::common::{Project, RecipeOpts, Shape, parse_event};

#[test]
fn every_line_is_an_envelope_and_the_run_is_bracketed() {
    let (p, _) = Project::with_shape(Shape::Fan, 5, &RecipeOpts::default());
    for pass in 0..2 {
        let r = p.run_json(&[]);
        r.ok();
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert!(
            lines.len() >= 7,
            "pass {pass}: expected run-started, 5 stage events, run-finished:\n{}",
            r.stdout
        );
        let events: Vec<_> = lines.iter().map(|l| parse_event(l)).collect();
        assert_eq!(events.first().unwrap()["type"], "run-started");
        assert_eq!(events.last().unwrap()["type"], "run-finished");
        assert_eq!(
            events.iter().filter(|e| e["type"] == "run-started").count(),
            1
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| e["type"] == "run-finished")
                .count(),
            1
        );
        // Every started stage finishes, after it started.
        for (i, e) in events
            .iter()
            .enumerate()
            .filter(|(_, e)| e["type"] == "stage-started")
        {
            let name = &e["data"]["stage"];
            let fin = events
                .iter()
                .position(|f| f["type"] == "stage-finished" && f["data"]["stage"] == *name);
            assert!(
                fin.is_some_and(|f| f > i),
                "pass {pass}: {name} started but never finished after"
            );
        }
        // Nothing else on stdout in JSON mode (status lines belong on stderr).
        assert!(
            !r.stdout.contains("Summary"),
            "status text leaked onto stdout"
        );
    }
}

#[test]
fn finished_and_cached_events_carry_key_and_timing() {
    let (p, _) = Project::with_shape(Shape::Chain, 3, &RecipeOpts::default());
    let first = p.run_json(&[]);
    first.ok();
    let fin: Vec<_> = first
        .events()
        .into_iter()
        .filter(|e| e["type"] == "stage-finished")
        .collect();
    assert_eq!(fin.len(), 3);
    for e in &fin {
        assert!(
            e["data"]["key"].is_string(),
            "stage-finished without a key: {e}"
        );
        assert!(
            e["data"]["elapsed_ms"].is_number(),
            "stage-finished without elapsed_ms: {e}"
        );
    }
    let second = p.run_json(&[]);
    second.ok();
    let cached: Vec<_> = second
        .events()
        .into_iter()
        .filter(|e| e["type"] == "stage-cached")
        .collect();
    assert_eq!(cached.len(), 3);
    for e in &cached {
        let stage = e["data"]["stage"].as_str().unwrap();
        let key_then =
            fin.iter().find(|f| f["data"]["stage"] == stage).unwrap()["data"]["key"].clone();
        assert_eq!(
            e["data"]["key"], key_then,
            "{stage}: the cached key must equal the key it was committed under"
        );
    }
}

#[test]
fn failing_stage_exits_1_with_a_stage_failed_event() {
    let recipe = r#"[experiment]
name = "failing"

[stages.ok]
kind = "shell"
deps = ["seed.txt"]
cmd = "mkdir -p out && cat ${deps} > ${outs}"
outs = ["out/ok.txt"]

[stages.bad]
kind = "shell"
deps = ["@ok"]
cmd = "echo about to fail >&2; exit 7"
outs = ["out/bad.txt"]

[stages.after]
kind = "shell"
deps = ["@bad"]
cmd = "cat ${deps} > ${outs}"
outs = ["out/after.txt"]
"#;
    let p = Project::new(recipe);
    let r = p.run_json(&[]);
    assert_eq!(
        r.code, 1,
        "a failed stage exits 1\n{}\n{}",
        r.stdout, r.stderr
    );
    let events = r.events();
    assert_eq!(
        events.last().unwrap()["type"],
        "run-finished",
        "run-finished is emitted even on failure"
    );
    assert_eq!(r.stages_of("stage-failed"), vec!["bad"]);
    assert!(
        !r.set_of("stage-started").contains("after"),
        "a dependent of a failed stage must not start"
    );
    assert!(r.set_of("stage-finished").contains("ok"));

    // A failure is never cached: fixing the command runs `bad` (and `after`), `ok` hits.
    p.write_recipe(&recipe.replace("echo about to fail >&2; exit 7", "cat ${deps} > ${outs}"));
    let fixed = p.run_json(&[]);
    fixed.ok();
    assert_eq!(fixed.set_of("stage-cached"), ["ok".to_owned()].into());
    assert_eq!(
        fixed.set_of("stage-finished"),
        ["after".to_owned(), "bad".to_owned()].into()
    );
}

#[test]
fn missing_declared_out_is_a_failure_naming_the_path() {
    let recipe = r#"[experiment]
name = "noout"

[stages.lazy]
kind = "shell"
deps = ["seed.txt"]
cmd = "true"
outs = ["out/never-written.txt"]
"#;
    let p = Project::new(recipe);
    let r = p.run(&["--no-progress", "run", p.recipe().to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("never-written.txt"),
        "the error must name the missing out:\n{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("Failed"),
        "a `Failed` status line is expected:\n{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let again = p.run_json(&[]);
    assert_eq!(again.code, 1, "the failure must not have been cached");
    assert_eq!(again.stages_of("stage-started"), vec!["lazy"]);
}
