//! Loading, saving and bad-input handling of the LLaVA model: every error names the file
//! and the tensor or field; round trips (single file, sharded 4.x layout, PEFT adapters)
//! reproduce the same logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use stages::model::{Llava, LoraConfig, ModelError, preset};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

fn fixture_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

/// A model dir in a tempdir with the fixture config and the given weights.
fn model_dir(weights: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    candle_core::safetensors::save(weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

/// A short prompt with one image, small enough to keep the tests fast.
fn small_batch() -> (Tensor, Tensor) {
    let mut ids = vec![1u32, 126, 98];
    ids.extend(std::iter::repeat_n(1022u32, 64));
    ids.extend([3, 141, 243, 104]);
    let n = ids.len();
    let inp =
        candle_core::safetensors::load(fixture().join("inputs.safetensors"), &Device::Cpu).unwrap();
    (
        Tensor::from_vec(ids, (1, n), &Device::Cpu).unwrap(),
        inp["pixel_values"].i(0..1).unwrap(),
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn missing_tensor_is_named_with_its_file() {
    let mut w = fixture_weights();
    w.remove("language_model.model.layers.2.mlp.up_proj.weight");
    let dir = model_dir(&w);
    let e = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("language_model.model.layers.2.mlp.up_proj.weight"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_names_file_tensor_and_both_shapes() {
    let mut w = fixture_weights();
    w.insert(
        "multi_modal_projector.linear_1.weight".into(),
        Tensor::zeros((256, 64), DType::F16, &Device::Cpu).unwrap(),
    );
    let dir = model_dir(&w);
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("multi_modal_projector.linear_1.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("[256, 64]") && msg.contains("[256, 128]"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_and_bad_fields_name_the_config_file() {
    let dir = model_dir(&fixture_weights());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace(
            "LlavaForConditionalGeneration",
            "MllamaForConditionalGeneration",
        ),
    )
    .unwrap();
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("architectures[0]") && msg.contains("Mllama"),
        "{msg}"
    );
    std::fs::write(
        dir.path().join("config.json"),
        cfg.replace(
            "\"num_hidden_layers\": 4",
            "\"num_hidden_layers\": \"four\"",
        ),
    )
    .unwrap();
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("text_config.num_hidden_layers"),
        "{msg}"
    );
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("not valid JSON"),
        "{msg}"
    );
}

#[test]
fn corrupt_checkpoint_and_missing_shard_are_reported_by_path() {
    let dir = model_dir(&fixture_weights());
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let msg = Llava::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("model-00001-of-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn image_token_count_mismatch_is_an_input_error() {
    let m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let (ids, pv) = small_batch();
    let two = Tensor::cat(&[&pv, &pv], 0).unwrap();
    let e = m.forward(&ids, Some(&two), None, None, None).err().unwrap();
    assert!(matches!(e, ModelError::Input(_)), "{e:?}");
    assert!(
        e.to_string().contains("64 image tokens") && e.to_string().contains("2 image(s) × 64"),
        "{e}"
    );
    let bad = Tensor::new(&[[1u32, 5000]], &Device::Cpu).unwrap();
    let e = m
        .forward(&bad, None, None, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("input_ids[0][1] = 5000") && e.contains("vocabulary"),
        "{e}"
    );
    let wrong_px = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let e = m
        .forward(&ids, Some(&wrong_px), None, None, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("pixel_values") && e.contains("32"), "{e}");
    let e = m
        .forward(
            &ids,
            Some(&pv),
            Some(&Tensor::ones((1, 3), DType::I64, &Device::Cpu).unwrap()),
            None,
            None,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("attention_mask has shape [1, 3]"), "{e}");
}

#[test]
fn save_then_load_reproduces_logits_in_f32_and_f16() {
    let m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let (ids, pv) = small_batch();
    let want = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let back = Llava::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.config(), m.config());
    assert_eq!(
        max_diff(
            &back.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &want
        ),
        0.0
    );
    // The fixture weights are f16 values, so an f16 save is lossless too.
    m.save_as(dir.path(), DType::F16).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st["language_model.lm_head.weight"].dtype(), DType::F16);
    assert_eq!(
        st.len(),
        fixture_weights().len(),
        "same tensor set as transformers writes"
    );
    let back = Llava::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &back.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &want
        ),
        0.0
    );
}

