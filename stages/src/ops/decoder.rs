//! A whole LLaMA decoder layer as one CPU computation, forward and backward.
//!
//! Composed from the per-op kernels, a layer is about twenty candle graph nodes: norms,
//! seven (LoRA) projections, reshapes and transposes around RoPE and attention, SwiGLU and
//! two residual adds. Each node allocates its output, and candle's backward gives every
//! node input a zero-filled gradient buffer that it then adds into, so in a LoRA step most
//! of the time that is not GEMM went to allocation, zero-filling, strided copies and these
//! adds (docs/model-bench.md). Here a layer is one node: the forward writes each
//! intermediate once into a buffer it owns, in the layout the next step reads (q, k and v
//! stay token-major, `[b, s, h·d]`, and attention reads them per head with a row stride),
//! and the backward is written out by hand over the same buffers.
//!
//! Covered: f32 on the CPU, no projection biases, frozen norm and projection weights, and
//! any number of LoRA pairs per projection (stacked adapters add) without LoRA dropout.
//! That is inference, LoRA training and projector training (gradients flow through a
//! frozen decoder); the model falls back to the composed ops for anything else (full
//! fine-tuning, dropout, other devices and dtypes), which stay the reference this is
//! tested against.
//!
//! - **Inference** ([`forward`]) runs without a graph and can append keys/values to the KV
//!   cache through a callback; attention then reads the cache's head-major buffers.
//! - **Training** ([`train`]) is a candle `CustomOp2` of the layer input and the layer's
//!   LoRA factors packed into one tensor (a `cat` of the flattened factors: candle ops take
//!   at most three inputs; the `cat`'s own backward hands each factor its slice). The
//!   forward keeps its intermediates inside the op for the backward, which is what
//!   candle's graph would hold too.
//! - **Suffix**: with `from > 0` only queries `from..s` are computed (keys and values of
//!   every position still are), and the output holds those rows. A caller that needs the
//!   last layer's output only at some positions (generation's prefill: the last one; a
//!   training loss: the scored ones) skips most of that layer.
//!
//! Merged weights: a LoRA projection over many rows uses `W + Σ s·B A` (one GEMM; see
//! `gemm::merge_pays`), computed once per forward and reused by the backward. An adapter
//! whose `B` is zero (a fresh one) then adds exact zeros: the output is bit-identical
//! to the model without it.

use std::cell::Cell;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Storage, Tensor, bail};

use super::attention::{Dims, Heads, MaskRef, Problem};
use super::fused::{grad_for, rms_norm_bwd_rows, rms_norm_rows, slice, tensor, with_f32};
use super::gemm::{self, Lora};
use super::packed::{self, Packed};
use super::simd::{self, simd_fn};

/// Projection order of [`Params::w`] and [`Params::lora`].
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const O: usize = 3;
pub(crate) const GATE: usize = 4;
pub(crate) const UP: usize = 5;
pub(crate) const DOWN: usize = 6;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether the model may use this path on this thread ([`with_composed`] turns it off).
pub(crate) fn enabled() -> bool {
    ENABLED.with(Cell::get)
}

/// Runs `f` with the model on the composed ops on this thread: the reference the fused
/// layer is tested against.
#[cfg(test)]
pub(crate) fn with_composed<R>(f: impl FnOnce() -> R) -> R {
    let prev = ENABLED.with(|e| e.replace(false));
    let r = f();
    ENABLED.with(|e| e.set(prev));
    r
}

/// Layer sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerDims {
    pub(crate) d: usize,
    pub(crate) hq: usize,
    pub(crate) hkv: usize,
    pub(crate) hd: usize,
    pub(crate) inter: usize,
    pub(crate) eps: f32,
}

impl LayerDims {
    /// `(out, in)` of projection `i`.
    fn proj(&self, i: usize) -> (usize, usize) {
        let (qd, kvd) = (self.hq * self.hd, self.hkv * self.hd);
        match i {
            Q => (qd, self.d),
            K | V => (kvd, self.d),
            O => (self.d, qd),
            GATE | UP => (self.inter, self.d),
            _ => (self.d, self.inter),
        }
    }
}

