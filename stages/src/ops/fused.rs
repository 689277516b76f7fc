//! Fused CPU kernels (f32, contiguous) for RMSNorm, softmax and RoPE, as candle
//! `CustomOp`s **with** a backward pass.
//!
//! The composed versions in [`super::reference`] allocate a tensor per primitive (a norm is
//! ~8 passes over the data forward and more backward); these do one pass forward and one
//! or two backward. Each backward is itself a plain Rust loop over slices (the gradient is
//! returned as a fresh tensor built from a `Vec`), so no candle op without backward ever
//! appears on the gradient path. Second-order gradients are not supported (nothing needs
//! them).
//!
//! Only CPU f32 storage is handled; [`super`] dispatches everything else to the reference
//! ops, so the CUDA entry points (candle's default `cuda_fwd`, which returns a clear
//! "no cuda implementation" error) are never reached in practice.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor,
    bail,
};

use super::simd::{self, dot, dot3, simd_fn};

/// The contiguous f32 slice behind a CPU storage and layout, or an error naming `op`.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: fused kernel needs f32 input, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: fused kernel needs contiguous input"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        bail!("{op}: fused kernel needs a CPU tensor")
    };
    Ok(f(slice(cs, l, op)?))
}

/// A new CPU tensor from `v`.
pub(crate) fn tensor(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// `Some(grad())` when `arg` is part of the autograd graph, else `None`: candle's backprop
/// would otherwise allocate a zero gradient for a constant (a frozen norm weight, the RoPE
/// tables) and add into it, two wasted passes per op.
pub(crate) fn grad_for(
    arg: &Tensor,
    grad: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    if arg.track_op() {
        grad().map(Some)
    } else {
        Ok(None)
    }
}

/// Whether the fused kernels can take these tensors.
pub(crate) fn eligible(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

// ---------------------------------------------------------------- RMSNorm

pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1, "rms_norm")?, slice(s2, l2, "rms_norm")?);
        let d = w.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            bail!(
                "rms_norm: weight of {d} does not match input {:?}",
                l1.dims()
            );
        }
        let mut y = vec![0f32; x.len()];
        rms_norm_rows(x, w, self.eps, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let (dx, dw) = with_f32(x, "rms_norm", |x| {
            with_f32(w, "rms_norm", |w| {
                with_f32(g, "rms_norm", |g| {
                    let mut dx = vec![0f32; x.len()];
                    let mut dw = vec![0f32; d];
                    rms_norm_bwd_rows(x, w, self.eps, g, &mut dx, false, Some(&mut dw));
                    (dx, dw)
                })
            })
        })???;
        Ok((
            grad_for(x, || tensor(dx, x.shape()))?,
            grad_for(w, || tensor(dw, w.shape()))?,
        ))
    }
}

simd_fn! {
    /// RMSNorm of the rows of `x` (width `w.len()`) into `y`.
    pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let d = w.len();
        if d == 0 {
            return;
        }
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let inv = 1.0 / (dot::<L>(xr, xr) / d as f32 + eps).sqrt();
            for ((o, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *o = xv * inv * wv;
            }
        }
    }
}

simd_fn! {
    /// RMSNorm backward: writes (or with `acc` adds) `∂L/∂x` into `dx` and adds `∂L/∂w`
    /// into `dw` when given. `y = x·inv·w` ⇒ `dx = inv·(g·w) − x·inv³/d · Σ(g·w·x)`.
    pub(crate) fn rms_norm_bwd_rows(
        x: &[f32],
        w: &[f32],
        eps: f32,
        g: &[f32],
        dx: &mut [f32],
        acc: bool,
        dw: Option<&mut [f32]>,
    ) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let mut dw = dw;
        for ((xr, gr), dxr) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let inv = 1.0 / (dot::<L>(xr, xr) / d as f32 + eps).sqrt();
            let gw_x = dot3::<L>(gr, w, xr);
            if let Some(dw) = dw.as_deref_mut() {
                for ((o, &gv), &xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *o += gv * xv * inv;
                }
            }
            let c = inv * inv * inv * gw_x / d as f32;
            for (((o, &gv), &wv), &xv) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                let v = inv * gv * wv - c * xv;
                *o = if acc { *o + v } else { v };
            }
        }
    }
}

// ---------------------------------------------------------------- softmax

