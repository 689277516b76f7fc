//! Few-row products `x Wᵀ` against weights repacked for them: the linear layers of a
//! decoding step (one row per sequence).
//!
//! A decoding step multiplies a handful of rows by every weight matrix of the model, so it
//! is bound by reading the weights (13.6 MB a step for llava-tiny), not by arithmetic.
//! Through `gemm` (`W xᵀ`, module `gemm`) those reads are repacked on every call and walk
//! sixteen weight rows at once; measured alone, a llava-tiny step's products ran at about
//! 30 GFLOP/s against 80 when the same weights sat in L2 (docs/model-bench.md). Here each
//! weight is packed once per generation into tiles of [`TILE`] output rows stored
//! `k`-major (`[tile][k][TILE]`), so a product reads it as a single sequential stream.
//!
//! **The bits of gemm.** Each output element is `Σₖ w·x` as one chain of fused
//! multiply-adds in `k` order, split into the same `k` blocks gemm uses for these shapes
//! (at most 512 long, as equal as possible, the blocks' sums added in order): exactly what
//! gemm computes for `W xᵀ` with FMA kernels, so switching a decoding step to this path
//! changes no result (a test checks every row count the model uses). Without FMA the model
//! keeps gemm ([`usable`]).

use candle_core::{Result, Tensor};

use super::simd::{self, simd_fn};

/// Output rows per tile: six 16-lane accumulators, plus the input column, fill the AVX2
/// register file.
const TILE: usize = 6;

/// Rows of `x` per pass: one 16-lane register holds one input column.
const ROWS: usize = simd::LANES;

/// Longest `k` block gemm sums in one chain for these shapes.
const KC: usize = 512;

/// A weight `W[out, k]` in `[tile][k][TILE]` order, the last tile padded with zero rows.
#[derive(Debug)]
pub(crate) struct Packed {
    out: usize,
    k: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs a row-major `W[out, k]`.
    pub(crate) fn new(w: &[f32], out: usize) -> Self {
        let k = w.len().checked_div(out).unwrap_or(0);
        let tiles = out.div_ceil(TILE);
        let mut data = Vec::with_capacity(tiles * k * TILE);
        for t in 0..tiles {
            let rows: Vec<&[f32]> = (t * TILE..(t + 1) * TILE)
                .map(|o| {
                    if o < out {
                        &w[o * k..(o + 1) * k]
                    } else {
                        &[][..]
                    }
                })
                .collect();
            for kk in 0..k {
                data.extend(rows.iter().map(|r| r.get(kk).copied().unwrap_or(0.0)));
            }
        }
        Self { out, k, data }
    }

    /// Packs a CPU f32 weight tensor `[out, k]` (read in place).
    pub(crate) fn from_tensor(w: &Tensor) -> Result<Self> {
        let (out, _) = w.dims2()?;
        super::fused::with_f32(w, "packed weight", |v| Self::new(v, out))
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }

    /// Bytes a packed `[out, k]` weight takes.
    pub(crate) fn size(out: usize, k: usize) -> usize {
        out.div_ceil(TILE) * TILE * k * std::mem::size_of::<f32>()
    }
}

/// Whether [`xwt`] gives gemm's bits on this CPU (it has FMA), and the model should use it.
pub(crate) fn usable() -> bool {
    simd::level() != simd::Level::Scalar
}

/// Whether a product of `rows` input rows with `W[out, k]` takes this path. gemm sums in
/// another order where the output has at most 256 elements (dot products along `k`), for
/// a single row (a matrix-vector product) and for `k ≤ 2`; and many rows are better served
/// by its blocking.
pub(crate) fn covers(rows: usize, out: usize, k: usize) -> bool {
    few_rows(rows) && rows * out > 256 && k > 2
}

/// Whether products of `rows` input rows can take this path at all (2 to 64 rows: the
/// rows gemm serves with `W xᵀ`).
pub(crate) fn few_rows(rows: usize) -> bool {
    (2..=super::gemm::SMALL_ROWS).contains(&rows)
}

/// The `k` blocks gemm sums separately for `W xᵀ` with `out` and `rows` rows: products
/// with both at most 64 take blocks of 512, larger ones `⌈k / 512⌉` blocks of
/// `⌈k / blocks⌉`. (gemm derives the 512 of larger products from the L1 cache's geometry;
/// it is 512 on 8-way 32 KiB L1 caches and can be 1024 on 12-way ones, where the two paths
/// then differ in the last bits for `k` over 512.)
fn blocks(out: usize, rows: usize, k: usize) -> impl Iterator<Item = (usize, usize)> {
    let kc = if out <= 64 && rows <= 64 {
        k.min(KC)
    } else {
        k.div_ceil(k.div_ceil(KC))
    }
    .max(1);
    (0..k).step_by(kc).map(move |k0| (k0, (k0 + kc).min(k)))
}

