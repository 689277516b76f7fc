//! Vectorised row and elementwise kernels (exp, softmax, log-softmax, SiLU, SwiGLU,
//! quick-GELU, dot products) with run-time CPU dispatch.
//!
//! The crate builds for baseline x86-64, so its plain loops run as SSE2 and call libm's
//! scalar `expf` per element (6–10% of a training step in the profile of
//! docs/model-bench.md). Each kernel here is written once, as scalar code over slices or
//! over a fixed 16-lane accumulator, and compiled three times by [`simd_fn!`]: with
//! AVX-512F + FMA, with AVX2 + FMA, and for the baseline. The first call picks one from
//! `is_x86_feature_detected!` for the rest of the process.
//!
//! **Same bytes on every CPU.** The three builds compute every element with the same
//! sequence of IEEE operations: `mul_add` is a fused multiply-add in each (an instruction
//! with FMA, libm's exact `fmaf` without), Rust never contracts or reassociates floating
//! point, and each element's value does not depend on which lane or loop tail computed it.
//! Reductions go through [`Lanes`], 16 accumulators in one AVX-512 register, two AVX2
//! registers or an array: element `i` goes to lane `i % 16` (a short tail is padded with
//! zeros), and the lanes are combined in one fixed tree. The vectorizer does not do that
//! for plain loops (a float sum is sequential unless reassociated, and the array form came
//! out as 128-bit shuffles), hence the explicit register types. So results depend on the
//! inputs alone.
//!
//! [`exp`] is Cephes' `expf` (range reduction by `ln 2` in two parts, degree-6
//! polynomial, about 1 ulp); below `ln(2⁻¹²⁶)` it returns exactly 0 (the softmax of a
//! key masked with `f32::MIN` must be exactly 0) and above 88.376 it returns +∞ (the
//! true value, ≥ 2.4e38, only ever feeds `1 / (1 + e)`).

/// Lanes of the reduction accumulators (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Level {
    Avx512,
    Avx2,
    Scalar,
}

/// The instruction set the kernels run with in this process.
pub(crate) fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("fma");
            if fma && std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if fma && std::arch::is_x86_feature_detected!("avx2") {
                return Level::Avx2;
            }
        }
        Level::Scalar
    })
}

/// Defines a function whose body is compiled for AVX-512, AVX2 and the baseline, and
/// dispatches on [`level`].
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident : $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            // `L` is the reduction register type of the build ([`Lanes`]).
            #[inline(always)]
            #[allow(dead_code, non_camel_case_types)]
            fn body<L: $crate::ops::simd::Lanes>($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($a: $t),*) $(-> $r)? {
                    body::<$crate::ops::simd::Avx512>($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($a: $t),*) $(-> $r)? {
                    body::<$crate::ops::simd::Avx2>($($a),*)
                }
                match $crate::ops::simd::level() {
                    // SAFETY: `level` detected these features on this CPU.
                    $crate::ops::simd::Level::Avx512 => return unsafe { avx512($($a),*) },
                    // SAFETY: as above.
                    $crate::ops::simd::Level::Avx2 => return unsafe { avx2($($a),*) },
                    $crate::ops::simd::Level::Scalar => {}
                }
            }
            body::<$crate::ops::simd::Scalar>($($a),*)
        }
    };
}
pub(crate) use simd_fn;

/// `eˣ` (see the module docs for accuracy and the two cut-offs).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_544; // ln(2^-126)
    const HI: f32 = 88.376_26; // largest x whose rounded x·log2(e) is 127
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it leaves round(v) in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let xc = if x < LO {
        LO
    } else if x > HI {
        HI
    } else {
        x
    };
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    let r = n.mul_add(-LN2_HI, xc);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y * scale
    }
}

/// `1 / (1 + e^(−x))`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// 16 f32 accumulators; see the module docs. Implementations must give identical
/// results: `fma` fused, the reductions in the tree `[i] + [i+8]`, then `+[i+4]`,
/// `+[i+2]`, `+[i+1]`.
pub(crate) trait Lanes: Copy {
    fn splat(v: f32) -> Self;
    fn load(x: &[f32; LANES]) -> Self;
    fn store(self, out: &mut [f32; LANES]);
    /// `self + a·b`, rounded once.
    fn fma(self, a: Self, b: Self) -> Self;
    fn add(self, a: Self) -> Self;
    fn mul(self, a: Self) -> Self;
    fn max(self, a: Self) -> Self;
    fn reduce_add(self) -> f32;
    fn reduce_max(self) -> f32;
}