/// A layer's tensors: the two RMSNorm weights, the seven projection weights `[out, in]`
/// (order [`Q`]..[`DOWN`]) and, per projection, its LoRA pairs `(A, B, scale)` (one per
/// attached adapter that targets it, in adapter order). `packed`, when given, holds the
/// same seven weights packed for few-row products (decoding; module `packed`), which then
/// serve the base products of calls with few rows.
#[derive(Clone)]
pub(crate) struct Params {
    pub(crate) ln1: Tensor,
    pub(crate) ln2: Tensor,
    pub(crate) w: [Tensor; 7],
    pub(crate) lora: [Vec<(Tensor, Tensor, f32)>; 7],
    pub(crate) packed: Option<Arc<[Packed; 7]>>,
}

impl Params {
    /// Whether this path covers the tensors: CPU f32, contiguous, base weights frozen.
    pub(crate) fn eligible(&self, dims: &LayerDims) -> bool {
        let ok = |t: &Tensor| {
            t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
        };
        let base = [&self.ln1, &self.ln2].into_iter().chain(&self.w);
        base.clone().all(|t| ok(t) && !t.track_op())
            && self.w.iter().enumerate().all(|(i, w)| {
                let (o, n) = dims.proj(i);
                w.dims() == [o, n]
            })
            && self.lora.iter().enumerate().all(|(i, l)| {
                l.iter().all(|(a, b, _)| {
                    let (o, n) = dims.proj(i);
                    ok(a)
                        && ok(b)
                        && a.dim(1).ok() == Some(n)
                        && b.dim(0).ok() == Some(o)
                        && a.dim(0).ok() == b.dim(1).ok()
                })
            })
    }

    /// Whether any LoRA factor needs a gradient.
    pub(crate) fn lora_tracked(&self) -> bool {
        self.lora
            .iter()
            .flatten()
            .any(|(a, b, _)| a.track_op() || b.track_op())
    }

    fn has_lora(&self) -> bool {
        self.lora.iter().any(|l| !l.is_empty())
    }
}

/// Where the tokens of one forward sit: RoPE tables `[b, s, hd]` for the `s` new
/// positions, and the additive mask `[b, 1, s, t]` over all `t` keys (cached included).
#[derive(Clone)]
pub(crate) struct Positions {
    pub(crate) b: usize,
    pub(crate) s: usize,
    pub(crate) cos: Arc<Vec<f32>>,
    pub(crate) sin: Arc<Vec<f32>>,
    pub(crate) mask: Option<Arc<Vec<f32>>>,
}

impl Positions {
    /// From the model's tables and mask tensors.
    pub(crate) fn new(cos: &Tensor, sin: &Tensor, mask: Option<&Tensor>) -> Result<Self> {
        let (b, s, _) = cos.dims3()?;
        let vals = |t: &Tensor| -> Result<Arc<Vec<f32>>> {
            Ok(Arc::new(
                t.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            ))
        };
        Ok(Self {
            b,
            s,
            cos: vals(cos)?,
            sin: vals(sin)?,
            mask: mask.map(vals).transpose()?,
        })
    }
}

/// Keys/values of one forward: the layer's own, or appended to a KV cache by the callback,
/// which returns the cache's keys and values (`[b, hkv, t, hd]`, any row strides).
pub(crate) enum Kv<'c> {
    Own,
    Cache(&'c mut dyn FnMut(NewKv<'_>) -> Result<(Tensor, Tensor)>),
}

/// The keys (after RoPE) and values of a forward's new positions as the layer computed
/// them: token-major `[b, s, h, d]`.
pub(crate) struct NewKv<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    /// `(b, h, s, d)`.
    pub(crate) dims: (usize, usize, usize, usize),
}

