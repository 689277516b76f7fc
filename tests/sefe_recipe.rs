//! The shipped `experiments/sefe_coin.toml` through the binary, shrunk with `--set` to two
//! tasks and a few steps: the four methods (a matrix over ASD's `x` and RegLoRA's λ) share the
//! common stages, each task is three stages (train, merge, key elements) chained to the
//! previous task's merge and keys, the key elements accumulate by concatenation and only
//! RegLoRA's trainings penalize them, every method gets its metrics, the report lands under
//! `runs/`, a second run is fully cached, and a run killed with SIGKILL during training
//! resumes to the same report bytes.
#![cfg(feature = "ml")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use stages::train::reglora::KeyElements;

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
    "vision.steps=2",
    "--set",
    "vision.holdout=2",
    "--set",
    "base.steps=2",
    "--set",
    "task.steps=4",
    "--set",
    "task.checkpoint_every=1",
];

// The default runs one repetition (`rep = 1`); the 3-seed recipe adds reps 2 and 3.
const METHODS: [&str; 4] = [
    "rep=1,x=0,reglora=0",
    "rep=1,x=0,reglora=2500",
    "rep=1,x=20,reglora=0",
    "rep=1,x=20,reglora=2500",
];

fn command(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
    c.current_dir(dir)
        .env_remove("PIPELINE_CACHE_DIR")
        .env_remove("PIPELINE_RUNS_DIR")
        .args(args)
        .args(["--cache-dir", ".cache", "--runs-dir", "runs"]);
    c
}

fn pipeline(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().unwrap()
}

