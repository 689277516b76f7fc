//! Parity of the candle LLaVA against Hugging Face transformers on the llava-tiny fixture
//! (`tests/fixtures/llava-tiny/`, see its README): every intermediate tensor, logits with
//! and without the PEFT adapter, after merging, padded vs unpadded, and KV-cached decoding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use stages::model::{KvCache, Llava};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava-tiny")
}

fn load_st(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join(name), &Device::Cpu).unwrap()
}

fn model() -> Llava {
    Llava::load(&fixture(), DType::F32, &Device::Cpu).unwrap()
}

/// Asserts `|got - want| <= 1e-4 + 1e-4 |want|` elementwise (rows where `valid` is false are
/// skipped: logits at left-padding positions are unspecified), and returns the max |Δ|.
fn assert_close(name: &str, got: &Tensor, want: &Tensor, valid: Option<&[bool]>) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let row = got.dims()[got.rank() - 1];
    let g = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if valid.is_some_and(|v| !v[i / row]) {
            continue;
        }
        let d = (a - b).abs();
        assert!(
            d <= 1e-4 + 1e-4 * b.abs(),
            "{name}: element {i}: got {a}, want {b} (|Δ| {d})"
        );
        worst = worst.max(d);
    }
    worst
}

struct Inputs {
    ids: Tensor,
    mask: Tensor,
    pos: Tensor,
    pv: Tensor,
    valid: Vec<bool>,
}

fn inputs() -> Inputs {
    let inp = load_st("inputs.safetensors");
    let mask = inp["attention_mask"].clone();
    let valid = mask
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|v| *v != 0)
        .collect();
    Inputs {
        ids: inp["input_ids"].clone(),
        mask,
        pos: inp["position_ids"].clone(),
        pv: inp["pixel_values"].clone(),
        valid,
    }
}

#[test]
fn every_intermediate_matches_transformers() {
    let m = model();
    let x = inputs();
    let exp = load_st("expected.safetensors");
    let tr = m
        .forward_traced(&x.ids, Some(&x.pv), Some(&x.mask), Some(&x.pos))
        .unwrap();
    assert_close(
        "vision_embeddings",
        tr.vision_embeddings.as_ref().unwrap(),
        &exp["vision_embeddings"],
        None,
    );
    // feature layer -2 of 2 layers = hidden_states[1]; layer 2 is never needed, so never run.
    assert_eq!(tr.vision_hidden_states.len(), 2);
    for (i, h) in tr.vision_hidden_states.iter().enumerate() {
        assert_close(
            &format!("vision_hidden_states.{i}"),
            h,
            &exp[&format!("vision_hidden_states.{i}")],
            None,
        );
    }
    assert_close(
        "vision_selected",
        tr.vision_selected.as_ref().unwrap(),
        &exp["vision_selected"],
        None,
    );
    assert_close(
        "image_features",
        tr.image_features.as_ref().unwrap(),
        &exp["image_features"],
        None,
    );
    let v = Some(x.valid.as_slice());
    assert_close(
        "lm_inputs_embeds",
        &tr.lm_inputs_embeds,
        &exp["lm_inputs_embeds"],
        v,
    );
    for (i, h) in tr.lm_layer_outputs.iter().enumerate() {
        assert_close(
            &format!("lm_layer_output.{i}"),
            h,
            &exp[&format!("lm_layer_output.{i}")],
            v,
        );
    }
    assert_close(
        "lm_final_hidden",
        &tr.lm_final_hidden,
        &exp["lm_final_hidden"],
        v,
    );
    let d = assert_close("logits", &tr.logits, &exp["logits"], v);
    assert!(d < 1e-4, "logits max |Δ| vs transformers: {d:.2e}");
    // The public entry points agree with the traced forward.
    let feats = m.project(&m.vision_features(&x.pv).unwrap()).unwrap();
    assert_close(
        "project(vision_features)",
        &feats,
        &exp["image_features"],
        None,
    );
    let logits = m
        .forward(&x.ids, Some(&x.pv), Some(&x.mask), Some(&x.pos), None)
        .unwrap();
    assert_close("forward", &logits, &exp["logits"], v);
}