#[test]
fn sharded_hub_4x_layout_loads_the_same_model() {
    // llava-hf 4.x names (vision_tower.vision_model.*) split over two shards with an index.
    let w = fixture_weights();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let (mut s1, mut s2, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (k, t) in w {
        let name = k.replacen("vision_tower.", "vision_tower.vision_model.", 1);
        let shard = if name.starts_with("language_model.") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(name.clone(), shard.into());
        if shard.contains("00001") {
            s1.insert(name, t)
        } else {
            s2.insert(name, t)
        };
    }
    candle_core::safetensors::save(&s1, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&s2, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let sharded = Llava::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let base = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let (ids, pv) = small_batch();
    let d = max_diff(
        &sharded.forward(&ids, Some(&pv), None, None, None).unwrap(),
        &base.forward(&ids, Some(&pv), None, None, None).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn adapter_save_load_round_trip_keeps_peft_keys_and_logits() {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m.load_adapter(&fixture().join("adapter"), "default", false)
        .unwrap();
    let (ids, pv) = small_batch();
    let want = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter("default", dir.path()).unwrap();
    let ours =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let theirs = candle_core::safetensors::load(
        fixture().join("adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let mut m2 = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    m2.load_adapter(dir.path(), "again", false).unwrap();
    assert_eq!(
        max_diff(
            &m2.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &want
        ),
        0.0
    );
    // A wrong-rank adapter tensor is reported with the file and the key.
    let mut bad = theirs.clone();
    let key = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_A.weight";
    bad.insert(
        key.into(),
        Tensor::zeros((4, 256), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&bad, dir.path().join("adapter_model.safetensors")).unwrap();
    let msg = m2
        .load_adapter(dir.path(), "bad", false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains(key) && msg.contains("[4, 256]"),
        "{msg}"
    );
}

#[test]
fn stacked_adapters_add_and_fresh_adapter_is_identity() {
    let mut m = Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let (ids, pv) = small_batch();
    let base = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    // A fresh adapter has B = 0: no change until trained.
    let n = m
        .add_adapter("task1", LoraConfig::language_model(4, 8.0), 1)
        .unwrap();
    assert_eq!(n, 28);
    assert_eq!(
        max_diff(
            &m.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &base
        ),
        0.0
    );
    m.remove_adapter("task1").unwrap();
    // Fixture adapter frozen + a new one on top: still the fixture's LoRA logits.
    m.load_adapter(&fixture().join("adapter"), "old", false)
        .unwrap();
    let with_old = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    m.add_adapter("new", LoraConfig::language_model(4, 8.0), 2)
        .unwrap();
    assert_eq!(
        max_diff(
            &m.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &with_old
        ),
        0.0
    );
    let vars = m.trainable_vars(stages::model::TrainMode::LORA).unwrap();
    assert_eq!(vars.len(), 56, "only the new adapter's 28 A/B pairs train");
    // Merging the old one keeps the function (within f32 rounding).
    m.merge_adapter("old").unwrap();
    assert!(
        max_diff(
            &m.forward(&ids, Some(&pv), None, None, None).unwrap(),
            &with_old
        ) < 1e-4
    );
    assert!(
        m.add_adapter(
            "x",
            LoraConfig {
                target_modules: stages::model::lora::TargetModules::Names(vec!["nope".into()]),
                ..LoraConfig::language_model(4, 8.0)
            },
            0
        )
        .is_err()
    );
}

#[test]
fn presets_build_random_models() {
    let cfg = preset::preset("llava-tiny").unwrap();
    let m = Llava::from_config_random(cfg.clone(), 3, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        m.params().num_elements(),
        4_217_600,
        "same parameter count as the fixture"
    );
    let m2 = Llava::from_config_random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let (ids, pv) = small_batch();
    let a = m.forward(&ids, Some(&pv), None, None, None).unwrap();
    assert_eq!(
        max_diff(&a, &m2.forward(&ids, Some(&pv), None, None, None).unwrap()),
        0.0,
        "seeded"
    );
    assert_eq!(a.dims(), [1, ids.dim(1).unwrap(), 1024]);
}

#[test]
fn half_precision_models_run_close_to_f32() {
    let (ids, pv) = small_batch();
    let want = Llava::load(&fixture(), DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&ids, Some(&pv), None, None, None)
        .unwrap();
    for dt in [DType::F16, DType::BF16] {
        let m = Llava::load(&fixture(), dt, &Device::Cpu).unwrap();
        let got = m.forward(&ids, Some(&pv), None, None, None).unwrap();
        assert_eq!(got.dtype(), dt);
        let d = max_diff(&got.to_dtype(DType::F32).unwrap(), &want);
        // |logits| ≤ 3.5 here; bf16 keeps 8 mantissa bits, f16 11.
        assert!(
            d.is_finite() && d < if dt == DType::F16 { 0.05 } else { 0.3 },
            "{dt:?}: max |Δ| {d}"
        );
    }
}

#[test]
fn llava_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Llava>();
    assert_send_sync::<stages::model::KvCache>();
}