fn shrunk_run_args(r: &str) -> Vec<&str> {
    let mut args = vec!["run", r, "-j", "2"];
    args.extend_from_slice(SHRINK);
    args
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

/// Every file of the report output, by name.
fn report_files(runs: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = runs.join("report/report");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn shipped_recipe_plans_four_methods_runs_shrunk_then_caches() {
    let t = tempfile::tempdir().unwrap();
    let r = recipe();
    let r = r.to_str().unwrap();
    let plan = pipeline(t.path(), &["plan", r]);
    let text =
        String::from_utf8_lossy(&plan.stdout).into_owned() + &String::from_utf8_lossy(&plan.stderr);
    assert!(plan.status.success(), "{text}");
    // 4 shared (data, vision tower, tokenizer, base) + 2 ASD + 4 x 8 x (training, merge, key
    // elements, evaluation) + 4 metrics + the report.
    assert!(text.contains("139 stages"), "{text}");
    for m in METHODS {
        for s in [
            format!("task/{m},task=OCRVQA"),
            format!("merge/{m},task=OCRVQA"),
            format!("keys/{m},task=VQAv2"),
            format!("eval/{m},task=ScienceQA"),
            format!("metrics/{m}"),
        ] {
            assert!(text.contains(&s), "plan lacks {s}: {text}");
        }
    }

    let args = shrunk_run_args(r);
    let out = pipeline(t.path(), &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let runs = t.path().join("runs/sefe_coin");

    // The trainings write adapters only; the merges are the models, with the training logs.
    let task = runs.join("task/rep=1,x=20,reglora=2500,task=TextVQA");
    assert!(task.join("adapter/adapter_model.safetensors").is_file());
    assert!(!task.join("model").exists());
    let merged = runs.join("merge/rep=1,x=20,reglora=2500,task=TextVQA/model");
    assert!(merged.join("model.safetensors").is_file());
    assert_eq!(
        read_json(&merged.join("train_log.json")),
        read_json(&task.join("adapter/train_log.json"))
    );
    // Key elements accumulate: TextVQA's set is its own entries, then ScienceQA's.
    let keys = |m: &str, t: &str| {
        KeyElements::load(&runs.join(format!(
            "keys/{m},task={t}/key_elements/reglora_key_elements.safetensors"
        )))
        .unwrap()
    };
    let (k1, k2) = (
        keys("rep=1,x=20,reglora=2500", "ScienceQA"),
        keys("rep=1,x=20,reglora=2500", "TextVQA"),
    );
    assert!(!k1.is_empty());
    assert_eq!(k2.len(), 2 * k1.len());
    for (m, v) in &k1.sets {
        assert_eq!(
            &k2.sets[m][v.len()..],
            &v[..],
            "{m}: older set last, unchanged"
        );
    }
    // RegLoRA on: TextVQA trained against ScienceQA's key elements.
    let log = read_json(&task.join("adapter/train_log.json"));
    assert_eq!(log[2]["extras"][0][0], "reglora", "{log}");
    // RegLoRA off: no penalty.
    let off = runs.join("task/rep=1,x=20,reglora=0,task=TextVQA/adapter");
    let log = read_json(&off.join("train_log.json"));
    assert_eq!(log[2]["extras"], serde_json::json!([]), "{log}");

    for m in METHODS {
        let metrics = read_json(&runs.join(format!("metrics/{m}/metrics/metrics.json")));
        assert_eq!(
            metrics["tasks"],
            serde_json::json!(["ScienceQA", "TextVQA"]),
            "{metrics}"
        );
        assert_eq!(
            metrics["matrix"].as_array().map(Vec::len),
            Some(2),
            "{metrics}"
        );
    }
    let files = report_files(&runs);
    let md = &files.iter().find(|(n, _)| n == "report.md").unwrap().1;
    let md = String::from_utf8_lossy(md);
    for label in ["ASD 0%, RegLoRA λ=0", "ASD 20%, RegLoRA λ=2500"] {
        assert!(md.contains(label), "report lacks {label}: {md}");
    }
    assert!(files.iter().any(|(n, _)| n == "report.html"));

    let again = pipeline(t.path(), &args);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(
        !err.contains("Running"),
        "second run recomputed something: {err}"
    );

    // More repetitions reuse this run as repetition 1: every rep-1 stage but the report (which
    // now also reads rep 2's metrics) is a hit. 2 tasks: 4 shared + 2 ASD + 4 x 2 x 4 + 4
    // metrics = 42 stages per repetition, and one report.
    let mut reps = vec!["plan", r];
    reps.extend_from_slice(SHRINK);
    reps.extend(["--set", "vars.reps=[1, 2]"]);
    let plan = pipeline(t.path(), &reps);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("85 stages: 42 hit, 43 run"), "{text}");

    // One expansion's learning rate: exactly that training, its merge and key elements, its
    // successor's (which read them), and the evaluations and metrics downstream of them
    // rerun; the other three methods stay cached.
    let mut one = args.clone();
    // (3e-3 is not the recipe's lr: an override equal to it would change nothing)
    one.extend(["--set", "task/rep=1,x=0,reglora=0,task=ScienceQA.lr=3e-3"]);
    let out = pipeline(t.path(), &one);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let ran: Vec<&str> = err
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Running "))
        .collect();
    let mut ran_sorted = ran.clone();
    ran_sorted.sort_unstable();
    assert_eq!(
        ran_sorted,
        [
            "eval/rep=1,x=0,reglora=0,task=ScienceQA",
            "eval/rep=1,x=0,reglora=0,task=TextVQA",
            "keys/rep=1,x=0,reglora=0,task=ScienceQA",
            "keys/rep=1,x=0,reglora=0,task=TextVQA",
            "merge/rep=1,x=0,reglora=0,task=ScienceQA",
            "merge/rep=1,x=0,reglora=0,task=TextVQA",
            "metrics/rep=1,x=0,reglora=0",
            "report",
            "task/rep=1,x=0,reglora=0,task=ScienceQA",
            "task/rep=1,x=0,reglora=0,task=TextVQA",
        ],
        "{err}"
    );
}

#[test]
fn sigkill_during_training_resumes_to_the_same_report_bytes() {
    let r = recipe();
    let r = r.to_str().unwrap();
    let args = shrunk_run_args(r);

    let clean = tempfile::tempdir().unwrap();
    let out = pipeline(clean.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = report_files(&clean.path().join("runs/sefe_coin"));

    // Kill the run once a task training has written its first checkpoint.
    let t = tempfile::tempdir().unwrap();
    let mut child = command(t.path(), &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ck = t.path().join(".cache");
    let start = Instant::now();
    let mut killed = false;
    while start.elapsed() < Duration::from_secs(300) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // Only the task trainings checkpoint at this size (every step).
        let has_task_ckpt = walk(&ck).iter().any(|p| {
            let s = p.to_string_lossy();
            s.contains("checkpoints") && s.contains("step-")
        });
        if has_task_ckpt {
            child.kill().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
    assert!(
        killed,
        "the run ended before any training checkpoint appeared"
    );

    let out = pipeline(t.path(), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = report_files(&t.path().join("runs/sefe_coin"));
    assert_eq!(
        got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
    );
    for ((n, a), (_, b)) in got.iter().zip(&want) {
        assert!(a == b, "{n} differs after the resumed run");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
