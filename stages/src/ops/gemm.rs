//! Matrix products on f32 slices through the `gemm` crate (candle's own CPU matmul
//! backend, with its run-time-selected AVX-512/FMA microkernels), and the linear-layer and
//! LoRA products built on it.
//!
//! Calling `gemm` directly, rather than through candle tensors, lets a kernel write into a
//! buffer it already has (a strided view, the output of a fused op, an accumulator), so a
//! linear layer costs one pass over its output instead of candle's zero-fill, product,
//! copy out of the op and bias add. All calls are single-threaded
//! (`Parallelism::None`): the callers run one thread (see `configure_cpu_runtime`) or
//! parallelize over heads/batches themselves, and a given shape always takes the same code
//! path, so results are deterministic.

/// A read-only matrix operand: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major with `cols` columns.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub(crate) fn t(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: cols,
        }
    }
}

/// Whether every index `(i, j)`, `i < rows`, `j < cols` lies inside a slice of `len`.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst[m, n] = (acc ? dst : 0) + beta · lhs[m, k] · rhs[k, n]`; `dst` row-major with row
/// stride `drs`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    drs: usize,
    acc: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(fits(dst.len(), m, n, drs, 1), "gemm: dst too short");
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[i * drs..i * drs + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: `dst` covers every index the strides reach (asserted) and, being a distinct
    // mutable borrow, cannot alias the operands.
    unsafe { raw((m, n, k), dst.as_mut_ptr(), drs, acc, lhs, rhs, beta) }
}

/// A new row-major `[m, n]` matrix `beta · lhs · rhs`, written by gemm straight into fresh
/// memory (no zero-fill first: gemm writes every element and, with `read_dst` off, reads
/// none).
pub(crate) fn mm_new(
    (m, n, k): (usize, usize, usize),
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    beta: f32,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        return vec![0f32; m * n];
    }
    let mut v = Vec::with_capacity(m * n);
    // SAFETY: the buffer holds m·n floats with row stride n, which gemm writes in full
    // through the raw pointer (no reference to uninitialized memory is formed); only then
    // does `set_len` make them part of the vector.
    unsafe {
        raw((m, n, k), v.as_mut_ptr(), n, false, lhs, rhs, beta);
        v.set_len(m * n);
    }
    v
}

/// The gemm call behind [`mm`] and [`mm_new`].
///
/// # Safety
/// `dst` must be valid for writes (and reads when `acc`) at `i · drs + j` for every
/// `i < m`, `j < n`, and must not overlap the operands; `m, n, k > 0`.
#[allow(clippy::too_many_arguments)]
unsafe fn raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    drs: usize,
    acc: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    beta: f32,
) {
    assert!(
        fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs),
        "gemm: operand too short"
    );
    // SAFETY: the operands cover every index their strides reach (asserted); the caller
    // vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            drs as isize,
            acc,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Rows up to which [`xwt`] computes `(W xᵀ)ᵀ` instead of `x Wᵀ`: for few rows (decoding,
/// one per sequence) gemm is about 2x faster with the contiguous `W` as the left operand
/// (docs/model-bench.md); the transposed result is copied out, `rows × out` floats.
pub(crate) const SMALL_ROWS: usize = 64;

/// `y[n, out] (+)= x[n, in] · Wᵀ` for row-major `x` and `W[out, in]`; `y` has row stride
/// `out`. With `acc` the product is added to `y`.
pub(crate) fn xwt(x: &[f32], n: usize, w: &[f32], out: usize, y: &mut [f32], acc: bool) {
    let inp = if out == 0 { 0 } else { w.len() / out };
    if n <= SMALL_ROWS && n > 0 {
        let yt = mm_new((out, n, inp), Mat::rows(w, inp), Mat::t(x, inp), 1.0);
        transpose_into(&yt, n, &mut y[..n * out], acc);
    } else {
        mm(
            (n, out, inp),
            y,
            out,
            acc,
            Mat::rows(x, inp),
            Mat::t(w, inp),
            1.0,
        );
    }
}

/// `y (+)= ytᵀ` for `yt: [out, n]`, `y: [n, out]`.
fn transpose_into(yt: &[f32], n: usize, y: &mut [f32], acc: bool) {
    let out = y.len() / n.max(1);
    for (i, row) in y.chunks_exact_mut(out).enumerate() {
        for (j, o) in row.iter_mut().enumerate() {
            let v = yt[j * n + i];
            *o = if acc { *o + v } else { v };
        }
    }
}

/// A new `[n, out]` matrix `x Wᵀ` (see [`xwt`]).
pub(crate) fn xwt_new(x: &[f32], n: usize, w: &[f32], out: usize) -> Vec<f32> {
    let inp = if out == 0 { 0 } else { w.len() / out };
    if n <= SMALL_ROWS && n > 0 {
        let yt = mm_new((out, n, inp), Mat::rows(w, inp), Mat::t(x, inp), 1.0);
        let mut y = vec![0f32; n * out];
        transpose_into(&yt, n, &mut y, false);
        y
    } else {
        mm_new((n, out, inp), Mat::rows(x, inp), Mat::t(w, inp), 1.0)
    }
}

/// A new `[n, in]` matrix `g W` (see [`xw`]).
pub(crate) fn xw_new(g: &[f32], n: usize, w: &[f32], out: usize) -> Vec<f32> {
    let inp = if out == 0 { 0 } else { w.len() / out };
    mm_new((n, inp, out), Mat::rows(g, out), Mat::rows(w, inp), 1.0)
}

/// `y[n, in] (+)= g[n, out] · W` for `W[out, in]` (the input gradient of `x Wᵀ`).
pub(crate) fn xw(g: &[f32], n: usize, w: &[f32], out: usize, y: &mut [f32], acc: bool) {
    let inp = if out == 0 { 0 } else { w.len() / out };
    mm(
        (n, inp, out),
        y,
        inp,
        acc,
        Mat::rows(g, out),
        Mat::rows(w, inp),
        1.0,
    );
}

/// One LoRA pair on a linear layer `W[out, in]`: `A[r, in]`, `B[out, r]`, and the scale.
#[derive(Clone, Copy)]
pub(crate) struct Lora<'a> {
    pub(crate) a: &'a [f32],
    pub(crate) b: &'a [f32],
    pub(crate) r: usize,
    pub(crate) scale: f32,
}

