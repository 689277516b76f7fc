//! `model.merge` and `reglora.key-elements` through `StageKind::run`: key elements of two
//! hand-made adapters accumulate by concatenation (duplicates kept), and the split chain
//! (`train.lora` with `merge = false` -> `model.merge` / `reglora.key-elements`) writes the
//! same bytes as `train.lora` with `merge = true`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use engine::stage::{NoProgress, Resources, StageCtx, StageError, StageKind};
use serde_json::{Value, json};

use super::*;
use crate::kinds::coin_data::SynthCoin;
use crate::kinds::train_kinds::{LoraTrain, Pretrain, TokenizerTrain};

/// Runs `kind` in `work` with `params` over its defaults and single-directory `inputs`, as
/// the engine would; returns the output directory (`work/out`) and the stage log.
fn run_kind(
    kind: &dyn StageKind,
    work: &Path,
    params: Value,
    inputs: &[(&str, &Path)],
) -> Result<(PathBuf, String), StageError> {
    let out_dir = work.join("out");
    let ckpt = work.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut full = serde_json::Map::new();
    for s in kind.params() {
        if let Some(d) = s.default {
            full.insert(s.name.to_string(), d);
        }
    }
    for (k, v) in params.as_object().unwrap() {
        full.insert(k.clone(), v.clone());
    }
    let inputs: BTreeMap<String, Vec<PathBuf>> = inputs
        .iter()
        .map(|(k, p)| ((*k).to_string(), vec![p.to_path_buf()]))
        .collect();
    for (k, p) in &inputs {
        full.insert(k.clone(), json!(p[0].to_str().unwrap()));
    }
    let params = Value::Object(full);
    for o in kind.outputs(&params) {
        std::fs::create_dir_all(out_dir.join(o.name)).unwrap();
    }
    let mut log = Vec::new();
    let mut ctx = StageCtx {
        name: kind.kind(),
        recipe_dir: work,
        params: &params,
        inputs: &inputs,
        out_dir: &out_dir,
        checkpoint_dir: &ckpt,
        seed: 5,
        cancel: Arc::new(AtomicBool::new(false)),
        progress: &NoProgress,
        log: &mut log,
        resources: Resources::default(),
    };
    kind.run(&mut ctx)?;
    Ok((out_dir, String::from_utf8(log).unwrap()))
}

fn ok(kind: &dyn StageKind, work: &Path, params: Value, inputs: &[(&str, &Path)]) -> PathBuf {
    run_kind(kind, work, params, inputs)
        .unwrap_or_else(|e| panic!("{} fails: {e}", kind.kind()))
        .0
}

const Q: &str = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
const VISION: &str = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.mlp.fc1";

/// A PEFT-named adapter file with the pair `(a, b)` on `Q` and a vision-tower pair, which
/// RegLoRA never regularizes.
fn adapter(dir: &Path, a: &[f32], b: &[f32]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let t = |v: &[f32], shape: (usize, usize)| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let map: std::collections::HashMap<String, Tensor> = [
        (format!("{Q}.lora_A.weight"), t(a, (2, 3))),
        (format!("{Q}.lora_B.weight"), t(b, (2, 2))),
        (format!("{VISION}.lora_A.weight"), t(&[9.0, 9.0], (1, 2))),
        (format!("{VISION}.lora_B.weight"), t(&[9.0], (1, 1))),
    ]
    .into();
    candle_core::safetensors::save(&map, dir.join(ADAPTER_FILE)).unwrap();
    dir.to_path_buf()
}

fn keys_of(out: &Path) -> KeyElements {
    KeyElements::load(&out.join("key_elements").join(KEY_ELEMENTS_FILE)).unwrap()
}

