//! `eval.coin` and `eval.cl-metrics` end to end through `StageKind::run` with hand-built
//! contexts: a tiny synth-coin dataset and the `llava-tiny` fixture model; checks
//! that predictions and scores are well-formed for all eight tasks, that a run stopped between
//! shards resumes to the same bytes as an uninterrupted one, task selection (`upto`), and the
//! metrics kind on hand-written scores.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::stage::{NoProgress, Progress, Resources, StageCtx, StageError, StageKind};
use serde_json::{Value, json};
use stages::data::coin::{DatasetInfo, TASKS, read_test};
use stages::eval::coin_score::{Rule, TaskScore};
use stages::kinds::cl_metrics::{ClMetrics, ClMetricsKind};
use stages::kinds::coin_data::SynthCoin;
use stages::kinds::coin_eval::{CoinScores, EvalCoin, Prediction};

/// Cancels the run once `at` progress units are done (a simulated kill).
struct StopAt {
    at: u64,
    flag: Arc<AtomicBool>,
}
impl Progress for StopAt {
    fn progress(&self, done: u64, _: u64, _: &str) {
        if done >= self.at {
            self.flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs `kind` in `work` (outputs under `work/out`, checkpoints in `work/ckpt`); returns the
/// first output's directory and the log.
fn run_with(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, Vec<PathBuf>)],
    stop_at: Option<u64>,
) -> Result<(PathBuf, String), StageError> {
    let out_dir = work.join("out");
    let ckpt = work.join("ckpt");
    for o in kind.outputs(&params) {
        std::fs::create_dir_all(out_dir.join(o.name)).unwrap();
    }
    std::fs::create_dir_all(&ckpt).unwrap();
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, p)| ((*k).to_string(), p.clone()))
        .collect();
    let mut full = serde_json::Map::new();
    for s in kind.params() {
        if let Some(d) = s.default {
            full.insert(s.name.to_string(), d);
        }
    }
    for (k, v) in params.as_object().unwrap() {
        full.insert(k.clone(), v.clone());
    }
    for (k, p) in &inputs {
        let v = if p.len() == 1 && k != "evals" {
            json!(p[0].to_str().unwrap())
        } else {
            json!(p.iter().map(|x| x.to_str().unwrap()).collect::<Vec<_>>())
        };
        full.insert(k.clone(), v);
    }
    let params = Value::Object(full);
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = stop_at.map(|at| StopAt {
        at,
        flag: cancel.clone(),
    });
    let mut log = Vec::new();
    let mut ctx = StageCtx {
        name: "eval/test",
        recipe_dir: work,
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        checkpoint_dir: &ckpt,
        seed: 11,
        cancel,
        progress: stop.as_ref().map_or(&NoProgress as &dyn Progress, |s| s),
        log: &mut log,
        resources: Resources::default(),
    };
    kind.run(&mut ctx)?;
    let first = kind.outputs(&params)[0].name;
    Ok((out_dir.join(first), String::from_utf8(log).unwrap()))
}

fn run(kind: &dyn StageKind, work: &Path, params: Value, inputs: &[(&str, &Path)]) -> PathBuf {
    let inputs: Vec<(&str, Vec<PathBuf>)> = inputs
        .iter()
        .map(|(k, p)| (*k, vec![p.to_path_buf()]))
        .collect();
    run_with(kind, work, params, &inputs, None)
        .unwrap_or_else(|e| panic!("{} fails: {e}", kind.kind()))
        .0
}

/// Tiny dataset (3 test questions per task, 64-pixel images) and the `llava-tiny` fixture
/// model (random weights whose greedy answers vary with the input, unlike a freshly
/// pretrained model's, so that equal predictions across runs mean something).
fn base(root: &Path) -> (PathBuf, PathBuf) {
    let data = run(
        &SynthCoin,
        &root.join("data"),
        json!({"per_task": {"train": 4, "test": 3}, "pretrain": 8, "image_size": 64}),
        &[],
    );
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny");
    (data, model)
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    walk(dir, dir)
}

fn walk(root: &Path, dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(root, &p));
        } else {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(rel, std::fs::read(&p).unwrap());
        }
    }
    out
}

const EVAL: &str = r#"{"shard_size": 2, "batch_size": 2, "max_new_tokens": 6}"#;

