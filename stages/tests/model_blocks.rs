//! The model's blocks against plain nested-loop references in f64, on a tiny random config
//! that exercises what the llava-tiny fixture does not: grouped-query attention (4 query
//! heads on 2 KV heads), a head_dim that is not hidden/heads, attention biases, tied
//! embeddings, a non-default RoPE θ, the `full` feature strategy (CLS kept) with the last
//! CLIP layer selected, and several images merged in order.

use candle_core::{DType, Device, IndexOp, Tensor};
use stages::model::Llava;
use stages::model::config::{ClipVisionConfig, FeatureSelect, LlamaConfig, LlavaConfig, VisionAct};

fn config() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_channels: 3,
            image_size: 8,
            patch_size: 4,
            layer_norm_eps: 1e-5,
            hidden_act: VisionAct::QuickGelu,
            projection_dim: 8,
        },
        text: LlamaConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 6,
            rms_norm_eps: 1e-5,
            rope_theta: 500.0,
            max_position_embeddings: 64,
            attention_bias: true,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            pad_token_id: Some(0),
        },
        image_token_index: 39,
        vision_feature_layer: -1,
        vision_feature_select_strategy: FeatureSelect::Full,
        multimodal_projector_bias: true,
        tie_word_embeddings: true,
    }
}

/// A random model whose norm weights and biases are random too (the default init makes
/// them 1 and 0, which would hide a mis-wired norm or bias).
fn model() -> Llava {
    let mut m = Llava::from_config_random(config(), 9, DType::F32, &Device::Cpu).unwrap();
    let names: Vec<(String, Vec<usize>)> = m
        .params()
        .iter()
        .map(|(n, t)| (n.to_owned(), t.dims().to_vec()))
        .collect();
    for (name, dims) in &names {
        if name.contains("norm") || name.contains("layrnorm") || name.ends_with(".bias") {
            let t = (Tensor::randn(0f32, 0.3, dims.as_slice(), &Device::Cpu).unwrap()
                + if name.ends_with(".bias") { 0.0 } else { 1.0 })
            .unwrap();
            m.set_param(name, &t).unwrap();
        }
    }
    m
}

fn values(m: &Llava, name: &str) -> Vec<f64> {
    let id = m.params().id(name).unwrap_or_else(|| panic!("{name}"));
    m.params()
        .get(id)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// `x [n, in] · W[out, in]ᵀ + b`.
fn lin(x: &[f64], w: &[f64], b: Option<&[f64]>, n_in: usize) -> Vec<f64> {
    let n_out = w.len() / n_in;
    let rows = x.len() / n_in;
    let mut y = vec![0.0; rows * n_out];
    for r in 0..rows {
        for o in 0..n_out {
            let mut acc = b.map_or(0.0, |b| b[o]);
            for i in 0..n_in {
                acc += x[r * n_in + i] * w[o * n_in + i];
            }
            y[r * n_out + o] = acc;
        }
    }
    y
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * s * w)
        })
        .collect()
}

/// HF rotate_half RoPE on one head vector at position `p`.
fn rope(u: &[f64], p: f64, theta: f64) -> Vec<f64> {
    let d = u.len();
    let h = d / 2;
    let mut out = vec![0.0; d];
    for i in 0..h {
        let a = p * theta.powf(-((2 * i) as f64) / d as f64);
        out[i] = u[i] * a.cos() - u[i + h] * a.sin();
        out[i + h] = u[i + h] * a.cos() + u[i] * a.sin();
    }
    out
}

