//! Linear and LoRA-linear layers whose base weight is frozen, as CPU `CustomOp`s.
//!
//! candle's matmul backward always computes the gradient of *both* operands, even when
//! the weight is a plain (frozen) tensor, so a LoRA step pays the full `dW` GEMM of every
//! base projection and then throws it away. These ops capture the frozen `W` (and bias)
//! inside the op and differentiate only with respect to the tracked inputs: `x` for a
//! frozen linear; `x`, `A`, `B` for LoRA. The products are module `gemm`'s, written
//! straight into the output (the bias is its initial value), so a layer makes one pass over
//! its output.
//!
//! Shapes: `x: [.., in]`, `W: [out, in]`, `b: [out]`, `A: [r, in]`, `B: [out, r]`;
//! `y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::fused::{grad_for, slice, tensor, with_f32};
use super::gemm::{self, Lora};

/// Output shape: `x`'s with the last dim replaced by `out`.
fn out_shape(x: &[usize], out: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = out;
    }
    s
}

/// `(rows, out)` of `x · Wᵀ` for `x` of `dims`, checking the inner sizes agree.
fn sizes(dims: &[usize], w: &Tensor, op: &str) -> Result<(usize, usize)> {
    let (out, inp) = w.dims2()?;
    if dims.last() != Some(&inp) {
        bail!("{op}: input {dims:?} does not end in the weight's {inp} columns");
    }
    Ok((dims.iter().rev().skip(1).product(), out))
}

/// `[rows, out]` initialized to the bias rows (zeros without a bias), and whether a bias
/// was written (the product must then be added).
fn bias_rows(b: Option<&Tensor>, rows: usize, out: usize) -> Result<(Vec<f32>, bool)> {
    match b {
        None => Ok((vec![0f32; rows * out], false)),
        Some(b) => with_f32(b, "linear", |b| (b.repeat(rows), true)),
    }
}

/// `x Wᵀ + b` for 2-D `x` through candle's matmul, for a weight that needs its own
/// gradient (full fine-tuning). For few rows it computes `(W xᵀ)ᵀ`, ~2x faster in gemm
/// (see `gemm::xwt`).
pub(crate) fn linear2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = if x.dim(0)? <= 64 {
        w.matmul(&x.t()?)?.t()?.contiguous()?
    } else {
        x.matmul(&w.t()?)?
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

pub(crate) struct FrozenLinear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "linear")?;
        let (rows, out) = sizes(l.dims(), &self.w, "linear")?;
        let (mut y, acc) = bias_rows(self.b.as_ref(), rows, out)?;
        with_f32(&self.w, "linear", |w| {
            gemm::xwt(x, rows, w, out, &mut y, acc)
        })?;
        Ok((CpuStorage::F32(y), Shape::from(out_shape(l.dims(), out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (rows, out) = sizes(x.dims(), &self.w, "linear")?;
        let dx = with_f32(g, "linear", |g| {
            with_f32(&self.w, "linear", |w| {
                let mut dx = vec![0f32; x.elem_count()];
                gemm::xw(g, rows, w, out, &mut dx, false);
                dx
            })
        })??;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

pub(crate) struct LoraLinear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
    pub(crate) scale: f64,
}

impl LoraLinear {
    fn lora<'a>(&self, a: &'a [f32], b: &'a [f32], out: usize) -> Lora<'a> {
        Lora {
            a,
            b,
            r: if out == 0 { 0 } else { b.len() / out },
            scale: self.scale as f32,
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let x = slice(s1, l1, "lora_linear")?;
        let (a, bm) = (slice(s2, l2, "lora_linear")?, slice(s3, l3, "lora_linear")?);
        let (rows, out) = sizes(l1.dims(), &self.w, "lora_linear")?;
        let inp = l1.dims().last().copied().unwrap_or(0);
        let lora = self.lora(a, bm, out);
        let (mut y, acc) = bias_rows(self.b.as_ref(), rows, out)?;
        with_f32(&self.w, "lora_linear", |w| {
            if gemm::merge_pays(rows, out, inp) {
                gemm::xwt(
                    x,
                    rows,
                    &gemm::merged(w, out, std::slice::from_ref(&lora)),
                    out,
                    &mut y,
                    acc,
                );
            } else {
                gemm::xwt(x, rows, w, out, &mut y, acc);
                gemm::lora_add(x, rows, out, &lora, &mut y);
            }
        })?;
        Ok((CpuStorage::F32(y), Shape::from(out_shape(l1.dims(), out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, out) = sizes(x.dims(), &self.w, "lora_linear")?;
        let inp = x.dims().last().copied().unwrap_or(0);
        let (dx, da, db) = with_f32(x, "lora_linear", |xs| {
            with_f32(a, "lora_linear", |av| {
                with_f32(bm, "lora_linear", |bv| {
                    with_f32(g, "lora_linear", |gs| {
                        with_f32(&self.w, "lora_linear", |w| {
                            let lora = self.lora(av, bv, out);
                            // The layer input is a constant for the first layers of a LoRA
                            // model: skip its GEMMs.
                            let dx = x.track_op().then(|| {
                                let mut dx = vec![0f32; xs.len()];
                                if gemm::merge_pays(rows, out, inp) {
                                    gemm::xw(
                                        gs,
                                        rows,
                                        &gemm::merged(w, out, std::slice::from_ref(&lora)),
                                        out,
                                        &mut dx,
                                        false,
                                    );
                                } else {
                                    gemm::xw(gs, rows, w, out, &mut dx, false);
                                    gemm::lora_dx(gs, rows, out, &lora, &mut dx);
                                }
                                dx
                            });
                            let (da, db) = gemm::lora_grads(xs, gs, rows, out, &lora);
                            (dx, da, db)
                        })
                    })
                })
            })
        })?????;
        Ok((
            dx.map(|dx| tensor(dx, x.shape())).transpose()?,
            grad_for(a, || tensor(da, a.shape()))?,
            grad_for(bm, || tensor(db, bm.shape()))?,
        ))
    }
}
