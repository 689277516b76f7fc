//! Fused scaled-dot-product attention for CPU f32, with backward, GQA and an additive mask.
//!
//! Forward, per (batch, query head) and tile of up to [`TILE`] query rows: the scores
//! `scale · Q Kᵀ` as one GEMM into a per-thread `TILE × t` scratch, the mask and an exact
//! stable softmax per row, then `P V` as a second GEMM. The probabilities of a whole head are
//! never stored: backward recomputes each tile's (flash attention's trade), so memory stays
//! `O(b·h·s·d)` like the inputs plus one tile per thread. The GEMMs are the `gemm` crate's
//! (candle's own CPU matmul backend, AVX-512/FMA microkernels, one thread per call since
//! heads are already spread over rayon): a per-row scalar dot product loop ran at a small
//! fraction of that speed (profile in docs/model-bench.md).
//!
//! Masked keys: HF fills masked scores with `f32::MIN`. Adding any finite score of
//! magnitude < 1e31 to `f32::MIN` rounds back to `f32::MIN` exactly, so a key whose mask is
//! `f32::MIN` (or `-inf`) gets the mask value itself as its score, bit-identical to adding
//! it; its probability is then exactly 0 and contributes nothing to either GEMM.
//!
//! GQA: query head `h` reads KV head `h / (hq / hkv)`. Backward parallelizes over
//! (batch, KV head) groups, so each task owns its query heads' `dq` and its `dk`, `dv`
//! exclusively: no atomics, deterministic sums for a given thread count.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::fused::{grad_for, slice, tensor, with_f32};

/// An additive mask broadcast to `[b, mh, s, t]`, `mh` ∈ {1, hq}.
pub(crate) struct Mask {
    pub(crate) data: Vec<f32>,
    pub(crate) per_head: bool,
}

pub(crate) struct Attention {
    pub(crate) scale: f32,
    pub(crate) mask: Option<Mask>,
}

#[derive(Clone, Copy)]
struct Dims {
    hq: usize,
    hkv: usize,
    s: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        match (q, k, v) {
            ([b, hq, s, d], [kb, hkv, t, kd], [vb, vh, vt, vd])
                if b == kb
                    && b == vb
                    && d == kd
                    && d == vd
                    && hkv == vh
                    && t == vt
                    && *hkv > 0
                    && hq % hkv == 0 =>
            {
                Ok(Self {
                    hq: *hq,
                    hkv: *hkv,
                    s: *s,
                    t: *t,
                    d: *d,
                })
            }
            _ => bail!(
                "attention: q {q:?} k {k:?} v {v:?} must be [b, hq, s, d] and [b, hkv, t, d] with hq a multiple of hkv"
            ),
        }
    }
}

impl Attention {
    fn mask_row(&self, dm: Dims, bi: usize, h: usize, i: usize) -> Option<&[f32]> {
        self.mask.as_ref().map(|m| {
            let mh = if m.per_head { dm.hq } else { 1 };
            let hh = if m.per_head { h } else { 0 };
            let o = ((bi * mh + hh) * dm.s + i) * dm.t;
            &m.data[o..o + dm.t]
        })
    }
}

/// Keys or values `[b, h, t, d]` for the forward: each (batch, head) block of `t × d` is
/// contiguous, but blocks may sit at any stride. That is the layout of a prefix view of
/// the preallocated KV cache (`[b, h, cap, d]` narrowed to `t` positions), which the
/// kernel thus reads without first copying it into a contiguous tensor.
struct HeadBlocks<'a> {
    data: &'a [f32],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    len: usize,
}

impl<'a> HeadBlocks<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = s else {
            bail!(
                "attention: fused kernel needs f32 input, got {:?}",
                s.dtype()
            )
        };
        if !blocks_contiguous(l) {
            bail!("attention: keys/values need contiguous [t, d] blocks per head");
        }
        let (st, dims) = (l.stride(), l.dims());
        Ok(Self {
            data,
            start: l.start_offset(),
            batch_stride: st[0],
            head_stride: st[1],
            len: dims[2] * dims[3],
        })
    }

    #[inline]
    fn block(&self, b: usize, h: usize) -> &'a [f32] {
        let o = self.start + b * self.batch_stride + h * self.head_stride;
        &self.data[o..o + self.len]
    }
}