impl NewKv<'_> {
    /// Head-major `[b, h, s, d]` tensors, the cache's layout.
    pub(crate) fn tensors(&self) -> Result<(Tensor, Tensor)> {
        let (b, h, s, d) = self.dims;
        let shape = Shape::from((b, h, s, d));
        Ok((
            tensor(self.buffer(self.k, s), &shape)?,
            tensor(self.buffer(self.v, s), &shape)?,
        ))
    }

    /// Fresh head-major `[b, h, cap, d]` buffers holding these positions first and zeros
    /// after, written in one pass (a cache's first append needs no zero-fill and copy).
    pub(crate) fn buffers(&self, cap: usize) -> (Vec<f32>, Vec<f32>) {
        (self.buffer(self.k, cap), self.buffer(self.v, cap))
    }

    fn buffer(&self, x: &[f32], cap: usize) -> Vec<f32> {
        let (b, h, s, d) = self.dims;
        let mut out = Vec::with_capacity(b * h * cap * d);
        for bi in 0..b {
            for hi in 0..h {
                for si in 0..s {
                    let o = ((bi * s + si) * h + hi) * d;
                    out.extend_from_slice(&x[o..o + d]);
                }
                out.resize(out.len() + (cap - s) * d, 0.0);
            }
        }
        out
    }
}

/// The layer's data as slices.
struct Ws<'a> {
    dims: LayerDims,
    ln1: &'a [f32],
    ln2: &'a [f32],
    w: [&'a [f32]; 7],
    lora: [Vec<Lora<'a>>; 7],
    packed: Option<&'a [Packed; 7]>,
}

/// Read guards on CPU tensors, so their data can be borrowed as slices.
fn hold<'t>(ts: &[&'t Tensor]) -> Vec<(impl Deref<Target = Storage> + use<'t>, &'t Layout)> {
    ts.iter().map(|t| t.storage_and_layout()).collect()
}

/// The contiguous f32 data behind held guards.
fn slices<'a, G: Deref<Target = Storage>>(held: &'a [(G, &Layout)]) -> Result<Vec<&'a [f32]>> {
    held.iter()
        .map(|(st, l)| match &**st {
            Storage::Cpu(cs) => slice(cs, l, "decoder layer"),
            _ => bail!("decoder layer: CPU tensors only"),
        })
        .collect()
}

/// The whole f32 storage and the layout behind held guards (for strided views).
fn strided<'a, G: Deref<Target = Storage>>(
    held: &'a [(G, &'a Layout)],
) -> Result<Vec<(&'a [f32], &'a Layout)>> {
    held.iter()
        .map(|(st, l)| match &**st {
            Storage::Cpu(CpuStorage::F32(v)) => Ok((v.as_slice(), *l)),
            _ => bail!("decoder layer: the KV cache must be CPU f32"),
        })
        .collect()
}

