//! The shipped `experiments/sefe_coin.toml` through the binary, shrunk with `--set` to two
//! tasks and a few steps: every stage runs, the RegLoRA chain carries key elements from task to
//! task, the merged models and the metrics land under `runs/`, and a second run is fully
//! cached.
#![cfg(feature = "ml")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn recipe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/sefe_coin.toml")
}

const SHRINK: &[&str] = &[
    "--set",
    "vars.tasks=[\"ScienceQA\", \"TextVQA\"]",
    "--set",
    "coin.per_task={ train = 4, test = 2 }",
    "--set",
    "coin.pretrain=8",
    "--set",
    "base.steps=2",
    "--set",
    "task.steps=3",
];

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

#[test]
fn shipped_recipe_plans_in_full_and_runs_shrunk_then_caches() {
    let t = tempfile::tempdir().unwrap();
    let r = recipe();
    let r = r.to_str().unwrap();
    let plan = pipeline(t.path(), &["plan", r]);
    let text =
        String::from_utf8_lossy(&plan.stdout).into_owned() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success(), "{text}");
    for s in ["task/ScienceQA", "task/OCRVQA", "base", "tokenizer", "asd"] {
        assert!(text.contains(s), "plan lacks {s}: {text}");
    }

    let mut args = vec!["run", r];
    args.extend_from_slice(SHRINK);
    let out = pipeline(t.path(), &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let runs = t.path().join("runs/sefe_coin");
    let last = runs.join("task/TextVQA/model");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "reglora_key_elements.safetensors",
    ] {
        assert!(last.join(f).is_file(), "{} lacks {f}", last.display());
    }
    assert!(
        runs.join("task/TextVQA/adapter/adapter_config.json")
            .is_file()
    );
    // TextVQA trained with the penalty against ScienceQA's key elements.
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(last.join("train_log.json")).unwrap()).unwrap();
    assert_eq!(log[2]["extras"][0][0], "reglora", "{log}");

    // The evaluation rows and the continual-learning metrics over them.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs.join("metrics/metrics/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(
        m["tasks"],
        serde_json::json!(["ScienceQA", "TextVQA"]),
        "{m}"
    );
    assert_eq!(m["matrix"].as_array().map(Vec::len), Some(2), "{m}");
    assert!(runs.join("eval/TextVQA/metrics/scores.json").is_file());

    let again = pipeline(t.path(), &args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        !err.contains("Running"),
        "second run recomputed something: {err}"
    );
}