#[test]
fn eval_coin_writes_predictions_and_scores_and_resumes_to_the_same_bytes() {
    let root = tempfile::tempdir().unwrap();
    let (data, model) = base(root.path());
    let info = DatasetInfo::load(&data).unwrap();
    let params: Value = serde_json::from_str(EVAL).unwrap();
    let inputs = [("model", vec![model.clone()]), ("data", vec![data.clone()])];

    let (full, log) = run_with(
        &EvalCoin,
        &root.path().join("a"),
        params.clone(),
        &inputs,
        None,
    )
    .unwrap();
    let scores: CoinScores =
        serde_json::from_slice(&std::fs::read(full.join("scores.json")).unwrap()).unwrap();
    assert_eq!(scores.order, TASKS.to_vec());
    assert_eq!(scores.model_id, "eval/test");
    assert!(!scores.faithful);
    assert_eq!(scores.tasks["Grounding"].rule, Rule::Grounding);
    assert_eq!(scores.tasks["ScienceQA"].rule, Rule::ScienceQa);
    let mut answer_ids = HashSet::new();
    let mut texts = HashSet::new();
    for task in TASKS {
        let s: &TaskScore = &scores.tasks[task];
        assert_eq!((s.total, s.missing), (3, 0), "{task}");
        assert!(
            (0.0..=100.0).contains(&s.accuracy),
            "{task}: {}",
            s.accuracy
        );
        assert!(
            (s.accuracy - 100.0 * s.correct / 3.0).abs() < 1e-9,
            "{task}"
        );
        let recs = read_test(&data.join(&info.task(task).unwrap().test)).unwrap();
        let text = std::fs::read_to_string(full.join("predictions").join(format!("{task}.jsonl")))
            .unwrap();
        let preds: Vec<Prediction> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(preds.len(), recs.len(), "{task}");
        for (p, r) in preds.iter().zip(&recs) {
            assert_eq!(p.question_id, r.question_id);
            assert_eq!(p.prompt, r.text);
            assert_eq!(p.model_id, "eval/test");
            texts.insert(p.text.clone());
            assert!(
                answer_ids.insert(p.answer_id.clone()),
                "duplicate answer_id {}",
                p.answer_id
            );
            let finish = p.metadata["finish"].as_str().unwrap();
            assert!(finish == "eos" || finish == "length", "{finish}");
        }
        // Every field CoIN's prediction files carry, by name.
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for f in [
            "question_id",
            "prompt",
            "text",
            "answer_id",
            "model_id",
            "metadata",
        ] {
            assert!(first.get(f).is_some(), "{task}: no `{f}`");
        }
    }
    // Real generations, not one constant (else the comparisons below would prove nothing).
    assert!(texts.len() > 1, "{texts:?}");
    assert!(log.contains("shards generated 2, reused 0"), "{log}");

    // Killed after 5 of the 16 shards, then rerun with the same checkpoint directory.
    let work = root.path().join("b");
    let err = run_with(&EvalCoin, &work, params.clone(), &inputs, Some(5)).unwrap_err();
    assert!(matches!(err, StageError::Cancelled), "{err}");
    let shards = walk(&work.join("ckpt"), &work.join("ckpt"));
    assert_eq!(shards.len(), 5, "{:?}", shards.keys().collect::<Vec<_>>());
    std::fs::remove_dir_all(work.join("out")).unwrap();
    let (resumed, log) = run_with(&EvalCoin, &work, params, &inputs, None).unwrap();
    assert!(
        log.contains("ScienceQA: ") && log.contains("reused 2"),
        "{log}"
    );
    assert_eq!(tree(&full), tree(&resumed));

    // Batch size and shard size change speed only, never the answers.
    let other = json!({"shard_size": 3, "batch_size": 1, "max_new_tokens": 6});
    let (regrouped, _) = run_with(&EvalCoin, &root.path().join("c"), other, &inputs, None).unwrap();
    assert_eq!(tree(&full), tree(&regrouped));
}

#[test]
fn eval_coin_selects_tasks_and_rejects_bad_selections() {
    let root = tempfile::tempdir().unwrap();
    let (data, model) = base(root.path());
    let inputs = [("model", vec![model.clone()]), ("data", vec![data.clone()])];
    let mut params: Value = serde_json::from_str(EVAL).unwrap();
    params["upto"] = json!("TextVQA");
    params["faithful"] = json!(true);
    let (out, _) = run_with(
        &EvalCoin,
        &root.path().join("upto"),
        params.clone(),
        &inputs,
        None,
    )
    .unwrap();
    let scores = CoinScores::load(&out).unwrap();
    assert_eq!(scores.order, ["ScienceQA", "TextVQA"]);
    assert!(scores.faithful);
    assert!(!out.join("predictions/ImageNet.jsonl").exists());

    params["upto"] = json!("MMBench");
    let e = run_with(
        &EvalCoin,
        &root.path().join("bad1"),
        params.clone(),
        &inputs,
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("parameter `upto`: `MMBench` is not a task"),
        "{e}"
    );
    params["upto"] = json!("GQA");
    params["tasks"] = json!(["GQA"]);
    let e = run_with(
        &EvalCoin,
        &root.path().join("bad2"),
        params.clone(),
        &inputs,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("both set"), "{e}");
    params["upto"] = json!("");
    params["tasks"] = json!(["VizWiz"]);
    params["max_new_tokens"] = json!(0);
    let e = run_with(&EvalCoin, &root.path().join("bad3"), params, &inputs, None).unwrap_err();
    assert!(e.to_string().contains("`max_new_tokens` = 0"), "{e}");
}

