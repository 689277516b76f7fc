//! `eval.coin` and `eval.cl-metrics` end to end through `StageKind::run` with hand-built
//! contexts: a tiny synth-coin dataset and the `llava-tiny` fixture model; checks
//! that predictions and scores are well-formed for all eight tasks, that a run stopped between
//! shards resumes to the same bytes as an uninterrupted one, task selection (`upto`), and the
//! metrics kind on hand-written scores.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use engine::stage::{StageError, StageKind};
use serde_json::{Value, json};
use stages::data::coin::{DatasetInfo, TASKS, read_test};
use stages::eval::coin_score::{Rule, TaskScore};
use stages::kinds::cl_metrics::{ClMetrics, ClMetricsKind};
use stages::kinds::coin_data::SynthCoin;
use stages::kinds::coin_eval::{CoinScores, EvalCoin, Prediction};

mod support;

use support::{How, run_kind, single, tree};

/// Runs `kind` in `work` as stage `eval/test` (seed 11); returns the first output's
/// directory and the log.
fn run_with(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, Vec<PathBuf>)],
    stop_at: Option<u64>,
) -> Result<(PathBuf, String), StageError> {
    let how = How {
        name: "eval/test",
        seed: 11,
        stop_at,
        lists: &["evals"],
    };
    run_kind(kind, work, params, inputs, how)
}

fn run(kind: &dyn StageKind, work: &Path, params: Value, inputs: &[(&str, &Path)]) -> PathBuf {
    run_with(kind, work, params, &single(inputs), None)
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
    let shards = tree(&work.join("ckpt"));
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