pub(crate) struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "softmax")?;
        let d = *l.dims().last().unwrap_or(&1);
        let mut y = x.to_vec();
        if d > 0 {
            for yr in y.chunks_exact_mut(d) {
                simd::softmax_inplace(yr);
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = y.dim(candle_core::D::Minus1)?;
        let dx = with_f32(y, "softmax", |y| {
            with_f32(g, "softmax", |g| {
                let mut dx = vec![0f32; y.len()];
                for ((yr, gr), o) in y
                    .chunks_exact(d)
                    .zip(g.chunks_exact(d))
                    .zip(dx.chunks_exact_mut(d))
                {
                    simd::softmax_bwd(yr, gr, o);
                }
                dx
            })
        })??;
        Ok(Some(tensor(dx, y.shape())?))
    }
}

// ---------------------------------------------------------------- RoPE

/// RoPE with HF `rotate_half` on `x: [b, h, s, d]`, `cos, sin: [b, s, d]`.
pub(crate) struct Rope;

fn rope_dims(x: &[usize], c: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match (x, c) {
        ([b, h, s, d], [cb, cs, cd]) if b == cb && s == cs && d == cd && d % 2 == 0 => {
            Ok((*b, *h, *s, *d))
        }
        _ => bail!(
            "rope: x {x:?} needs [b, heads, seq, d] with even d and cos/sin [b, seq, d], got cos/sin {c:?}"
        ),
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, s, d) = rope_dims(l1.dims(), l2.dims())?;
        if l3.dims() != l2.dims() {
            bail!("rope: sin {:?} differs from cos {:?}", l3.dims(), l2.dims());
        }
        let (x, cos, sin) = (
            slice(s1, l1, "rope")?,
            slice(s2, l2, "rope")?,
            slice(s3, l3, "rope")?,
        );
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    let o = ((bi * h + hi) * s + si) * d;
                    let c = (bi * s + si) * d;
                    let (xr, yr, cr, sr) = (
                        &x[o..o + d],
                        &mut y[o..o + d],
                        &cos[c..c + d],
                        &sin[c..c + d],
                    );
                    for j in 0..half {
                        yr[j] = xr[j] * cr[j] - xr[j + half] * sr[j];
                        yr[j + half] = xr[j + half] * cr[j + half] + xr[j] * sr[j + half];
                    }
                }
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, s, d) = rope_dims(x.dims(), cos.dims())?;
        let half = d / 2;
        let (dx, dc, ds) = with_f32(x, "rope", |x| {
            with_f32(cos, "rope", |cos| {
                with_f32(sin, "rope", |sin| {
                    with_f32(g, "rope", |g| {
                        let mut dx = vec![0f32; x.len()];
                        let mut dc = vec![0f32; cos.len()];
                        let mut ds = vec![0f32; sin.len()];
                        for bi in 0..b {
                            for hi in 0..h {
                                for si in 0..s {
                                    let o = ((bi * h + hi) * s + si) * d;
                                    let c = (bi * s + si) * d;
                                    for j in 0..half {
                                        let (lo, hi_) = (o + j, o + j + half);
                                        let (cl, chh) = (c + j, c + j + half);
                                        // y_lo = x_lo c_lo − x_hi s_lo ; y_hi = x_hi c_hi + x_lo s_hi
                                        dx[lo] = g[lo] * cos[cl] + g[hi_] * sin[chh];
                                        dx[hi_] = g[hi_] * cos[chh] - g[lo] * sin[cl];
                                        dc[cl] += g[lo] * x[lo];
                                        dc[chh] += g[hi_] * x[hi_];
                                        ds[cl] -= g[lo] * x[hi_];
                                        ds[chh] += g[hi_] * x[lo];
                                    }
                                }
                            }
                        }
                        (dx, dc, ds)
                    })
                })
            })
        })????;
        Ok((
            grad_for(x, || tensor(dx, x.shape()))?,
            grad_for(cos, || tensor(dc, cos.shape()))?,
            grad_for(sin, || tensor(ds, sin.shape()))?,
        ))
    }
}

// ---------------------------------------------------------------- LayerNorm

/// LayerNorm over the last dim (biased variance) with affine weight and bias.
pub(crate) struct LayerNorm {
    pub(crate) eps: f32,
}