/// The portable build: an array.
#[derive(Clone, Copy)]
pub(crate) struct Scalar([f32; LANES]);

impl Scalar {
    #[inline(always)]
    fn zip(self, a: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Self(std::array::from_fn(|i| f(self.0[i], a.0[i])))
    }

    #[inline(always)]
    fn tree(self, f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut a = self.0;
        let mut w = LANES;
        while w > 1 {
            w /= 2;
            for i in 0..w {
                a[i] = f(a[i], a[i + w]);
            }
        }
        a[0]
    }
}

/// `a > b ? a : b`, the comparison the vector `max` instructions make (for non-NaN input).
#[inline(always)]
fn max2(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

impl Lanes for Scalar {
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Self([v; LANES])
    }
    #[inline(always)]
    fn load(x: &[f32; LANES]) -> Self {
        Self(*x)
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; LANES]) {
        *out = self.0;
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], self.0[i])))
    }
    #[inline(always)]
    fn add(self, a: Self) -> Self {
        self.zip(a, |x, y| x + y)
    }
    #[inline(always)]
    fn mul(self, a: Self) -> Self {
        self.zip(a, |x, y| x * y)
    }
    #[inline(always)]
    fn max(self, a: Self) -> Self {
        self.zip(a, max2)
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        self.tree(|x, y| x + y)
    }
    #[inline(always)]
    fn reduce_max(self) -> f32 {
        self.tree(max2)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

/// The AVX2 and AVX-512 builds. Their methods are only reached from functions compiled
/// with those features (`simd_fn!` dispatches on [`level`]); inlined there, the
/// intrinsics become single instructions.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::undocumented_unsafe_blocks)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, Lanes};

    /// Lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(__m256, __m256);

    /// The last steps of the tree, from 8 lanes: `[i] + [i+4]`, `+[i+2]`, `+[i+1]`.
    #[inline(always)]
    fn tree8(v: __m256, f: impl Fn(__m128, __m128) -> __m128) -> f32 {
        // SAFETY: reached only with AVX available (see the module docs).
        unsafe {
            let s4 = f(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s2 = f(s4, _mm_movehl_ps(s4, s4));
            _mm_cvtss_f32(f(s2, _mm_shuffle_ps(s2, s2, 1)))
        }
    }

    impl Lanes for Avx2 {
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Self(_mm256_set1_ps(v), _mm256_set1_ps(v)) }
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            unsafe {
                Self(
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                )
            }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), self.0);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), self.1);
            }
        }
        #[inline(always)]
        fn fma(self, a: Self, b: Self) -> Self {
            unsafe {
                Self(
                    _mm256_fmadd_ps(a.0, b.0, self.0),
                    _mm256_fmadd_ps(a.1, b.1, self.1),
                )
            }
        }
        #[inline(always)]
        fn add(self, a: Self) -> Self {
            unsafe { Self(_mm256_add_ps(self.0, a.0), _mm256_add_ps(self.1, a.1)) }
        }
        #[inline(always)]
        fn mul(self, a: Self) -> Self {
            unsafe { Self(_mm256_mul_ps(self.0, a.0), _mm256_mul_ps(self.1, a.1)) }
        }
        #[inline(always)]
        fn max(self, a: Self) -> Self {
            // max_ps(x, y) = x > y ? x : y, like `max2`.
            unsafe { Self(_mm256_max_ps(self.0, a.0), _mm256_max_ps(self.1, a.1)) }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            unsafe { tree8(_mm256_add_ps(self.0, self.1), |a, b| _mm_add_ps(a, b)) }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            unsafe { tree8(_mm256_max_ps(self.0, self.1), |a, b| _mm_max_ps(a, b)) }
        }
    }

    /// All 16 lanes in one register.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(__m512);

    impl Avx512 {
        /// Lanes 0–7 and 8–15.
        #[inline(always)]
        fn halves(self) -> (__m256, __m256) {
            unsafe {
                let hi = _mm512_extractf64x4_pd(_mm512_castps_pd(self.0), 1);
                (_mm512_castps512_ps256(self.0), _mm256_castpd_ps(hi))
            }
        }
    }

    impl Lanes for Avx512 {
        #[inline(always)]
        fn splat(v: f32) -> Self {
            unsafe { Self(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        fn load(x: &[f32; LANES]) -> Self {
            unsafe { Self(_mm512_loadu_ps(x.as_ptr())) }
        }
        #[inline(always)]
        fn store(self, out: &mut [f32; LANES]) {
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) }
        }
        #[inline(always)]
        fn fma(self, a: Self, b: Self) -> Self {
            unsafe { Self(_mm512_fmadd_ps(a.0, b.0, self.0)) }
        }
        #[inline(always)]
        fn add(self, a: Self) -> Self {
            unsafe { Self(_mm512_add_ps(self.0, a.0)) }
        }
        #[inline(always)]
        fn mul(self, a: Self) -> Self {
            unsafe { Self(_mm512_mul_ps(self.0, a.0)) }
        }
        #[inline(always)]
        fn max(self, a: Self) -> Self {
            unsafe { Self(_mm512_max_ps(self.0, a.0)) }
        }
        #[inline(always)]
        fn reduce_add(self) -> f32 {
            let (lo, hi) = self.halves();
            unsafe { tree8(_mm256_add_ps(lo, hi), |a, b| _mm_add_ps(a, b)) }
        }
        #[inline(always)]
        fn reduce_max(self) -> f32 {
            let (lo, hi) = self.halves();
            unsafe { tree8(_mm256_max_ps(lo, hi), |a, b| _mm_max_ps(a, b)) }
        }
    }
}