#[test]
fn adapter_logits_and_merged_logits_match_peft() {
    let mut m = model();
    m.load_adapter(&fixture().join("adapter"), "default", false)
        .unwrap();
    assert_eq!(m.adapter("default").unwrap().num_layers(), 28);
    let x = inputs();
    let exp = load_st("expected.safetensors");
    let v = Some(x.valid.as_slice());
    let lora = m
        .forward(&x.ids, Some(&x.pv), Some(&x.mask), Some(&x.pos), None)
        .unwrap();
    assert_close("logits_lora", &lora, &exp["logits_lora"], v);
    m.merge_adapter("default").unwrap();
    assert!(m.adapters().is_empty());
    let merged = m
        .forward(&x.ids, Some(&x.pv), Some(&x.mask), Some(&x.pos), None)
        .unwrap();
    assert_close("logits_merged", &merged, &exp["logits_merged"], v);
}

#[test]
fn left_padding_does_not_change_a_rows_logits() {
    let m = model();
    let x = inputs();
    let inp = load_st("inputs.safetensors");
    let single = &inp["input_ids_0"];
    let l0 = single.dim(1).unwrap();
    let alone = m
        .forward(single, Some(&x.pv.i(0..1).unwrap()), None, None, None)
        .unwrap();
    let batch = m
        .forward(&x.ids, Some(&x.pv), Some(&x.mask), Some(&x.pos), None)
        .unwrap();
    let l = x.ids.dim(1).unwrap();
    let padded_row = batch.i((0..1, l - l0.., ..)).unwrap();
    let d = assert_close("padded vs unpadded", &padded_row, &alone, None);
    assert!(d < 1e-4, "{d}");
}

#[test]
fn kv_cached_greedy_decoding_reproduces_transformers_step_logits() {
    let m = model();
    let inp = load_st("inputs.safetensors");
    let exp = load_st("expected.safetensors");
    let pv = inp["pixel_values"].i(1..2).unwrap();
    let ids = &inp["input_ids_1"];
    let want = &exp["generate.single_1.step_logits"];
    let mut cache = KvCache::new();
    let mut logits = m
        .forward(ids, Some(&pv), None, None, Some(&mut cache))
        .unwrap();
    let l = ids.dim(1).unwrap();
    assert_eq!(cache.len(), l);
    for step in 0..want.dim(0).unwrap() {
        let last = logits.i((0, logits.dim(1).unwrap() - 1)).unwrap();
        assert_close(
            &format!("step {step}"),
            &last.unsqueeze(0).unwrap(),
            &want.i(step..step + 1).unwrap(),
            None,
        );
        let next = last
            .argmax(0)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .reshape((1, 1))
            .unwrap();
        logits = m
            .forward(&next, None, None, None, Some(&mut cache))
            .unwrap();
    }
    assert_eq!(cache.len(), l + want.dim(0).unwrap());
}

#[test]
fn left_padded_batch_decodes_with_cache_and_mask() {
    // Prefill the padded batch, then one cached step with a grown mask and explicit positions:
    // must equal the uncached forward of the extended batch at the new position.
    let m = model();
    let x = inputs();
    let mut cache = KvCache::new();
    m.forward(
        &x.ids,
        Some(&x.pv),
        Some(&x.mask),
        Some(&x.pos),
        Some(&mut cache),
    )
    .unwrap();
    let next = Tensor::new(&[[5u32], [7u32]], &Device::Cpu).unwrap();
    let ones = Tensor::ones((2, 1), DType::I64, &Device::Cpu).unwrap();
    let mask2 = Tensor::cat(&[&x.mask, &ones], 1).unwrap();
    let last_pos = x.pos.i((.., x.pos.dim(1).unwrap() - 1..)).unwrap();
    let pos2 = (last_pos + 1.0).unwrap();
    let step = m
        .forward(&next, None, Some(&mask2), Some(&pos2), Some(&mut cache))
        .unwrap();
    let ids2 = Tensor::cat(&[&x.ids, &next.to_dtype(DType::I64).unwrap()], 1).unwrap();
    let full_pos = Tensor::cat(&[&x.pos, &pos2], 1).unwrap();
    let full = m
        .forward(&ids2, Some(&x.pv), Some(&mask2), Some(&full_pos), None)
        .unwrap();
    let l = ids2.dim(1).unwrap();
    assert_close(
        "cached step",
        &step,
        &full.i((.., l - 1..l, ..)).unwrap(),
        None,
    );
}