/// Mean and `1/sqrt(var + eps)` of one row.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(s1, l1, "layer_norm")?,
            slice(s2, l2, "layer_norm")?,
            slice(s3, l3, "layer_norm")?,
        );
        let d = w.len();
        if d == 0 || b.len() != d || l1.dims().last() != Some(&d) {
            bail!(
                "layer_norm: weight {:?} / bias {:?} do not match input {:?}",
                l2.dims(),
                l3.dims(),
                l1.dims()
            );
        }
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (mean, inv) = moments(xr, self.eps);
            for j in 0..d {
                yr[j] = (xr[j] - mean) * inv * w[j] + b[j];
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let (dx, dw, db) = with_f32(x, "layer_norm", |x| {
            with_f32(w, "layer_norm", |w| {
                with_f32(g, "layer_norm", |g| {
                    let mut dx = vec![0f32; x.len()];
                    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                    let mut xhat = vec![0f32; d];
                    for ((xr, gr), dxr) in x
                        .chunks_exact(d)
                        .zip(g.chunks_exact(d))
                        .zip(dx.chunks_exact_mut(d))
                    {
                        let (mean, inv) = moments(xr, self.eps);
                        // dx = inv · (dy − mean(dy) − x̂ · mean(dy · x̂)), dy = g · w.
                        let (mut m1, mut m2) = (0f32, 0f32);
                        for j in 0..d {
                            xhat[j] = (xr[j] - mean) * inv;
                            let dy = gr[j] * w[j];
                            m1 += dy;
                            m2 += dy * xhat[j];
                            dw[j] += gr[j] * xhat[j];
                            db[j] += gr[j];
                        }
                        let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                        for j in 0..d {
                            dxr[j] = inv * (gr[j] * w[j] - m1 - xhat[j] * m2);
                        }
                    }
                    (dx, dw, db)
                })
            })
        })???;
        Ok((
            grad_for(x, || tensor(dx, x.shape()))?,
            grad_for(w, || tensor(dw, w.shape()))?,
            grad_for(b, || tensor(db, b.shape()))?,
        ))
    }
}

// ---------------------------------------------------------------- SiLU, log-softmax

/// `x σ(x)` with a one-pass backward (candle's composed SiLU backward makes ~7 passes).
pub(crate) struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fused-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "silu")?;
        let mut y = vec![0f32; x.len()];
        simd::silu(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(x, "silu", |x| {
            with_f32(g, "silu", |g| {
                let mut dx = vec![0f32; x.len()];
                simd::silu_bwd(x, g, &mut dx);
                dx
            })
        })??;
        grad_for(x, || tensor(dx, x.shape()))
    }
}

/// SwiGLU's gating `silu(g) · u` (LLaMA's MLP) in one pass. Composed, it is two graph
/// nodes whose backward makes four `[tokens, intermediate]` temporaries plus a zero-filled
/// accumulator for the SiLU output's gradient; fused, backward writes `dg` and `du` directly.
pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, "swiglu")?, slice(s2, l2, "swiglu")?);
        if l1.dims() != l2.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims());
        }
        // Same expression as `silu` then a multiply: identical values.
        let mut y = vec![0f32; g.len()];
        simd::swiglu(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, "swiglu", |g| {
            with_f32(u, "swiglu", |u| {
                with_f32(gy, "swiglu", |gy| {
                    let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
                    simd::swiglu_bwd(g, u, gy, &mut dg, &mut du);
                    (dg, du)
                })
            })
        })???;
        Ok((
            grad_for(g, || tensor(dg, g.shape()))?,
            grad_for(u, || tensor(du, u.shape()))?,
        ))
    }
}

/// Log-softmax over the last dim; backward `g − softmax · Σ g`.
pub(crate) struct LogSoftmax;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "fused-log-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "log_softmax")?;
        let d = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        if d > 0 {
            for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                simd::log_softmax(xr, yr);
            }
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let d = y.dim(candle_core::D::Minus1)?;
        let dx = with_f32(y, "log_softmax", |y| {
            with_f32(g, "log_softmax", |g| {
                let mut dx = vec![0f32; y.len()];
                for ((yr, gr), o) in y
                    .chunks_exact(d)
                    .zip(g.chunks_exact(d))
                    .zip(dx.chunks_exact_mut(d))
                {
                    simd::log_softmax_bwd(yr, gr, o);
                }
                dx
            })
        })??;
        grad_for(x, || tensor(dx, y.shape()))
    }
}

/// CLIP's quick-GELU `x σ(1.702 x)`, vectorized, with a one-pass backward (candle's
/// composed version is three graph nodes: a scale, a sigmoid and a product).
pub(crate) struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "fused-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = slice(s, l, "quick_gelu")?.to_vec();
        simd::quick_gelu(&mut y, None);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(x, "quick_gelu", |x| {
            with_f32(g, "quick_gelu", |g| {
                let mut dx = vec![0f32; x.len()];
                simd::quick_gelu_bwd(x, g, &mut dx);
                dx
            })
        })??;
        grad_for(x, || tensor(dx, x.shape()))
    }
}