/// `W + Σ scale · B A` over the pairs, added in order.
pub(crate) fn merged(w: &[f32], out: usize, loras: &[Lora<'_>]) -> Vec<f32> {
    let inp = if out == 0 { 0 } else { w.len() / out };
    let mut m = w.to_vec();
    for l in loras {
        mm(
            (out, inp, l.r),
            &mut m,
            inp,
            true,
            Mat::rows(l.b, l.r),
            Mat::rows(l.a, inp),
            l.scale,
        );
    }
    m
}

/// Whether `x (W + s·B A)ᵀ` beats `x Wᵀ + s·(x Aᵀ) Bᵀ` for `rows` rows: merging costs one
/// `[out, r] × [r, in]` product and an `out × in` pass; the split form pays two skinny
/// rank-`r` GEMMs (poorly vectorized at r = 8) and a pass over the `rows × out` output.
/// Decoding (a few rows) keeps the split form; training batches merge.
pub(crate) fn merge_pays(rows: usize, out: usize, inp: usize) -> bool {
    rows * (inp + out) >= 2 * inp * out
}

/// `y[n, out] += scale · (x Aᵀ) Bᵀ`.
pub(crate) fn lora_add(x: &[f32], n: usize, out: usize, l: &Lora<'_>, y: &mut [f32]) {
    let inp = if l.r == 0 { 0 } else { l.a.len() / l.r };
    let xa = mm_new((n, l.r, inp), Mat::rows(x, inp), Mat::t(l.a, inp), l.scale);
    mm(
        (n, out, l.r),
        y,
        out,
        true,
        Mat::rows(&xa, l.r),
        Mat::t(l.b, l.r),
        1.0,
    );
}

/// `dx[n, in] += scale · (g B) A`: the input gradient through the LoRA branch (split
/// form).
pub(crate) fn lora_dx(g: &[f32], n: usize, out: usize, l: &Lora<'_>, dx: &mut [f32]) {
    let inp = if l.r == 0 { 0 } else { l.a.len() / l.r };
    let gb = mm_new(
        (n, l.r, out),
        Mat::rows(g, out),
        Mat::rows(l.b, l.r),
        l.scale,
    );
    mm(
        (n, inp, l.r),
        dx,
        inp,
        true,
        Mat::rows(&gb, l.r),
        Mat::rows(l.a, inp),
        1.0,
    );
}

/// Gradients of the LoRA factors of `y = x Wᵀ + s (x Aᵀ) Bᵀ` given `g = ∂L/∂y`:
/// `dA = s (g B)ᵀ x` (`[r, in]`) and `dB = s gᵀ (x Aᵀ)` (`[out, r]`).
pub(crate) fn lora_grads(
    x: &[f32],
    g: &[f32],
    n: usize,
    out: usize,
    l: &Lora<'_>,
) -> (Vec<f32>, Vec<f32>) {
    let (r, inp) = (l.r, if l.r == 0 { 0 } else { l.a.len() / l.r });
    let gb = mm_new((n, r, out), Mat::rows(g, out), Mat::rows(l.b, r), 1.0);
    // dAᵀ = s xᵀ (g B), then transposed: gemm runs a product with r (= 8) rows on its
    // 16-row microkernel at half width, one with `in` rows at full width.
    let dat = mm_new((inp, r, n), Mat::t(x, inp), Mat::rows(&gb, r), l.scale);
    let da = (0..r * inp).map(|e| dat[(e % inp) * r + e / inp]).collect();
    let xa = mm_new((n, r, inp), Mat::rows(x, inp), Mat::t(l.a, inp), 1.0);
    let db = mm_new((out, r, n), Mat::t(g, out), Mat::rows(&xa, r), l.scale);
    (da, db)
}
