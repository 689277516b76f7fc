//! candle `CustomOp`s that run the custom kernels on CUDA tensors (feature `cuda-candle`).
//!
//! [`attention`] and [`lora_linear`] are what `ops::attention` / `ops::lora_linear` call
//! first: they return `None` for anything the kernels do not cover (not a CUDA tensor,
//! another dtype or head dim), and the caller goes on to its CPU kernels or the reference.
//! On the CPU each op delegates to the fused CPU op it mirrors (`ops::attention`,
//! `ops::lora`), so the reference semantics are one and the same.
//!
//! Backward on CUDA: attention's three gradients come from one kernel op writing
//! `[dq | dk | dv]` into one buffer, split afterwards by views; LoRA's `dA`, `dB` come from
//! the kernels, `dx = g W + (s g B) A` from candle's matmul (cuBLAS).
//!
//! Each op writes its kernel call once, generic in the element type ([`TypedOp3`]);
//! [`dispatch`] picks the type from the operands' dtype and sets up the stream and kernels.
//! The two forward ops share one `CustomOp3` impl ([`Kernel`], CPU op on the CPU, kernels
//! on CUDA), and so do the backward helpers, which exist on CUDA only ([`CudaOnly`]).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{
    CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, StorageRef, Tensor, bail,
};
use half::{bf16, f16};

use super::launch::{self, Attn, AttnKernel, Elem, Lora};
use super::{CudaError, Kernels, kernels};
use crate::ops::{attention as cpu_attention, lora as cpu_lora};

fn err(e: CudaError) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

fn driver(e: super::cudarc::driver::DriverError) -> candle_core::Error {
    err(CudaError::Driver(e))
}

/// The elements of a contiguous CUDA tensor, and whether they start at an even offset
/// (16-bit tensor-core kernels load element pairs as 32-bit words).
fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<(CudaView<'a, T>, bool)> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: CUDA kernel needs a contiguous input")
    };
    Ok((s.as_cuda_slice::<T>()?.slice(a..b), a % 2 == 0))
}

/// A view of a tensor captured by an op (a mask, `W`, an output gradient), which must live
/// on the CUDA device; `guard` is the tensor's `storage_and_layout()`.
fn captured<'g, T: CudaDType>(
    guard: &'g (StorageRef<'_>, &Layout),
    what: &str,
) -> Result<(CudaView<'g, T>, bool)> {
    match &*guard.0 {
        Storage::Cuda(cs) => view::<T>(cs, guard.1, what),
        _ => bail!("{what} must be on the CUDA device"),
    }
}

fn supported(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16 | DType::F16)
}

/// The three operands of a `CustomOp3`, on CUDA.
type Operands<'s> = [(&'s CudaStorage, &'s Layout); 3];

/// Where a kernel op runs: the operands' device, its stream and the compiled kernels.
struct Cx {
    dev: CudaDevice,
    st: Arc<CudaStream>,
    kern: Arc<Kernels>,
}

impl Cx {
    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.st.alloc_zeros::<T>(n).map_err(driver)
    }

    fn wrap<T: CudaDType>(&self, out: CudaSlice<T>, shape: Shape) -> (CudaStorage, Shape) {
        (CudaStorage::wrap_cuda_slice(out, self.dev.clone()), shape)
    }
}

/// An op over three CUDA tensors whose kernels are generic in the element type.
trait TypedOp3 {
    /// The op's name, for candle and in errors.
    const NAME: &'static str;

    /// Runs the kernels for element type `T` (the dtype of every operand).
    fn run<T: Elem + CudaDType>(&self, cx: &Cx, ops: Operands<'_>) -> Result<(CudaStorage, Shape)>;
}

/// `cuda_fwd` of every op: `op.run::<T>` for the operands' dtype.
fn dispatch<O: TypedOp3>(
    op: &O,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dt = s1.dtype();
    if !supported(dt) {
        bail!("{}: no kernel for {dt:?}", O::NAME)
    }
    let dev = s1.device().clone();
    let st = dev.cuda_stream();
    let kern = kernels(&st).map_err(err)?;
    let cx = Cx { dev, st, kern };
    let ops = [(s1, l1), (s2, l2), (s3, l3)];
    match dt {
        DType::F32 => op.run::<f32>(&cx, ops),
        DType::BF16 => op.run::<bf16>(&cx, ops),
        DType::F16 => op.run::<f16>(&cx, ops),
        _ => bail!("{}: no kernel for {dt:?}", O::NAME),
    }
}

/// Gradients of the three operands (`None` where not tracked).
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A kernel op with a fused CPU op of the same semantics.
trait WithCpuOp: TypedOp3 {
    type Cpu: CustomOp3;