/// Whether a rank-4 layout has a contiguous `[t, d]` block per (batch, head).
pub(crate) fn blocks_contiguous(l: &Layout) -> bool {
    match (l.dims(), l.stride()) {
        ([_, _, t, d], [_, _, st, sd]) => (*sd == 1 || *d <= 1) && (*st == *d || *t <= 1),
        _ => false,
    }
}

/// Query rows per tile: bounds the score scratch to `TILE × t` floats per thread
/// (a 2048-token prompt needs 1 MiB, not 16).
const TILE: usize = 128;

/// `dst[m, n] = (read_dst ? dst : 0) + beta · lhs[m, k] · rhs[k, n]`, all row-major with
/// explicit strides: `(rs, cs)` = (row, column) stride of each operand. One thread (the
/// caller parallelizes over heads); deterministic for given shapes.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    read_dst: bool,
    lhs: &[f32],
    (lrs, lcs): (usize, usize),
    rhs: &[f32],
    (rrs, rcs): (usize, usize),
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds: every index the strides can reach lies inside its slice.
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() > last(m, n, n, 1));
    if k > 0 {
        assert!(lhs.len() > last(m, k, lrs, lcs) && rhs.len() > last(k, n, rrs, rcs));
    }
    // SAFETY: the asserts above keep every access in bounds; `dst` does not alias the
    // inputs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl Attention {
    /// Softmax probabilities of the query rows `q` (`[rows, d]`, starting at query row `i0`
    /// of head `h`) against keys `k` (`[t, d]`) into `p` (`[rows, t]`): one GEMM for the
    /// scores, then the mask and an exact stable softmax per row. A masked key's score is
    /// set to the mask value itself (see the module docs: identical to adding it).
    fn probs_tile(
        &self,
        q: &[f32],
        k: &[f32],
        dm: Dims,
        (bi, h, i0): (usize, usize, usize),
        p: &mut [f32],
    ) {
        let (t, d) = (dm.t, dm.d);
        let rows = q.len() / d.max(1);
        mm((rows, t, d), p, false, q, (d, 1), k, (1, d), self.scale);
        for (r, pr) in p.chunks_exact_mut(t).enumerate() {
            if let Some(mask) = self.mask_row(dm, bi, h, i0 + r) {
                for (pj, &m) in pr.iter_mut().zip(mask) {
                    *pj = if m == f32::MIN || m == f32::NEG_INFINITY {
                        m
                    } else {
                        *pj + m
                    };
                }
            }
            let mx = pr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f32;
            for pj in pr.iter_mut() {
                *pj = (*pj - mx).exp();
                z += *pj;
            }
            let inv = 1.0 / z;
            pr.iter_mut().for_each(|pj| *pj *= inv);
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let dm = Dims::new(l1.dims(), l2.dims(), l3.dims())?;
        let q = slice(s1, l1, "attention")?;
        let (k, v) = (HeadBlocks::new(s2, l2)?, HeadBlocks::new(s3, l3)?);
        let Dims {
            hq, hkv, s, t, d, ..
        } = dm;
        let n_rep = hq / hkv;
        let mut out = vec![0f32; q.len()];
        if s * d > 0 {
            out.par_chunks_mut(s * d).enumerate().for_each_init(
                || vec![0f32; TILE.min(s) * t],
                |p, (bh, o)| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let (kh, vh) = (k.block(bi, h / n_rep), v.block(bi, h / n_rep));
                    for i0 in (0..s).step_by(TILE) {
                        let rows = TILE.min(s - i0);
                        let qt = &q[(bh * s + i0) * d..(bh * s + i0 + rows) * d];
                        let pt = &mut p[..rows * t];
                        self.probs_tile(qt, kh, dm, (bi, h, i0), pt);
                        let ot = &mut o[i0 * d..(i0 + rows) * d];
                        mm((rows, d, t), ot, false, pt, (t, 1), vh, (d, 1), 1.0);
                    }
                },
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::new(q.dims(), k.dims(), v.dims())?;
        let Dims {
            hq, hkv, s, t, d, ..
        } = dm;
        let n_rep = hq / hkv;
        let (dq, dk, dv) = with_f32(q, "attention", |q| {
            with_f32(k, "attention", |k| {
                with_f32(v, "attention", |v| {
                    with_f32(g, "attention", |g| {
                        let mut dq = vec![0f32; q.len()];
                        let mut dk = vec![0f32; k.len()];
                        let mut dv = vec![0f32; v.len()];
                        if s * d > 0 && t * d > 0 {
                            let tile = TILE.min(s) * t;
                            dq.par_chunks_mut(n_rep * s * d)
                                .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
                                .enumerate()
                                .for_each_init(
                                    || (vec![0f32; tile], vec![0f32; tile]),
                                    |(p, dp), (grp, (dqg, (dkg, dvg)))| {
                                        let (bi, kvh) = (grp / hkv, grp % hkv);
                                        let kvo = grp * t * d;
                                        let (kh, vh) = (&k[kvo..kvo + t * d], &v[kvo..kvo + t * d]);
                                        for r in 0..n_rep {
                                            let h = kvh * n_rep + r;
                                            let bh = bi * hq + h;
                                            for i0 in (0..s).step_by(TILE) {
                                                let rows = TILE.min(s - i0);
                                                let span =
                                                    (bh * s + i0) * d..(bh * s + i0 + rows) * d;
                                                let (qt, gt) = (&q[span.clone()], &g[span]);
                                                let (p, dp) =
                                                    (&mut p[..rows * t], &mut dp[..rows * t]);
                                                self.probs_tile(qt, kh, dm, (bi, h, i0), p);
                                                // dP = G Vᵀ; dS = P ∘ (dP − rowsum(P ∘ dP)) · scale
                                                mm(
                                                    (rows, t, d),
                                                    dp,
                                                    false,
                                                    gt,
                                                    (d, 1),
                                                    vh,
                                                    (1, d),
                                                    1.0,
                                                );
                                                for (pr, dr) in
                                                    p.chunks_exact(t).zip(dp.chunks_exact_mut(t))
                                                {
                                                    let big_d: f32 = pr
                                                        .iter()
                                                        .zip(dr.iter())
                                                        .map(|(a, b)| a * b)
                                                        .sum();
                                                    for (x, &pj) in dr.iter_mut().zip(pr) {
                                                        *x = pj * (*x - big_d) * self.scale;
                                                    }
                                                }
                                                let dqt = &mut dqg
                                                    [(r * s + i0) * d..(r * s + i0 + rows) * d];
                                                // dQ = dS K; dK += dSᵀ Q; dV += Pᵀ G
                                                mm(
                                                    (rows, d, t),
                                                    dqt,
                                                    false,
                                                    dp,
                                                    (t, 1),
                                                    kh,
                                                    (d, 1),
                                                    1.0,
                                                );
                                                mm(
                                                    (t, d, rows),
                                                    dkg,
                                                    true,
                                                    dp,
                                                    (1, t),
                                                    qt,
                                                    (d, 1),
                                                    1.0,
                                                );
                                                mm(
                                                    (t, d, rows),
                                                    dvg,
                                                    true,
                                                    p,
                                                    (1, t),
                                                    gt,
                                                    (d, 1),
                                                    1.0,
                                                );
                                            }
                                        }
                                    },
                                );
                        }
                        (dq, dk, dv)
                    })
                })
            })
        })????;
        Ok((
            grad_for(q, || tensor(dq, q.shape()))?,
            grad_for(k, || tensor(dk, k.shape()))?,
            grad_for(v, || tensor(dv, v.shape()))?,
        ))
    }
}