/// Folds `f` over 16-element blocks of `xs` (equal lengths), the tail zero-padded.
#[inline(always)]
fn fold<L: Lanes, const N: usize>(xs: [&[f32]; N], init: L, f: impl Fn(L, [L; N]) -> L) -> L {
    let n = xs.iter().map(|x| x.len()).min().unwrap_or(0);
    let blocks = n / LANES;
    let mut acc = init;
    for b in 0..blocks {
        acc = f(
            acc,
            std::array::from_fn(|k| {
                let c: &[f32; LANES] = xs[k][b * LANES..(b + 1) * LANES].try_into().unwrap();
                L::load(c)
            }),
        );
    }
    if n % LANES != 0 {
        acc = f(
            acc,
            std::array::from_fn(|k| {
                let mut pad = [0f32; LANES];
                pad[..n % LANES].copy_from_slice(&xs[k][blocks * LANES..n]);
                L::load(&pad)
            }),
        );
    }
    acc
}

/// `Σ a_i b_i` (fused multiply-adds into 16 lanes).
#[inline(always)]
pub(crate) fn dot<L: Lanes>(a: &[f32], b: &[f32]) -> f32 {
    fold([a, b], L::splat(0.0), |acc, [x, y]| acc.fma(x, y)).reduce_add()
}

/// `Σ (a_i b_i) c_i`.
#[inline(always)]
pub(crate) fn dot3<L: Lanes>(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    fold([a, b, c], L::splat(0.0), |acc, [x, y, z]| {
        acc.fma(x.mul(y), z)
    })
    .reduce_add()
}

/// `Σ a_i`.
#[inline(always)]
pub(crate) fn sum<L: Lanes>(a: &[f32]) -> f32 {
    fold([a], L::splat(0.0), |acc, [x]| acc.add(x)).reduce_add()
}

/// `max a_i` (−∞ for an empty slice). The zero padding of a short tail is harmless
/// only where the true maximum is ≥ 0, so the tail is folded in separately here.
#[inline(always)]
pub(crate) fn max<L: Lanes>(a: &[f32]) -> f32 {
    let body = a.len() - a.len() % LANES;
    let m = fold([&a[..body]], L::splat(f32::NEG_INFINITY), |acc, [x]| {
        acc.max(x)
    })
    .reduce_max();
    a[body..].iter().fold(m, |m, &v| max2(v, m))
}

