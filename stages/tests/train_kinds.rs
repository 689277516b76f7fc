//! The training kinds end to end through `StageKind::run` with hand-built contexts, at tiny
//! sizes: synth-coin -> tokenizer.train -> train.pretrain -> train.lora (x2, RegLoRA), checking
//! that every output is a loadable HF / PEFT directory, that key elements have the §1.4 counts
//! and accumulate by concatenation, and that a run stopped mid-training resumes to the same
//! bytes as an uninterrupted one.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use engine::stage::{StageError, StageKind};
use serde_json::{Value, json};
use stages::kinds::coin_data::SynthCoin;
use stages::kinds::train_kinds::{KEY_ELEMENTS_FILE, LoraTrain, Pretrain, TokenizerTrain};
use stages::model::tokenizer::LlavaTokenizer;
use stages::model::{Llava, LoraConfig};
use stages::train::reglora::KeyElements;

mod support;

use support::{How, run_kind, single, tree};

/// Runs `kind` in `work` as a stage named after the kind.
fn run_with(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, &Path)],
    seed: u64,
    stop_at: Option<u64>,
) -> Result<(PathBuf, String), StageError> {
    let how = How {
        name: kind.kind(),
        seed,
        stop_at,
        lists: &[],
    };
    run_kind(kind, work, params, &single(inputs), how)
}

fn run(kind: &dyn StageKind, work: &Path, params: Value, inputs: &[(&str, &Path)]) -> PathBuf {
    run_with(kind, work, params, inputs, 7, None)
        .unwrap_or_else(|e| panic!("{} fails: {e}", kind.kind()))
        .0
}

/// Dataset + tokenizer + pretrained model, tiny.
fn base(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = run(
        &SynthCoin,
        &root.join("data"),
        json!({"per_task": {"train": 4, "test": 2}, "pretrain": 8, "image_size": 64}),
        &[],
    );
    let tok = run(
        &TokenizerTrain,
        &root.join("tok"),
        json!({}),
        &[("data", &data)],
    );
    let model = run(
        &Pretrain,
        &root.join("pre"),
        json!({"steps": 2, "batch_size": 2}),
        &[("data", &data), ("tokenizer", &tok)],
    );
    (data, tok, model)
}

