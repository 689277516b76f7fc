//! Fused scaled-dot-product attention for CPU f32, with backward, GQA and an additive mask.
//!
//! Forward, per (batch, query head) and tile of up to [`TILE`] query rows: the scores
//! `scale · Q Kᵀ` as one GEMM into a per-thread `TILE × t` scratch, the mask and an exact
//! stable softmax per row, then `P V` as a second GEMM. The probabilities of a whole head are
//! never stored: backward recomputes each tile's (flash attention's trade), so memory stays
//! `O(b·h·s·d)` like the inputs plus one tile per thread. The GEMMs are the `gemm` crate's
//! (module `gemm`): a per-row scalar dot product loop ran at a small fraction of that speed
//! (profile in docs/model-bench.md). A tile of very few rows (a decoding step: one query per
//! sequence) takes vectorized dot products and row updates instead (module `simd`): a
//! one-row GEMM per head uses one of the microkernel's 16 rows and pays gemm's per-call
//! set-up, which made decoding attention several times slower.
//!
//! Layouts ([`Heads`]): queries, keys, values, outputs and gradients may each be
//! head-major (`[b, h, len, d]`, the op's tensors; a prefix view of the KV cache's
//! `[b, h, cap, d]` buffers) or token-major (`[b, len, h, d]`, a linear layer's output
//! viewed per head, which the fused decoder layer of module `decoder` attends over without
//! transposing). Only each row's `d` values need to be contiguous.
//!
//! Masked keys: see [`super::simd::masked_softmax_rows`] (HF's `f32::MIN` fill, exactly
//! zero probability).
//!
//! GQA: query head `h` reads KV head `h / (hq / hkv)`. Both passes parallelize over the
//! batch (or loop over it on the calling thread when rayon has one thread), so each task
//! owns its batch's rows of every output: no atomics, and every sum runs in the same order
//! whatever the thread count.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::fused::{grad_for, slice, tensor, with_f32};
use super::gemm::{Mat, mm};
use super::simd;

/// An additive mask broadcast to `[b, mh, s, t]`, `mh` ∈ {1, hq}.
pub(crate) struct Mask {
    pub(crate) data: Vec<f32>,
    pub(crate) per_head: bool,
}

/// The attention op on head-major tensors (`ops::attention`).
pub(crate) struct Attention {
    pub(crate) scale: f32,
    pub(crate) mask: Option<Mask>,
}

/// Problem sizes: batch, query heads, KV heads, queries, keys, head width.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) s: usize,
    pub(crate) t: usize,
    pub(crate) d: usize,
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
                    b: *b,
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

/// Where the rows of each (batch, head) live in a buffer: row `i` of head `h` of batch
/// `b` starts at `start + b·bs + h·hs + i·rs`, and its `d` values are contiguous.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub(crate) start: usize,
    pub(crate) bs: usize,
    pub(crate) hs: usize,
    pub(crate) rs: usize,
}

impl Heads {
    /// Contiguous `[b, h, len, d]`.
    pub(crate) fn head_major(h: usize, len: usize, d: usize) -> Self {
        Self {
            start: 0,
            bs: h * len * d,
            hs: len * d,
            rs: d,
        }
    }

    /// Contiguous `[b, len, h, d]` (a `[b, len, h·d]` linear output).
    pub(crate) fn token_major(h: usize, len: usize, d: usize) -> Self {
        Self {
            start: 0,
            bs: len * h * d,
            hs: d,
            rs: h * d,
        }
    }

