//! Training-side guarantees of the model: every trainable variable receives a gradient
//! through a small loss (LoRA, projector, full), updates through the returned `Var`s
//! reach the model, and LoRA dropout is seeded.
//!
//! The gradient check exists because candle's fused norm/softmax/rope ops silently drop
//! gradients: a model built on them would "train" with some parameters frozen, no error.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use stages::model::{Llava, LoraConfig, TrainMode};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

fn batch() -> (Tensor, Tensor) {
    let mut ids = vec![1u32, 126, 98];
    ids.extend(std::iter::repeat_n(1022u32, 64));
    ids.extend([3, 141, 243, 104, 102]);
    let n = ids.len();
    let inp =
        candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu).unwrap();
    (
        Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
        inp["pixel_values"].i(0..1).unwrap(),
    )
}

/// Next-token cross-entropy over the text tail (positions after the image tokens).
fn loss(m: &Llava) -> Tensor {
    let (ids, pv) = batch();
    let logits = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    let n = ids.dim(1).unwrap();
    let pred = logits.i((0, 66..n - 1)).unwrap();
    let target = ids.i((0, 67..n)).unwrap();
    let logp = candle_nn::ops::log_softmax(&pred, D::Minus1).unwrap();
    let picked = logp.gather(&target.unsqueeze(1).unwrap(), 1).unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

/// Asserts that each var has a finite, non-zero gradient.
fn assert_all_get_gradients(m: &Llava, vars: &[(String, Var)]) {
    let grads = loss(m).backward().unwrap();
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm² {norm}"
        );
    }
}

#[test]
fn every_lora_var_gets_a_gradient() {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    // The fixture adapter has B ≠ 0, so A's gradient is non-zero too.
    m.load_adapter(&fixture().join("adapter"), "default", true)
        .unwrap();
    let vars = m.trainable_vars(TrainMode::LORA).unwrap();
    assert_eq!(vars.len(), 56);
    assert_eq!(
        vars[0].0,
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    assert_all_get_gradients(&m, &vars);
}

#[test]
fn every_full_and_projector_var_gets_a_gradient() {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let vars = m.trainable_vars(TrainMode::ALL).unwrap();
    // All parameters except CLIP's post_layernorm (2) and encoder layer 1 (16), which the
    // forward never reads with vision_feature_layer = -2.
    let total = m.params().iter().count();
    assert_eq!(vars.len(), total - 18);
    assert!(
        vars.iter()
            .all(|(n, _)| !n.starts_with("vision_tower.post_layernorm")
                && !n.starts_with("vision_tower.encoder.layers.1."))
    );
    assert_all_get_gradients(&m, &vars);

    let vars = m.trainable_vars(TrainMode::PROJECTOR).unwrap();
    assert_eq!(vars.len(), 4);
    assert!(
        vars.iter()
            .all(|(n, _)| n.starts_with("multi_modal_projector."))
    );
    assert_all_get_gradients(&m, &vars);
    // Everything else is frozen again: the gradient store holds no base-weight entries.
    let grads = loss(&m).backward().unwrap();
    let embed = m
        .params()
        .id("language_model.model.embed_tokens.weight")
        .unwrap();
    assert!(grads.get(m.params().get(embed)).is_none());
}

#[test]
fn updating_the_returned_vars_changes_the_model() {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m.add_adapter("t", LoraConfig::language_model(4, 8.0), 5)
        .unwrap();
    let before = loss(&m).to_scalar::<f32>().unwrap();
    let vars = m.trainable_vars(TrainMode::LORA).unwrap();
    // Plain SGD steps on the LoRA factors only.
    for _ in 0..3 {
        let grads = loss(&m).backward().unwrap();
        for (_, v) in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
                    .unwrap();
            }
        }
    }
    let after = loss(&m).to_scalar::<f32>().unwrap();
    assert!(after < before, "loss {before} -> {after}");
    // The saved adapter carries the trained values.
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter("t", dir.path()).unwrap();
    let mut m2 = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m2.load_adapter(dir.path(), "t", false).unwrap();
    assert!((loss(&m2).to_scalar::<f32>().unwrap() - after).abs() < 1e-5);
}

