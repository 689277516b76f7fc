//! End to end through the binary: a two-task continual chain on synth-coin trained on a
//! subset of the tasks (ScienceQA, then GQA, skipping the two between them in dataset order),
//! `eval.cl-metrics` with a label and the trained models, and a `report` over it. Checks that
//! the matrix is labelled in training order without a `tasks` parameter, that the losses
//! come from the models' training logs, that the report lands under `runs/` with its figures,
//! and that a second run is fully cached.
#![cfg(feature = "ml")]

mod support;

use support::{coin_chain, pipeline, read_json};

/// The chain (two LoRA steps per task, so that the loss curves have two points), then the
/// labelled metrics with the models' training logs and a report.
fn recipe() -> String {
    coin_chain("rep", 3, 2)
        + r#"
[stages.metrics]
kind = "eval.cl-metrics"
evals = "@eval/*"
models = "@task/*"
label = "LoRA"

[stages.report]
kind = "report"
metrics = ["@metrics"]
title = "Two tasks"
"#
}

#[test]
fn subset_chain_reports_in_training_order_and_caches() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("r.toml"), recipe()).unwrap();
    let out = pipeline(t.path(), &["run", "r.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let runs = t.path().join("runs/rep");

    // The evaluation after GQA scored ScienceQA..GQA (four tasks in dataset order); the
    // matrix still has GQA, not TextVQA, as its second task.
    let m = read_json(&runs.join("metrics/metrics/metrics.json"));
    assert_eq!(m["tasks"], serde_json::json!(["ScienceQA", "GQA"]), "{m}");
    assert_eq!(m["label"], "LoRA");
    let s1 = read_json(&runs.join("eval/GQA/metrics/scores.json"));
    assert_eq!(s1["order"].as_array().map(Vec::len), Some(4), "{s1}");
    assert_eq!(
        m["matrix"][1][1].as_f64(),
        s1["tasks"]["GQA"]["accuracy"].as_f64()
    );

    // losses.json holds each model's training log, in task order.
    let losses = read_json(&runs.join("metrics/metrics/losses.json"));
    let log = read_json(&runs.join("task/GQA/model/train_log.json"));
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