    /// A rank-4 `[b, h, len, d]` layout whose last dim is contiguous.
    pub(crate) fn from_layout(l: &Layout) -> Option<Self> {
        match (l.dims(), l.stride()) {
            ([_, _, _, d], [bs, hs, rs, sd]) if *sd == 1 || *d <= 1 => Some(Self {
                start: l.start_offset(),
                bs: *bs,
                hs: *hs,
                rs: *rs,
            }),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn at(&self, b: usize, h: usize) -> usize {
        self.start + b * self.bs + h * self.hs
    }
}

/// Query rows per tile: bounds the score scratch to `TILE × t` floats per thread
/// (a 2048-token prompt needs 1 MiB, not 16).
const TILE: usize = 128;

/// Tiles of at most this many rows use the dot-product path instead of GEMMs.
const FEW_ROWS: usize = 2;

/// An additive mask `[b, mh, rows, t]` (`mh` = hq when `per_head`, else 1) whose row
/// `row0 + i` belongs to query `i` (a suffix of the queries when `row0 > 0`).
#[derive(Clone, Copy)]
pub(crate) struct MaskRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) per_head: bool,
    pub(crate) rows: usize,
    pub(crate) row0: usize,
}

/// One attention problem over borrowed buffers.
#[derive(Clone, Copy)]
pub(crate) struct Problem<'a> {
    pub(crate) dm: Dims,
    pub(crate) scale: f32,
    pub(crate) mask: Option<MaskRef<'a>>,
    pub(crate) q: (&'a [f32], Heads),
    pub(crate) k: (&'a [f32], Heads),
    pub(crate) v: (&'a [f32], Heads),
}

impl Problem<'_> {
    /// The mask rows `[i0, i0 + rows)` of head `h` in batch `b`, back to back.
    fn mask_rows(&self, b: usize, h: usize, i0: usize, rows: usize) -> Option<&[f32]> {
        let Dims { hq, t, .. } = self.dm;
        self.mask.map(|m| {
            let (mh, hh) = if m.per_head { (hq, h) } else { (1, 0) };
            let o = ((b * mh + hh) * m.rows + m.row0 + i0) * t;
            &m.data[o..o + rows * t]
        })
    }

    fn kv_head(&self, h: usize) -> usize {
        h / (self.dm.hq / self.dm.hkv)
    }

    /// Softmax probabilities of query rows `[i0, i0 + rows)` of head `h` in batch `b`
    /// into `p` (`[rows, t]`).
    fn probs_tile(&self, b: usize, h: usize, i0: usize, rows: usize, p: &mut [f32]) {
        let Dims { t, d, .. } = self.dm;
        let ((q, qh), (k, kh)) = (self.q, self.k);
        let q0 = qh.at(b, h) + i0 * qh.rs;
        let k0 = kh.at(b, self.kv_head(h));
        if rows <= FEW_ROWS {
            for (r, pr) in p.chunks_exact_mut(t.max(1)).take(rows).enumerate() {
                let qr = &q[q0 + r * qh.rs..q0 + r * qh.rs + d];
                simd::scores(qr, &k[k0..], kh.rs, self.scale, &mut pr[..t]);
            }
        } else {
            let lhs = Mat {
                data: &q[q0..],
                rs: qh.rs,
                cs: 1,
            };
            let rhs = Mat {
                data: &k[k0..],
                rs: 1,
                cs: kh.rs,
            };
            mm((rows, t, d), p, t, false, lhs, rhs, self.scale);
        }
        simd::masked_softmax_rows(p, t, self.mask_rows(b, h, i0, rows));
    }

    /// Values of head `h`'s KV head in batch `b`, as rows.
    fn values(&self, b: usize, h: usize) -> Mat<'_> {
        let (v, vh) = self.v;
        Mat {
            data: &v[vh.at(b, self.kv_head(h))..],
            rs: vh.rs,
            cs: 1,
        }
    }

    /// `out ← P V` for a tile: `out` starts at the tile's first row, row stride `rs`.
    fn weighted(&self, b: usize, h: usize, p: &[f32], rows: usize, out: &mut [f32], rs: usize) {
        let Dims { t, d, .. } = self.dm;
        let vm = self.values(b, h);
        if rows <= FEW_ROWS {
            for r in 0..rows {
                let pr = &p[r * t..(r + 1) * t];
                simd::weighted_rows(pr, vm.data, vm.rs, &mut out[r * rs..r * rs + d]);
            }
        } else {
            mm((rows, d, t), out, rs, false, Mat::rows(p, t), vm, 1.0);
        }
    }

    /// Writes the attention output into `out` (`b · o.bs` floats, `o.start` = 0).
    pub(crate) fn forward(&self, out: &mut [f32], o: Heads) {
        let Dims { b, s, t, d, .. } = self.dm;
        if b == 0 || s * d == 0 {
            return;
        }
        let scratch = || vec![0f32; TILE.min(s) * t];
        if sequential() {
            let mut p = scratch();
            for (bi, ob) in out.chunks_mut(o.bs).take(b).enumerate() {
                self.forward_batch(bi, ob, o, &mut p);
            }
        } else {
            out.par_chunks_mut(o.bs)
                .take(b)
                .enumerate()
                .for_each_init(scratch, |p, (bi, ob)| self.forward_batch(bi, ob, o, p));
        }
    }

    /// The output rows of batch `bi` into `ob`.
    fn forward_batch(&self, bi: usize, ob: &mut [f32], o: Heads, p: &mut [f32]) {
        let Dims { hq, s, t, .. } = self.dm;
        for h in 0..hq {
            for i0 in (0..s).step_by(TILE) {
                let rows = TILE.min(s - i0);
                let pt = &mut p[..rows * t];
                self.probs_tile(bi, h, i0, rows, pt);
                let at = o.at(0, h) + i0 * o.rs;
                self.weighted(bi, h, pt, rows, &mut ob[at..], o.rs);
            }
        }
    }

    /// Gradients of the inputs given the output gradient `g`. `dq`, `dk`, `dv` are
    /// zero-filled buffers of `b · bs` floats (`start` = 0); this adds into them.
    pub(crate) fn backward(
        &self,
        g: (&[f32], Heads),
        (dq, dqh): (&mut [f32], Heads),
        (dk, dkh): (&mut [f32], Heads),
        (dv, dvh): (&mut [f32], Heads),
    ) {
        let Dims { b, s, t, d, .. } = self.dm;
        if b == 0 || s * d == 0 || t * d == 0 {
            return;
        }
        let tile = TILE.min(s) * t;
        let scratch = || (vec![0f32; tile], vec![0f32; tile]);
        let heads = (dqh, dkh, dvh);
        if sequential() {
            let mut sc = scratch();
            let batches = dq
                .chunks_mut(dqh.bs)
                .zip(dk.chunks_mut(dkh.bs).zip(dv.chunks_mut(dvh.bs)))
                .take(b);
            for (bi, (dqb, (dkb, dvb))) in batches.enumerate() {
                self.backward_batch(bi, g, (dqb, dkb, dvb), heads, &mut sc);
            }
        } else {
            dq.par_chunks_mut(dqh.bs)
                .zip(dk.par_chunks_mut(dkh.bs).zip(dv.par_chunks_mut(dvh.bs)))
                .take(b)
                .enumerate()
                .for_each_init(scratch, |sc, (bi, (dqb, (dkb, dvb)))| {
                    self.backward_batch(bi, g, (dqb, dkb, dvb), heads, sc)
                });
        }
    }

    /// The gradients of batch `bi`'s rows into `dqb`, `dkb`, `dvb`.
    fn backward_batch(
        &self,
        bi: usize,
        (g, gh): (&[f32], Heads),
        (dqb, dkb, dvb): (&mut [f32], &mut [f32], &mut [f32]),
        (dqh, dkh, dvh): (Heads, Heads, Heads),
        (p, dp): &mut (Vec<f32>, Vec<f32>),
    ) {
        let Dims { hq, s, t, d, .. } = self.dm;
        let (q, qh) = self.q;
        let (k, kh) = self.k;
        for h in 0..hq {
            let kvh = self.kv_head(h);
            let km = Mat {
                data: &k[kh.at(bi, kvh)..],
                rs: kh.rs,
                cs: 1,
            };
            let vm = self.values(bi, h);
            for i0 in (0..s).step_by(TILE) {
                let rows = TILE.min(s - i0);
                let (p, dp) = (&mut p[..rows * t], &mut dp[..rows * t]);
                self.probs_tile(bi, h, i0, rows, p);
                let gm = Mat {
                    data: &g[gh.at(bi, h) + i0 * gh.rs..],
                    rs: gh.rs,
                    cs: 1,
                };
                let qm = Mat {
                    data: &q[qh.at(bi, h) + i0 * qh.rs..],
                    rs: qh.rs,
                    cs: 1,
                };
                // dP = G Vᵀ; dS = scale · P ∘ (dP − rowsum(P ∘ dP))
                let vt = Mat {
                    data: vm.data,
                    rs: 1,
                    cs: vm.rs,
                };
                mm((rows, t, d), dp, t, false, gm, vt, 1.0);
                simd::softmax_bwd_rows(p, dp, t, self.scale);
                // dQ = dS K; dK += dSᵀ Q; dV += Pᵀ G
                let dq0 = dqh.at(0, h) + i0 * dqh.rs;
                mm(
                    (rows, d, t),
                    &mut dqb[dq0..],
                    dqh.rs,
                    false,
                    Mat::rows(dp, t),
                    km,
                    1.0,
                );
                let dk0 = dkh.at(0, kvh);
                mm(
                    (t, d, rows),
                    &mut dkb[dk0..],
                    dkh.rs,
                    true,
                    Mat::t(dp, t),
                    qm,
                    1.0,
                );
                let dv0 = dvh.at(0, kvh);
                mm(
                    (t, d, rows),
                    &mut dvb[dv0..],
                    dvh.rs,
                    true,
                    Mat::t(p, t),
                    gm,
                    1.0,
                );
            }
        }
    }
}