/// An `eval.coin`-shaped output holding only scores.
fn scores_dir(root: &Path, name: &str, acc: &[(&str, f64)]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let s = CoinScores {
        model_id: name.into(),
        faithful: false,
        order: acc.iter().map(|(t, _)| (*t).to_string()).collect(),
        tasks: acc
            .iter()
            .map(|(t, a)| {
                let score = TaskScore {
                    rule: Rule::ExactCi,
                    accuracy: *a,
                    correct: 0.0,
                    total: 1,
                    missing: 0,
                };
                ((*t).to_string(), score)
            })
            .collect(),
    };
    std::fs::write(dir.join("scores.json"), serde_json::to_vec(&s).unwrap()).unwrap();
    dir
}

#[test]
fn cl_metrics_on_a_worked_sequence() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Row 0 also has a score for a later task: it is not part of the matrix.
    let evals = vec![
        scores_dir(r, "e0", &[("ScienceQA", 80.0), ("TextVQA", 5.0)]),
        scores_dir(r, "e1", &[("ScienceQA", 60.0), ("TextVQA", 90.0)]),
        scores_dir(
            r,
            "e2",
            &[("ScienceQA", 50.0), ("TextVQA", 70.0), ("ImageNet", 85.0)],
        ),
    ];
    let (out, _) = run_with(
        &ClMetricsKind,
        &r.join("m"),
        json!({}),
        &[("evals", evals.clone())],
        None,
    )
    .unwrap();
    let m: ClMetrics =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m.tasks, ["ScienceQA", "TextVQA", "ImageNet"]);
    assert_eq!(
        m.matrix,
        vec![vec![80.0], vec![60.0, 90.0], vec![50.0, 70.0, 85.0]]
    );
    assert!((m.summary.mean_finetune_accuracy - 85.0).abs() < 1e-9);
    assert!((m.summary.mean_final_accuracy - 205.0 / 3.0).abs() < 1e-9);
    assert!((m.summary.backward_transfer.unwrap() + 25.0).abs() < 1e-9);
    let json: Value =
        serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    for k in [
        "mean_finetune_accuracy",
        "mean_final_accuracy",
        "mean_average_accuracy",
        "backward_transfer",
        "matrix",
    ] {
        assert!(json.get(k).is_some(), "metrics.json lacks {k}");
    }
    let md = std::fs::read_to_string(out.join("metrics.md")).unwrap();
    assert!(md.contains("| ImageNet | 50.00 | 70.00 | 85.00 |"), "{md}");

    // A row that lacks a task it needs names the file and the task.
    let short = vec![evals[0].clone(), scores_dir(r, "e1b", &[("TextVQA", 90.0)])];
    let e = run_with(
        &ClMetricsKind,
        &r.join("bad"),
        json!({"tasks": ["ScienceQA", "TextVQA"]}),
        &[("evals", short)],
        None,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("e1b/scores.json") && msg.contains("`ScienceQA`"),
        "{msg}"
    );
}

#[test]
fn eval_coin_names_file_record_and_field_of_a_missing_image() {
    let root = tempfile::tempdir().unwrap();
    let (data, model) = base(root.path());
    let info = DatasetInfo::load(&data).unwrap();
    let test_file = data.join(&info.task("GQA").unwrap().test);
    let recs = read_test(&test_file).unwrap();
    let image = recs[1].image.as_ref().expect("GQA questions have images");
    std::fs::remove_file(info.image_path(&data, image)).unwrap();
    let params = json!({"tasks": ["GQA"], "max_new_tokens": 2});
    let inputs = [("model", vec![model]), ("data", vec![data])];
    let e = run_with(&EvalCoin, &root.path().join("e"), params, &inputs, None).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StageError::Input(_)), "{msg}");
    assert!(
        msg.contains(&test_file.display().to_string())
            && msg.contains(&format!("record 1 (question_id {})", recs[1].question_id))
            && msg.contains("field `image`"),
        "{msg}"
    );
}