/// Runs `f` on the layer's data; LoRA factors come from the tensors in `params`, or from
/// `pack` (the training op's input, factors flattened back to back) when given.
fn with_ws<R>(
    params: &Params,
    dims: LayerDims,
    pack: Option<&[f32]>,
    f: impl FnOnce(&Ws<'_>) -> Result<R>,
) -> Result<R> {
    let mut ts: Vec<&Tensor> = vec![&params.ln1, &params.ln2];
    ts.extend(params.w.iter());
    if pack.is_none() {
        for (a, b, _) in params.lora.iter().flatten() {
            ts.extend([a, b]);
        }
    }
    let held = hold(&ts);
    let sl = slices(&held)?;
    let mut lora: [Vec<Lora<'_>>; 7] = Default::default();
    let (mut next, mut off) = (9, 0);
    for (i, (a, b, scale)) in params
        .lora
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.iter().map(move |p| (i, p)))
    {
        let (r, scale) = (a.dim(0)?, *scale);
        let (ab, bb) = match pack {
            Some(p) => {
                let (na, nb) = (a.elem_count(), b.elem_count());
                let pair = (&p[off..off + na], &p[off + na..off + na + nb]);
                off += na + nb;
                pair
            }
            None => {
                next += 2;
                (sl[next - 2], sl[next - 1])
            }
        };
        lora[i].push(Lora {
            a: ab,
            b: bb,
            r,
            scale,
        });
    }
    f(&Ws {
        dims,
        ln1: sl[0],
        ln2: sl[1],
        w: [sl[2], sl[3], sl[4], sl[5], sl[6], sl[7], sl[8]],
        lora,
        packed: params.packed.as_deref(),
    })
}

simd_fn! {
    /// RoPE (HF `rotate_half`) in place on token rows of `heads × hd` values; row `r`
    /// is position `from + r % rows` of batch `r / rows` in the `[b, s, hd]` tables.
    /// `inverse` applies the transpose rotation (the backward).
    fn rope_rows(
        x: &mut [f32],
        heads: usize,
        hd: usize,
        tables: (&[f32], &[f32]),
        at: (usize, usize, usize),
        inverse: bool,
    ) {
        let ((cos, sin), (rows, s, from)) = (tables, at);
        let half = hd / 2;
        if half == 0 || rows == 0 {
            return;
        }
        for (r, xr) in x.chunks_exact_mut(heads * hd).enumerate() {
            let tr = (r / rows) * s + from + r % rows;
            let (c, sn) = (&cos[tr * hd..(tr + 1) * hd], &sin[tr * hd..(tr + 1) * hd]);
            for xh in xr.chunks_exact_mut(hd) {
                let (lo, hi) = xh.split_at_mut(half);
                for j in 0..half {
                    let (l, h) = (lo[j], hi[j]);
                    if inverse {
                        lo[j] = l * c[j] + h * sn[j + half];
                        hi[j] = h * c[j + half] - l * sn[j];
                    } else {
                        lo[j] = l * c[j] - h * sn[j];
                        hi[j] = h * c[j + half] + l * sn[j + half];
                    }
                }
            }
        }
    }
}

/// Rows `from..s` of each batch of a `[b, s, width]` buffer.
fn suffix(x: &[f32], (b, s, from): (usize, usize, usize), width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(b * (s - from) * width);
    for bi in 0..b {
        out.extend_from_slice(&x[(bi * s + from) * width..(bi + 1) * s * width]);
    }
    out
}

/// Adds `[b, s − from, width]` rows into rows `from..s` of each batch of `x`.
fn add_suffix(x: &mut [f32], rows: &[f32], (b, s, from): (usize, usize, usize), width: usize) {
    let n = (s - from) * width;
    for bi in 0..b {
        let dst = &mut x[(bi * s + from) * width..(bi + 1) * s * width];
        for (o, &v) in dst.iter_mut().zip(&rows[bi * n..(bi + 1) * n]) {
            *o += v;
        }
    }
}

/// Per projection, the merged `W + Σ s·B A` when the forward used it.
type Merged = [Option<Vec<f32>>; 7];

impl Ws<'_> {
    /// `y (+)= x W_iᵀ` with the base weight alone, from its packed copy when that covers
    /// `rows` (same bits as gemm either way).
    fn base(&self, i: usize, x: &[f32], rows: usize, y: &mut [f32], acc: bool) {
        let (out, inp) = self.dims.proj(i);
        match self.packed {
            Some(p) if packed::covers(rows, out, inp) => packed::xwt(x, rows, &p[i], y, acc),
            _ => gemm::xwt(x, rows, self.w[i], out, y, acc),
        }
    }

    /// A new `[rows, out]` buffer `x W_iᵀ` with the base weight alone (see [`Ws::base`]).
    fn base_new(&self, i: usize, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp) = self.dims.proj(i);
        match self.packed {
            Some(p) if packed::covers(rows, out, inp) => {
                let mut y = vec![0f32; rows * out];
                packed::xwt(x, rows, &p[i], &mut y, false);
                y
            }
            _ => gemm::xwt_new(x, rows, self.w[i], out),
        }
    }

    /// `y (+)= x W_iᵀ` (LoRA included) over `rows` rows.
    fn project(
        &self,
        i: usize,
        merged: &mut Merged,
        x: &[f32],
        rows: usize,
        y: &mut [f32],
        acc: bool,
    ) {
        let (out, inp) = self.dims.proj(i);
        let loras = &self.lora[i];
        if !loras.is_empty() && gemm::merge_pays(rows, out, inp) {
            let m = merged[i].get_or_insert_with(|| gemm::merged(self.w[i], out, loras));
            gemm::xwt(x, rows, m, out, y, acc);
        } else {
            self.base(i, x, rows, y, acc);
            for l in loras {
                gemm::lora_add(x, rows, out, l, y);
            }
        }
    }

    /// A new `[rows, out]` buffer `x W_iᵀ` (LoRA included).
    fn project_new(&self, i: usize, merged: &mut Merged, x: &[f32], rows: usize) -> Vec<f32> {
        let (out, inp) = self.dims.proj(i);
        let loras = &self.lora[i];
        if !loras.is_empty() && gemm::merge_pays(rows, out, inp) {
            let m = merged[i].get_or_insert_with(|| gemm::merged(self.w[i], out, loras));
            gemm::xwt_new(x, rows, m, out)
        } else {
            let mut y = self.base_new(i, x, rows);
            for l in loras {
                gemm::lora_add(x, rows, out, l, &mut y);
            }
            y
        }
    }

    /// A new buffer `g W_i` with the weights [`Ws::project`] used.
    fn project_back_new(&self, i: usize, merged: &Merged, g: &[f32], rows: usize) -> Vec<f32> {
        let (out, _) = self.dims.proj(i);
        match &merged[i] {
            Some(m) => gemm::xw_new(g, rows, m, out),
            None => {
                let mut dx = gemm::xw_new(g, rows, self.w[i], out);
                for l in &self.lora[i] {
                    gemm::lora_dx(g, rows, out, l, &mut dx);
                }
                dx
            }
        }
    }

    /// `dx (+)= g W_i` with the weights [`Ws::project`] used.
    fn project_back(
        &self,
        i: usize,
        merged: &Merged,
        g: &[f32],
        rows: usize,
        dx: &mut [f32],
        acc: bool,
    ) {
        let (out, _) = self.dims.proj(i);
        match &merged[i] {
            Some(m) => gemm::xw(g, rows, m, out, dx, acc),
            None => {
                gemm::xw(g, rows, self.w[i], out, dx, acc);
                for l in &self.lora[i] {
                    gemm::lora_dx(g, rows, out, l, dx);
                }
            }
        }
    }

    /// The attention problem over queries `q` (`[b, s − from, hq·hd]`) and the given
    /// keys/values (`t` positions).
    fn problem<'a>(
        &self,
        pos: &'a Positions,
        from: usize,
        q: &'a [f32],
        (k, v, t): ((&'a [f32], Heads), (&'a [f32], Heads), usize),
    ) -> Problem<'a> {
        let LayerDims { hq, hkv, hd, .. } = self.dims;
        let sq = pos.s - from;
        Problem {
            dm: Dims {
                b: pos.b,
                hq,
                hkv,
                s: sq,
                t,
                d: hd,
            },
            scale: (1.0 / (hd as f64).sqrt()) as f32,
            mask: pos.mask.as_ref().map(|m| MaskRef {
                data: m,
                per_head: false,
                rows: pos.s,
                row0: from,
            }),
            q: (q, Heads::token_major(hq, sq, hd)),
            k,
            v,
        }
    }
}

