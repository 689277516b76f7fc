//! The linear layer every block uses, and the per-forward context it reads.
//!
//! A [`Linear`] holds only handles: its weight and bias live in the model's
//! [`ParamStore`], and the LoRA factors attached to it live in the model's adapter list,
//! indexed by the layer's *slot* (its registration order). That keeps one source of truth
//! for every tensor, so merging an adapter, saving, or turning a subset into training
//! variables never has to walk the block structure.
//!
//! Forward: `y = x Wᵀ + b + Σ_adapters scale · (dropout(x) Aᵀ) Bᵀ`, PEFT's order and
//! scaling. The common single-adapter, no-dropout case goes through
//! [`ops::lora_linear`](crate::ops::lora_linear) so a fused kernel can take it.

use candle_core::{Result, Tensor};

use super::weights::{Builder, Init, ParamId, ParamStore};
use crate::ops;

/// What a layer needs besides its input: the parameters and the adapters, plus the
/// dropout key when LoRA dropout is active (training).
pub(crate) struct Ctx<'a> {
    pub(crate) store: &'a ParamStore,
    pub(crate) adapters: &'a [super::lora::Adapter],
    pub(crate) dropout: Option<DropoutKey>,
}

/// Seeds LoRA dropout masks: a mask depends on (seed, forward step, layer, adapter) only,
/// so a training run is reproducible and two layers never share a mask.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutKey {
    pub(crate) seed: u64,
    pub(crate) step: u64,
}

/// Static facts about a registered linear layer (for LoRA targeting and merging).
#[derive(Debug, Clone)]
pub struct LinearInfo {
    /// Canonical weight prefix, e.g. `language_model.model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The weight parameter `[out, in]`.
    pub weight: ParamId,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
}

/// A linear layer: handles into the parameter store plus its LoRA slot.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) w: ParamId,
    pub(crate) b: Option<ParamId>,
    pub(crate) slot: usize,
}

impl Builder<'_> {
    /// Registers `{name}.weight` `[out, in]` (and `{name}.bias` when `bias`).
    pub(crate) fn linear(
        &mut self,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        linears: &mut Vec<LinearInfo>,
    ) -> super::Result<Linear> {
        let w = self.param(
            &format!("{name}.weight"),
            &[out_dim, in_dim],
            Init::Normal(0.02),
        )?;
        let b = if bias {
            Some(self.param(&format!("{name}.bias"), &[out_dim], Init::Zeros)?)
        } else {
            None
        };
        let slot = linears.len();
        linears.push(LinearInfo {
            name: name.to_owned(),
            weight: w,
            in_dim,
            out_dim,
        });
        Ok(Linear { w, b, slot })
    }
}

impl Linear {
    /// The layer's LoRA pairs `(A, B, scale)` in adapter order, the form the fused kernels
    /// take; `None` when dropout is active on one of them.
    pub(crate) fn fused_loras<'c>(
        &self,
        cx: &Ctx<'c>,
    ) -> Option<Vec<(&'c Tensor, &'c Tensor, f64)>> {
        cx.adapters
            .iter()
            .filter_map(|ad| ad.pair(self.slot).map(|p| (ad, p)))
            .map(|(ad, p)| {
                let dropout = cx.dropout.is_some() && ad.config.dropout > 0.0;
                (!dropout).then_some((&p.a, &p.b, ad.scale()))
            })
            .collect()
    }

    pub(crate) fn forward(&self, x: &Tensor, cx: &Ctx<'_>) -> Result<Tensor> {
        let w = cx.store.get(self.w);
        let b = self.b.map(|id| cx.store.get(id));
        match self.fused_loras(cx).as_deref() {
            Some([]) => return ops::linear(x, w, b),
            Some(&[(a, bm, scale)]) => return ops::lora_linear(x, w, b, a, bm, scale),
            _ => {}
        }
        let mut y = ops::linear(x, w, b)?;
        let active = cx
            .adapters
            .iter()
            .filter_map(|ad| ad.pair(self.slot).map(|p| (ad, p)));
        for (ad, pair) in active {
            let xd = match cx.dropout {
                Some(key) if ad.config.dropout > 0.0 => ad.dropout(x, key, self.slot)?,
                _ => x.clone(),
            };
            let low = ops::linear(&ops::linear(&xd, &pair.a, None)?, &pair.b, None)?;
            y = (y + (low * ad.scale())?)?;
        }
        Ok(y)
    }
}
