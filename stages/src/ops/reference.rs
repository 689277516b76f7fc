//! Composed reference implementations of the shared ops, built only from candle primitives
//! that have a backward pass (matmul, broadcast arithmetic, `exp`, `sqrt`, `narrow`, `cat`,
//! reductions). They are slow on CPU (every step allocates a fresh tensor) but their
//! gradients are correct by construction, so they serve as the ground truth for the fused
//! [`CustomOp`](candle_core::CustomOp1) kernels in the sibling modules and as the fallback
//! for dtypes/devices the fused kernels do not cover.
//!
//! Conventions follow Hugging Face transformers (see the llava-tiny fixture README):
//! norms and softmax are computed in f32 and cast back to the input dtype; masked attention
//! scores carry `f32::MIN` added before the softmax.

use candle_core::{D, DType, Result, Tensor};

/// Runs `f` in f32 and casts the result back to `x`'s dtype (HF upcasts norms and softmax).
fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    if dt == DType::F32 || dt == DType::F64 {
        f(x)
    } else {
        f(&x.to_dtype(DType::F32)?)?.to_dtype(dt)
    }
}

/// RMSNorm over the last dim: `x * rsqrt(mean(x²) + eps) * w` (HF `LlamaRMSNorm`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let normed = in_f32(x, |x| {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)
    })?;
    normed.broadcast_mul(w)
}

/// LayerNorm over the last dim with affine weight and bias (biased variance, as torch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let normed = in_f32(x, |x| {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)
    })?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// Numerically stable softmax over the last dim, computed in f32.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        // The max is a constant shift: detaching it does not change the gradient.
        let m = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&m)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    })
}

/// Log-softmax over the last dim, computed in f32.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| {
        let m = x.max_keepdim(D::Minus1)?.detach();
        let z = x.broadcast_sub(&m)?;
        z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)
    })
}

/// HF `rotate_half`: `cat(-x[..., d/2:], x[..., :d/2])`.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary embedding, HF convention: `x * cos + rotate_half(x) * sin`, with
/// `x: [b, heads, seq, d]` and `cos, sin: [b, seq, d]` (broadcast over heads).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)?
        .broadcast_add(&rotate_half(x)?.broadcast_mul(&sin)?)
}

/// Repeats each KV head `n_rep` times along dim 1 (HF `repeat_kv`: query head `h` uses
/// KV head `h / n_rep`).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, hkv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, hkv, n_rep, t, d))?
        .reshape((b, hkv * n_rep, t, d))
}

/// Eager scaled-dot-product attention: `softmax(q kᵀ * scale + mask) v`.
/// `q: [b, hq, s, d]`, `k, v: [b, hkv, t, d]` with `hq` a multiple of `hkv`; `mask` is
/// additive and broadcastable to `[b, 1, s, t]` (or `[b, hq, s, t]`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let hq = q.dim(1)?;
    let hkv = k.dim(1)?;
    if hkv == 0 || hq % hkv != 0 {
        candle_core::bail!("attention: {hq} query heads is not a multiple of {hkv} kv heads");
    }
    let k = repeat_kv(k, hq / hkv)?;
    let v = repeat_kv(v, hq / hkv)?;
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(scores.dtype())?)?;
    }
    let p = softmax_last_dim(&scores)?;
    p.matmul(&v.contiguous()?)
}

/// `x · σ(1.702 x)` (CLIP's activation).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// Exact GELU, `0.5 x (1 + erf(x / √2))`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// SiLU, `x σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(x)?)
}

/// `x Wᵀ (+ b)` for `x: [.., in]`, `w: [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// LoRA linear: `x Wᵀ + b + scale · (x Aᵀ) Bᵀ` with `a: [r, in]`, `bm: [out, r]`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let base = linear(x, w, b)?;
    let low = linear(&linear(x, a, None)?, bm, None)?;
    base + (low * scale)?
}
