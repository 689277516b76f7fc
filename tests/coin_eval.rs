//! End to end through the binary: a two-task continual chain on synth-coin (pretrain, then a
//! LoRA per task chained on the previous one), an `eval.coin` after each task with
//! `upto = "{item}"`, and `eval.cl-metrics` over the gather `@eval/*`; the matrix has one row
//! per training stage and a second run is fully cached.
#![cfg(feature = "ml")]

mod support;

use support::{coin_chain, pipeline, read_json};

/// The chain, then the metrics over every evaluation.
fn recipe() -> String {
    coin_chain("cl", 5, 1)
        + r#"
[stages.metrics]
kind = "eval.cl-metrics"
evals = "@eval/*"
tasks = ["ScienceQA", "GQA"]
"#
}

#[test]
fn continual_eval_chain_builds_the_matrix_and_caches() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("r.toml"), recipe()).unwrap();
    let out = pipeline(t.path(), &["run", "r.toml", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("\"stage-finished\"").count(), 8, "{stdout}");

    let m = read_json(&t.path().join("runs/cl/metrics/metrics/metrics.json"));
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
    let s0 = read_json(&t.path().join("runs/cl/eval/ScienceQA/metrics/scores.json"));
    assert_eq!(s0["order"], serde_json::json!(["ScienceQA"]));
    assert_eq!(s0["tasks"]["ScienceQA"]["accuracy"].as_f64().unwrap(), a00);

    let again = pipeline(t.path(), &["run", "r.toml", "--json"]);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert_eq!(stdout.matches("\"stage-finished\"").count(), 0, "{stdout}");
}
