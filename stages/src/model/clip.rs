//! The CLIP vision tower (as LLaVA uses it) and the multimodal projector.
//!
//! CLIP here is a pre-LN ViT: patch embedding (a stride-`p` conv **without bias**, written
//! as the equivalent patch-flatten + matmul), a learned class token, learned absolute
//! position embeddings, then `pre_layrnorm` (sic, transformers' name) before the encoder.
//! Each encoder layer is `x += attn(ln1(x)); x += fc2(act(fc1(ln2(x))))`, attention unmasked
//! with scale `1/√head_dim`.
//!
//! LLaVA reads CLIP's `hidden_states` tuple, whose entry 0 is the embeddings output *after*
//! `pre_layrnorm` and entry `i` the output of layer `i-1`; `post_layernorm` is loaded and
//! saved (the checkpoint has it) but never applied. Layers past the selected one cannot
//! influence the result, so [`ClipVision::forward`] stops there: with the usual
//! `vision_feature_layer = -2` the last layer is never computed.
//!
//! The projector (`mlp2x_gelu`) is `linear_2(gelu_erf(linear_1(x)))`.

use candle_core::{Result, Tensor};

use super::config::{ClipVisionConfig, LlavaConfig, VisionAct};
use super::linear::{Ctx, Linear, LinearInfo};
use super::weights::{Builder, Init, ParamId};
use crate::ops;

struct LayerNorm {
    w: ParamId,
    b: ParamId,
}

impl LayerNorm {
    fn new(bld: &mut Builder<'_>, name: &str, dim: usize) -> super::Result<Self> {
        Ok(Self {
            w: bld.param(&format!("{name}.weight"), &[dim], Init::Ones)?,
            b: bld.param(&format!("{name}.bias"), &[dim], Init::Zeros)?,
        })
    }
    fn forward(&self, x: &Tensor, cx: &Ctx<'_>, eps: f64) -> Result<Tensor> {
        ops::layer_norm(x, cx.store.get(self.w), cx.store.get(self.b), eps)
    }
}

struct ClipLayer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The CLIP vision transformer.
pub(crate) struct ClipVision {
    cfg: ClipVisionConfig,
    patch: ParamId,
    class: ParamId,
    pos: ParamId,
    pre_ln: LayerNorm,
    layers: Vec<ClipLayer>,
    // Loaded and saved for checkpoint fidelity; LLaVA never applies it.
    _post_ln: LayerNorm,
}

