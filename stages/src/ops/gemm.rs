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
    assert!(
        fits(lhs.data.len(), m, k, lhs.rs, lhs.cs) && fits(rhs.data.len(), k, n, rhs.rs, rhs.cs),
        "gemm: operand too short"
    );
    // SAFETY: the asserts keep every index the strides reach inside its slice, and `dst`
    // is a distinct mutable borrow, so it cannot alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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
const SMALL_ROWS: usize = 64;

/// `y[n, out] (+)= x[n, in] · Wᵀ` for row-major `x` and `W[out, in]`; `y` has row stride
/// `out`. With `acc` the product is added to `y`.
pub(crate) fn xwt(x: &[f32], n: usize, w: &[f32], out: usize, y: &mut [f32], acc: bool) {
    let inp = if out == 0 { 0 } else { w.len() / out };
    if n <= SMALL_ROWS && n > 0 {
        let mut yt = vec![0f32; out * n];
        mm(
            (out, n, inp),
            &mut yt,
            n,
            false,
            Mat::rows(w, inp),
            Mat::t(x, inp),
            1.0,
        );
        for (i, row) in y.chunks_exact_mut(out).take(n).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                let v = yt[j * n + i];
                *o = if acc { *o + v } else { v };
            }
        }
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
    let mut xa = vec![0f32; n * l.r];
    mm(
        (n, l.r, inp),
        &mut xa,
        l.r,
        false,
        Mat::rows(x, inp),
        Mat::t(l.a, inp),
        l.scale,
    );
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
    let mut gb = vec![0f32; n * l.r];
    mm(
        (n, l.r, out),
        &mut gb,
        l.r,
        false,
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
    da: &mut [f32],
    db: &mut [f32],
) {
    let (r, inp) = (l.r, if l.r == 0 { 0 } else { l.a.len() / l.r });
    let mut gb = vec![0f32; n * r];
    mm(
        (n, r, out),
        &mut gb,
        r,
        false,
        Mat::rows(g, out),
        Mat::rows(l.b, r),
        1.0,
    );
    mm(
        (r, inp, n),
        da,
        inp,
        false,
        Mat::t(&gb, r),
        Mat::rows(x, inp),
        l.scale,
    );
    let mut xa = gb;
    mm(
        (n, r, inp),
        &mut xa,
        r,
        false,
        Mat::rows(x, inp),
        Mat::t(l.a, inp),
        1.0,
    );
    mm(
        (out, r, n),
        db,
        r,
        false,
        Mat::t(g, out),
        Mat::rows(&xa, r),
        l.scale,
    );
}
