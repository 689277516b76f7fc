//! The whole model with its decoder layers fused (`ops::decoder`, the default) against the
//! same model on composed ops: logits of a left-padded batch, the output suffix of
//! `forward_hidden_from`, LoRA and projector gradients, and greedy generation with the KV
//! cache. The composed ops are themselves checked against transformers by the parity tests.

use candle_core::{DType, Device, Tensor};

use super::generate::{GenPrompt, GenerateOptions, generate, sequence_logprobs};
use super::{Llava, LoraConfig, TrainMode, preset};
use crate::ops::decoder::with_composed;
use crate::ops::tests::{max_rel, randn};

/// The tiny preset with an adapter on every decoder projection whose `B` is non-zero.
fn model() -> Llava {
    let cfg = preset::preset("llava-tiny").unwrap();
    let mut m = Llava::from_config_random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    m.add_adapter("t", LoraConfig::language_model(4, 8.0), 1)
        .unwrap();
    for (i, p) in m.adapters[0].pairs.iter_mut().flatten().enumerate() {
        p.b = (randn(p.b.dims(), 100 + i as u64) * 0.2).unwrap();
    }
    m
}

/// Two rows of one image plus text; row 1 left-padded by 3.
struct Batch {
    ids: Tensor,
    pixels: Tensor,
    mask: Tensor,
    pos: Tensor,
    scored: Tensor,
}

fn batch(m: &Llava) -> Batch {
    let (img, n_img) = (m.config().image_token_index, 64);
    let text = 9;
    let s = n_img + text + 3;
    let mut ids = Vec::new();
    let (mut mask, mut pos, mut scored) = (Vec::new(), Vec::new(), Vec::new());
    for (r, pad) in [0usize, 3].into_iter().enumerate() {
        let real = s - pad;
        for i in 0..s {
            let j = i as i64 - pad as i64;
            let id = if i < pad {
                0
            } else if (j as usize) < n_img {
                img
            } else {
                (5 + 7 * i + 13 * r) as u32 % 900 + 3
            };
            ids.push(id);
            mask.push(u32::from(i >= pad));
            pos.push(j.max(0));
            scored.push(u32::from(i >= pad + n_img + 2 && i < pad + real));
        }
    }
    let t = |v: Vec<u32>| Tensor::from_vec(v, (2, s), &Device::Cpu).unwrap();
    Batch {
        ids: t(ids),
        pixels: (randn(&[2, 3, 64, 64], 7) * 2.0).unwrap(),
        mask: t(mask),
        pos: Tensor::from_vec(pos, (2, s), &Device::Cpu).unwrap(),
        scored: t(scored),
    }
}

#[test]
fn fused_and_composed_logits_agree_and_the_suffix_is_a_slice_of_them() {
    let m = model();
    let b = batch(&m);
    let run = |from: usize| {
        m.forward_hidden_from(
            &b.ids,
            Some(&b.pixels),
            Some(&b.mask),
            Some(&b.pos),
            None,
            from,
        )
        .unwrap()
    };
    let fused = run(0);
    let composed = with_composed(|| run(0));
    assert!(
        max_rel(&fused, &composed) < 1e-5,
        "{}",
        max_rel(&fused, &composed)
    );
    let s = b.ids.dim(1).unwrap();
    for from in [1, 60, s - 1] {
        let want = fused.narrow(1, from, s - from).unwrap();
        assert!(max_rel(&run(from), &want) < 1e-5, "from {from}");
        let c = with_composed(|| run(from));
        assert!(max_rel(&c, &want) < 1e-5, "composed, from {from}");
    }
}

/// Gradients of a scored log-likelihood for the variables of `mode`, fused and composed.
fn grads_agree(mode: TrainMode) {
    let mut m = model();
    let vars = m.trainable_vars(mode).unwrap();
    let b = batch(&m);
    let grads = || {
        let lp = sequence_logprobs(
            &m,
            &b.ids,
            Some(&b.pixels),
            Some(&b.mask),
            Some(&b.pos),
            &b.scored,
        )
        .unwrap();
        lp.sum.sum_all().unwrap().backward().unwrap()
    };
    let (gf, gc) = (grads(), with_composed(grads));
    for (name, v) in &vars {
        let (f, c) = (gf.get(v.as_tensor()), gc.get(v.as_tensor()));
        let (f, c) = (
            f.unwrap_or_else(|| panic!("{name}: no fused gradient")),
            c.unwrap(),
        );
        assert!(max_rel(f, c) < 1e-4, "{name}: {}", max_rel(f, c));
    }
}

#[test]
fn fused_and_composed_lora_gradients_agree() {
    grads_agree(TrainMode::LORA);
}

#[test]
fn fused_and_composed_projector_gradients_agree() {
    // The decoder is frozen and gradients pass through it to the image features.
    grads_agree(TrainMode::PROJECTOR);
}

#[test]
fn fused_and_composed_greedy_generation_agree() {
    let m = model();
    let b = batch(&m);
    let ids = b.ids.to_vec2::<u32>().unwrap();
    let prompts: Vec<GenPrompt> = (0..2)
        .map(|r| GenPrompt {
            // Row 1's own prompt without its padding: generate pads it again.
            input_ids: ids[r][3 * r..].to_vec(),
            pixel_values: Some(b.pixels.narrow(0, r, 1).unwrap()),
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        batch_size: 2,
        ..GenerateOptions::default()
    };
    let fused = generate(&m, &prompts, &opts, None).unwrap();
    let composed = with_composed(|| generate(&m, &prompts, &opts, None).unwrap());
    assert_eq!(fused, composed);
}

/// Decoding steps through a cache that packs the weights (the default) give the same
/// logits, to the bit, as plain products, with a LoRA adapter on every projection.
#[test]
fn decoding_with_packed_weights_keeps_the_plain_products_bits() {
    use super::KvCache;
    let m = model();
    let b = batch(&m);
    let s = b.ids.dim(1).unwrap();
    let steps = |mut cache: KvCache| {
        let mut out = vec![
            m.forward(
                &b.ids,
                Some(&b.pixels),
                Some(&b.mask),
                Some(&b.pos),
                Some(&mut cache),
            )
            .unwrap(),
        ];
        let mut mask = b.mask.clone();
        for step in 0..4u32 {
            let ids = Tensor::new(&[[7 + step], [300 + 11 * step]], &Device::Cpu).unwrap();
            let ones = Tensor::ones((2, 1), DType::U32, &Device::Cpu).unwrap();
            mask = Tensor::cat(&[&mask, &ones], 1).unwrap();
            let at = (s as i64 - 3 + step as i64, s as i64 + step as i64);
            let pos = Tensor::new(&[[at.1], [at.0]], &Device::Cpu).unwrap();
            let l = m.forward(&ids, None, Some(&mask), Some(&pos), Some(&mut cache));
            out.push(l.unwrap());
        }
        let bits: Vec<Vec<u32>> = out
            .iter()
            .map(|l| l.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect();
        (bits, cache.packed_bytes())
    };
    let (packed, packed_bytes) = steps(KvCache::with_capacity(s + 4));
    let (plain, plain_bytes) = steps(KvCache::with_capacity(s + 4).without_packing());
    assert!(
        packed_bytes > 0 && plain_bytes == 0,
        "{packed_bytes} / {plain_bytes} bytes packed"
    );
    assert_eq!(packed, plain);
}
