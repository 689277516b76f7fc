//! End-to-end tests of `pipeline run --executor slurm` against a real Slurm cluster.
//!
//! They need Slurm's client tools on `PATH` and a controller that answers `squeue`; for a
//! one-node cluster on this machine (as root, Debian or Ubuntu):
//!
//! ```sh
//! sudo bash scripts/slurm/start-local-slurm.sh && source /tmp/pipeline-slurm/env.sh
//! cargo test --test slurm
//! ```
//!
//! Without a cluster every test that needs one prints how to enable it and passes; with
//! `PIPELINE_REQUIRE_SLURM=1` (set by CI) a missing cluster fails them instead, so they can
//! never be skipped silently. The jobs run the `pipeline` binary under test, so the test
//! directories (under the system temp dir) must be visible to the cluster's nodes, as they
//! are on a one-node cluster.

#[path = "../cli/common.rs"]
#[allow(dead_code)]
mod common;

mod errors;
mod runs;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::{Project, RunResult, run_cmd};

/// Whether a cluster answers; if not, panics under `PIPELINE_REQUIRE_SLURM=1`, else prints
/// how to enable the tests. Checked once per test binary.
pub(crate) fn slurm_available(test: &str) -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let state = AVAILABLE.get_or_init(probe);
    match state {
        Ok(()) => true,
        Err(why) => {
            let required = std::env::var("PIPELINE_REQUIRE_SLURM").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "PIPELINE_REQUIRE_SLURM=1 but no usable Slurm cluster: {why}"
            );
            // Straight to the stderr file descriptor: the test harness captures `eprintln!`
            // of passing tests, and a skip must be visible.
            let _ = writeln!(
                std::io::stderr(),
                "skipping {test}: no usable Slurm cluster ({why}). To run it: \
                 `sudo bash scripts/slurm/start-local-slurm.sh && source \
                 /tmp/pipeline-slurm/env.sh`, then `cargo test --test slurm` \
                 (PIPELINE_REQUIRE_SLURM=1 turns this skip into a failure)"
            );
            false
        }
    }
}

fn probe() -> Result<(), String> {
    let out = Command::new("squeue")
        .args(["--noheader", "--format=%i"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `squeue`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`squeue` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    for tool in ["sbatch", "scontrol", "scancel"] {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run `{tool}`: {e}"))?;
    }
    Ok(())
}

/// `pipeline --json run recipe.toml --executor slurm <extra>`.
pub(crate) fn run_slurm(p: &Project, extra: &[&str]) -> RunResult {
    let recipe = p.recipe();
    let mut args = vec![
        "--json",
        "--no-progress",
        "run",
        recipe.to_str().unwrap(),
        "--executor",
        "slurm",
    ];
    args.extend_from_slice(extra);
    run_cmd(p.cmd(&args))
}

/// The Slurm job logs the runs of `p` left, one per submitted job.
pub(crate) fn job_logs(p: &Project) -> Vec<std::path::PathBuf> {
    let mut logs = Vec::new();
    collect_logs(&p.cache().join("slurm"), &mut logs);
    logs.sort();
    logs
}

fn collect_logs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        if path.is_dir() {
            collect_logs(&path, out);
        } else if path.extension().is_some_and(|x| x == "log") {
            out.push(path);
        }
    }
}

/// The `stage-progress` messages of `r` that announce a submission.
pub(crate) fn submissions(r: &RunResult) -> Vec<String> {
    r.events()
        .iter()
        .filter(|e| e["type"] == "stage-progress")
        .filter_map(|e| e["data"]["message"].as_str().map(str::to_owned))
        .filter(|m| m.ends_with("submitted"))
        .collect()
}
