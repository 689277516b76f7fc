//! `-v` shows what each stage printed: after a run, and again, from the log stored in the
//! cache entry, when the stage is a cache hit.

use crate::common::Project;

const RECIPE: &str = r#"[experiment]
name = "logs"

[stages.talk]
kind = "shell"
deps = ["seed.txt"]
cmd = "echo to stdout from talk; echo to stderr from talk >&2; cat ${deps} > ${outs}"
outs = ["talk.txt"]

[stages.quiet]
kind = "shell"
deps = ["@talk"]
cmd = "cat ${deps} > ${outs}"
outs = ["quiet.txt"]
"#;

#[test]
fn verbose_hit_replays_the_stored_log() {
    let p = Project::new(RECIPE);
    let recipe = p.recipe();
    let recipe = recipe.to_str().unwrap();
    for pass in ["ran", "cached"] {
        let r = p.run(&["-v", "--no-progress", "run", recipe]);
        r.ok();
        let verb = if pass == "ran" { "Finished" } else { "Cached" };
        let lines: Vec<&str> = r.stderr.lines().collect();
        let status = lines
            .iter()
            .position(|l| l.trim_start().starts_with(&format!("{verb} talk")))
            .unwrap_or_else(|| panic!("{pass}: no `{verb} talk` line:\n{}", r.stderr));
        // Both streams of the command, just before its status line.
        let before = lines[..status].join("\n");
        assert!(
            before.contains("| to stdout from talk") && before.contains("| to stderr from talk"),
            "{pass}: the log is shown with the stage:\n{}",
            r.stderr
        );
        assert_eq!(
            r.stderr.matches("from talk").count(),
            2,
            "{pass}: each line once, and nothing for the silent stage:\n{}",
            r.stderr
        );
    }
    // Without -v the log stays in the cache.
    let r = p.run(&["--no-progress", "run", recipe]);
    r.ok();
    assert!(!r.stderr.contains("from talk"), "{}", r.stderr);
    // The `--json` events point at the same file.
    let r = p.run(&["--json", "run", recipe]);
    r.ok();
    let cached: Vec<_> = r
        .events()
        .into_iter()
        .filter(|e| e["type"] == "stage-cached" && e["data"]["stage"] == "talk")
        .collect();
    let log = cached[0]["data"]["log"].as_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("to stdout from talk"), "{log}: {text}");
}