/// Whether to run the per-batch loops on this thread: with one rayon thread (the
/// default, `configure_cpu_runtime`) a parallel iterator only hands the work to the pool's
/// worker and sleeps until it is done, two context switches per call.
fn sequential() -> bool {
    rayon::current_num_threads() <= 1
}

impl Attention {
    fn problem<'a>(
        &'a self,
        dm: Dims,
        q: &'a [f32],
        k: (&'a [f32], Heads),
        v: (&'a [f32], Heads),
    ) -> Problem<'a> {
        Problem {
            dm,
            scale: self.scale,
            mask: self.mask.as_ref().map(|m| MaskRef {
                data: &m.data,
                per_head: m.per_head,
                rows: dm.s,
                row0: 0,
            }),
            q: (q, Heads::head_major(dm.hq, dm.s, dm.d)),
            k,
            v,
        }
    }
}

/// The f32 data and head layout of a key/value operand.
fn kv_operand<'a>(s: &'a CpuStorage, l: &Layout) -> Result<(&'a [f32], Heads)> {
    let CpuStorage::F32(data) = s else {
        bail!(
            "attention: fused kernel needs f32 input, got {:?}",
            s.dtype()
        )
    };
    match Heads::from_layout(l) {
        Some(h) => Ok((data, h)),
        None => bail!("attention: keys/values need a contiguous last dim"),
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
        let p = self.problem(dm, q, kv_operand(s2, l2)?, kv_operand(s3, l3)?);
        let mut out = vec![0f32; q.len()];
        p.forward(&mut out, Heads::head_major(dm.hq, dm.s, dm.d));
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
        let (hq_l, hkv_l) = (
            Heads::head_major(dm.hq, dm.s, dm.d),
            Heads::head_major(dm.hkv, dm.t, dm.d),
        );
        let (dq, dk, dv) = with_f32(q, "attention", |q| {
            with_f32(k, "attention", |k| {
                with_f32(v, "attention", |v| {
                    with_f32(g, "attention", |g| {
                        let mut dq = vec![0f32; q.len()];
                        let mut dk = vec![0f32; k.len()];
                        let mut dv = vec![0f32; v.len()];
                        let p = self.problem(dm, q, (k, hkv_l), (v, hkv_l));
                        p.backward(
                            (g, hq_l),
                            (&mut dq, hq_l),
                            (&mut dk, hkv_l),
                            (&mut dv, hkv_l),
                        );
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