    /// The CPU op, for first and second operands of these dims.
    fn cpu_op_for(&self, d1: &[usize], d2: &[usize]) -> Result<Self::Cpu>;

    /// The gradients on CUDA, from the output gradient `g`.
    fn cuda_bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, g: &Tensor) -> Result<Grads3>;
}

/// A forward op: on the CPU, forward and backward are the fused CPU op's; on CUDA, the
/// kernels' ([`TypedOp3`], [`WithCpuOp::cuda_bwd`]).
struct Kernel<O>(O);

impl<O: WithCpuOp + Send + Sync> CustomOp3 for Kernel<O> {
    fn name(&self) -> &'static str {
        O::NAME
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
        self.0
            .cpu_op_for(l1.dims(), l2.dims())?
            .cpu_fwd(s1, l1, s2, l2, s3, l3)
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        dispatch(&self.0, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, res: &Tensor, g: &Tensor) -> Result<Grads3> {
        if a.device().is_cuda() {
            self.0.cuda_bwd(a, b, c, g)
        } else {
            self.0.cpu_op_for(a.dims(), b.dims())?.bwd(a, b, c, res, g)
        }
    }
}

/// An op that exists on CUDA only: a backward helper, whose CPU counterpart is the backward
/// of the fused CPU op.
struct CudaOnly<O>(O);

impl<O: TypedOp3 + Send + Sync> CustomOp3 for CudaOnly<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!(
            "{} runs on CUDA only (the CPU backward is the fused CPU op's)",
            O::NAME
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        dispatch(&self.0, s1, l1, s2, l2, s3, l3)
    }
}

// ------------------------------------------------------------------ attention

/// Attention on CUDA through the custom kernels, or `None` when they do not apply.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !q.device().is_cuda() || !supported(q.dtype()) {
        return Ok(None);
    }
    let (b, hq, s, d) = q.dims4()?;
    let (kb, hkv, t, kd) = k.dims4()?;
    let same = k.dtype() == q.dtype() && v.dtype() == q.dtype() && v.dims() == k.dims();
    if !same || kb != b || kd != d || !launch::HEAD_DIMS.contains(&d) || s == 0 || t == 0 {
        return Ok(None);
    }
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) => {
            let per_head = m.rank() == 4 && hq > 1 && m.dim(1)? == hq;
            let mh = if per_head { hq } else { 1 };
            let t = m
                .detach()
                .to_dtype(DType::F32)?
                .broadcast_as((b, mh, s, t))?
                .contiguous()?;
            Some((t, mh))
        }
    };
    let op = CudaAttention {
        scale: scale as f32,
        mask,
        causal: false,
        range: None,
        kernel: AttnKernel::Auto,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Kernel(op))
        .map(Some)
}

/// Masks for [`attention_masked`]; all optional and combinable.
#[derive(Clone, Default)]
pub struct AttnMask {
    /// Query `i` sees keys `j <= i + (t - s)`.
    pub causal: bool,
    /// `[b, 2]` u32: per batch, the `[start, end)` of visible keys (padding).
    pub key_range: Option<Tensor>,
    /// Additive mask broadcastable to `[b, 1, s, t]` or `[b, hq, s, t]`.
    pub dense: Option<Tensor>,
}

/// Attention with structural masks, differentiable, on CPU (through the fused CPU op, with
/// the masks written out densely) or CUDA (the kernels; causal and key-range masks cost no
/// memory traffic there and fully hidden tiles are skipped). Head dims 64 and 128 on CUDA.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
    kernel: AttnKernel,
) -> Result<Tensor> {
    let (b, hq, s, _) = q.dims4()?;
    let t = k.dim(2)?;
    let dense = match &mask.dense {
        None => None,
        Some(m) => {
            let per_head = m.rank() == 4 && hq > 1 && m.dim(1)? == hq;
            let mh = if per_head { hq } else { 1 };
            let m = m
                .detach()
                .to_dtype(DType::F32)?
                .broadcast_as((b, mh, s, t))?;
            Some((m.contiguous()?, mh))
        }
    };
    let range = match &mask.key_range {
        None => None,
        Some(r) => Some(r.to_dtype(DType::U32)?.reshape((b, 2))?.contiguous()?),
    };
    let op = CudaAttention {
        scale: scale as f32,
        mask: dense,
        causal: mask.causal,
        range,
        kernel,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Kernel(op))
}

