//! Fused scaled-dot-product attention for CPU f32, with backward, GQA and an additive mask.
//!
//! Forward, per (batch, query head, query row): scores against every key, an exact stable
//! softmax in a per-row scratch of `t` floats, and the weighted sum of values. The `[s, t]`
//! probability matrix is never materialized (the point of flash attention), and backward
//! recomputes each row's probabilities instead of storing them, so memory stays
//! `O(b·h·s·d)` like the inputs.
//!
//! Masked keys: HF fills masked scores with `f32::MIN`. Adding any finite score of
//! magnitude < 1e31 to `f32::MIN` rounds back to `f32::MIN` exactly, so for keys whose
//! mask is `f32::MIN` (or `-inf`) the dot product is skipped and the score set to the mask
//! value: bit-identical to computing it, and it halves the work of causal attention.
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

    /// Softmax probabilities of query row `qr` against keys `k` (`[t, d]`) into `p`.
    fn probs(&self, qr: &[f32], k: &[f32], mask: Option<&[f32]>, d: usize, p: &mut [f32]) {
        for (j, pj) in p.iter_mut().enumerate() {
            let m = mask.map_or(0.0, |m| m[j]);
            *pj = if m == f32::MIN || m == f32::NEG_INFINITY {
                m
            } else {
                dot(qr, &k[j * d..(j + 1) * d]) * self.scale + m
            };
        }
        let mx = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - mx).exp();
            z += *pj;
        }
        let r = 1.0 / z;
        p.iter_mut().for_each(|pj| *pj *= r);
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

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler vectorize without reassociating a single sum.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
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
                || vec![0f32; t],
                |p, (bh, o)| {
                    let (bi, h) = (bh / hq, bh % hq);
                    let (kh, vh) = (k.block(bi, h / n_rep), v.block(bi, h / n_rep));
                    for i in 0..s {
                        let qr = &q[(bh * s + i) * d..(bh * s + i + 1) * d];
                        self.probs(qr, kh, self.mask_row(dm, bi, h, i), d, p);
                        let orow = &mut o[i * d..(i + 1) * d];
                        for (j, &pj) in p.iter().enumerate() {
                            if pj != 0.0 {
                                axpy(pj, &vh[j * d..(j + 1) * d], orow);
                            }
                        }
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
                            dq.par_chunks_mut(n_rep * s * d)
                                .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
                                .enumerate()
                                .for_each_init(
                                    || (vec![0f32; t], vec![0f32; t]),
                                    |(p, dp), (grp, (dqg, (dkg, dvg)))| {
                                        let (bi, kvh) = (grp / hkv, grp % hkv);
                                        let kvo = grp * t * d;
                                        let (kh, vh) = (&k[kvo..kvo + t * d], &v[kvo..kvo + t * d]);
                                        for r in 0..n_rep {
                                            let h = kvh * n_rep + r;
                                            let bh = bi * hq + h;
                                            for i in 0..s {
                                                let row = (bh * s + i) * d;
                                                let (qr, gr) = (&q[row..row + d], &g[row..row + d]);
                                                self.probs(
                                                    qr,
                                                    kh,
                                                    self.mask_row(dm, bi, h, i),
                                                    d,
                                                    p,
                                                );
                                                // dp_j = g·v_j ; D = Σ p_j dp_j ; ds_j = p_j (dp_j − D)
                                                let mut big_d = 0f32;
                                                for j in 0..t {
                                                    dp[j] = if p[j] != 0.0 {
                                                        dot(gr, &vh[j * d..(j + 1) * d])
                                                    } else {
                                                        0.0
                                                    };
                                                    big_d += p[j] * dp[j];
                                                }
                                                let dqr =
                                                    &mut dqg[(r * s + i) * d..(r * s + i + 1) * d];
                                                for j in 0..t {
                                                    if p[j] == 0.0 {
                                                        continue;
                                                    }
                                                    let ds = p[j] * (dp[j] - big_d) * self.scale;
                                                    axpy(ds, &kh[j * d..(j + 1) * d], dqr);
                                                    axpy(ds, qr, &mut dkg[j * d..(j + 1) * d]);
                                                    axpy(p[j], gr, &mut dvg[j * d..(j + 1) * d]);
                                                }
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
