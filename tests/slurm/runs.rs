//! Runs on the cluster: results equal the local executor's, failures stop their dependents,
//! a cancelled job resumes, hits are never submitted, and concurrent runs share the cache.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Project, RecipeOpts, RunResult, Shape, wait_timeout};
use crate::{job_logs, run_slurm, slurm_available, submissions};

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("s{i:04}")).collect()
}

#[test]
fn dag_on_slurm_equals_local_and_a_cached_rerun_submits_nothing() {
    if !slurm_available("dag_on_slurm_equals_local_and_a_cached_rerun_submits_nothing") {
        return;
    }
    let opts = RecipeOpts {
        name: "slurmdag".into(),
        ..RecipeOpts::default()
    };
    let n = 7;
    let (local, _) = Project::with_shape(Shape::Layered, n, &opts);
    local.run_json(&[]).ok();
    let (sl, _) = Project::with_shape(Shape::Layered, n, &opts);
    let first = run_slurm(&sl, &[]);
    first.ok();
    let all: std::collections::BTreeSet<String> = names(n).into_iter().collect();
    assert_eq!(first.set_of("stage-finished"), all, "{}", first.stdout);
    assert_eq!(submissions(&first).len(), n, "one job per stage");
    assert_eq!(job_logs(&sl).len(), n, "one job log per stage");
    assert_eq!(sl.outs().len(), n);
    assert_eq!(
        sl.outs(),
        local.outs(),
        "Slurm and local outputs must be byte-identical"
    );
    assert!(sl.exec_counts().values().all(|&c| c == 1));
    for name in names(n) {
        let link = sl.root().join("runs/slurmdag").join(&name).join("out");
        assert!(link.exists(), "runs link for {name} missing");
    }

    let again = run_slurm(&sl, &[]);
    again.ok();
    assert_eq!(again.set_of("stage-cached"), all);
    assert!(again.set_of("stage-started").is_empty());
    assert!(submissions(&again).is_empty(), "{}", again.stdout);
    assert_eq!(job_logs(&sl).len(), n, "a cached run must submit no job");
}

const FAILING: &str = r#"
[experiment]
name = "failing"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "echo a >> ../execlog.txt && mkdir -p out && cat ${deps} > ${outs}"
outs = ["out/a.txt"]

[stages.bad]
kind = "shell"
deps = ["@a"]
cmd = "echo bad >> ../execlog.txt && echo boom-from-bad >&2 && exit 3"
outs = ["out/bad.txt"]

[stages.after]
kind = "shell"
deps = ["@bad"]
cmd = "echo after >> ../execlog.txt && cat ${deps} > ${outs}"
outs = ["out/after.txt"]

[stages.side]
kind = "shell"
deps = ["@a"]
cmd = "echo side >> ../execlog.txt && cat ${deps} > ${outs}"
outs = ["out/side.txt"]
"#;