/// The layer's and the forward's sizes: `n` rows in, `nq = b·sq` rows out (queries),
/// `qd`/`kvd` the query and key/value widths.
struct Sizes {
    d: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    inter: usize,
    eps: f32,
    b: usize,
    s: usize,
    sq: usize,
    n: usize,
    nq: usize,
    qd: usize,
    kvd: usize,
}

impl Sizes {
    fn new(l: LayerDims, pos: &Positions, from: usize) -> Self {
        let (b, s) = (pos.b, pos.s);
        Self {
            d: l.d,
            hq: l.hq,
            hkv: l.hkv,
            hd: l.hd,
            inter: l.inter,
            eps: l.eps,
            b,
            s,
            sq: s - from,
            n: b * s,
            nq: b * (s - from),
            qd: l.hq * l.hd,
            kvd: l.hkv * l.hd,
        }
    }
}

/// What the backward needs from the forward.
struct Saved {
    n1: Vec<f32>,
    /// `n1` at the query rows (`None` when they are all rows).
    n1q: Option<Vec<f32>>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    x1: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    h: Vec<f32>,
    merged: Merged,
}

/// The layer on `x` (`[b, s, d]` rows), returning rows `from..s` of its output, and the
/// intermediates when `save` (training; keys/values must then be [`Kv::Own`]).
fn run(
    ws: &Ws<'_>,
    x: &[f32],
    pos: &Positions,
    from: usize,
    kv: Kv<'_>,
    save: bool,
) -> Result<(Vec<f32>, Option<Saved>)> {
    let Sizes {
        d,
        hq,
        hkv,
        hd,
        inter,
        eps,
        b,
        s,
        sq,
        n,
        nq,
        qd,
        ..
    } = Sizes::new(ws.dims, pos, from);
    let tables = (pos.cos.as_slice(), pos.sin.as_slice());
    let mut merged: Merged = Default::default();
    let mut n1 = vec![0f32; n * d];
    rms_norm_rows(x, ws.ln1, eps, &mut n1);
    let mut k = ws.project_new(K, &mut merged, &n1, n);
    let v = ws.project_new(V, &mut merged, &n1, n);
    rope_rows(&mut k, hkv, hd, tables, (s, s, 0), false);
    let n1q = (from > 0).then(|| suffix(&n1, (b, s, from), d));
    let mut q = ws.project_new(Q, &mut merged, n1q.as_deref().unwrap_or(&n1), nq);
    rope_rows(&mut q, hq, hd, tables, (sq, s, from), false);

    let cached = match kv {
        Kv::Own => None,
        Kv::Cache(f) => Some(f(NewKv {
            k: &k,
            v: &v,
            dims: (b, hkv, s, hd),
        })?),
    };
    let held = cached.as_ref().map(|(kc, vc)| hold(&[kc, vc]));
    let own = Heads::token_major(hkv, s, hd);
    let kv_ops = match (&held, &cached) {
        (Some(h), Some((kc, _))) => {
            let sl = strided(h)?;
            let heads = |l: &Layout| {
                Heads::from_layout(l).ok_or_else(|| {
                    candle_core::Error::Msg("decoder layer: cache rows not contiguous".into())
                })
            };
            (
                (sl[0].0, heads(sl[0].1)?),
                (sl[1].0, heads(sl[1].1)?),
                kc.dim(2)?,
            )
        }
        _ => ((k.as_slice(), own), (v.as_slice(), own), s),
    };
    let mut a = vec![0f32; nq * qd];
    ws.problem(pos, from, &q, kv_ops)
        .forward(&mut a, Heads::token_major(hq, sq, hd));
    drop(held);

    let mut x1 = if from > 0 {
        suffix(x, (b, s, from), d)
    } else {
        x.to_vec()
    };
    ws.project(O, &mut merged, &a, nq, &mut x1, true);
    let mut n2 = vec![0f32; nq * d];
    rms_norm_rows(&x1, ws.ln2, eps, &mut n2);
    let gate = ws.project_new(GATE, &mut merged, &n2, nq);
    let up = ws.project_new(UP, &mut merged, &n2, nq);
    let mut h = vec![0f32; nq * inter];
    simd::swiglu(&gate, &up, &mut h);
    // The residual stream becomes the output (the backward keeps its own copy of x1).
    let mut out = if save {
        x1.clone()
    } else {
        std::mem::take(&mut x1)
    };
    ws.project(DOWN, &mut merged, &h, nq, &mut out, true);
    let saved = save.then(|| Saved {
        n1,
        n1q,
        q,
        k,
        v,
        a,
        x1,
        n2,
        gate,
        up,
        h,
        merged,
    });
    Ok((out, saved))
}