#[test]
fn chain_writes_loadable_dirs_and_accumulates_key_elements() {
    let root = tempfile::tempdir().unwrap();
    let (data, tok_dir, pre) = base(root.path());
    let tok = LlavaTokenizer::load(&tok_dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "train_log.json",
    ] {
        assert!(pre.join(f).is_file(), "pretrain output lacks {f}");
    }
    let m = Llava::load(&pre, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config().text.vocab_size, tok.vocab_size());
    assert_eq!(m.config().image_token_index, tok.image_id);
    let log: Vec<Value> =
        serde_json::from_slice(&std::fs::read(pre.join("train_log.json")).unwrap()).unwrap();
    assert_eq!(log.len(), 2);

    let reg = json!(2.5e3);
    let p1 = json!({"task": "ScienceQA", "steps": 2, "batch_size": 2, "rank": 4, "lr": 1e-3, "reglora": reg});
    let (t1, log1) = run_with(
        &LoraTrain,
        &root.path().join("t1"),
        p1,
        &[("base", &pre), ("data", &data)],
        3,
        None,
    )
    .unwrap();
    assert!(
        !log1.contains("reglora: ") || log1.contains("accumulated"),
        "no penalty on the first task: {log1}"
    );
    assert!(!log1.contains("key elements over"), "{log1}");
    let k1 = KeyElements::load(&t1.join(KEY_ELEMENTS_FILE)).unwrap();
    // 4 layers x 7 projections; k = int(0.02 * out * in) each.
    assert_eq!(k1.sets.len(), 28);
    let q = k1
        .sets
        .keys()
        .find(|k| k.ends_with("layers.0.self_attn.q_proj"))
        .unwrap();
    assert_eq!(k1.sets[q].len(), (0.02f64 * 256.0 * 256.0) as usize);
    let d = k1
        .sets
        .keys()
        .find(|k| k.ends_with("layers.0.mlp.down_proj"))
        .unwrap();
    assert_eq!(k1.sets[d].len(), (0.02f64 * 256.0 * 688.0) as usize);

    // The adapter is PEFT and loads onto the base; base + adapter merged equals the output.
    let adapter = t1.parent().unwrap().join("adapter");
    let cfg = LoraConfig::from_file(&adapter.join("adapter_config.json")).unwrap();
    assert_eq!(cfg.r, 4);
    let mut b = Llava::load(&pre, DType::F32, &Device::Cpu).unwrap();
    b.load_adapter(&adapter, "a", false).unwrap();
    b.merge_adapter("a").unwrap();
    let merged = Llava::load(&t1, DType::F32, &Device::Cpu).unwrap();
    let name = "language_model.model.layers.0.self_attn.q_proj.weight";
    let (x, y) = (
        b.params().get(b.params().id(name).unwrap()),
        merged.params().get(merged.params().id(name).unwrap()),
    );
    let diff: f32 = (x - y)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-6, "merged weights differ by {diff}");
    // The projector trained (its own lr group), so it differs from the base.
    let pn = "multi_modal_projector.linear_1.weight";
    let pdiff: f32 = (b.params().get(b.params().id(pn).unwrap())
        - merged.params().get(merged.params().id(pn).unwrap()))
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar()
    .unwrap();
    assert!(pdiff > 0.0, "projector did not train");

    // Task 2 on the merged model: the penalty is on, and the set doubles by concatenation.
    let p2 = json!({"task": "TextVQA", "steps": 3, "batch_size": 2, "rank": 4, "lr": 1e-3, "reglora": reg});
    let (t2, log2) = run_with(
        &LoraTrain,
        &root.path().join("t2"),
        p2,
        &[("base", &t1), ("data", &data)],
        4,
        None,
    )
    .unwrap();
    assert!(log2.contains("key elements over 28 matrices"), "{log2}");
    let steps: Vec<Value> =
        serde_json::from_slice(&std::fs::read(t2.join("train_log.json")).unwrap()).unwrap();
    // Step 1 runs at warmup lr 0, so B is still zero at step 2; step 3 sees a non-zero update.
    assert_eq!(steps[0]["extras"][0][1].as_f64(), Some(0.0));
    let extras = steps[2]["extras"].as_array().unwrap();
    assert_eq!(extras[0][0], "reglora");
    assert!(extras[0][1].as_f64().unwrap() > 0.0, "{extras:?}");
    let k2 = KeyElements::load(&t2.join(KEY_ELEMENTS_FILE)).unwrap();
    assert_eq!(k2.sets[q].len(), 2 * k1.sets[q].len());
    assert_eq!(
        &k2.sets[q][k1.sets[q].len()..],
        &k1.sets[q][..],
        "older set comes last, unchanged"
    );
    assert_eq!(
        tree(&t2.parent().unwrap().join("key_elements"))[KEY_ELEMENTS_FILE],
        std::fs::read(t2.join(KEY_ELEMENTS_FILE)).unwrap()
    );

    // Bad input is named: an unknown task and an out-of-range RegLoRA percentage.
    let err = run_with(
        &LoraTrain,
        &root.path().join("bad"),
        json!({"task": "Nope"}),
        &[("base", &pre), ("data", &data)],
        1,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`Nope`") && err.contains("ScienceQA"), "{err}");
    let err = run_with(
        &LoraTrain,
        &root.path().join("bad2"),
        json!({"task": "GQA", "reglora": 1.0, "reglora_top": 0.0}),
        &[("base", &pre), ("data", &data)],
        1,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`reglora_top` = 0"), "{err}");
}

#[test]
fn interrupted_training_resumes_to_identical_bytes() {
    let root = tempfile::tempdir().unwrap();
    let (data, _, pre) = base(root.path());
    let params = json!({"task": "GQA", "steps": 4, "batch_size": 1, "rank": 4, "lr": 1e-3,
        "dropout": 0.1, "checkpoint_every": 2});
    let inputs = [("base", pre.as_path()), ("data", data.as_path())];
    let straight = run_with(
        &LoraTrain,
        &root.path().join("a"),
        params.clone(),
        &inputs,
        9,
        None,
    )
    .unwrap()
    .0;
    // Stopped after step 3: the checkpoint is at step 2 and the loss log has a stale step 3.
    let work = root.path().join("b");
    let err = run_with(&LoraTrain, &work, params.clone(), &inputs, 9, Some(3)).unwrap_err();
    assert!(matches!(err, StageError::Cancelled), "{err}");
    let stale = std::fs::read_to_string(work.join("ckpt/losses.jsonl")).unwrap();
    assert_eq!(stale.lines().count(), 3);
    std::fs::remove_dir_all(work.join("out")).unwrap();
    let (resumed, log) = run_with(&LoraTrain, &work, params, &inputs, 9, None).unwrap();
    assert!(log.contains("resuming at 2"), "{log}");
    assert_eq!(tree(&straight), tree(&resumed));
    let adapter = |d: &Path| tree(&d.parent().unwrap().join("adapter"));
    assert_eq!(adapter(&straight), adapter(&resumed));
}
