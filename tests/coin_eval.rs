//! End to end through the binary: a two-task continual chain on synth-coin (pretrain, then a
//! LoRA per task chained on the previous one), an `eval.coin` after each task with
//! `upto = "{item}"`, and `eval.cl-metrics` over the gather `@eval/*`; the matrix has one row
//! per training stage and a second run is fully cached.
#![cfg(feature = "ml")]

use std::path::Path;
use std::process::{Command, Output};

fn pipeline(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .current_dir(dir)
        .env_remove("PIPELINE_CACHE_DIR")
        .env_remove("PIPELINE_RUNS_DIR")
        .args(args)
        .args(["--cache-dir", ".cache", "--runs-dir", "runs"])
        .output()
        .unwrap()
}

const RECIPE: &str = r#"[experiment]
name = "cl"
seed = 5

[vars]
tasks = ["ScienceQA", "GQA"]

[stages.coin]
kind = "data.synth-coin"
per_task = { train = 4, test = 3 }
pretrain = 8

[stages.tokenizer]
kind = "tokenizer.train"
data = "@coin"

[stages.base]
kind = "train.pretrain"
data = "@coin"
tokenizer = "@tokenizer"
steps = 1
batch_size = 2

[stages.task]
kind = "train.lora"
foreach = "tasks"
chain = "base"
base = "@base"
data = "@coin"
task = "{item}"
rank = 2
steps = 1
batch_size = 2

[stages.eval]
kind = "eval.coin"
foreach = "tasks"
model = "@task/{item}"
data = "@coin"
upto = "{item}"
max_new_tokens = 4
batch_size = 3

[stages.metrics]
kind = "eval.cl-metrics"
evals = "@eval/*"
tasks = ["ScienceQA", "GQA"]
"#;

#[test]
fn continual_eval_chain_builds_the_matrix_and_caches() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("r.toml"), RECIPE).unwrap();
    let out = pipeline(t.path(), &["run", "r.toml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("\"stage-finished\"").count(), 8, "{stdout}");

    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("runs/cl/metrics/metrics/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["tasks"], serde_json::json!(["ScienceQA", "GQA"]));
    let rows = m["matrix"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].as_array().unwrap().len(), 1);
    assert_eq!(rows[1].as_array().unwrap().len(), 2);
    let (a00, a10, a11) = (
        rows[0][0].as_f64().unwrap(),
        rows[1][0].as_f64().unwrap(),
        rows[1][1].as_f64().unwrap(),
    );
    let bwt = m["backward_transfer"].as_f64().unwrap();
    assert!((bwt - (a10 - a00)).abs() < 1e-9);
    let mft = m["mean_finetune_accuracy"].as_f64().unwrap();
    assert!((mft - (a00 + a11) / 2.0).abs() < 1e-9);

    // The first evaluation saw only ScienceQA, the second both.
    let s0: serde_json::Value = serde_json::from_slice(
        &std::fs::read(t.path().join("runs/cl/eval/ScienceQA/metrics/scores.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(s0["order"], serde_json::json!(["ScienceQA"]));
    assert_eq!(s0["tasks"]["ScienceQA"]["accuracy"].as_f64().unwrap(), a00);

    let again = pipeline(t.path(), &["run", "r.toml", "--json"]);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(stdout.matches("\"stage-finished\"").count(), 0, "{stdout}");
}
