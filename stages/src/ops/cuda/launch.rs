//! Typed launchers for the kernels of `stages/kernels/`, over cudarc device memory.
//!
//! Layouts are the kernels' (see their file headers): attention `q: [b, hq, s, d]`
//! contiguous, `k, v: [b, hkv, t, d]` with contiguous `[t, d]` blocks at the given strides;
//! LoRA operands as [`Mat`]s (any strides). 16-bit tensor-core kernels read element pairs
//! as 32-bit words, so their views must start at even element offsets (the candle glue
//! guarantees it). Launch parameters are `#[repr(C)]` mirrors of the kernels' structs.

use std::sync::Arc;

use super::cudarc::driver::{
    CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use super::{CudaError, Kernels, Result};

/// An element type the kernels are instantiated for.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + 'static {
    /// The suffix of the kernel names.
    const NAME: &'static str;
    /// Whether tensor-core (mma.sync) kernels exist for it.
    const MMA: bool;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const MMA: bool = false;
}
impl Elem for half::bf16 {
    const NAME: &'static str = "bf16";
    const MMA: bool = true;
}
impl Elem for half::f16 {
    const NAME: &'static str = "f16";
    const MMA: bool = true;
}

/// Head dims the attention kernels are instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Mirror of `AttnParams` in attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct AttnParams {
    kv_batch_stride: i64,
    kv_head_stride: i64,
    b: i32,
    hq: i32,
    hkv: i32,
    s: i32,
    t: i32,
    scale: f32,
    causal: i32,
    has_range: i32,
    has_mask: i32,
    mask_heads: i32,
}
// SAFETY: plain `#[repr(C)]` data laid out as the kernel's struct.
unsafe impl DeviceRepr for AttnParams {}

/// Mirror of `GemmParams` in lora.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct GemmParams {
    sa1m: i64,
    sa1k: i64,
    sb1k: i64,
    sb1n: i64,
    sa2m: i64,
    sa2k: i64,
    sb2k: i64,
    sb2n: i64,
    m: i32,
    n: i32,
    k1: i32,
    k2: i32,
    alpha1: f32,
    alpha2: f32,
    has_bias: i32,
    pad: i32,
}
// SAFETY: plain `#[repr(C)]` data laid out as the kernel's struct.
unsafe impl DeviceRepr for GemmParams {}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::Unsupported(format!("{what} = {v} exceeds i32")))
}

fn i64_of(v: usize) -> i64 {
    v as i64
}

fn blocks(n: usize, per: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per).max(1))
        .map_err(|_| CudaError::Unsupported(format!("grid of {n}/{per} blocks")))
}

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A null device pointer for optional kernel arguments.
const NULL: u64 = 0;

/// Which attention forward kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// Tensor cores for bf16/f16, SIMT for f32.
    Auto,
    /// The SIMT kernel for any dtype (exact f32 scores; the reference-quality path).
    Simt,
}

/// One attention problem: inputs, sizes and masks.
pub struct Attn<'a, T> {
    pub q: CudaView<'a, T>,
    pub k: CudaView<'a, T>,
    pub v: CudaView<'a, T>,
    pub b: usize,
    pub hq: usize,
    pub hkv: usize,
    pub s: usize,
    pub t: usize,
    pub d: usize,
    /// Element strides between batches and heads of `k` and `v`.
    pub kv_batch_stride: usize,
    pub kv_head_stride: usize,
    pub scale: f32,
    /// Query `i` sees keys `j <= i + (t - s)`.
    pub causal: bool,
    /// Per batch `[start, end)` of visible keys, `[b, 2]` (read as `int` by the kernels:
    /// values below 2³¹).
    pub range: Option<CudaView<'a, u32>>,
    /// Dense additive f32 mask `[b, heads, s, t]`, heads ∈ {1, hq}.
    pub mask: Option<(CudaView<'a, f32>, usize)>,
}