#[test]
fn key_elements_of_two_tasks_concatenate_newest_first_with_duplicates() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Task 1: B·A = [[1, 2, 3], [-4, -5, -6]]; top 50 % of 6 = 3 by |.|: (1,2), (1,1), (1,0).
    let a1 = adapter(&r.join("a1"), &[1., 2., 3., 4., 5., 6.], &[1., 0., 0., -1.]);
    // Task 2: B·A = [[0, 0, 0], [0, 8, -9]]: (1,2), (1,1), then the first of the zero ties, (0,0).
    let a2 = adapter(&r.join("a2"), &[0., 0., 0., 0., 8., -9.], &[0., 0., 0., 1.]);
    let k1 = ok(
        &KeyElementsKind,
        &r.join("k1"),
        json!({"top": 50.0}),
        &[("adapter", &a1)],
    );
    let first = keys_of(&k1);
    assert_eq!(first.sets.len(), 1, "only the decoder linear: {first:?}");
    assert_eq!(first.sets[Q], [[1, 2], [1, 1], [1, 0]]);
    let (k2, log) = run_kind(
        &KeyElementsKind,
        &r.join("k2"),
        json!({"top": 50.0}),
        &[("adapter", &a2), ("previous", &k1.join("key_elements"))],
    )
    .unwrap();
    // Newest first, then the older set unchanged; (1,2) and (1,1) appear twice.
    assert_eq!(
        keys_of(&k2).sets[Q],
        [[1, 2], [1, 1], [0, 0], [1, 2], [1, 1], [1, 0]]
    );
    assert!(
        log.contains("3 key elements over 1 matrices, after 3 earlier ones: 6"),
        "{log}"
    );

    // The default keeps 2 %: int(0.02 * 6) = 0 entries of this tiny matrix.
    let k0 = ok(
        &KeyElementsKind,
        &r.join("k0"),
        json!({}),
        &[("adapter", &a1)],
    );
    assert!(keys_of(&k0).is_empty());

    // Bad input names the parameter or the file.
    let e = run_kind(
        &KeyElementsKind,
        &r.join("e1"),
        json!({"top": 0.0}),
        &[("adapter", &a1)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`top` = 0"), "{e}");
    let e = run_kind(
        &KeyElementsKind,
        &r.join("e2"),
        json!({}),
        &[("adapter", &k1)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a PEFT adapter") && e.contains("k1"), "{e}");
    let e = run_kind(
        &KeyElementsKind,
        &r.join("e3"),
        json!({}),
        &[("adapter", &a1), ("previous", &a2)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(KEY_ELEMENTS_FILE), "{e}");
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn split_chain_writes_the_bytes_of_the_merging_train_lora() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let data = ok(
        &SynthCoin,
        &r.join("data"),
        json!({"per_task": {"train": 4, "test": 2}, "pretrain": 8, "image_size": 64}),
        &[],
    )
    .join("dataset");
    let tok = ok(
        &TokenizerTrain,
        &r.join("tok"),
        json!({}),
        &[("data", &data)],
    )
    .join("tokenizer");
    let base = ok(
        &Pretrain,
        &r.join("pre"),
        json!({"steps": 1, "batch_size": 2}),
        &[("data", &data), ("tokenizer", &tok)],
    )
    .join("model");
    let lora = json!({"task": "ScienceQA", "steps": 2, "batch_size": 2, "rank": 4,
                      "lr": 1e-2, "projector_lr": 1e-2, "warmup_ratio": 0.0, "reglora": 2500.0});
    let both = ok(
        &LoraTrain,
        &r.join("both"),
        lora.clone(),
        &[("base", &base), ("data", &data)],
    );
    let mut split_params = lora.clone();
    split_params["merge"] = json!(false);
    let split = ok(
        &LoraTrain,
        &r.join("split"),
        split_params,
        &[("base", &base), ("data", &data)],
    );
    // merge = false: the adapter only, with the trained projector and the log.
    let names: Vec<String> = std::fs::read_dir(&split)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["adapter"]);
    let ad = split.join("adapter");
    assert_eq!(files(&ad), files(&both.join("adapter")));
    assert!(ad.join(NON_LORA_FILE).is_file() && ad.join(TRAIN_LOG_FILE).is_file());

    let merged = ok(
        &ModelMerge,
        &r.join("merge"),
        json!({"base": base.to_str().unwrap(), "adapter": ad.to_str().unwrap()}),
        &[],
    )
    .join("model");
    let mut want = files(&both.join("model"));
    // The merging run also carries the key elements in the model; the split chain keeps
    // them in their own stage.
    let carried = want
        .remove(KEY_ELEMENTS_FILE)
        .expect("reglora writes the set");
    assert_eq!(
        files(&merged),
        want,
        "merged model differs from train.lora's"
    );

    // The key elements of the adapter are the ones train.lora selected itself.
    let keys = ok(
        &KeyElementsKind,
        &r.join("keys"),
        json!({}),
        &[("adapter", &ad)],
    );
    assert_eq!(
        std::fs::read(keys.join("key_elements").join(KEY_ELEMENTS_FILE)).unwrap(),
        carried
    );
    // Without merging the projector the result differs: the projector did train.
    let bare = r.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["adapter_config.json", ADAPTER_FILE] {
        std::fs::copy(ad.join(f), bare.join(f)).unwrap();
    }
    let lora_only = ok(
        &ModelMerge,
        &r.join("merge-bare"),
        json!({"base": base.to_str().unwrap(), "adapter": bare.to_str().unwrap()}),
        &[],
    )
    .join("model");
    assert_ne!(
        std::fs::read(lora_only.join("model.safetensors")).unwrap(),
        want["model.safetensors"]
    );
    assert!(!lora_only.join(TRAIN_LOG_FILE).exists());

    // Task 2 reads the key elements as a parameter: the penalty is on from its first step.
    let mut p2 = lora.clone();
    p2["task"] = json!("TextVQA");
    p2["merge"] = json!(false);
    let (t2, log) = run_kind(
        &LoraTrain,
        &r.join("t2"),
        p2,
        &[
            ("base", &merged),
            ("data", &data),
            ("key_elements", &keys.join("key_elements")),
        ],
    )
    .unwrap();
    assert!(log.contains("key elements over 28 matrices"), "{log}");
    let steps: Vec<Value> =
        serde_json::from_slice(&std::fs::read(t2.join("adapter").join(TRAIN_LOG_FILE)).unwrap())
            .unwrap();
    assert_eq!(steps[1]["extras"][0][0], "reglora", "{steps:?}");
    // RegLoRA off ignores the parameter.
    let mut off = lora.clone();
    off["reglora"] = json!(0.0);
    off["merge"] = json!(false);
    let (_, log) = run_kind(
        &LoraTrain,
        &r.join("off"),
        off,
        &[
            ("base", &merged),
            ("data", &data),
            ("key_elements", &keys.join("key_elements")),
        ],
    )
    .unwrap();
    assert!(
        log.contains("reglora off: `key_elements` not used"),
        "{log}"
    );
    // A `key_elements` directory without the file is named.
    let mut p3 = lora;
    p3["merge"] = json!(false);
    let e = run_kind(
        &LoraTrain,
        &r.join("t3"),
        p3,
        &[("base", &merged), ("data", &data), ("key_elements", &bare)],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`key_elements`") && e.contains("bare"), "{e}");

    // model.merge: an adapter path that is not an adapter, a base that is not a model.
    let e = run_kind(
        &ModelMerge,
        &r.join("m-bad"),
        json!({"base": base.to_str().unwrap(), "adapter": "nowhere"}),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`adapter`") && e.contains("nowhere"), "{e}");
    let e = run_kind(
        &ModelMerge,
        &r.join("m-bad2"),
        json!({"base": data.to_str().unwrap(), "adapter": ad.to_str().unwrap()}),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(data.to_str().unwrap()), "{e}");
}
