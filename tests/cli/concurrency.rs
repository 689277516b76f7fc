//! Two `pipeline run` of one recipe on one cache at the same time: both succeed, and every
//! stage executes exactly once (the second process waits on the stage's lock, then hits).

use std::process::Stdio;
use std::time::Duration;

use crate::common::{Project, RecipeOpts, RunResult, Shape, wait_timeout};

fn spawn(p: &Project) -> std::process::Child {
    let recipe = p.recipe();
    let mut c = p.cmd(&[
        "--json",
        "--no-progress",
        "run",
        recipe.to_str().unwrap(),
        "-j",
        "2",
    ]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("spawn")
}

fn finish(child: std::process::Child) -> RunResult {
    let out = wait_timeout(child, Duration::from_secs(60));
    RunResult {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn check(sh: Shape, n: usize) {
    let opts = RecipeOpts {
        sleep: Some(0.05),
        ..RecipeOpts::default()
    };
    let (p, _) = Project::with_shape(sh, n, &opts);
    let (a, b) = (spawn(&p), spawn(&p));
    let (a, b) = (finish(a), finish(b));
    a.ok();
    b.ok();
    let counts = p.exec_counts();
    assert_eq!(
        counts.len(),
        n,
        "{sh:?}: every stage must have run: {counts:?}"
    );
    assert!(
        counts.values().all(|&c| c == 1),
        "{sh:?}: a stage ran twice: {counts:?}"
    );
    let fa = a.set_of("stage-finished");
    let fb = b.set_of("stage-finished");
    assert!(
        fa.is_disjoint(&fb),
        "{sh:?}: both processes claim to have run {:?}",
        fa.intersection(&fb).collect::<Vec<_>>()
    );
    assert_eq!(fa.len() + fb.len(), n, "{sh:?}");
    // Each process accounts for every stage: run by itself or cached (run by the other).
    for r in [&a, &b] {
        let seen: std::collections::BTreeSet<_> = r
            .set_of("stage-finished")
            .union(&r.set_of("stage-cached"))
            .cloned()
            .collect();
        assert_eq!(
            seen.len(),
            n,
            "{sh:?}: a process skipped stages:\n{}",
            r.stdout
        );
    }
    let third = p.run_json(&[]);
    third.ok();
    assert!(third.set_of("stage-started").is_empty(), "{sh:?}");
}

#[test]
fn two_concurrent_runs_fan() {
    check(Shape::Fan, 8);
}

#[test]
fn two_concurrent_runs_chain() {
    check(Shape::Chain, 5);
}