/// Softmax of one row in place: `e^(x − max) / Σ`.
#[inline(always)]
fn softmax_row<L: Lanes>(row: &mut [f32]) {
    let m = max::<L>(row);
    for v in row.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum::<L>(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

simd_fn! {
    /// Softmax of one row in place.
    pub(crate) fn softmax_inplace(row: &mut [f32]) {
        softmax_row::<L>(row)
    }
}

simd_fn! {
    /// Attention probabilities of `rows` score rows of length `t` in place: the additive
    /// mask row of each (when given), then a softmax. A key whose mask is `f32::MIN` or
    /// −∞ gets the mask value itself as its score: adding any finite score of magnitude
    /// < 1e31 to `f32::MIN` rounds back to `f32::MIN`, so this is bit-identical to the
    /// addition and gives the key a probability of exactly 0.
    /// `mask` holds the rows' mask rows back to back (`rows × t`).
    pub(crate) fn masked_softmax_rows(p: &mut [f32], t: usize, mask: Option<&[f32]>) {
        if t == 0 {
            return;
        }
        for (r, row) in p.chunks_exact_mut(t).enumerate() {
            if let Some(m) = mask {
                for (x, &mv) in row.iter_mut().zip(&m[r * t..(r + 1) * t]) {
                    *x = if mv == f32::MIN || mv == f32::NEG_INFINITY { mv } else { *x + mv };
                }
            }
            softmax_row::<L>(row);
        }
    }
}

/// 16 values of `x` from `at` as a block.
#[inline(always)]
fn block(x: &[f32], at: usize) -> &[f32; LANES] {
    x[at..at + LANES].try_into().unwrap()
}

/// [`dot`] of `q` with four rows at once (four independent accumulators instead of one
/// dependency chain); each result is bit-identical to `dot(q, k[u])`.
#[inline(always)]
fn dot4<L: Lanes>(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let d = q.len();
    let mut acc = [L::splat(0.0); 4];
    let whole = d - d % LANES;
    for at in (0..whole).step_by(LANES) {
        let qv = L::load(block(q, at));
        for u in 0..4 {
            acc[u] = acc[u].fma(qv, L::load(block(k[u], at)));
        }
    }
    if whole < d {
        let pad = |x: &[f32]| {
            let mut b = [0f32; LANES];
            b[..d - whole].copy_from_slice(&x[whole..d]);
            L::load(&b)
        };
        let qv = pad(q);
        for u in 0..4 {
            acc[u] = acc[u].fma(qv, pad(k[u]));
        }
    }
    // Spelled out: `acc.map(..)` is a library function the compiler may leave out of line,
    // compiled without the caller's AVX (it did, once other code grew).
    [
        acc[0].reduce_add(),
        acc[1].reduce_add(),
        acc[2].reduce_add(),
        acc[3].reduce_add(),
    ]
}

simd_fn! {
    /// Attention scores of one query row against `out.len()` keys:
    /// `out[j] = scale · q · k[j]`, key `j` at `k[j * k_rs..][..q.len()]`.
    pub(crate) fn scores(q: &[f32], k: &[f32], k_rs: usize, scale: f32, out: &mut [f32]) {
        let (d, t) = (q.len(), out.len());
        let key = |j: usize| &k[j * k_rs..j * k_rs + d];
        for (c, o) in out.chunks_exact_mut(4).enumerate() {
            let j = 4 * c;
            let r = dot4::<L>(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (o, r) in o.iter_mut().zip(r) {
                *o = scale * r;
            }
        }
        for j in t - t % 4..t {
            out[j] = scale * dot::<L>(q, key(j));
        }
    }
}

/// [`weighted_rows`] for `d = 16·C`: the output in `2C` registers, even and odd keys in
/// separate accumulators (independent chains), added at the end.
#[inline(always)]
fn weighted_regs<L: Lanes, const C: usize>(p: &[f32], v: &[f32], v_rs: usize, out: &mut [f32]) {
    let (mut even, mut odd) = ([L::splat(0.0); C], [L::splat(0.0); C]);
    let pairs = p.len() / 2;
    for jp in 0..pairs {
        let j = 2 * jp;
        let (p0, p1) = (L::splat(p[j]), L::splat(p[j + 1]));
        for c in 0..C {
            even[c] = even[c].fma(p0, L::load(block(v, j * v_rs + c * LANES)));
            odd[c] = odd[c].fma(p1, L::load(block(v, (j + 1) * v_rs + c * LANES)));
        }
    }
    if p.len() % 2 == 1 {
        let j = p.len() - 1;
        let p0 = L::splat(p[j]);
        for c in 0..C {
            even[c] = even[c].fma(p0, L::load(block(v, j * v_rs + c * LANES)));
        }
    }
    for c in 0..C {
        even[c]
            .add(odd[c])
            .store((&mut out[c * LANES..(c + 1) * LANES]).try_into().unwrap());
    }
}

simd_fn! {
    /// `out = Σ_j p[j] · v[j]`, value row `j` at `v[j * v_rs..][..out.len()]`.
    pub(crate) fn weighted_rows(p: &[f32], v: &[f32], v_rs: usize, out: &mut [f32]) {
        let d = out.len();
        match d {
            32 => return weighted_regs::<L, 2>(p, v, v_rs, out),
            64 => return weighted_regs::<L, 4>(p, v, v_rs, out),
            128 => return weighted_regs::<L, 8>(p, v, v_rs, out),
            _ => {}
        }
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&v[j * v_rs..j * v_rs + d]) {
                *o = pj.mul_add(x, *o);
            }
        }
    }
}

simd_fn! {
    /// Attention's softmax backward on score rows of length `t`, in place:
    /// `dp ← scale · p ∘ (dp − rowsum(p ∘ dp))`.
    pub(crate) fn softmax_bwd_rows(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
        if t == 0 {
            return;
        }
        for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
            let d = dot::<L>(pr, dr);
            for (x, &pj) in dr.iter_mut().zip(pr) {
                *x = pj * (*x - d) * scale;
            }
        }
    }
}

