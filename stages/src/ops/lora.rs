//! Linear and LoRA-linear layers whose base weight is frozen, as CPU `CustomOp`s.
//!
//! candle's matmul backward always computes the gradient of *both* operands, even when
//! the weight is a plain (frozen) tensor, so a LoRA step pays the full `dW` GEMM of every
//! base projection and then throws it away. These ops capture the frozen `W` (and bias)
//! inside the op and differentiate only with respect to the tracked inputs: `x` for a
//! frozen linear; `x`, `A`, `B` for LoRA. The GEMMs themselves are candle's (gemm crate);
//! only the graph is custom.
//!
//! Shapes: `x: [.., in]`, `W: [out, in]`, `b: [out]`, `A: [r, in]`, `B: [out, r]`;
//! `y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ`.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, D, Device, Layout, Result, Shape, Storage, Tensor, bail,
};

use super::fused::{grad_for, slice};

fn cpu_tensor(s: &CpuStorage, l: &Layout, op: &str) -> Result<Tensor> {
    Tensor::from_slice(slice(s, l, op)?, l.shape().clone(), &Device::Cpu)
}

fn into_cpu(t: Tensor, op: &str) -> Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        bail!("{op}: expected a CPU result")
    };
    Ok((
        CpuStorage::F32(slice(cs, l, op)?.to_vec()),
        l.shape().clone(),
    ))
}

/// `x` as a 2-D `[N, in]` matrix (a view when `x` is contiguous).
fn rows(x: &Tensor) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    x.contiguous()?.reshape(((), k))
}

/// Output shape: `x`'s with the last dim replaced by `out`.
fn out_shape(x: &[usize], out: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(l) = s.last_mut() {
        *l = out;
    }
    s
}

/// Rows up to which [`linear2d`] computes `(W xᵀ)ᵀ` instead of `x Wᵀ`.
const SMALL_M: usize = 64;

/// `x Wᵀ + b` for 2-D `x`, with `W`, `b` plain tensors.
///
/// For few rows (decoding: one per sequence) the gemm crate is ~2.5x faster on
/// `W · xᵀ` (contiguous `W` as the left operand) than on `x · Wᵀ` with a transposed-view
/// right operand, which it repacks on every call (measured: 16×256 by 688×256, 0.29 vs
/// 0.85 ms). The transposed result is made contiguous; that copy is `M × out`, tiny.
pub(crate) fn linear2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = if x.dim(0)? <= SMALL_M {
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
        let x = cpu_tensor(s, l, "linear")?;
        let y = linear2d(&rows(&x)?, &self.w, self.b.as_ref())?;
        let (st, _) = into_cpu(y, "linear")?;
        Ok((st, Shape::from(out_shape(l.dims(), self.w.dim(0)?))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rows(g)?.matmul(&self.w)?.reshape(x.shape())?))
    }
}

pub(crate) struct LoraLinear {
    pub(crate) w: Tensor,
    pub(crate) b: Option<Tensor>,
    pub(crate) scale: f64,
}

/// Whether `x (W + s·B A)ᵀ` beats `x Wᵀ + s·(x Aᵀ) Bᵀ` for `rows` rows of `x`: merging
/// costs one `[out, r] × [r, in]` product and an `out × in` add; the split form pays two
/// skinny rank-`r` GEMMs (poorly vectorized at r = 8) and an add over the `rows × out`
/// output, i.e. it loses once `rows · (in + out) > in · out` (187 rows for 256 × 688).
/// Decoding (a few rows) keeps the split form; training batches merge.
fn merge_pays(rows: usize, w: &Tensor) -> bool {
    let (out, inp) = match w.dims() {
        [o, i] => (*o, *i),
        _ => return false,
    };
    rows * (inp + out) >= 2 * inp * out
}

impl LoraLinear {
    /// `W + scale · B A` (`[out, in]`), a constant: gradients of `A`, `B` come from `bwd`.
    fn merged(&self, a: &Tensor, bm: &Tensor) -> Result<Tensor> {
        let ba = (bm.detach().matmul(&a.detach())? * self.scale)?;
        self.w.add(&ba)
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
        let x = rows(&cpu_tensor(s1, l1, "lora_linear")?)?;
        let (a, bm) = (
            cpu_tensor(s2, l2, "lora_linear")?,
            cpu_tensor(s3, l3, "lora_linear")?,
        );
        let y = if merge_pays(x.dim(0)?, &self.w) {
            linear2d(&x, &self.merged(&a, &bm)?, self.b.as_ref())?
        } else {
            // Scale the rank-r intermediate, not the [N, out] output: r ≪ out.
            let low = linear2d(&(linear2d(&x, &a, None)? * self.scale)?, &bm, None)?;
            (linear2d(&x, &self.w, self.b.as_ref())? + low)?
        };
        let (st, _) = into_cpu(y, "lora_linear")?;
        Ok((st, Shape::from(out_shape(l1.dims(), self.w.dim(0)?))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x2, g2) = (rows(x)?, rows(g)?);
        let gb = (g2.matmul(bm)? * self.scale)?; // [N, r]
        // The layer input is a constant for the first layers of a LoRA model: skip its GEMM.
        let dx = grad_for(x, || {
            if merge_pays(g2.dim(0)?, &self.w) {
                g2.matmul(&self.merged(a, bm)?)?.reshape(x.shape())
            } else {
                (g2.matmul(&self.w)? + gb.matmul(a)?)?.reshape(x.shape())
            }
        })?;
        let da = grad_for(a, || gb.t()?.matmul(&x2))?; // [r, in]
        let db = grad_for(bm, || {
            let xa = (x2.matmul(&a.t()?)? * self.scale)?; // [N, r]
            g2.t()?.matmul(&xa) // [out, r]
        })?;
        Ok((dx, da, db))
    }
}