impl<T: Elem> Attn<'_, T> {
    fn params(&self) -> Result<AttnParams> {
        if !HEAD_DIMS.contains(&self.d) {
            return Err(CudaError::Unsupported(format!(
                "attention kernels cover head dims {HEAD_DIMS:?}, not {}",
                self.d
            )));
        }
        if self.hkv == 0 || !self.hq.is_multiple_of(self.hkv) || self.t == 0 {
            return Err(CudaError::Unsupported(format!(
                "attention: hq {} must be a multiple of hkv {} and t {} > 0",
                self.hq, self.hkv, self.t
            )));
        }
        let mask_heads = self.mask.as_ref().map_or(1, |m| m.1);
        if mask_heads != 1 && mask_heads != self.hq {
            return Err(CudaError::Unsupported(format!(
                "attention mask has {mask_heads} heads, expected 1 or {}",
                self.hq
            )));
        }
        Ok(AttnParams {
            kv_batch_stride: i64_of(self.kv_batch_stride),
            kv_head_stride: i64_of(self.kv_head_stride),
            b: i32_of(self.b, "batch")?,
            hq: i32_of(self.hq, "query heads")?,
            hkv: i32_of(self.hkv, "kv heads")?,
            s: i32_of(self.s, "queries")?,
            t: i32_of(self.t, "keys")?,
            scale: self.scale,
            causal: self.causal as i32,
            has_range: self.range.is_some() as i32,
            has_mask: self.mask.is_some() as i32,
            mask_heads: i32_of(mask_heads, "mask heads")?,
        })
    }
}

/// Pushes an optional input (or a null pointer).
fn push_opt<'a, 'b: 'a, U>(lb: &mut cudarc_args::Args<'a>, v: &'b Option<CudaView<'_, U>>) {
    match v {
        Some(v) => lb.arg(v),
        None => lb.arg(&NULL),
    };
}

/// Short alias for cudarc's launch builder.
mod cudarc_args {
    pub(super) type Args<'a> = super::super::cudarc::driver::LaunchArgs<'a>;
}

/// Attention forward into `out` (`[b, hq, s, d]`); with `stats`, also each row's softmax
/// max and normalizer (`[b, hq, s]` each), which the backward needs.
pub fn attention_fwd<T: Elem>(
    kern: &Kernels,
    st: &Arc<CudaStream>,
    a: &Attn<'_, T>,
    out: &mut CudaSlice<T>,
    stats: Option<(&mut CudaSlice<f32>, &mut CudaSlice<f32>)>,
    which: AttnKernel,
) -> Result<()> {
    let p = a.params()?;
    let mma = T::MMA && which == AttnKernel::Auto;
    let name = format!(
        "attn_fwd_{}_{}_d{}",
        if mma { "mma" } else { "simt" },
        T::NAME,
        a.d
    );
    let rows = if mma { 64 } else { 16 };
    let f = kern.function(&name)?;
    let mask = a.mask.as_ref().map(|m| m.0.slice(..));
    let mut lb = st.launch_builder(&f);
    lb.arg(&a.q).arg(&a.k).arg(&a.v).arg(out);
    match stats {
        Some((m, l)) => {
            lb.arg(m).arg(l);
        }
        None => {
            lb.arg(&NULL).arg(&NULL);
        }
    }
    push_opt(&mut lb, &mask);
    push_opt(&mut lb, &a.range);
    lb.arg(&p);
    let grid = (blocks(a.s, rows)?, i32_of(a.b * a.hq, "b*hq")? as u32);
    // SAFETY: argument types and order match the kernel's signature; sizes were checked
    // by `params` and the callers' allocations.
    unsafe { lb.launch(cfg(grid, 128)) }?;
    Ok(())
}

