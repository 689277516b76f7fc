//! The shared tensor ops the model is built from (norms, softmax, RoPE, attention,
//! activations, LoRA linear).
//!
//! Every op here is differentiable: candle's own fused `softmax_last_dim`, `rms_norm`,
//! `layer_norm`, `rope*` and `sdpa` have no backward and silently drop gradients, so the
//! model must never call them. The public functions dispatch to fused CPU kernels
//! (candle `CustomOp`s with a hand-written backward) where those exist for the input's
//! dtype and device, and fall back to [`reference`], the composed-primitive versions,
//! everywhere else. Signatures never change between the two, so model code is oblivious.
//!
//! Fused kernels (CPU, f32): [`rms_norm`], [`layer_norm`], [`softmax_last_dim`],
//! [`log_softmax_last_dim`], [`silu`], [`swiglu`], [`quick_gelu`], [`rope`]
//! (module `fused`; exp and the row loops vectorized at run time by module `simd`),
//! [`attention`] (module `attention`: flash-style, GQA, additive mask), and [`linear`] /
//! [`lora_linear`] with a frozen base weight (module `lora`: skips the weight-gradient GEMM
//! candle would otherwise compute and discard), with the GEMMs of module `gemm`. Exact GELU
//! uses candle's elementwise op, which already has a backward. Module `decoder` runs a whole
//! LLaMA decoder layer as one computation (see there); the model calls it directly.
//!
//! The CPU kernels are also the reference semantics of the custom CUDA kernels (module
//! `cuda`, `stages/kernels/`): with the `cuda-candle` feature, [`attention`] and
//! [`lora_linear`] on CUDA tensors of f32/bf16/f16 run those first; anything they do not
//! cover takes the composed path.

use candle_core::{D, Result, Tensor};

mod attention;
#[cfg(any(feature = "cuda", feature = "cuda-candle"))]
pub mod cuda;
pub(crate) mod decoder;
mod fused;
mod gemm;
mod lora;
pub(crate) mod packed;
pub mod reference;
mod simd;

use fused::eligible;

/// RMSNorm over the last dim: `x * rsqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if eligible(&[x, w]) {
        return x
            .contiguous()?
            .apply_op2(&w.contiguous()?, fused::RmsNorm { eps: eps as f32 });
    }
    reference::rms_norm(x, w, eps)
}

/// LayerNorm over the last dim with weight and bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if eligible(&[x, w, b]) {
        let op = fused::LayerNorm { eps: eps as f32 };
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op);
    }
    reference::layer_norm(x, w, b, eps)
}

/// Softmax over the last dim (computed in f32, cast back).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if eligible(&[x]) {
        return x.contiguous()?.apply_op1(fused::Softmax);
    }
    reference::softmax_last_dim(x)
}

/// Rotary embedding with HF `rotate_half`; `x: [b, heads, seq, d]`, `cos, sin: [b, seq, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if eligible(&[x, cos, sin]) {
        return x
            .contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, fused::Rope);
    }
    reference::rope(x, cos, sin)
}

/// Scaled-dot-product attention with GQA and an optional additive mask broadcastable to
/// `[b, 1, s, t]`; `q: [b, hq, s, d]`, `k, v: [b, hkv, t, d]`. Returns `[b, hq, s, d]`.
/// The mask is a constant: it receives no gradient.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda-candle")]
    if let Some(y) = cuda::candle::attention(q, k, v, mask, scale)? {
        return Ok(y);
    }
    if eligible(&[q, k, v]) && mask.is_none_or(|m| eligible(&[m])) {
        let (b, hq, s, _) = q.dims4()?;
        let t = k.dim(2)?;
        let mask = match mask {
            None => None,
            Some(m) => {
                let per_head = m.rank() == 4 && hq > 1 && m.dim(1)? == hq;
                let mh = if per_head { hq } else { 1 };
                let data = m
                    .detach()
                    .broadcast_as((b, mh, s, t))?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Some(attention::Mask { data, per_head })
            }
        };
        let op = attention::Attention {
            scale: scale as f32,
            mask,
        };
        return q
            .contiguous()?
            .apply_op3(&head_blocks(k)?, &head_blocks(v)?, op);
    }
    reference::attention(q, k, v, mask, scale)
}

/// `x` itself when each row of `d` values is contiguous (a KV-cache prefix view, a
/// transposed linear output), else a contiguous copy.
fn head_blocks(x: &Tensor) -> Result<Tensor> {
    if attention::Heads::from_layout(x.layout()).is_some() {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// CLIP's `x · σ(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if eligible(&[x]) {
        return x.contiguous()?.apply_op1(fused::QuickGelu);
    }
    reference::quick_gelu(x)
}

/// Exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    reference::gelu_erf(x)
}

/// SiLU.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if eligible(&[x]) {
        return x.contiguous()?.apply_op1(fused::Silu);
    }
    reference::silu(x)
}

/// SwiGLU gating `silu(gate) · up` (same shapes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if eligible(&[gate, up]) && gate.shape() == up.shape() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, fused::SwiGlu);
    }
    silu(gate)? * up
}

/// Log-softmax over the last dim (computed in f32, cast back). Added for losses and
/// log-probabilities: one pass forward and backward instead of candle's composed chain.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if eligible(&[x]) {
        return x.contiguous()?.apply_op1(fused::LogSoftmax);
    }
    reference::log_softmax_last_dim(x)
}

/// `x Wᵀ (+ b)`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if eligible(&[x, w]) && frozen(w, b) && x.track_op() {
        let op = lora::FrozenLinear {
            w: w.detach(),
            b: b.map(Tensor::detach),
        };
        return x.contiguous()?.apply_op1(op);
    }
    as_rows(x, |x2| lora::linear2d(x2, w, b))
}

/// LoRA linear: `x Wᵀ + b + scale · (x Aᵀ) Bᵀ`, `w: [out, in]`, `a: [r, in]`, `bm: [out, r]`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda-candle")]
    if let Some(y) = cuda::candle::lora_linear(x, w, b, a, bm, scale)? {
        return Ok(y);
    }
    if eligible(&[x, w, a, bm]) && frozen(w, b) {
        let op = lora::LoraLinear {
            w: w.detach(),
            b: b.map(Tensor::detach),
            scale,
        };
        return x
            .contiguous()?
            .apply_op3(&a.contiguous()?, &bm.contiguous()?, op);
    }
    reference::lora_linear(x, w, b, a, bm, scale)
}

/// Whether the base weight and bias are constants (no gradient wanted).
fn frozen(w: &Tensor, b: Option<&Tensor>) -> bool {
    !w.track_op() && b.is_none_or(|b| !b.track_op() && eligible(&[b]))
}

/// Applies a 2-D matmul-based `f` to `x: [.., k]` flattened to `[N, k]`, restoring the
/// leading dims. Plain 2-D GEMMs avoid candle's broadcast-batched matmul path.
fn as_rows(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.rank() == 2 {
        return f(x);
    }
    let dims = x.dims().to_vec();
    let k = x.dim(D::Minus1)?;
    let y = f(&x.contiguous()?.reshape(((), k))?)?;
    let mut out = dims;
    if let Some(l) = out.last_mut() {
        *l = y.dim(1)?;
    }
    y.reshape(out)
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_decoder;
#[cfg(test)]
mod tests_fused;