impl ClipVision {
    pub(crate) fn new(
        bld: &mut Builder<'_>,
        cfg: &ClipVisionConfig,
        linears: &mut Vec<LinearInfo>,
    ) -> super::Result<Self> {
        let d = cfg.hidden_size;
        let p = "vision_tower";
        let patch = bld.param(
            &format!("{p}.embeddings.patch_embedding.weight"),
            &[d, cfg.num_channels, cfg.patch_size, cfg.patch_size],
            Init::Normal(0.02),
        )?;
        let class = bld.param(
            &format!("{p}.embeddings.class_embedding"),
            &[d],
            Init::Normal(0.02),
        )?;
        let pos = bld.param(
            &format!("{p}.embeddings.position_embedding.weight"),
            &[cfg.num_positions(), d],
            Init::Normal(0.02),
        )?;
        let pre_ln = LayerNorm::new(bld, &format!("{p}.pre_layrnorm"), d)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{p}.encoder.layers.{i}");
            layers.push(ClipLayer {
                ln1: LayerNorm::new(bld, &format!("{l}.layer_norm1"), d)?,
                q: bld.linear(&format!("{l}.self_attn.q_proj"), d, d, true, linears)?,
                k: bld.linear(&format!("{l}.self_attn.k_proj"), d, d, true, linears)?,
                v: bld.linear(&format!("{l}.self_attn.v_proj"), d, d, true, linears)?,
                out: bld.linear(&format!("{l}.self_attn.out_proj"), d, d, true, linears)?,
                ln2: LayerNorm::new(bld, &format!("{l}.layer_norm2"), d)?,
                fc1: bld.linear(
                    &format!("{l}.mlp.fc1"),
                    d,
                    cfg.intermediate_size,
                    true,
                    linears,
                )?,
                fc2: bld.linear(
                    &format!("{l}.mlp.fc2"),
                    cfg.intermediate_size,
                    d,
                    true,
                    linears,
                )?,
            });
        }
        let _post_ln = LayerNorm::new(bld, &format!("{p}.post_layernorm"), d)?;
        Ok(Self {
            cfg: cfg.clone(),
            patch,
            class,
            pos,
            pre_ln,
            layers,
            _post_ln,
        })
    }

    /// The embeddings output (before `pre_layrnorm`): `[class; patches] + positions`.
    pub(crate) fn embeddings(&self, pixel_values: &Tensor, cx: &Ctx<'_>) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, ch, h, w) = pixel_values.dims4()?;
        if ch != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "pixel_values has shape [{b}, {ch}, {h}, {w}], the vision tower expects [n, {}, {}, {}]",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let p = c.patch_size;
        let g = c.patches_per_side();
        let weight = cx.store.get(self.patch);
        let x = pixel_values.to_dtype(weight.dtype())?;
        // [b, c, gh, p, gw, p] -> [b, gh, gw, c, p, p]: each row is one patch in the conv
        // kernel's (c, kh, kw) order, so the conv is one matmul with the flattened kernel.
        let patches = x
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, g * g, ch * p * p))?;
        let kernel = weight.reshape((c.hidden_size, ch * p * p))?;
        let patches = ops::linear(&patches, &kernel, None)?;
        let class = cx
            .store
            .get(self.class)
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&class, &patches], 1)?;
        x.broadcast_add(cx.store.get(self.pos))
    }

    /// The embeddings output and `hidden_states[0..=upto]` (see the module docs).
    pub(crate) fn forward(
        &self,
        pixel_values: &Tensor,
        cx: &Ctx<'_>,
        upto: usize,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let c = &self.cfg;
        let emb = self.embeddings(pixel_values, cx)?;
        let mut x = self.pre_ln.forward(&emb, cx, c.layer_norm_eps)?;
        let mut hidden = vec![x.clone()];
        let (b, t, d) = x.dims3()?;
        let heads = c.num_attention_heads;
        let hd = c.head_dim();
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in self.layers.iter().take(upto) {
            let h = layer.ln1.forward(&x, cx, c.layer_norm_eps)?;
            let split = |y: Tensor| y.reshape((b, t, heads, hd))?.transpose(1, 2);
            let q = split(layer.q.forward(&h, cx)?)?;
            let k = split(layer.k.forward(&h, cx)?)?;
            let v = split(layer.v.forward(&h, cx)?)?;
            let a = ops::attention(&q, &k, &v, None, scale)?
                .transpose(1, 2)?
                .reshape((b, t, d))?;
            x = (x + layer.out.forward(&a, cx)?)?;
            let h = layer.ln2.forward(&x, cx, c.layer_norm_eps)?;
            let h = layer.fc1.forward(&h, cx)?;
            let h = match c.hidden_act {
                VisionAct::QuickGelu => ops::quick_gelu(&h)?,
                VisionAct::Gelu => ops::gelu_erf(&h)?,
            };
            x = (x + layer.fc2.forward(&h, cx)?)?;
            hidden.push(x.clone());
        }
        Ok((emb, hidden))
    }
}

/// LLaVA's `multi_modal_projector`.
pub(crate) struct Projector {
    linear_1: Linear,
    linear_2: Linear,
}

impl Projector {
    pub(crate) fn new(
        bld: &mut Builder<'_>,
        cfg: &LlavaConfig,
        linears: &mut Vec<LinearInfo>,
    ) -> super::Result<Self> {
        let (dv, dt, bias) = (
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            cfg.multimodal_projector_bias,
        );
        Ok(Self {
            linear_1: bld.linear("multi_modal_projector.linear_1", dv, dt, bias, linears)?,
            linear_2: bld.linear("multi_modal_projector.linear_2", dt, dt, bias, linears)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, cx: &Ctx<'_>) -> Result<Tensor> {
        let h = ops::gelu_erf(&self.linear_1.forward(x, cx)?)?;
        self.linear_2.forward(&h, cx)
    }
}

/// Drops the CLS token (`default` strategy) or keeps it (`full`).
pub(crate) fn select(hidden: &Tensor, keep_cls: bool) -> Result<Tensor> {
    if keep_cls {
        Ok(hidden.clone())
    } else {
        let t = hidden.dim(1)?;
        hidden.narrow(1, 1, t - 1)
    }
}