/// Attention backward: recomputes the forward's row statistics, then `dq` (`[b, hq, s,
/// d]`) and `dk`, `dv` (`[b, hkv, t, d]`, contiguous) from the output gradient `go`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<T: Elem>(
    kern: &Kernels,
    st: &Arc<CudaStream>,
    a: &Attn<'_, T>,
    go: &CudaView<'_, T>,
    dq: &mut CudaViewMut<'_, T>,
    dk: &mut CudaViewMut<'_, T>,
    dv: &mut CudaViewMut<'_, T>,
    which: AttnKernel,
) -> Result<()> {
    let p = a.params()?;
    let rows = a.b * a.hq * a.s;
    let mut o = st.alloc_zeros::<T>(rows * a.d)?;
    let mut m = st.alloc_zeros::<f32>(rows.max(1))?;
    let mut l = st.alloc_zeros::<f32>(rows.max(1))?;
    let mut delta = st.alloc_zeros::<f32>(rows.max(1))?;
    attention_fwd(kern, st, a, &mut o, Some((&mut m, &mut l)), which)?;

    let f = kern.function(&format!("attn_bwd_delta_{}_d{}", T::NAME, a.d))?;
    let n = i32_of(rows, "rows")?;
    let mut lb = st.launch_builder(&f);
    lb.arg(&o).arg(go).arg(&mut delta).arg(&n);
    // SAFETY: matches attn_bwd_delta's signature; all buffers hold `rows` rows.
    unsafe { lb.launch(cfg((blocks(rows, 8)?, 1), 256)) }?;

    let mask = a.mask.as_ref().map(|m| m.0.slice(..));
    let f = kern.function(&format!("attn_bwd_dkdv_{}_d{}", T::NAME, a.d))?;
    let mut lb = st.launch_builder(&f);
    lb.arg(&a.q).arg(&a.k).arg(&a.v).arg(go);
    lb.arg(&m).arg(&l).arg(&delta).arg(dk).arg(dv);
    push_opt(&mut lb, &mask);
    push_opt(&mut lb, &a.range);
    lb.arg(&p);
    let grid = (blocks(a.t, 8)?, i32_of(a.b * a.hkv, "b*hkv")? as u32);
    // SAFETY: matches attn_bwd_dkdv's signature.
    unsafe { lb.launch(cfg(grid, 256)) }?;

    let f = kern.function(&format!("attn_bwd_dq_{}_d{}", T::NAME, a.d))?;
    let mut lb = st.launch_builder(&f);
    lb.arg(&a.q).arg(&a.k).arg(&a.v).arg(go);
    lb.arg(&m).arg(&l).arg(&delta).arg(dq);
    push_opt(&mut lb, &mask);
    push_opt(&mut lb, &a.range);
    lb.arg(&p);
    let grid = (blocks(a.s, 8)?, i32_of(a.b * a.hq, "b*hq")? as u32);
    // SAFETY: matches attn_bwd_dq's signature.
    unsafe { lb.launch(cfg(grid, 256)) }?;
    Ok(())
}

/// A matrix operand: `rows × cols` at element strides `(rs, cs)` in `data`.
pub struct Mat<'a, T> {
    pub data: CudaView<'a, T>,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: CudaView<'a, T>, rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            data: self.data,
        }
    }
}

/// `c = alpha1 a1 b1 (+ alpha2 a2 b2) (+ bias)`, `c` a fresh row-major `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm2<T: Elem>(
    kern: &Kernels,
    st: &Arc<CudaStream>,
    a1: &Mat<'_, T>,
    b1: &Mat<'_, T>,
    alpha1: f32,
    seg2: Option<(&Mat<'_, T>, &Mat<'_, T>, f32)>,
    bias: Option<&CudaView<'_, T>>,
    c: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let (m, n) = (a1.rows, b1.cols);
    let bad = a1.cols != b1.rows
        || seg2.is_some_and(|(a2, b2, _)| a2.rows != m || b2.cols != n || a2.cols != b2.rows);
    if bad || c.len() < m * n {
        return Err(CudaError::Unsupported(format!(
            "gemm2: operand shapes do not chain ({m}x{} . {}x{n})",
            a1.cols, b1.rows
        )));
    }
    let (a2, b2, alpha2) = seg2.unwrap_or((a1, b1, 0.0));
    let p = GemmParams {
        sa1m: i64_of(a1.rs),
        sa1k: i64_of(a1.cs),
        sb1k: i64_of(b1.rs),
        sb1n: i64_of(b1.cs),
        sa2m: i64_of(a2.rs),
        sa2k: i64_of(a2.cs),
        sb2k: i64_of(b2.rs),
        sb2n: i64_of(b2.cs),
        m: i32_of(m, "m")?,
        n: i32_of(n, "n")?,
        k1: i32_of(a1.cols, "k")?,
        k2: if seg2.is_some() {
            i32_of(a2.cols, "k2")?
        } else {
            0
        },
        alpha1,
        alpha2,
        has_bias: bias.is_some() as i32,
        pad: 0,
    };
    let f = kern.function(&format!("gemm2_{}", T::NAME))?;
    let mut lb = st.launch_builder(&f);
    lb.arg(&a1.data).arg(&b1.data).arg(&a2.data).arg(&b2.data);
    match bias {
        Some(b) => lb.arg(b),
        None => lb.arg(&NULL),
    };
    lb.arg(c).arg(&p);
    // SAFETY: matches gemm2's signature; strides and sizes describe the views.
    unsafe { lb.launch(cfg((blocks(n, 64)?, blocks(m, 64)?), 256)) }?;
    Ok(())
}