/// Gradients of one layer: the input's (when wanted) and each LoRA pair's `(dA, dB)`
/// (empty when not wanted).
struct Grads {
    dx: Option<Vec<f32>>,
    lora: [Vec<(Vec<f32>, Vec<f32>)>; 7],
}

fn backward(
    ws: &Ws<'_>,
    x: &[f32],
    pos: &Positions,
    from: usize,
    sv: &Saved,
    gout: &[f32],
    want_dx: bool,
    want_lora: bool,
) -> Grads {
    let Sizes {
        d,
        hq,
        hkv,
        hd,
        inter,
        eps,
        b,
        s,
        sq,
        n,
        nq,
        qd,
        kvd,
    } = Sizes::new(ws.dims, pos, from);
    let tables = (pos.cos.as_slice(), pos.sin.as_slice());
    let mut lora: [Vec<(Vec<f32>, Vec<f32>)>; 7] = Default::default();
    let mut lora_grad = |i: usize, u: &[f32], g: &[f32], rows: usize| {
        for l in ws.lora[i].iter().filter(|_| want_lora) {
            lora[i].push(gemm::lora_grads(u, g, rows, ws.dims.proj(i).0, l));
        }
    };
    let m = &sv.merged;
    // MLP: out = x1 + down(swiglu(gate(n2), up(n2))), n2 = rms(x1).
    let dh = ws.project_back_new(DOWN, m, gout, nq);
    lora_grad(DOWN, &sv.h, gout, nq);
    let (mut dg, mut du) = (vec![0f32; nq * inter], vec![0f32; nq * inter]);
    simd::swiglu_bwd(&sv.gate, &sv.up, &dh, &mut dg, &mut du);
    drop(dh);
    let mut dn2 = ws.project_back_new(GATE, m, &dg, nq);
    ws.project_back(UP, m, &du, nq, &mut dn2, true);
    lora_grad(GATE, &sv.n2, &dg, nq);
    lora_grad(UP, &sv.n2, &du, nq);
    let mut dx1 = gout.to_vec();
    rms_norm_bwd_rows(&sv.x1, ws.ln2, eps, &dn2, &mut dx1, true, None);
    // Attention: x1 = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rms(x).
    let da = ws.project_back_new(O, m, &dx1, nq);
    lora_grad(O, &sv.a, &dx1, nq);
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; nq * qd],
        vec![0f32; n * kvd],
        vec![0f32; n * kvd],
    );
    let own = Heads::token_major(hkv, s, hd);
    let qh = Heads::token_major(hq, sq, hd);
    ws.problem(pos, from, &sv.q, ((&sv.k, own), (&sv.v, own), s))
        .backward((&da, qh), (&mut dq, qh), (&mut dk, own), (&mut dv, own));
    rope_rows(&mut dq, hq, hd, tables, (sq, s, from), true);
    rope_rows(&mut dk, hkv, hd, tables, (s, s, 0), true);
    let n1q = sv.n1q.as_deref().unwrap_or(&sv.n1);
    lora_grad(Q, n1q, &dq, nq);
    lora_grad(K, &sv.n1, &dk, n);
    lora_grad(V, &sv.n1, &dv, n);
    let dx = want_dx.then(|| {
        let mut dn1 = ws.project_back_new(K, m, &dk, n);
        ws.project_back(V, m, &dv, n, &mut dn1, true);
        let mut dx = if from > 0 {
            let part = ws.project_back_new(Q, m, &dq, nq);
            add_suffix(&mut dn1, &part, (b, s, from), d);
            let mut dx = vec![0f32; n * d];
            add_suffix(&mut dx, &dx1, (b, s, from), d);
            dx
        } else {
            ws.project_back(Q, m, &dq, nq, &mut dn1, true);
            dx1
        };
        rms_norm_bwd_rows(x, ws.ln1, eps, &dn1, &mut dx, true, None);
        dx
    });
    Grads { dx, lora }
}