#[test]
fn lora_dropout_is_seeded_and_only_in_training_mode() {
    // The fixture adapter with lora_dropout = 0.5 (PEFT files edited in a tempdir).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("adapter/adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixture().join("adapter/adapter_config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["lora_dropout"] = 0.5.into();
    std::fs::write(dir.path().join("adapter_config.json"), v.to_string()).unwrap();
    let mk = || {
        let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
        m.load_adapter(dir.path(), "default", true).unwrap();
        assert_eq!(m.adapter("default").unwrap().config.dropout, 0.5);
        m
    };
    let eval = loss(&mk()).to_scalar::<f32>().unwrap();
    let mut a = mk();
    let mut b = mk();
    a.set_dropout_seed(Some(11));
    b.set_dropout_seed(Some(11));
    let (la, lb) = (
        loss(&a).to_scalar::<f32>().unwrap(),
        loss(&b).to_scalar::<f32>().unwrap(),
    );
    assert_eq!(la, lb, "same seed, same masks");
    assert_ne!(la, eval, "dropout active in training mode");
    let la2 = loss(&a).to_scalar::<f32>().unwrap();
    assert_ne!(la, la2, "a new mask each forward");
    a.set_dropout_seed(None);
    assert_eq!(
        loss(&a).to_scalar::<f32>().unwrap(),
        eval,
        "no dropout at inference"
    );
}

#[test]
fn lora_gradients_match_torch_on_the_fixture_training_batch() {
    // expected_train.safetensors: HF forward + shifted CE over labels != -100, autograd
    // through the PEFT adapter (base frozen). Step 1 uses the adapter as saved.
    let exp =
        candle_core::safetensors::load(fixture().join("expected_train.safetensors"), &Device::Cpu)
            .unwrap();
    let inp =
        candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu).unwrap();
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m.load_adapter(&fixture().join("adapter"), "default", true)
        .unwrap();
    let vars = m.trainable_vars(TrainMode::LORA).unwrap();
    let ids = &exp["input_ids"];
    let logits = m
        .forward(
            ids,
            Some(&inp["pixel_values"]),
            Some(&exp["attention_mask"]),
            None,
            None,
        )
        .unwrap();
    let (b, l, v) = logits.dims3().unwrap();
    let labels = exp["labels"].to_vec2::<i64>().unwrap();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (r, row) in labels.iter().enumerate() {
        for t in 0..l - 1 {
            if row[t + 1] != -100 {
                rows.push((r * l + t) as u32);
                targets.push(row[t + 1] as u32);
            }
        }
    }
    assert_eq!(rows.len(), 11);
    let flat = logits.reshape((b * l, v)).unwrap();
    let picked = flat
        .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&picked, D::Minus1).unwrap();
    let tgt = Tensor::new(targets.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let loss = logp
        .gather(&tgt, 1)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let want_loss = exp["step1.loss"].to_vec1::<f32>().unwrap()[0];
    let got_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got_loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
        "loss {got_loss} vs {want_loss}"
    );
    let grads = loss.backward().unwrap();
    let var = |key: &str| {
        &vars
            .iter()
            .find(|(n, _)| n == key)
            .unwrap_or_else(|| panic!("{key}"))
            .1
    };
    let last = m.config().text.num_hidden_layers - 1;
    for (exp_name, key) in [
        (
            "step1.q_proj.lora_A.grad",
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
                .to_owned(),
        ),
        (
            "step1.q_proj.lora_B.grad",
            "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
                .to_owned(),
        ),
        (
            "step1.down_proj_last.lora_A.grad",
            format!(
                "base_model.model.model.language_model.layers.{last}.mlp.down_proj.lora_A.weight"
            ),
        ),
        (
            "step1.down_proj_last.lora_B.grad",
            format!(
                "base_model.model.model.language_model.layers.{last}.mlp.down_proj.lora_B.weight"
            ),
        ),
    ] {
        let g = grads.get(var(&key).as_tensor()).unwrap();
        let w = &exp[exp_name];
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = wv.iter().fold(0f32, |a, x| a.max(x.abs()));
        for (i, (a, b)) in gv.iter().zip(&wv).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs() + 1e-5 * scale,
                "{exp_name}[{i}]: {a} vs {b}"
            );
        }
    }
    // Global grad norm over all LoRA grads.
    let mut sq = 0f64;
    for (_, v) in &vars {
        sq += f64::from(
            grads
                .get(v.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
    }
    let want_norm = exp["step1.grad_global_norm"].to_vec1::<f32>().unwrap()[0];
    assert!(
        (sq.sqrt() as f32 - want_norm).abs() < 1e-3 * want_norm,
        "grad norm {} vs {want_norm}",
        sq.sqrt()
    );
}