#[test]
fn a_failing_job_stops_its_dependents_and_names_job_and_logs() {
    if !slurm_available("a_failing_job_stops_its_dependents_and_names_job_and_logs") {
        return;
    }
    let p = Project::new(FAILING);
    let r = run_slurm(&p, &[]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let failed: Vec<_> = r
        .events()
        .into_iter()
        .filter(|e| e["type"] == "stage-failed")
        .collect();
    assert_eq!(failed.len(), 1, "{}", r.stdout);
    assert_eq!(failed[0]["data"]["stage"], "bad");
    let error = failed[0]["data"]["error"].as_str().unwrap().to_owned();
    assert!(error.starts_with("Slurm job "), "{error}");
    assert!(error.contains("ended FAILED"), "{error}");
    assert!(error.contains("exit code 1:0"), "{error}");
    // The job log, and the stage's own log kept by `pipeline exec` on the node.
    let job_log = error.rsplit("job log: ").next().unwrap().trim();
    assert!(std::path::Path::new(job_log).is_file(), "{error}");
    let failed_log = p.root().join("runs/failing/bad/failed.log");
    assert!(
        error.contains(&*failed_log.to_string_lossy()),
        "the error must point at the stage's log: {error}"
    );
    let text = std::fs::read_to_string(&failed_log).unwrap();
    assert!(text.contains("boom-from-bad"), "{text}");

    let finished = r.events().into_iter().find(|e| e["type"] == "run-finished");
    let finished = finished.expect("run-finished");
    assert_eq!(finished["data"]["skipped"], serde_json::json!(["after"]));
    assert!(r.set_of("stage-finished").contains("side"));
    let counts = p.exec_counts();
    assert_eq!(counts.get("after"), None, "a dependent ran: {counts:?}");
    assert_eq!(counts.get("bad"), Some(&1));
    // Its job was cancelled, not left pending forever.
    let pending = Command::new("squeue")
        .args(["--noheader", "--format=%i", "--name=failing:after"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&pending.stdout).trim().is_empty(),
        "the dependent's job is still queued"
    );
}

/// `slow` writes a checkpoint, then waits (until `<tmp>/go` exists, at most 60 s); a rerun
/// that finds the checkpoint says so in its output.
const RESUME: &str = r#"
[experiment]
name = "resume"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "echo a >> ../execlog.txt && mkdir -p out && cat ${deps} > ${outs}"
outs = ["out/a.txt"]

[stages.slow]
kind = "shell"
deps = ["@a"]
cmd = """
echo slow >> ../execlog.txt
if [ -f "$PIPELINE_CHECKPOINT_DIR/half" ]; then r=resumed; else
  echo half > "$PIPELINE_CHECKPOINT_DIR/half"; r=fresh
  for i in $(seq 600); do [ -f ../go ] && break; sleep 0.1; done
fi
(cat ${deps}; echo $r) > ${outs}
"""
outs = ["out/slow.txt"]

[stages.c]
kind = "shell"
deps = ["@slow"]
cmd = "echo c >> ../execlog.txt && cat ${deps} > ${outs}"
outs = ["out/c.txt"]
"#;

fn squeue_ids(name: &str) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%i", &format!("--name={name}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_rerun_after_scancel_of_a_running_job_resumes() {
    if !slurm_available("a_rerun_after_scancel_of_a_running_job_resumes") {
        return;
    }
    let p = Project::new(RESUME);
    let recipe = p.recipe();
    let mut cmd = p.cmd(&[
        "--json",
        "--no-progress",
        "run",
        recipe.to_str().unwrap(),
        "--executor",
        "slurm",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Wait until `slow` runs and has written its checkpoint.
    let start = Instant::now();
    let ckpts = p.cache().join("v1/checkpoints");
    let checkpointed = || {
        std::fs::read_dir(&ckpts)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("half").exists())
    };
    while !checkpointed() {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "`slow` never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ids = squeue_ids("resume:slow");
    assert_eq!(ids.len(), 1, "{ids:?}");
    let st = Command::new("scancel").args(&ids).status().unwrap();
    assert!(st.success());
    let out = wait_timeout(child, Duration::from_secs(60));
    let r = RunResult {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let failed = r
        .events()
        .into_iter()
        .find(|e| e["type"] == "stage-failed")
        .expect("stage-failed");
    assert_eq!(failed["data"]["stage"], "slow");
    let error = failed["data"]["error"].as_str().unwrap();
    assert!(error.contains("CANCELLED"), "{error}");
    assert!(error.contains(&ids[0]), "{error}");
    assert!(!p.proj().join("out/slow.txt").exists());
    assert_eq!(p.exec_counts().get("c"), None);

    // The rerun: `a` is a hit, `slow` resumes from its checkpoint, `c` runs.
    std::fs::write(p.root().join("go"), "").unwrap();
    let again = run_slurm(&p, &[]);
    again.ok();
    assert_eq!(again.stages_of("stage-cached"), vec!["a"]);
    assert_eq!(
        again.set_of("stage-finished"),
        ["slow", "c"].iter().map(|s| (*s).to_owned()).collect()
    );
    let slow = std::fs::read_to_string(p.proj().join("out/slow.txt")).unwrap();
    assert!(slow.ends_with("resumed\n"), "{slow}");
    let counts = p.exec_counts();
    assert_eq!(counts.get("a"), Some(&1));
    assert_eq!(counts.get("slow"), Some(&2));
}

#[test]
fn two_runs_on_one_cache_compute_every_key_once() {
    if !slurm_available("two_runs_on_one_cache_compute_every_key_once") {
        return;
    }
    let opts = RecipeOpts {
        name: "twice".into(),
        sleep: Some(1.0),
        ..RecipeOpts::default()
    };
    let n = 4;
    let (p, _) = Project::with_shape(Shape::Fan, n, &opts);
    let spawn = || {
        let recipe = p.recipe();
        let mut c = p.cmd(&[
            "--json",
            "--no-progress",
            "run",
            recipe.to_str().unwrap(),
            "--executor",
            "slurm",
        ]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let finish = |c| {
        let out = wait_timeout(c, Duration::from_secs(60));
        RunResult {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let (a, b) = (finish(a), finish(b));
    a.ok();
    b.ok();
    let counts = p.exec_counts();
    assert_eq!(counts.len(), n, "{counts:?}");
    assert!(
        counts.values().all(|&c| c == 1),
        "a key was computed twice: {counts:?}"
    );
    let all: std::collections::BTreeSet<String> = names(n).into_iter().collect();
    for r in [&a, &b] {
        let seen: std::collections::BTreeSet<String> = r
            .set_of("stage-finished")
            .union(&r.set_of("stage-cached"))
            .cloned()
            .collect();
        assert_eq!(seen, all, "{}", r.stdout);
    }
    assert!(
        a.set_of("stage-finished")
            .is_disjoint(&b.set_of("stage-finished")),
        "both runs claim to have computed the same stage"
    );
}

const MIXED: &str = r#"
[experiment]
name = "mixed"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "mkdir -p out && (cat ${deps}; echo a) > ${outs}"
outs = ["out/a.txt"]

[stages.b]
kind = "shell"
executor = "slurm"
deps = ["@a"]
cmd = "(cat ${deps}; echo b on $SLURM_JOB_ID) > ${outs}"
outs = ["out/b.txt"]

[stages.c]
kind = "shell"
deps = ["@b"]
cmd = "(cat ${deps}; echo c) > ${outs}"
outs = ["out/c.txt"]
"#;

#[test]
fn stages_marked_slurm_run_as_jobs_and_the_rest_locally() {
    if !slurm_available("stages_marked_slurm_run_as_jobs_and_the_rest_locally") {
        return;
    }
    let p = Project::new(MIXED);
    let r = p.run_json(&[]);
    r.ok();
    let logs = job_logs(&p);
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(
        logs[0].starts_with(p.cache().join("slurm/mixed/b")),
        "{logs:?}"
    );
    let c = std::fs::read_to_string(p.proj().join("out/c.txt")).unwrap();
    let job = logs[0].file_stem().unwrap().to_string_lossy().into_owned();
    assert_eq!(c, format!("seed 42\na\nb on {job}\nc\n"));
    // `--executor local` overrides the recipe: nothing is submitted.
    std::fs::remove_dir_all(p.cache()).unwrap();
    let r = p.run_json(&["--executor", "local"]);
    r.ok();
    assert!(job_logs(&p).is_empty());
}

#[test]
fn ctrl_c_cancels_every_job_of_the_run() {
    if !slurm_available("ctrl_c_cancels_every_job_of_the_run") {
        return;
    }
    let p = Project::new(&RESUME.replace("name = \"resume\"", "name = \"interrupt\""));
    let recipe = p.recipe();
    let mut cmd = p.cmd(&[
        "--json",
        "--no-progress",
        "run",
        recipe.to_str().unwrap(),
        "--executor",
        "slurm",
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    // `slow` running and `c` queued behind it.
    while !p.exec_counts().contains_key("slow") {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "`slow` never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(squeue_ids("interrupt:c").len(), 1);
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    let out = wait_timeout(child, Duration::from_secs(60));
    let r = RunResult {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert_eq!(r.code, 130, "{}\n{}", r.stdout, r.stderr);
    for name in ["interrupt:slow", "interrupt:c"] {
        assert!(
            squeue_ids(name).is_empty(),
            "job {name} is still queued after Ctrl-C"
        );
    }
    assert!(!p.proj().join("out/slow.txt").exists());
    assert_eq!(p.exec_counts().get("c"), None);
}