/// Runs the layer without a graph (inference): `x` `[b, s, d]` to `[b, s − from, d]`.
pub(crate) fn forward(
    params: &Params,
    dims: LayerDims,
    x: &Tensor,
    pos: &Positions,
    from: usize,
    kv: Kv<'_>,
) -> Result<Tensor> {
    let out = with_f32(x, "decoder layer", |xs| {
        with_ws(params, dims, None, |ws| {
            run(ws, xs, pos, from, kv, false).map(|r| r.0)
        })
    })??;
    tensor(out, &Shape::from((pos.b, pos.s - from, dims.d)))
}

/// The layer as a differentiable op (training; no KV cache): gradients reach `x` and the
/// LoRA factors.
pub(crate) fn train(
    params: &Params,
    dims: LayerDims,
    x: &Tensor,
    pos: &Positions,
    from: usize,
) -> Result<Tensor> {
    let mut flat = Vec::new();
    for (a, b, _) in params.lora.iter().flatten() {
        flat.push(a.flatten_all()?);
        flat.push(b.flatten_all()?);
    }
    let pack = if flat.is_empty() {
        Tensor::zeros(1, candle_core::DType::F32, x.device())?
    } else {
        Tensor::cat(&flat, 0)?
    };
    let op = LayerOp {
        params: params.clone(),
        dims,
        pos: pos.clone(),
        from,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&pack, op)
}

