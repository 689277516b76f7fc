//! Slurm unusable: missing tools, an unreachable controller, a rejected submission. Each is
//! an environment error (exit code 3) with a message saying what and where, and nothing
//! committed is lost.

use crate::common::{Project, run_cmd};
use crate::{job_logs, run_slurm, slurm_available};

const TWO: &str = r#"
[experiment]
name = "two"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "mkdir -p out && cat ${deps} > ${outs}"
outs = ["out/a.txt"]

[stages.b]
kind = "shell"
deps = ["@a"]
cmd = "cat ${deps} > ${outs}"
outs = ["out/b.txt"]
"#;

/// Needs no cluster: runs everywhere.
#[test]
fn missing_sbatch_is_an_environment_error() {
    let p = Project::new(TWO);
    let empty = tempfile::tempdir().unwrap();
    let recipe = p.recipe();
    let mut cmd = p.cmd(&["run", recipe.to_str().unwrap(), "--executor", "slurm"]);
    cmd.env("PATH", empty.path());
    let r = run_cmd(cmd);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("`sbatch`"), "{}", r.stderr);
    assert!(r.stderr.contains("not on PATH"), "{}", r.stderr);
    assert!(r.stderr.contains("--executor local"), "{}", r.stderr);
    assert!(job_logs(&p).is_empty());
}

/// The configuration the Slurm tools read here, if it can be found.
fn slurm_conf() -> Option<String> {
    let path = std::env::var("SLURM_CONF").unwrap_or_else(|_| "/etc/slurm/slurm.conf".into());
    std::fs::read_to_string(path).ok()
}

#[test]
fn an_unreachable_controller_is_an_environment_error_and_keeps_hits() {
    if !slurm_available("an_unreachable_controller_is_an_environment_error_and_keeps_hits") {
        return;
    }
    let conf = slurm_conf().expect("slurm.conf (SLURM_CONF or /etc/slurm/slurm.conf)");
    // The same cluster, but a port nobody listens on.
    let bad: String = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("SlurmctldPort"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + "SlurmctldPort=6999\n";
    let p = Project::new(TWO);
    let bad_conf = p.root().join("unreachable.conf");
    std::fs::write(&bad_conf, bad).unwrap();
    let recipe = p.recipe();
    p.run_json(&["--only", "a"]).ok();

    let mut cmd = p.cmd(&["run", recipe.to_str().unwrap(), "--executor", "slurm"]);
    cmd.env("SLURM_CONF", &bad_conf);
    let r = run_cmd(cmd);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("cannot submit stage `b`"), "{}", r.stderr);
    assert!(r.stderr.contains("Unable to contact"), "{}", r.stderr);
    // `a` stayed committed: the next local run hits it.
    let again = p.run_json(&[]);
    again.ok();
    assert_eq!(again.stages_of("stage-cached"), vec!["a"]);
}

#[test]
fn a_rejected_submission_is_an_environment_error() {
    if !slurm_available("a_rejected_submission_is_an_environment_error") {
        return;
    }
    let p = Project::new(
        r#"
[experiment]
name = "huge"

[stages.a]
kind = "shell"
deps = ["seed.txt"]
cmd = "cat ${deps} > ${outs}"
outs = ["a.txt"]
resources = { cpus = 4096 }
"#,
    );
    let r = run_slurm(&p, &[]);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("cannot submit stage `a`"), "{}", r.stderr);
    assert!(r.stderr.contains("sbatch"), "{}", r.stderr);
}