/// The operands of one LoRA linear: `x: [m, k]`, `w: [n, k]`, `a: [r, k]`, `bm: [n, r]`.
pub struct Lora<'a, T> {
    pub x: CudaView<'a, T>,
    pub w: CudaView<'a, T>,
    pub bias: Option<CudaView<'a, T>>,
    pub a: CudaView<'a, T>,
    pub bm: CudaView<'a, T>,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub scale: f32,
    /// Every operand starts at an even element offset (the tensor-core kernel loads element
    /// pairs as 32-bit words).
    pub aligned: bool,
}

/// `y = x Wᵀ + b + (scale · x Aᵀ) Bᵀ` into `y: [m, n]`: one skinny GEMM for `u`, then
/// one GEMM over the concatenated K (tensor cores for bf16/f16 with even k, r and n).
pub fn lora_fwd<T: Elem>(
    kern: &Kernels,
    st: &Arc<CudaStream>,
    l: &Lora<'_, T>,
    y: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let (m, k, n, r) = (l.m, l.k, l.n, l.r);
    let x = Mat::row_major(l.x.slice(..), m, k);
    let mut u = st.alloc_zeros::<T>((m * r).max(1))?;
    let at = Mat::row_major(l.a.slice(..), r, k).t();
    gemm2(kern, st, &x, &at, l.scale, None, None, &mut u.slice_mut(..))?;
    if T::MMA && l.aligned && k % 2 == 0 && r % 2 == 0 && n % 2 == 0 {
        let f = kern.function(&format!("lora_fwd_mma_{}", T::NAME))?;
        let dims = [
            i32_of(m, "m")?,
            i32_of(n, "n")?,
            i32_of(k, "k")?,
            i32_of(r, "r")?,
        ];
        let has_bias = l.bias.is_some() as i32;
        let mut lb = st.launch_builder(&f);
        lb.arg(&l.x).arg(&l.w).arg(&u).arg(&l.bm);
        push_opt(&mut lb, &l.bias);
        lb.arg(y);
        for d in &dims {
            lb.arg(d);
        }
        lb.arg(&has_bias);
        // SAFETY: matches lora_fwd_mma's signature; shapes as documented on `Lora`.
        unsafe { lb.launch(cfg((blocks(n, 64)?, blocks(m, 64)?), 128)) }?;
        return Ok(());
    }
    let wt = Mat::row_major(l.w.slice(..), n, k).t();
    let um = Mat::row_major(u.as_view(), m, r);
    let bt = Mat::row_major(l.bm.slice(..), n, r).t();
    gemm2(
        kern,
        st,
        &x,
        &wt,
        1.0,
        Some((&um, &bt, 1.0)),
        l.bias.as_ref(),
        y,
    )
}

/// Gradients of the LoRA factors from the output gradient `g: [m, n]`:
/// `dA = (s g B)ᵀ x` (`[r, k]`) and `dB = gᵀ (s x Aᵀ)` (`[n, r]`).
pub fn lora_bwd_ab<T: Elem>(
    kern: &Kernels,
    st: &Arc<CudaStream>,
    l: &Lora<'_, T>,
    g: &CudaView<'_, T>,
    da: &mut CudaViewMut<'_, T>,
    db: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let (m, k, n, r) = (l.m, l.k, l.n, l.r);
    let gm = Mat::row_major(g.slice(..), m, n);
    let x = Mat::row_major(l.x.slice(..), m, k);
    let mut gb = st.alloc_zeros::<T>((m * r).max(1))?;
    let bmat = Mat::row_major(l.bm.slice(..), n, r);
    gemm2(
        kern,
        st,
        &gm,
        &bmat,
        l.scale,
        None,
        None,
        &mut gb.slice_mut(..),
    )?;
    let gbt = Mat::row_major(gb.as_view(), m, r).t();
    gemm2(kern, st, &gbt, &x, 1.0, None, None, da)?;
    let mut u = st.alloc_zeros::<T>((m * r).max(1))?;
    let at = Mat::row_major(l.a.slice(..), r, k).t();
    gemm2(kern, st, &x, &at, l.scale, None, None, &mut u.slice_mut(..))?;
    let um = Mat::row_major(u.as_view(), m, r);
    gemm2(kern, st, &gm.t(), &um, 1.0, None, None, db)
}