struct LayerOp {
    params: Params,
    dims: LayerDims,
    pos: Positions,
    from: usize,
    saved: Mutex<Option<Saved>>,
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "fused-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "decoder layer")?;
        let pack = self
            .params
            .has_lora()
            .then(|| slice(s2, l2, "decoder layer"))
            .transpose()?;
        if l1.dims() != [self.pos.b, self.pos.s, self.dims.d] {
            bail!(
                "decoder layer: input {:?} is not [{}, {}, {}]",
                l1.dims(),
                self.pos.b,
                self.pos.s,
                self.dims.d
            );
        }
        let (out, saved) = with_ws(&self.params, self.dims, pack, |ws| {
            run(ws, x, &self.pos, self.from, Kv::Own, true)
        })?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        let shape = Shape::from((self.pos.b, self.pos.s - self.from, self.dims.d));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        pack: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want_lora = self.params.has_lora() && pack.track_op();
        let grads = with_f32(x, "decoder layer", |xs| {
            with_f32(pack, "decoder layer", |ps| {
                with_f32(g, "decoder layer", |gs| {
                    let packed = self.params.has_lora().then_some(ps);
                    with_ws(&self.params, self.dims, packed, |ws| {
                        let mut guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                        if guard.is_none() {
                            *guard = run(ws, xs, &self.pos, self.from, Kv::Own, true)?.1;
                        }
                        let Some(sv) = guard.as_ref() else {
                            bail!("decoder layer: no saved activations")
                        };
                        Ok(backward(
                            ws,
                            xs,
                            &self.pos,
                            self.from,
                            sv,
                            gs,
                            x.track_op(),
                            want_lora,
                        ))
                    })
                })
            })
        })????;
        let dx = match grads.dx {
            Some(dx) => Some(tensor(dx, x.shape())?),
            None => None,
        };
        let dpack = grad_for(pack, || {
            let mut flat = Vec::with_capacity(pack.elem_count());
            for (i, l) in self.params.lora.iter().enumerate() {
                for (k, (a, b, _)) in l.iter().enumerate() {
                    match grads.lora[i].get(k) {
                        Some((da, db)) => {
                            flat.extend_from_slice(da);
                            flat.extend_from_slice(db);
                        }
                        None => flat.resize(flat.len() + a.elem_count() + b.elem_count(), 0.0),
                    }
                }
            }
            tensor(flat, pack.shape())
        })?;
        Ok((dx, dpack))
    }
}
