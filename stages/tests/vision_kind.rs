//! `train.vision` through `StageKind::run`, and `train.pretrain` starting from its tower: the
//! output holds only the tower, trained (loss falls, weights move) and reproducible; a stopped
//! run resumes to the same bytes; a frozen tower reaches the pretrained model unchanged; a
//! tower of another shape is refused naming the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use engine::stage::{StageError, StageKind};
use serde_json::{Value, json};
use stages::kinds::coin_data::SynthCoin;
use stages::kinds::train_kinds::{Pretrain, TokenizerTrain};
use stages::kinds::vision_kind::{VISION_LOG_FILE, VISION_WEIGHTS_FILE, VisionTrain};
use stages::model::Llava;

mod support;

use support::{How, run_kind, single, tree};

fn run_with(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, &Path)],
    stop_at: Option<u64>,
) -> Result<(PathBuf, String), StageError> {
    let how = How {
        name: kind.kind(),
        seed: 11,
        stop_at,
        lists: &[],
    };
    run_kind(kind, work, params, &single(inputs), how)
}

fn run(kind: &dyn StageKind, work: &Path, params: Value, inputs: &[(&str, &Path)]) -> PathBuf {
    run_with(kind, work, params, inputs, None)
        .unwrap_or_else(|e| panic!("{} fails: {e}", kind.kind()))
        .0
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Names of the files that differ between two output trees (not their bytes: a failure
/// message of megabytes helps nobody).
fn differing(a: &Path, b: &Path) -> Vec<String> {
    let (ta, tb) = (tree(a), tree(b));
    let mut names: Vec<String> = ta.keys().chain(tb.keys()).cloned().collect();
    names.sort();
    names.dedup();
    names.retain(|n| ta.get(n) != tb.get(n));
    // Name the first differing line of a text file.
    names
        .into_iter()
        .map(|n| {
            let text = |t: &BTreeMap<String, Vec<u8>>| {
                t.get(&n)
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            };
            let (x, y) = (text(&ta), text(&tb));
            match x.lines().zip(y.lines()).find(|(p, q)| p != q) {
                Some((p, q)) if x.is_ascii() => format!("{n}: `{p}` vs `{q}`"),
                _ => n,
            }
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

const VISION: &str =
    r#"{"steps": 12, "batch_size": 8, "holdout": 8, "lr": 2e-3, "checkpoint_every": 4}"#;

#[test]
fn tower_trains_reproducibly_resumes_and_feeds_pretraining() {
    let root = tempfile::tempdir().unwrap();
    let data = run(
        &SynthCoin,
        &root.path().join("data"),
        json!({"per_task": {"train": 2, "test": 1}, "pretrain": 48, "image_size": 64}),
        &[],
    );
    let params: Value = serde_json::from_str(VISION).unwrap();
    let vis = run(
        &VisionTrain,
        &root.path().join("v1"),
        params.clone(),
        &[("data", &data)],
    );

    // Only the tower, every tensor of it that the forward reads.
    let w = tensors(&vis.join(VISION_WEIGHTS_FILE));
    assert!(
        w.keys().all(|k| k.starts_with("vision_tower.")),
        "{:?}",
        w.keys()
    );
    assert!(
        w.keys().any(|k| k.contains("patch_embedding")),
        "{:?}",
        w.keys()
    );
    // The loss falls and the held-out scores cover the caption words.
    let log: Value =
        serde_json::from_slice(&std::fs::read(vis.join(VISION_LOG_FILE)).unwrap()).unwrap();
    let steps = log["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 12);
    let loss = |i: usize| steps[i]["loss"].as_f64().unwrap();
    assert!(loss(11) < loss(0), "loss {} -> {}", loss(0), loss(11));
    assert_eq!(log["train_captions"], 40);
    let words: Vec<&str> = log["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["word"].as_str().unwrap())
        .collect();
    assert!(words.windows(2).all(|p| p[0] < p[1]), "{words:?}");
    assert!(
        words.contains(&"red") || words.contains(&"blue"),
        "{words:?}"
    );

    // The weights moved from the random init of the same seed.
    let fresh = run(
        &VisionTrain,
        &root.path().join("v0"),
        json!({"steps": 1, "batch_size": 8, "holdout": 8, "lr": 0.0}),
        &[("data", &data)],
    );
    let w0 = tensors(&fresh.join(VISION_WEIGHTS_FILE));
    let pe = "vision_tower.embeddings.patch_embedding.weight";
    assert!(
        max_diff(&w[pe], &w0[pe]) > 0.0,
        "patch embedding did not train"
    );

    // Same seed, same bytes; stopped at step 6 (checkpoint at 4) and resumed, same bytes.
    let again = run(
        &VisionTrain,
        &root.path().join("v2"),
        params.clone(),
        &[("data", &data)],
    );
    assert_eq!(differing(&vis, &again), Vec::<String>::new());
    let work = root.path().join("v3");
    let err = run_with(
        &VisionTrain,
        &work,
        params.clone(),
        &[("data", &data)],
        Some(6),
    )
    .unwrap_err();
    assert!(matches!(err, StageError::Cancelled), "{err}");
    std::fs::remove_dir_all(work.join("out")).unwrap();
    let (resumed, text) = run_with(&VisionTrain, &work, params, &[("data", &data)], None).unwrap();
    assert!(text.contains("resuming at 4"), "{text}");
    assert_eq!(differing(&vis, &resumed), Vec::<String>::new());

    // Pretraining with the tower frozen keeps it exactly; trained, it moves on from it.
    let tok = run(
        &TokenizerTrain,
        &root.path().join("tok"),
        json!({}),
        &[("data", &data)],
    );
    let inputs = [
        ("data", data.as_path()),
        ("tokenizer", tok.as_path()),
        ("vision", vis.as_path()),
    ];
    let frozen = run(
        &Pretrain,
        &root.path().join("pf"),
        json!({"steps": 2, "batch_size": 2, "freeze_vision": true}),
        &inputs,
    );
    let m = Llava::load(&frozen, DType::F32, &Device::Cpu).unwrap();
    for (name, t) in &w {
        let id = m
            .params()
            .id(name)
            .unwrap_or_else(|| panic!("model lacks {name}"));
        assert_eq!(
            max_diff(m.params().get(id), t),
            0.0,
            "{name} changed while frozen"
        );
    }
    let trained = run(
        &Pretrain,
        &root.path().join("pt"),
        json!({"steps": 2, "batch_size": 2}),
        &inputs,
    );
    let m = Llava::load(&trained, DType::F32, &Device::Cpu).unwrap();
    let d = max_diff(m.params().get(m.params().id(pe).unwrap()), &w[pe]);
    assert!(
        d > 0.0 && d < 0.1,
        "trained tower should start from the given one: {d}"
    );

    // A tower built for another vision config is refused, naming the file and the field.
    let cfg_path = vis.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"]["hidden_size"] = json!(64);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = run_with(
        &Pretrain,
        &root.path().join("bad"),
        json!({"steps": 1, "batch_size": 2}),
        &inputs,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("config.json") && err.contains("vision_config"),
        "{err}"
    );
}
