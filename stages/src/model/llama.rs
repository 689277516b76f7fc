//! The LLaMA decoder, with transformers' `LlamaModel` semantics.
//!
//! Per layer: `x += o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`, then
//! `x += down(silu(gate(n2(x))) * up(n2(x)))`, with `n` = RMSNorm
//! `x · rsqrt(mean(x²) + eps) · w`. RoPE is HF's `rotate_half` (the two halves of each head,
//! not interleaved pairs) with `inv_freq_i = θ^(-2i/d)` computed in f32 like torch, at
//! *explicit* position ids: left-padded batches pass `cumsum(mask) - 1`, so a row's first
//! real token sits at position 0 whatever its padding.
//!
//! Masking is additive: allowed scores get 0, masked ones the dtype's most negative finite
//! value (transformers' `finfo.min`; never `-inf`, so a fully masked pad row yields a
//! uniform softmax instead of NaNs that would poison later layers). The mask is causal over
//! absolute positions in the cache plus the attention mask's zeros.
//!
//! [`KvCache`] keeps per-layer keys/values *after* RoPE, appended along the sequence axis.

use candle_core::{DType, Device, Result, Tensor};

use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::linear::{Ctx, Linear, LinearInfo};
use super::weights::{Builder, Init, ParamId};
use crate::ops;
use crate::ops::decoder;

/// Where the tokens of one forward sit: the additive mask `[b, 1, s, t]` (`None` = attend
/// to everything) and the RoPE tables `cos`, `sin` `[b, s, head_dim]`.
#[derive(Clone, Copy)]
pub(crate) struct Positions<'a> {
    pub(crate) mask: Option<&'a Tensor>,
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
}