struct CudaAttention {
    scale: f32,
    /// Dense additive mask `[b, heads, s, t]` (f32, contiguous) and its head count.
    mask: Option<(Tensor, usize)>,
    causal: bool,
    /// `[b, 2]` u32 key ranges.
    range: Option<Tensor>,
    kernel: AttnKernel,
}

impl CudaAttention {
    /// The fused CPU op with the same semantics, for `q: [b, _, s, _]`, `t` keys; causal
    /// and key-range masks are written out as `f32::MIN` entries of a dense mask.
    fn cpu_op(&self, b: usize, s: usize, t: usize) -> Result<cpu_attention::Attention> {
        let mh = self.mask.as_ref().map_or(1, |m| m.1);
        let mut data = match &self.mask {
            Some((m, _)) => Some(m.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        if self.causal || self.range.is_some() {
            let ranges = match &self.range {
                Some(r) => Some(r.flatten_all()?.to_vec1::<u32>()?),
                None => None,
            };
            let d = data.get_or_insert_with(|| vec![0f32; b * mh * s * t]);
            for (row, chunk) in d.chunks_mut(t).enumerate() {
                let (i, bi) = (row % s, row / (s * mh));
                for (j, x) in chunk.iter_mut().enumerate() {
                    let causal = self.causal && j + s > i + t;
                    let outside = ranges
                        .as_ref()
                        .is_some_and(|r| j < r[2 * bi] as usize || j >= r[2 * bi + 1] as usize);
                    if causal || outside {
                        *x = f32::MIN;
                    }
                }
            }
        }
        Ok(cpu_attention::Attention {
            scale: self.scale,
            mask: data.map(|data| cpu_attention::Mask {
                data,
                per_head: mh > 1,
            }),
        })
    }

    /// Runs `f` with the problem description over the three storages.
    fn with_problem<T: Elem + CudaDType, R>(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: Operands<'_>,
        f: impl FnOnce(&Attn<'_, T>, AttnKernel) -> Result<R>,
    ) -> Result<R> {
        let (q, e1) = view::<T>(s1, l1, "attention")?;
        let (k, e2) = view::<T>(s2, l2, "attention")?;
        let (v, e3) = view::<T>(s3, l3, "attention")?;
        let (&[b, hq, s, d], &[_, hkv, t, _]) = (l1.dims(), l2.dims()) else {
            bail!(
                "attention: q {:?} and k {:?} must be rank 4",
                l1.dims(),
                l2.dims()
            )
        };
        let guard = self
            .mask
            .as_ref()
            .map(|(m, mh)| (m.storage_and_layout(), *mh));
        let mask = match &guard {
            None => None,
            Some((g, mh)) => Some((captured::<f32>(g, "attention mask")?.0, *mh)),
        };
        let rguard = self.range.as_ref().map(|r| r.storage_and_layout());
        let range = match &rguard {
            None => None,
            Some(g) => Some(captured::<u32>(g, "attention key range")?.0),
        };
        let a = Attn {
            q,
            k,
            v,
            b,
            hq,
            hkv,
            s,
            t,
            d,
            kv_batch_stride: hkv * t * d,
            kv_head_stride: t * d,
            scale: self.scale,
            causal: self.causal,
            range,
            mask,
        };
        let which = if e1 && e2 && e3 {
            self.kernel
        } else {
            AttnKernel::Simt
        };
        f(&a, which)
    }
}

impl TypedOp3 for CudaAttention {
    const NAME: &'static str = "cuda-attention";

    fn run<T: Elem + CudaDType>(&self, cx: &Cx, ops: Operands<'_>) -> Result<(CudaStorage, Shape)> {
        let shape = ops[0].1.shape().clone();
        let mut out = cx.zeros::<T>(shape.elem_count())?;
        self.with_problem::<T, _>(ops, |a, which| {
            launch::attention_fwd(&cx.kern, &cx.st, a, &mut out, None, which).map_err(err)
        })?;
        Ok(cx.wrap(out, shape))
    }
}

impl WithCpuOp for CudaAttention {
    type Cpu = cpu_attention::Attention;

    fn cpu_op_for(&self, q: &[usize], k: &[usize]) -> Result<Self::Cpu> {
        if q.len() != 4 || k.len() != 4 {
            bail!("attention: q {q:?} and k {k:?} must be rank 4")
        }
        self.cpu_op(q[0], q[2], k[2])
    }

    fn cuda_bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Result<Grads3> {
        let op = CudaOnly(AttentionGrad {
            fwd: CudaAttention {
                scale: self.scale,
                mask: self.mask.clone(),
                causal: self.causal,
                range: self.range.clone(),
                kernel: self.kernel,
            },
            g: g.contiguous()?.detach(),
        });
        let packed = q.apply_op3_no_bwd(k, v, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |o: usize, n: usize, t: &Tensor| -> Result<Option<Tensor>> {
            if t.track_op() {
                packed.narrow(0, o, n)?.reshape(t.shape()).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok((part(0, nq, q)?, part(nq, nk, k)?, part(nq + nk, nk, v)?))
    }
}

/// `[dq | dk | dv]` flattened into one tensor, from the output gradient `g`.
struct AttentionGrad {
    fwd: CudaAttention,
    g: Tensor,
}

impl TypedOp3 for AttentionGrad {
    const NAME: &'static str = "cuda-attention-grad";

    fn run<T: Elem + CudaDType>(&self, cx: &Cx, ops: Operands<'_>) -> Result<(CudaStorage, Shape)> {
        let (nq, nk) = (ops[0].1.shape().elem_count(), ops[1].1.shape().elem_count());
        let mut packed = cx.zeros::<T>(nq + 2 * nk)?;
        let gg = self.g.storage_and_layout();
        let (go, _) = captured::<T>(&gg, "cuda-attention backward: the output gradient")?;
        {
            let (mut dq, mut rest) = packed.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            self.fwd.with_problem::<T, _>(ops, |a, which| {
                launch::attention_bwd(&cx.kern, &cx.st, a, &go, &mut dq, &mut dk, &mut dv, which)
                    .map_err(err)
            })?;
        }
        Ok(cx.wrap(packed, Shape::from(nq + 2 * nk)))
    }
}

// ------------------------------------------------------------------ LoRA linear

/// LoRA linear on CUDA through the custom kernels, or `None` when they do not apply.
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    a: &Tensor,
    bm: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    let dt = x.dtype();
    let all = [Some(w), b, Some(a), Some(bm)];
    let same = all
        .iter()
        .flatten()
        .all(|t| t.dtype() == dt && t.device().same_device(x.device()));
    let frozen = !w.track_op() && b.is_none_or(|b| !b.track_op());
    if !x.device().is_cuda() || !supported(dt) || !same || !frozen || w.rank() != 2 {
        return Ok(None);
    }
    let op = CudaLora {
        w: w.contiguous()?.detach(),
        b: b.map(|b| b.contiguous().map(|b| b.detach())).transpose()?,
        scale,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &bm.contiguous()?, Kernel(op))
        .map(Some)
}

struct CudaLora {
    w: Tensor,
    b: Option<Tensor>,
    scale: f64,
}

impl CudaLora {
    fn cpu_op(&self) -> cpu_lora::LoraLinear {
        cpu_lora::LoraLinear {
            w: self.w.clone(),
            b: self.b.clone(),
            scale: self.scale,
        }
    }

    /// Runs `f` with the operands over the storages of `x`, `A`, `B` (and the captured
    /// `W`, bias).
    fn with_operands<T: Elem + CudaDType, R>(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: Operands<'_>,
        f: impl FnOnce(&Lora<'_, T>) -> Result<R>,
    ) -> Result<R> {
        let (x, ex) = view::<T>(s1, l1, "lora_linear")?;
        let (a, ea) = view::<T>(s2, l2, "lora_linear")?;
        let (bm, eb) = view::<T>(s3, l3, "lora_linear")?;
        let wguard = self.w.storage_and_layout();
        let wl = wguard.1;
        let (w, ew) = captured::<T>(&wguard, "lora_linear weight")?;
        let bguard = self.b.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bguard {
            None => None,
            Some(g) => Some(captured::<T>(g, "lora_linear bias")?),
        };
        let bias_even = bias.as_ref().is_none_or(|b| b.1);
        let bias = bias.map(|b| b.0);
        let (n, k) = (wl.dims()[0], wl.dims()[1]);
        let r = l2.dims().first().copied().unwrap_or(0);
        let xk = l1.dims().last().copied().unwrap_or(0);
        if xk != k || l2.dims() != [r, k] || l3.dims() != [n, r] {
            bail!(
                "lora_linear: x {:?}, W [{n}, {k}], A {:?}, B {:?} do not chain",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let l = Lora {
            x,
            w,
            bias,
            a,
            bm,
            m: l1.shape().elem_count() / k.max(1),
            k,
            n,
            r,
            scale: self.scale as f32,
            aligned: ex && ea && eb && ew && bias_even,
        };
        f(&l)
    }
}

impl TypedOp3 for CudaLora {
    const NAME: &'static str = "cuda-lora-linear";

    fn run<T: Elem + CudaDType>(&self, cx: &Cx, ops: Operands<'_>) -> Result<(CudaStorage, Shape)> {
        let mut dims = ops[0].1.dims().to_vec();
        let n = self.w.dim(0)?;
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let shape = Shape::from(dims);
        let mut y = cx.zeros::<T>(shape.elem_count())?;
        self.with_operands::<T, _>(ops, |l| {
            launch::lora_fwd(&cx.kern, &cx.st, l, &mut y.slice_mut(..)).map_err(err)
        })?;
        Ok(cx.wrap(y, shape))
    }
}

impl WithCpuOp for CudaLora {
    type Cpu = cpu_lora::LoraLinear;

    fn cpu_op_for(&self, _: &[usize], _: &[usize]) -> Result<Self::Cpu> {
        Ok(self.cpu_op())
    }

    fn cuda_bwd(&self, x: &Tensor, a: &Tensor, bm: &Tensor, g: &Tensor) -> Result<Grads3> {
        let k = self.w.dim(1)?;
        let (x2, g2) = (
            x.reshape(((), k))?,
            g.contiguous()?.reshape(((), self.w.dim(0)?))?,
        );
        let dx = if x.track_op() {
            let gb = (g2.matmul(bm)? * self.scale)?;
            Some((g2.matmul(&self.w)? + gb.matmul(a)?)?.reshape(x.shape())?)
        } else {
            None
        };
        let op = CudaOnly(LoraGradAb {
            fwd: CudaLora {
                w: self.w.clone(),
                b: self.b.clone(),
                scale: self.scale,
            },
            g: g2,
        });
        let packed = x2.apply_op3_no_bwd(a, bm, &op)?;
        let (na, nb) = (a.elem_count(), bm.elem_count());
        let da = a
            .track_op()
            .then(|| packed.narrow(0, 0, na)?.reshape(a.shape()))
            .transpose()?;
        let db = bm
            .track_op()
            .then(|| packed.narrow(0, na, nb)?.reshape(bm.shape()))
            .transpose()?;
        Ok((dx, da, db))
    }
}

/// `[dA | dB]` flattened into one tensor, from the output gradient `g: [m, n]`.
struct LoraGradAb {
    fwd: CudaLora,
    g: Tensor,
}

impl TypedOp3 for LoraGradAb {
    const NAME: &'static str = "cuda-lora-grad-ab";

    fn run<T: Elem + CudaDType>(&self, cx: &Cx, ops: Operands<'_>) -> Result<(CudaStorage, Shape)> {
        let (na, nb) = (ops[1].1.shape().elem_count(), ops[2].1.shape().elem_count());
        let mut packed = cx.zeros::<T>(na + nb)?;
        let gg = self.g.storage_and_layout();
        let (g, _) = captured::<T>(&gg, "cuda-lora-linear backward: the output gradient")?;
        {
            let (mut da, mut db) = packed.split_at_mut(na);
            self.fwd.with_operands::<T, _>(ops, |l| {
                launch::lora_bwd_ab(&cx.kern, &cx.st, l, &g, &mut da, &mut db).map_err(err)
            })?;
        }
        Ok(cx.wrap(packed, Shape::from(na + nb)))
    }
}
