//! Failures: no entry, dependents skipped, independent stages finish.

use engine::events::Event;

use crate::Project;

const FAN: &str = r#"
[experiment]
name = "t"

[stages.a]
kind = "test.echo"

[stages.bad]
kind = "test.fail"
message = "exploded on purpose"
deps = ["@a"]

[stages.after_bad]
kind = "test.echo"
deps = ["@bad"]

[stages.other]
kind = "test.echo"
p = 4
deps = ["@a"]
"#;

#[test]
fn failure_skips_dependents_and_leaves_no_entry() {
    let p = Project::new();
    let out = p.run(FAN);
    assert_eq!(out.ran(), ["a", "other"]);
    assert_eq!(
        out.summary.failed,
        [("bad".to_owned(), "exploded on purpose".to_owned())]
    );
    assert_eq!(out.summary.skipped, ["after_bad"]);
    assert_eq!(out.summary.exit_code(), 1);
    let failed = out
        .events
        .iter()
        .find(|e| matches!(e, Event::StageFailed { .. }))
        .unwrap();
    let Event::StageFailed {
        stage, key, error, ..
    } = failed
    else {
        unreachable!()
    };
    assert_eq!(
        (stage.as_str(), error.as_str()),
        ("bad", "exploded on purpose")
    );
    assert!(key.is_some());
    // The failure is not cached: the next run tries again (and succeeds once fixed).
    let again = p.run(FAN);
    assert_eq!(again.summary.failed.len(), 1);
    assert_eq!(again.cached(), ["a", "other"]);
    let fixed = FAN.replace(
        "kind = \"test.fail\"\nmessage = \"exploded on purpose\"",
        "kind = \"test.echo\"",
    );
    let out = p.run(&fixed);
    assert_eq!(out.ran(), ["after_bad", "bad"]);
    assert_eq!(out.summary.exit_code(), 0);
}

#[test]
fn missing_external_file_fails_the_stage_naming_the_file() {
    let p = Project::new();
    let out = p.run(
        r#"
[experiment]
name = "t"

[stages.s]
kind = "shell"
deps = ["missing.txt"]
cmd = "cat ${deps}"
"#,
    );
    assert_eq!(out.summary.failed.len(), 1);
    assert!(
        out.summary.failed[0].1.contains("`missing.txt`"),
        "{:?}",
        out.summary.failed
    );
}

#[test]
fn a_panicking_kind_is_a_stage_failure() {
    let p = Project::new();
    let out = p.run(
        r#"
[experiment]
name = "t"

[stages.boom]
kind = "test.fail"
panic = true

[stages.fine]
kind = "test.echo"
"#,
    );
    assert_eq!(out.ran(), ["fine"]);
    assert_eq!(out.summary.failed.len(), 1);
    assert!(
        out.summary.failed[0]
            .1
            .starts_with("BUG: the stage panicked: test.fail was asked to panic"),
        "{:?}",
        out.summary.failed
    );
}