/// The language model on given input embeddings, by loops: logits `[b][s][vocab]`.
fn reference_lm(m: &Llava, x0: &[f64], b: usize, s: usize, mask: &[i64], pos: &[i64]) -> Vec<f64> {
    let c = &m.config().text;
    let (d, h, kv, hd) = (
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    );
    let mut x = x0.to_vec();
    for l in 0..c.num_hidden_layers {
        let p = format!("language_model.model.layers.{l}");
        let g = |n: &str| values(m, &format!("{p}.{n}"));
        let n = rms(&x, &g("input_layernorm.weight"), c.rms_norm_eps);
        let q = lin(
            &n,
            &g("self_attn.q_proj.weight"),
            Some(&g("self_attn.q_proj.bias")),
            d,
        );
        let k = lin(
            &n,
            &g("self_attn.k_proj.weight"),
            Some(&g("self_attn.k_proj.bias")),
            d,
        );
        let v = lin(
            &n,
            &g("self_attn.v_proj.weight"),
            Some(&g("self_attn.v_proj.bias")),
            d,
        );
        let head = |t: &[f64], row: usize, hh: usize, width: usize| {
            t[row * width + hh * hd..row * width + (hh + 1) * hd].to_vec()
        };
        let mut attn = vec![0.0; b * s * h * hd];
        for bi in 0..b {
            for hh in 0..h {
                let kh = hh / (h / kv);
                for i in 0..s {
                    let qi = rope(
                        &head(&q, bi * s + i, hh, h * hd),
                        pos[bi * s + i] as f64,
                        c.rope_theta,
                    );
                    let allowed: Vec<usize> = (0..=i).filter(|&j| mask[bi * s + j] != 0).collect();
                    if allowed.is_empty() {
                        continue;
                    }
                    let scores: Vec<f64> = allowed
                        .iter()
                        .map(|&j| {
                            let kj = rope(
                                &head(&k, bi * s + j, kh, kv * hd),
                                pos[bi * s + j] as f64,
                                c.rope_theta,
                            );
                            qi.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (w, &j) in e.iter().zip(&allowed) {
                        let vj = head(&v, bi * s + j, kh, kv * hd);
                        for t in 0..hd {
                            attn[(bi * s + i) * h * hd + hh * hd + t] += w / z * vj[t];
                        }
                    }
                }
            }
        }
        let o = lin(
            &attn,
            &g("self_attn.o_proj.weight"),
            Some(&g("self_attn.o_proj.bias")),
            h * hd,
        );
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let n = rms(&x, &g("post_attention_layernorm.weight"), c.rms_norm_eps);
        let gate = lin(&n, &g("mlp.gate_proj.weight"), None, d);
        let up = lin(&n, &g("mlp.up_proj.weight"), None, d);
        let act: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let down = lin(&act, &g("mlp.down_proj.weight"), None, c.intermediate_size);
        x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
    }
    let x = rms(
        &x,
        &values(m, "language_model.model.norm.weight"),
        c.rms_norm_eps,
    );
    // Tied head: the embedding matrix.
    lin(
        &x,
        &values(m, "language_model.model.embed_tokens.weight"),
        None,
        d,
    )
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

#[test]
fn decoder_with_gqa_bias_and_tied_head_matches_loops() {
    let m = model();
    // Row 0 left-padded by 2, row 1 full; positions = cumsum(mask) - 1.
    let ids = Tensor::new(&[[0u32, 0, 1, 7, 8, 9], [1, 3, 4, 5, 6, 2]], &Device::Cpu).unwrap();
    let mask_v = [0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let pos_v = [0i64, 0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5];
    let mask = Tensor::new(&mask_v, &Device::Cpu)
        .unwrap()
        .reshape((2, 6))
        .unwrap();
    let pos = Tensor::new(&pos_v, &Device::Cpu)
        .unwrap()
        .reshape((2, 6))
        .unwrap();
    let tr = m
        .forward_traced(&ids, None, Some(&mask), Some(&pos))
        .unwrap();
    let want = reference_lm(&m, &flat(&tr.lm_inputs_embeds), 2, 6, &mask_v, &pos_v);
    let got = flat(&tr.logits);
    let vocab = 40;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if mask_v[i / vocab] == 0 {
            continue;
        }
        assert!(
            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
            "logit {i}: got {g}, want {w}"
        );
    }
    // Embeddings are plain table rows.
    let table = values(&m, "language_model.model.embed_tokens.weight");
    let emb = flat(&tr.lm_inputs_embeds);
    assert!((emb[16 * 3] - table[16 * 7]).abs() < 1e-6);
}

#[test]
fn patch_embedding_is_the_strided_conv() {
    let m = model();
    let c = &m.config().vision;
    let px = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let ids = Tensor::new(
        &[[1u32, 39, 39, 39, 39, 39, 39, 39, 39, 39, 39, 5]],
        &Device::Cpu,
    )
    .unwrap();
    let tr = m.forward_traced(&ids, Some(&px), None, None).unwrap();
    let emb = flat(tr.vision_embeddings.as_ref().unwrap());
    let w = values(&m, "vision_tower.embeddings.patch_embedding.weight");
    let cls = values(&m, "vision_tower.embeddings.class_embedding");
    let pe = values(&m, "vision_tower.embeddings.position_embedding.weight");
    let p = flat(&px);
    let (d, ps, g) = (c.hidden_size, c.patch_size, c.patches_per_side());
    for n in 0..2 {
        for tok in 0..=g * g {
            for o in 0..d {
                let mut want = pe[tok * d + o];
                if tok == 0 {
                    want += cls[o];
                } else {
                    let (gy, gx) = ((tok - 1) / g, (tok - 1) % g);
                    for ch in 0..3 {
                        for ky in 0..ps {
                            for kx in 0..ps {
                                let pix = p[((n * 3 + ch) * 8 + gy * ps + ky) * 8 + gx * ps + kx];
                                want += w[((o * 3 + ch) * ps + ky) * ps + kx] * pix;
                            }
                        }
                    }
                }
                let got = emb[(n * (g * g + 1) + tok) * d + o];
                assert!(
                    (got - want).abs() < 1e-4,
                    "image {n} token {tok} dim {o}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn image_rows_are_filled_in_order_with_cls_kept() {
    let m = model();
    // Two images × 5 tokens (4 patches + CLS, strategy `full`) spread over two rows.
    let ids = Tensor::new(
        &[[1u32, 39, 39, 39, 39, 39, 7], [39, 39, 39, 39, 39, 8, 9]],
        &Device::Cpu,
    )
    .unwrap();
    let px = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let tr = m.forward_traced(&ids, Some(&px), None, None).unwrap();
    // vision_feature_layer = -1 of 1 layer: hidden_states[1], the layer's output.
    assert_eq!(tr.vision_hidden_states.len(), 2);
    let feats = tr.image_features.unwrap();
    assert_eq!(feats.dims(), [2, 5, 16]);
    let emb = &tr.lm_inputs_embeds;
    for k in 0..10 {
        let (b, p) = if k < 5 { (0, 1 + k) } else { (1, k - 5) };
        let got = flat(&emb.i((b, p)).unwrap());
        let want = flat(&feats.i((k / 5, k % 5)).unwrap());
        assert_eq!(got, want, "image token {k}");
    }
    // Per-image features do not depend on the other image in the batch.
    let alone = m.image_features(&px.i(1..2).unwrap()).unwrap();
    let d = (alone.i(0).unwrap() - feats.i(1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}