/// `y[n, out] (+)= x[n, k] · Wᵀ` for row-major `x` and `y` (row stride `out`); with `acc`
/// the product is added to `y`.
pub(crate) fn xwt(x: &[f32], n: usize, w: &Packed, y: &mut [f32], acc: bool) {
    let (k, out) = (w.k, w.out);
    assert!(
        x.len() >= n * k && y.len() >= n * out,
        "packed product: short operand"
    );
    let mut xt = vec![0f32; k * ROWS];
    for r0 in (0..n).step_by(ROWS) {
        let rows = (n - r0).min(ROWS);
        // Input columns as 16-lane vectors: xt[kk][r] = x[r0 + r][kk], zero past `rows`.
        for (r, xr) in x[r0 * k..(r0 + rows) * k].chunks_exact(k).enumerate() {
            for (kk, &v) in xr.iter().enumerate() {
                xt[kk * ROWS + r] = v;
            }
        }
        if rows < ROWS {
            for col in xt.chunks_exact_mut(ROWS) {
                col[rows..].fill(0.0);
            }
        }
        tiles(w, &xt, (rows, n), &mut y[r0 * out..(r0 + rows) * out], acc);
    }
}

simd_fn! {
    /// All tiles of `w` against one pass of up to 16 input rows (`xt`, `[k][16]`) out of
    /// `n` in the whole product.
    fn tiles(w: &Packed, xt: &[f32], rows_n: (usize, usize), y: &mut [f32], acc: bool) {
        let ((rows, n), k, out) = (rows_n, w.k, w.out);
        if k == 0 {
            if !acc {
                y.fill(0.0);
            }
            return;
        }
        for (t, panel) in w.data.chunks_exact(k * TILE).enumerate() {
            let mut sum = [[0f32; ROWS]; TILE];
            for (bi, (k0, k1)) in blocks(out, n, k).enumerate() {
                let mut a = [L::splat(0.0); TILE];
                let cols = xt[k0 * ROWS..k1 * ROWS].chunks_exact(ROWS);
                for (col, wk) in cols.zip(panel[k0 * TILE..k1 * TILE].chunks_exact(TILE)) {
                    let xv = L::load(col.try_into().expect("16 lanes"));
                    for (aj, &wj) in a.iter_mut().zip(wk) {
                        *aj = aj.fma(L::splat(wj), xv);
                    }
                }
                for (s, aj) in sum.iter_mut().zip(a) {
                    let mut part = [0f32; ROWS];
                    aj.store(&mut part);
                    if bi == 0 {
                        *s = part;
                    } else {
                        for (sv, pv) in s.iter_mut().zip(part) {
                            *sv += pv;
                        }
                    }
                }
            }
            let o0 = t * TILE;
            for (j, s) in sum.iter().enumerate().take(out - o0) {
                for (r, &v) in s.iter().enumerate().take(rows) {
                    let d = &mut y[r * out + o0 + j];
                    *d = if acc { *d + v } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / 16_777_216.0 - 0.5
            })
            .collect()
    }

    /// Every row count a decoding batch can have, on the model's shapes (and ragged
    /// ones), gives gemm's exact bits, with and without accumulation.
    #[test]
    fn packed_products_give_gemms_bits() {
        if !usable() {
            eprintln!("no FMA on this CPU: the packed path is not used");
            return;
        }
        let shapes = [
            (256, 256),
            (688, 256),
            (256, 688),
            (1024, 256),
            (70, 600),
            (13, 40),
            (40, 530),
        ];
        for (si, &(out, k)) in shapes.iter().enumerate() {
            let w = values(out * k, 1 + si as u32);
            let p = Packed::new(&w, out);
            assert_eq!(p.bytes(), Packed::size(out, k));
            for n in (1..=64).filter(|&n| covers(n, out, k)) {
                let x = values(n * k, 100 + n as u32);
                for acc in [false, true] {
                    let init = values(n * out, 7);
                    let (mut want, mut got) = (init.clone(), init);
                    gemm::xwt(&x, n, &w, out, &mut want, acc);
                    xwt(&x, n, &p, &mut got, acc);
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{out}x{k}, {n} rows, acc {acc}: bits differ from gemm"
                    );
                }
            }
        }
    }

    #[test]
    fn packed_products_cover_only_few_rows() {
        assert!(!covers(1, 256, 256) && covers(2, 256, 256) && covers(64, 256, 256));
        assert!(!covers(65, 256, 256) && !covers(16, 16, 256) && !covers(16, 256, 2));
    }
}
