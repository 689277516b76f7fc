//! End to end through the binary: a two-task continual chain on synth-coin trained on a
//! subset of the tasks (ScienceQA, then GQA, skipping the two between them in dataset order),
//! `eval.cl-metrics` with a label and the trained models, and a `report` over it. Checks that
//! the matrix is labelled in training order without a `tasks` parameter, that the losses
//! come from the models' training logs, that the report lands under `runs/` with its figures,
//! and that a second run is fully cached.
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
name = "rep"
seed = 3

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
steps = 2
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
models = "@task/*"
label = "LoRA"

[stages.report]
kind = "report"
metrics = ["@metrics"]
title = "Two tasks"
"#;

#[test]
fn subset_chain_reports_in_training_order_and_caches() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("r.toml"), RECIPE).unwrap();
    let out = pipeline(t.path(), &["run", "r.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let runs = t.path().join("runs/rep");

    // The evaluation after GQA scored ScienceQA..GQA (four tasks in dataset order); the
    // matrix still has GQA, not TextVQA, as its second task.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("metrics/metrics/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["tasks"], serde_json::json!(["ScienceQA", "GQA"]), "{m}");
    assert_eq!(m["label"], "LoRA");
    let s1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("eval/GQA/metrics/scores.json")).unwrap())
            .unwrap();
    assert_eq!(s1["order"].as_array().map(Vec::len), Some(4), "{s1}");
    assert_eq!(
        m["matrix"][1][1].as_f64(),
        s1["tasks"]["GQA"]["accuracy"].as_f64()
    );

    // losses.json holds each model's training log, in task order.
    let losses: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("metrics/metrics/losses.json")).unwrap())
            .unwrap();
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("task/GQA/model/train_log.json")).unwrap())
            .unwrap();
    assert_eq!(losses[1]["task"], "GQA");
    assert_eq!(losses[1]["steps"], serde_json::json!([1, 2]));
    assert_eq!(losses[1]["loss"][1], log[1]["loss"], "{losses} vs {log}");

    let report = runs.join("report/report");
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.starts_with("# Two tasks\n"), "{md}");
    assert!(md.contains("| LoRA | 1 |"), "{md}");
    for f in [
        "report.html",
        "heatmap-1-lora.png",
        "heatmap-1-lora.svg",
        "loss-1-lora.png",
        "loss-1-lora.svg",
    ] {
        assert!(report.join(f).is_file(), "the report lacks {f}");
    }

    let again = pipeline(t.path(), &["run", "r.toml"]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        !err.contains("Running"),
        "second run recomputed something: {err}"
    );
}
