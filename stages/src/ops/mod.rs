//! The shared tensor ops the model is built from (norms, softmax, RoPE, attention,
//! activations, LoRA linear).
//!
//! Every op here is differentiable: candle's own fused `softmax_last_dim`, `rms_norm`,
//! `layer_norm`, `rope*` and `sdpa` have no backward and silently drop gradients, so the
//! model must never call them. The public functions dispatch to fused CPU kernels
//! (candle `CustomOp`s with a hand-written backward) where those exist for the input's
//! dtype and device, and fall back to [`reference`], the composed-primitive versions,
//! everywhere else. Signatures never change between the two, so model code is oblivious.

use candle_core::{Result, Tensor};

pub mod reference;

/// RMSNorm over the last dim: `x * rsqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    reference::rms_norm(x, w, eps)
}

/// LayerNorm over the last dim with weight and bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    reference::layer_norm(x, w, b, eps)
}

/// Softmax over the last dim (computed in f32, cast back).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    reference::softmax_last_dim(x)
}

/// Rotary embedding with HF `rotate_half`; `x: [b, heads, seq, d]`, `cos, sin: [b, seq, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    reference::rope(x, cos, sin)
}

/// Scaled-dot-product attention with GQA and an optional additive mask broadcastable to
/// `[b, 1, s, t]`; `q: [b, hq, s, d]`, `k, v: [b, hkv, t, d]`. Returns `[b, hq, s, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    reference::attention(q, k, v, mask, scale)
}

/// CLIP's `x · σ(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    reference::quick_gelu(x)
}

/// Exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    reference::gelu_erf(x)
}

/// SiLU.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    reference::silu(x)
}

/// `x Wᵀ (+ b)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    reference::linear(x, w, b)
}

/// LoRA linear: `x Wᵀ + b + scale · (x Aᵀ) Bᵀ`, `w: [out, in]`, `a: [r, in]`, `bm: [out, r]`.
pub fn lora_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, a: &Tensor, bm: &Tensor, scale: f64) -> Result<Tensor> {
    reference::lora_linear(x, w, b, a, bm, scale)
}

#[cfg(test)]
mod tests;
