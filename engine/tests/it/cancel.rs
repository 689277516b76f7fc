//! Cancellation: nothing committed, checkpoints kept, the next run resumes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use engine::events::Event;

use crate::Project;

const SLOW: &str = r#"
[experiment]
name = "t"

[stages.slow]
kind = "test.slow"
steps = 40
step_ms = 25

[stages.after]
kind = "test.echo"
deps = ["@slow"]
"#;

#[test]
fn cancel_commits_nothing_and_the_rerun_resumes() {
    let p = Project::new();
    let recipe = p.load(SLOW, &[]);
    let opts = p.options();
    let cancel = opts.cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.store(true, Ordering::Relaxed);
    });
    let out = p.run_with(&recipe, &opts);
    stopper.join().unwrap();
    assert!(out.summary.interrupted);
    assert_eq!(out.summary.exit_code(), 130);
    assert!(out.ran().is_empty());
    assert_eq!(out.summary.skipped, ["slow", "after"]);
    let progressed = out
        .events
        .iter()
        .any(|e| matches!(e, Event::StageProgress { stage, .. } if stage == "slow"));
    assert!(progressed, "the slow stage reports progress");

    let out = p.run_with(&recipe, &p.options());
    assert_eq!(out.ran(), ["after", "slow"]);
    assert_eq!(
        out.rerun_lines()[0],
        "[RERUN] slow: never run; previous attempt incomplete (resuming)"
    );
    assert_eq!(p.value("after"), "slow=40\np=0\n");
}

#[test]
fn cancel_kills_shell_children() {
    let p = Project::new();
    let recipe = p.load(
        r#"
[experiment]
name = "t"

[stages.sleepy]
kind = "shell"
cmd = "sleep 30; echo done > ${outs}"
outs = ["out.txt"]
"#,
        &[],
    );
    let opts = p.options();
    let cancel = opts.cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.store(true, Ordering::Relaxed);
    });
    let started = std::time::Instant::now();
    let out = p.run_with(&recipe, &opts);
    stopper.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the child was not killed"
    );
    assert!(out.summary.interrupted);
    assert!(!p.path("out.txt").exists());
}