simd_fn! {
    /// Softmax backward of one row: `dx = y (g − Σ g y)`.
    pub(crate) fn softmax_bwd(y: &[f32], g: &[f32], dx: &mut [f32]) {
        let d = dot::<L>(y, g);
        for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
            *o = yv * (gv - d);
        }
    }
}

simd_fn! {
    /// Log-softmax of one row: `x − max − ln Σ e^(x − max)`.
    pub(crate) fn log_softmax(x: &[f32], y: &mut [f32]) {
        let m = max::<L>(x);
        // y holds the exponentials first, then the result.
        for (o, &v) in y.iter_mut().zip(x) {
            *o = exp(v - m);
        }
        let lse = m + sum::<L>(y).ln();
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v - lse;
        }
    }
}

simd_fn! {
    /// Log-softmax backward of one row: `dx = g − e^y Σ g`.
    pub(crate) fn log_softmax_bwd(y: &[f32], g: &[f32], dx: &mut [f32]) {
        let sg = sum::<L>(g);
        for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
            *o = gv - exp(yv) * sg;
        }
    }
}

simd_fn! {
    /// `x σ(x)`.
    pub(crate) fn silu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v / (1.0 + exp(-v));
        }
    }
}

simd_fn! {
    /// SiLU backward: `g σ(x) (1 + x (1 − σ(x)))`.
    pub(crate) fn silu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
        for ((o, &v), &gv) in dx.iter_mut().zip(x).zip(g) {
            let s = sigmoid(v);
            *o = gv * s * (1.0 + v * (1.0 - s));
        }
    }
}

simd_fn! {
    /// SwiGLU gating `silu(g) · u`.
    pub(crate) fn swiglu(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((o, &v), &w) in y.iter_mut().zip(g).zip(u) {
            *o = v / (1.0 + exp(-v)) * w;
        }
    }
}

simd_fn! {
    /// SwiGLU backward: `dg = gy u σ(g)(1 + g(1 − σ(g)))`, `du = gy g σ(g)`.
    pub(crate) fn swiglu_bwd(g: &[f32], u: &[f32], gy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len().min(u.len()).min(gy.len()).min(dg.len()).min(du.len()) {
            let (v, w, gv) = (g[i], u[i], gy[i]);
            let s = sigmoid(v);
            dg[i] = gv * w * s * (1.0 + v * (1.0 - s));
            du[i] = gv * v * s;
        }
    }
}

/// CLIP's quick-GELU constant: `x σ(1.702 x)`.
pub(crate) const QUICK_GELU: f32 = 1.702;