struct LlamaLayer {
    input_ln: ParamId,
    post_ln: ParamId,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The decoder stack plus embeddings, final norm and LM head.
pub(crate) struct Llama {
    cfg: LlamaConfig,
    pub(crate) embed: ParamId,
    layers: Vec<LlamaLayer>,
    norm: ParamId,
    /// `None` when tied to the embeddings.
    lm_head: Option<Linear>,
}

impl Llama {
    pub(crate) fn new(
        bld: &mut Builder<'_>,
        cfg: &LlamaConfig,
        tie: bool,
        linears: &mut Vec<LinearInfo>,
    ) -> super::Result<Self> {
        let p = "language_model.model";
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        let embed = bld.param(
            &format!("{p}.embed_tokens.weight"),
            &[cfg.vocab_size, d],
            Init::Normal(0.02),
        )?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for n in 0..cfg.num_hidden_layers {
            let l = format!("{p}.layers.{n}");
            let ab = cfg.attention_bias;
            let mb = cfg.mlp_bias;
            layers.push(LlamaLayer {
                input_ln: bld.param(&format!("{l}.input_layernorm.weight"), &[d], Init::Ones)?,
                q: bld.linear(&format!("{l}.self_attn.q_proj"), d, qd, ab, linears)?,
                k: bld.linear(&format!("{l}.self_attn.k_proj"), d, kvd, ab, linears)?,
                v: bld.linear(&format!("{l}.self_attn.v_proj"), d, kvd, ab, linears)?,
                o: bld.linear(&format!("{l}.self_attn.o_proj"), qd, d, ab, linears)?,
                post_ln: bld.param(
                    &format!("{l}.post_attention_layernorm.weight"),
                    &[d],
                    Init::Ones,
                )?,
                gate: bld.linear(&format!("{l}.mlp.gate_proj"), d, i, mb, linears)?,
                up: bld.linear(&format!("{l}.mlp.up_proj"), d, i, mb, linears)?,
                down: bld.linear(&format!("{l}.mlp.down_proj"), i, d, mb, linears)?,
            });
        }
        let norm = bld.param(&format!("{p}.norm.weight"), &[d], Init::Ones)?;
        // Tied: the head reuses embed_tokens (a checkpoint's lm_head copy, if any, is ignored,
        // as transformers does). Untied: the checkpoint must have its own.
        let lm_head = if tie {
            None
        } else {
            Some(bld.linear("language_model.lm_head", d, cfg.vocab_size, false, linears)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Runs the decoder on `x: [b, s, d]`, returning the final-norm hidden states of
    /// positions `from..s` (`[b, s − from, d]`): the last layer computes only those rows
    /// (keys and values of every position still go to the cache). `capture` receives each
    /// layer's output when given.
    ///
    /// A layer runs as one fused computation (`ops::decoder`) when it can (CPU f32, no
    /// biases, frozen base weights, no LoRA dropout, no graph through the cache); otherwise
    /// as composed ops ([`Llama::composed_layer`]).
    pub(crate) fn forward(
        &self,
        mut x: Tensor,
        at: &Positions<'_>,
        from: usize,
        mut cache: Option<&mut KvCache>,
        cx: &Ctx<'_>,
        mut capture: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let s = x.dim(1)?;
        if from >= s.max(1) {
            candle_core::bail!("decoder: output from position {from} of {s}");
        }
        let dims = self.layer_dims();
        let mut fused_pos = None;
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let from_i = if i == last { from } else { 0 };
            let fused = self
                .fused_params(layer, cx, &x)
                .filter(|p| cache.is_none() || !(x.track_op() || p.lora_tracked()));
            x = match fused {
                Some(p) => {
                    let pos = match &fused_pos {
                        Some(pos) => pos,
                        None => fused_pos.insert(decoder::Positions::new(at.cos, at.sin, at.mask)?),
                    };
                    match cache.as_deref_mut() {
                        _ if x.track_op() || p.lora_tracked() => {
                            decoder::train(&p, dims, &x, pos, from_i)?
                        }
                        Some(cache) => {
                            let mut p = p;
                            let layers = (i, self.layers.len());
                            p.packed = cache.packed(layers, &p, x.dim(0)? * (s - from_i));
                            let mut append = |new: decoder::NewKv<'_>| cache.append_new(i, new);
                            let kv = decoder::Kv::Cache(&mut append);
                            decoder::forward(&p, dims, &x, pos, from_i, kv)?
                        }
                        None => decoder::forward(&p, dims, &x, pos, from_i, decoder::Kv::Own)?,
                    }
                }
                None => self.composed_layer(layer, i, x, at, from_i, cache.as_deref_mut(), cx)?,
            };
            if let Some(cap) = capture.as_deref_mut() {
                cap.push(x.clone());
            }
        }
        if let Some(cache) = cache {
            cache.advance(s);
        }
        if self.layers.is_empty() && from > 0 {
            x = x.narrow(1, from, s - from)?;
        }
        ops::rms_norm(&x, cx.store.get(self.norm), self.cfg.rms_norm_eps)
    }

    fn layer_dims(&self) -> decoder::LayerDims {
        let c = &self.cfg;
        decoder::LayerDims {
            d: c.hidden_size,
            hq: c.num_attention_heads,
            hkv: c.num_key_value_heads,
            hd: c.head_dim,
            inter: c.intermediate_size,
            eps: c.rms_norm_eps as f32,
        }
    }

    /// The layer's tensors for the fused path, or `None` when it does not apply.
    fn fused_params(
        &self,
        layer: &LlamaLayer,
        cx: &Ctx<'_>,
        x: &Tensor,
    ) -> Option<decoder::Params> {
        let c = &self.cfg;
        if c.attention_bias
            || c.mlp_bias
            || !decoder::enabled()
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
        {
            return None;
        }
        let lins = [
            &layer.q,
            &layer.k,
            &layer.v,
            &layer.o,
            &layer.gate,
            &layer.up,
            &layer.down,
        ];
        let mut lora: [Vec<(Tensor, Tensor, f32)>; 7] = Default::default();
        for (slot, l) in lora.iter_mut().zip(lins) {
            *slot = l
                .fused_loras(cx)?
                .into_iter()
                .map(|(a, b, s)| (a.clone(), b.clone(), s as f32))
                .collect();
        }
        let p = decoder::Params {
            ln1: cx.store.get(layer.input_ln).clone(),
            ln2: cx.store.get(layer.post_ln).clone(),
            w: lins.map(|l| cx.store.get(l.w).clone()),
            lora,
            packed: None,
        };
        p.eligible(&self.layer_dims()).then_some(p)
    }

    /// One layer as composed ops (the reference for the fused path), output rows `from..s`.
    #[allow(clippy::too_many_arguments)]
    fn composed_layer(
        &self,
        layer: &LlamaLayer,
        i: usize,
        x: Tensor,
        at: &Positions<'_>,
        from: usize,
        cache: Option<&mut KvCache>,
        cx: &Ctx<'_>,
    ) -> Result<Tensor> {
        let Positions { mask, cos, sin } = *at;
        let c = &self.cfg;
        let (b, s, _) = x.dims3()?;
        let sq = s - from;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let n = ops::rms_norm(&x, cx.store.get(layer.input_ln), c.rms_norm_eps)?;
        // Queries (and the residual) only at positions from..s.
        let suffix = |t: &Tensor, dim: usize| -> Result<Tensor> {
            if from == 0 {
                Ok(t.clone())
            } else {
                t.narrow(dim, from, sq)
            }
        };
        let q = layer
            .q
            .forward(&suffix(&n, 1)?, cx)?
            .reshape((b, sq, h, hd))?
            .transpose(1, 2)?;
        let k = layer
            .k
            .forward(&n, cx)?
            .reshape((b, s, kvh, hd))?
            .transpose(1, 2)?;
        let v = layer
            .v
            .forward(&n, cx)?
            .reshape((b, s, kvh, hd))?
            .transpose(1, 2)?;
        let q = ops::rope(&q.contiguous()?, &suffix(cos, 1)?, &suffix(sin, 1)?)?;
        let k = ops::rope(&k.contiguous()?, cos, sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(i, k, v.contiguous()?)?,
            None => (k, v),
        };
        let mask = mask.map(|m| suffix(m, 2)).transpose()?;
        let a = ops::attention(&q, &k, &v, mask.as_ref(), scale)?
            .transpose(1, 2)?
            .reshape((b, sq, h * hd))?;
        let x = (suffix(&x, 1)? + layer.o.forward(&a, cx)?)?;
        let n = ops::rms_norm(&x, cx.store.get(layer.post_ln), c.rms_norm_eps)?;
        let g = layer.gate.forward(&n, cx)?;
        let u = layer.up.forward(&n, cx)?;
        x + layer.down.forward(&ops::swiglu(&g, &u)?, cx)?
    }

    /// `hidden Wᵀ` with the LM head (or the embeddings when tied).
    pub(crate) fn lm_head(&self, hidden: &Tensor, cx: &Ctx<'_>) -> Result<Tensor> {
        match &self.lm_head {
            Some(l) => l.forward(hidden, cx),
            None => ops::linear(hidden, cx.store.get(self.embed), None),
        }
    }
}

/// RoPE tables `cos, sin: [b, s, head_dim]` for integer positions `pos` (row-major `[b, s]`).
pub fn rope_tables(
    pos: &[i64],
    b: usize,
    s: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    // torch: inv_freq = 1 / θ^(arange(0, d, 2).float() / d), all in f32.
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    // One row per distinct position: a batch repeats the same positions in every row (a
    // training batch of 16 × 96 has 96), so the trigonometry is done once per position
    // and copied; the values are those of the direct computation.
    let row = |p: i64, cos: &mut Vec<f32>, sin: &mut Vec<f32>| {
        let row_start = cos.len();
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
        // emb = cat(freqs, freqs): the second half repeats the first.
        cos.extend_from_within(row_start..row_start + half);
        sin.extend_from_within(row_start..row_start + half);
    };
    let (mut tcos, mut tsin) = (Vec::new(), Vec::new());
    let mut at: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    let mut cos = Vec::with_capacity(b * s * head_dim);
    let mut sin = Vec::with_capacity(b * s * head_dim);
    for &p in pos {
        let i = *at.entry(p).or_insert_with(|| {
            row(p, &mut tcos, &mut tsin);
            tcos.len() / head_dim - 1
        });
        cos.extend_from_slice(&tcos[i * head_dim..(i + 1) * head_dim]);
        sin.extend_from_slice(&tsin[i * head_dim..(i + 1) * head_dim]);
    }
    let cos = Tensor::from_vec(cos, (b, s, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (b, s, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// The additive mask `[b, 1, s, past + s]`: query `i` (absolute position `past + i`) may see
/// key `j` iff `j <= past + i` and `keep[b][j]` (when a padding mask is given).
pub fn additive_mask(
    keep: Option<&[bool]>,
    b: usize,
    s: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = past + s;
    let min = match dtype {
        DType::F16 => half::f16::MIN.to_f32(),
        DType::BF16 => half::bf16::MIN.to_f32(),
        _ => f32::MIN,
    };
    let mut m = vec![0f32; b * s * t];
    for r in 0..b {
        for i in 0..s {
            let row = &mut m[(r * s + i) * t..(r * s + i + 1) * t];
            for (j, v) in row.iter_mut().enumerate() {
                let visible = j <= past + i && keep.is_none_or(|k| k[r * t + j]);
                if !visible {
                    *v = min;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, s, t), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_tables_follow_hf_layout() {
        let (cos, sin) = rope_tables(&[0, 3], 1, 2, 4, 100.0, DType::F32, &Device::Cpu).unwrap();
        let cos = cos.to_vec3::<f32>().unwrap();
        let sin = sin.to_vec3::<f32>().unwrap();
        assert_eq!(cos[0][0], vec![1.0; 4]);
        // d = 4: inv_freq = [1, 100^-0.5 = 0.1]; position 3 → angles [3, 0.3], repeated.
        let want = [3f32.cos(), 0.3f32.cos(), 3f32.cos(), 0.3f32.cos()];
        for (g, w) in cos[0][1].iter().zip(want) {
            assert!((g - w).abs() < 1e-6);
        }
        assert!((sin[0][1][1] - 0.3f32.sin()).abs() < 1e-6);
        // Repeated positions (shared rows) give the same values as each alone.
        let (c2, s2) = rope_tables(&[3, 0, 3], 3, 1, 4, 100.0, DType::F32, &Device::Cpu).unwrap();
        let (c2, s2) = (c2.to_vec3::<f32>().unwrap(), s2.to_vec3::<f32>().unwrap());
        assert_eq!(
            (&c2[0][0], &c2[1][0], &c2[2][0]),
            (&cos[0][1], &cos[0][0], &cos[0][1])
        );
        assert_eq!(s2[2][0], sin[0][1]);
    }

    #[test]
    fn mask_is_causal_over_the_cache_and_honours_padding() {
        // b = 1, past = 1, s = 2, keys t = 3; key 0 is padding.
        let keep = [false, true, true];
        let m = additive_mask(Some(&keep), 1, 2, 1, DType::F32, &Device::Cpu).unwrap();
        let m = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vis: Vec<bool> = m.iter().map(|v| *v == 0.0).collect();
        assert_eq!(vis, [false, true, false, false, true, true]);
        assert!(m.iter().all(|v| *v == 0.0 || *v == f32::MIN));
        let f16 = additive_mask(None, 1, 2, 0, DType::F16, &Device::Cpu).unwrap();
        let v = f16
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, [0.0, -65504.0, 0.0, 0.0], "f16 min stays finite");
    }
}