simd_fn! {
    /// `x σ(1.702 x)`, optionally after adding a bias row to every row of `x`:
    /// `y = z σ(1.702 z)` with `z = x + bias` (`bias.len()` divides `x.len()`).
    pub(crate) fn quick_gelu(x: &mut [f32], bias: Option<&[f32]>) {
        match bias {
            Some(b) if !b.is_empty() => {
                for row in x.chunks_exact_mut(b.len()) {
                    for (v, &bv) in row.iter_mut().zip(b) {
                        let z = *v + bv;
                        *v = z * sigmoid(QUICK_GELU * z);
                    }
                }
            }
            _ => {
                for v in x.iter_mut() {
                    *v *= sigmoid(QUICK_GELU * *v);
                }
            }
        }
    }
}

simd_fn! {
    /// Quick-GELU backward: `g (σ(a z) + a z σ(a z)(1 − σ(a z)))`, `a = 1.702`.
    pub(crate) fn quick_gelu_bwd(z: &[f32], g: &[f32], dz: &mut [f32]) {
        for ((o, &v), &gv) in dz.iter_mut().zip(z).zip(g) {
            let s = sigmoid(QUICK_GELU * v);
            *o = gv * (s + QUICK_GELU * v * s * (1.0 - s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm_and_exact_at_the_edges() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), (x as f64).exp() as f32);
            worst = worst.max(((got - want) / want).abs());
            x += 0.013;
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(-1e4), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1e4), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(sigmoid(-1e4), 0.0);
        assert_eq!(sigmoid(1e4), 1.0);
    }

    /// Softmax, its backward, log-softmax and the reductions of `x`, `g` as bits.
    #[inline(always)]
    fn probe<L: Lanes>(x: &[f32], g: &[f32]) -> Vec<u32> {
        let mut s = x.to_vec();
        softmax_row::<L>(&mut s);
        let mut out = s.clone();
        let d = dot::<L>(&s, g);
        out.extend(s.iter().zip(g).map(|(y, gv)| y * (gv - d)));
        // Four keys of width 16·k + 5 from x, against a query from g: dot4 = dot each.
        let w = x.len() / 5;
        let keys: [&[f32]; 4] = std::array::from_fn(|u| &x[u * w..(u + 1) * w]);
        let four = dot4::<L>(&g[..w], keys);
        for (u, k) in keys.iter().enumerate() {
            assert_eq!(four[u].to_bits(), dot::<L>(&g[..w], k).to_bits());
        }
        out.extend(four);
        if x.len() >= 64 * 3 {
            let mut o = [0f32; 64];
            weighted_regs::<L, 4>(&g[..3], x, 64, &mut o);
            out.extend(o);
        }
        out.extend([
            dot::<L>(x, g),
            dot3::<L>(x, g, x),
            sum::<L>(g),
            max::<L>(x),
            max::<L>(&x[..x.len().min(20)]),
        ]);
        out.iter().map(|v| v.to_bits()).collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn probe_avx512(x: &[f32], g: &[f32]) -> Vec<u32> {
        probe::<Avx512>(x, g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn probe_avx2(x: &[f32], g: &[f32]) -> Vec<u32> {
        probe::<Avx2>(x, g)
    }

    /// Every build this CPU can run gives the same bytes as the portable one (the
    /// module's promise).
    #[test]
    fn kernels_do_not_depend_on_the_instruction_set() {
        for n in [7, 16, 77, 1024] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0).collect();
            let g: Vec<f32> = (0..n).map(|i| ((i * 11) % 13) as f32 * 0.3 - 2.0).collect();
            let scalar = probe::<Scalar>(&x, &g);
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") {
                    // SAFETY: the features were just detected.
                    assert_eq!(unsafe { probe_avx2(&x, &g) }, scalar, "avx2, n {n}");
                }
                if has!("avx512f") && has!("fma") {
                    // SAFETY: as above.
                    assert_eq!(unsafe { probe_avx512(&x, &g) }, scalar, "avx512, n {n}");
                }
            }
            let mut s = x.clone();
            softmax_inplace(&mut s);
            assert_eq!(
                s.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                scalar[..n]
            );
        }
    }
}
