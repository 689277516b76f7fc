// Fused scaled-dot-product attention, forward and backward (flash-attention style: K/V
// tiles in shared memory, online softmax, the [s, t] score matrix never exists).
//
// Layouts: q, o, dq: [b, hq, s, D] contiguous; k, v: [b, hkv, t, D] with a contiguous
// [t, D] block per (batch, head) at any batch/head stride (a KV-cache prefix view);
// dk, dv: [b, hkv, t, D] contiguous. Query head h reads KV head h / (hq / hkv) (GQA).
//
// Masks, all optional and combinable:
//   causal     query i sees keys j <= i + (t - s) (bottom-right aligned, as with a KV cache);
//   range      per batch, keys outside [range[2b], range[2b+1]) are hidden (padding);
//   mask       a dense additive f32 mask [b, mask_heads, s, t], mask_heads in {1, hq}.
// Semantics are the CPU reference's (stages/src/ops/attention.rs), which follows HF:
// a hidden key scores MASKED (f32::MIN); a dense mask value of MASKED or -inf replaces
// the score, any other value is added to it. A row whose keys are all hidden is therefore
// the uniform average of all t values, which the kernels reproduce without visiting the
// skipped tiles (the `fully hidden` fallback below).
//
// Accumulation is f32 everywhere; 16-bit inputs are converted on load.

struct AttnParams {
    long long kv_batch_stride;  // elements between batches of k and v
    long long kv_head_stride;   // elements between heads of k and v
    int b, hq, hkv, s, t;
    float scale;
    int causal;
    int has_range;
    int has_mask;
    int mask_heads;
};

__device__ __forceinline__ bool hidden(const AttnParams& p, const int* range, int bi, int i, int j) {
    if (p.causal && j > i + (p.t - p.s)) return true;
    if (p.has_range && (j < range[2 * bi] || j >= range[2 * bi + 1])) return true;
    return false;
}

// The score of key j for query row i, from the raw dot product q_i . k_j.
__device__ __forceinline__ float attn_score(const AttnParams& p, const float* mask, const int* range,
                                            int bi, int h, int i, int j, float dot) {
    if (hidden(p, range, bi, i, j)) return MASKED;
    if (!p.has_mask) return dot * p.scale;
    const int mh = p.mask_heads > 1 ? h : 0;
    const float m = mask[(((long long)bi * p.mask_heads + mh) * p.s + i) * p.t + j];
    if (m == MASKED || m == __int_as_float(0xff800000)) return m;
    return dot * p.scale + m;
}

// Keys [lo, hi) that any of the rows [r_lo, r_hi) can see; everything outside is hidden
// for all of them.
__device__ __forceinline__ void key_span(const AttnParams& p, const int* range, int bi, int r_lo, int r_hi,
                                         int& lo, int& hi) {
    lo = 0;
    hi = p.t;
    if (p.causal) hi = min(hi, max(0, r_hi - 1 + (p.t - p.s) + 1));
    if (p.has_range) {
        lo = max(lo, range[2 * bi]);
        hi = min(hi, range[2 * bi + 1]);
    }
    (void)r_lo;
}

__device__ __forceinline__ float NEG_INF() { return __int_as_float(0xff800000); }

// ------------------------------------------------------------------ forward, SIMT (any dtype)
// One warp per query row (4 rows per warp, 16 per block); each lane holds D/32 columns.
// Scores come from a warp reduction per key: exact f32, the reference-quality path and the
// one used for f32 inputs.

#define SIMT_TK 32

template <typename T, int D>
__device__ void attn_fwd_simt(const T* q, const T* k, const T* v, T* o, float* row_m, float* row_l,
                              const float* mask, const int* range, AttnParams p) {
    constexpr int E = D / 32, RPW = 4, WARPS = 4;
    __shared__ float ks[SIMT_TK][D];
    __shared__ float vs[SIMT_TK][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, bi = bh / p.hq, h = bh % p.hq, kvh = h / (p.hq / p.hkv);
    const int row0 = blockIdx.x * (RPW * WARPS);
    const T* qb = q + (long long)bh * p.s * D;
    const T* kb = k + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    const T* vb = v + bi * p.kv_batch_stride + kvh * p.kv_head_stride;

    float qr[RPW][E], acc[RPW][E], m[RPW], l[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int row = row0 + warp * RPW + r;
        m[r] = NEG_INF();
        l[r] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            qr[r][e] = row < p.s ? to_f32(qb[(long long)row * D + lane + 32 * e]) : 0.f;
            acc[r][e] = 0.f;
        }
    }
    int lo, hi;
    key_span(p, range, bi, row0, min(row0 + RPW * WARPS, p.s), lo, hi);
    for (int j0 = lo; j0 < hi; j0 += SIMT_TK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < SIMT_TK * D; idx += 32 * WARPS) {
            const int jj = idx / D, c = idx % D, j = j0 + jj;
            ks[jj][c] = j < hi ? to_f32(kb[(long long)j * D + c]) : 0.f;
            vs[jj][c] = j < hi ? to_f32(vb[(long long)j * D + c]) : 0.f;
        }
        __syncthreads();
        const int n = min(SIMT_TK, hi - j0);
        for (int jj = 0; jj < n; jj++) {
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const int row = row0 + warp * RPW + r;
                if (row >= p.s) continue;  // warp-uniform
                float part = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) part += qr[r][e] * ks[jj][lane + 32 * e];
                const float sc = attn_score(p, mask, range, bi, h, row, j0 + jj, warp_sum(part));
                if (sc == NEG_INF()) continue;  // a -inf mask entry: weight exactly 0 (warp-uniform)
                if (sc > m[r]) {
                    const float corr = expf(m[r] - sc);
                    l[r] *= corr;
#pragma unroll
                    for (int e = 0; e < E; e++) acc[r][e] *= corr;
                    m[r] = sc;
                }
                const float pj = expf(sc - m[r]);
                l[r] += pj;
#pragma unroll
                for (int e = 0; e < E; e++) acc[r][e] += pj * vs[jj][lane + 32 * e];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int row = row0 + warp * RPW + r;
        if (row >= p.s) continue;
        T* orow = o + ((long long)bh * p.s + row) * D;
        if (m[r] <= MASKED) {
            // Fully hidden row: every key scores MASKED, so softmax is uniform over all t.
            for (int e = 0; e < E; e++) {
                float sum = 0.f;
                for (int j = 0; j < p.t; j++) sum += to_f32(vb[(long long)j * D + lane + 32 * e]);
                orow[lane + 32 * e] = from_f32<T>(sum / p.t);
            }
            m[r] = MASKED;
            l[r] = (float)p.t;
        } else {
            const float inv = 1.f / l[r];
#pragma unroll
            for (int e = 0; e < E; e++) orow[lane + 32 * e] = from_f32<T>(acc[r][e] * inv);
        }
        if (row_m != nullptr && lane == 0) {
            row_m[(long long)bh * p.s + row] = m[r];
            row_l[(long long)bh * p.s + row] = l[r];
        }
    }
}

// ------------------------------------------------------------------ forward, tensor cores
// FlashAttention-2 layout: 4 warps x 16 query rows = 64 rows per block, K/V tiles of 64
// keys in shared memory (rows padded by 8 elements: conflict-free fragment reads). Q stays
// in registers as mma A fragments; S = Q K^T accumulates in f32, the online softmax runs
// on the accumulator fragment, which is then re-packed in place as the A operand of P V
// (the C layout of m16n8 equals the A layout of m16k16 over two adjacent n-tiles).

#define MMA_BM 64
#define MMA_BN 64

template <typename T, int D>
__device__ void attn_fwd_mma(const T* q, const T* k, const T* v, T* o, float* row_m, float* row_l,
                             const float* mask, const int* range, AttnParams p) {
    constexpr int LDS = D + 8, KS = D / 16, NT = MMA_BN / 8, DT = D / 8;
    __shared__ __align__(16) u16 ks[MMA_BN][LDS];
    __shared__ __align__(16) u16 vs[MMA_BN][LDS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int bh = blockIdx.y, bi = bh / p.hq, h = bh % p.hq, kvh = h / (p.hq / p.hkv);
    const int row0 = blockIdx.x * MMA_BM;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
    const T* qb = q + (long long)bh * p.s * D;
    const T* kb = k + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    const T* vb = v + bi * p.kv_batch_stride + kvh * p.kv_head_stride;

    u32 qa[KS][4];
#pragma unroll
    for (int s = 0; s < KS; s++) {
        const int c0 = s * 16 + 2 * c, c1 = c0 + 8;
        qa[s][0] = ra < p.s ? ld2(qb + (long long)ra * D + c0) : 0u;
        qa[s][1] = rb < p.s ? ld2(qb + (long long)rb * D + c0) : 0u;
        qa[s][2] = ra < p.s ? ld2(qb + (long long)ra * D + c1) : 0u;
        qa[s][3] = rb < p.s ? ld2(qb + (long long)rb * D + c1) : 0u;
    }
    float oacc[DT][4];
#pragma unroll
    for (int d = 0; d < DT; d++) oacc[d][0] = oacc[d][1] = oacc[d][2] = oacc[d][3] = 0.f;
    float mr[2] = {NEG_INF(), NEG_INF()}, lr[2] = {0.f, 0.f};
    // Rows past s still compute (on zero queries) to keep every warp in lockstep for the
    // block-wide barriers; their mask lookups use a clamped row and results are dropped.
    const int rows[2] = {min(ra, p.s - 1), min(rb, p.s - 1)};

    int lo, hi;
    key_span(p, range, bi, row0, min(row0 + MMA_BM, p.s), lo, hi);
    for (int j0 = lo; j0 < hi; j0 += MMA_BN) {
        __syncthreads();
        for (int idx = tid; idx < MMA_BN * (D / 2); idx += 128) {
            const int jj = idx / (D / 2), cp = (idx % (D / 2)) * 2, j = j0 + jj;
            u32 kv = 0u, vv = 0u;
            if (j < hi) {
                kv = ld2(kb + (long long)j * D + cp);
                vv = ld2(vb + (long long)j * D + cp);
            }
            *reinterpret_cast<u32*>(&ks[jj][cp]) = kv;
            *reinterpret_cast<u32*>(&vs[jj][cp]) = vv;
        }
        __syncthreads();

        float sacc[NT][4];
#pragma unroll
        for (int n = 0; n < NT; n++) sacc[n][0] = sacc[n][1] = sacc[n][2] = sacc[n][3] = 0.f;
#pragma unroll
        for (int s = 0; s < KS; s++) {
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const u32 b0 = *reinterpret_cast<const u32*>(&ks[n * 8 + g][s * 16 + 2 * c]);
                const u32 b1 = *reinterpret_cast<const u32*>(&ks[n * 8 + g][s * 16 + 8 + 2 * c]);
                mma16816<T>(sacc[n], qa[s], b0, b1);
            }
        }
        // Scores, masks and the tile's row maxima (a row is spread over the 4 lanes of a quad).
        float tmax[2] = {NEG_INF(), NEG_INF()};
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int j = j0 + n * 8 + 2 * c + (e & 1);
                const float sc = j < hi ? attn_score(p, mask, range, bi, h, rows[e >> 1], j, sacc[n][e]) : NEG_INF();
                sacc[n][e] = sc;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], sc);
            }
        }
        float corr[2], sh[2], tsum[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            // The max stays -inf only while every score so far is a -inf mask entry; then
            // shift by 0 instead, so that exp(-inf - shift) is 0 rather than NaN.
            const float mn = fmaxf(mr[r], tmax[r]);
            const float shift = mn == NEG_INF() ? 0.f : mn;
            corr[r] = expf(mr[r] - shift);  // exp(-inf) = 0 on the first tile
            mr[r] = mn;
            sh[r] = shift;
        }
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float pv = expf(sacc[n][e] - sh[e >> 1]);
                sacc[n][e] = pv;
                tsum[e >> 1] += pv;
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tsum[r] += __shfl_xor_sync(0xffffffffu, tsum[r], 1);
            tsum[r] += __shfl_xor_sync(0xffffffffu, tsum[r], 2);
            lr[r] = lr[r] * corr[r] + tsum[r];
        }
#pragma unroll
        for (int d = 0; d < DT; d++) {
            oacc[d][0] *= corr[0];
            oacc[d][1] *= corr[0];
            oacc[d][2] *= corr[1];
            oacc[d][3] *= corr[1];
        }
        // O += P V: P's accumulator fragment re-packed as A, V read as B (k = key, n = column).
#pragma unroll
        for (int kk = 0; kk < MMA_BN / 16; kk++) {
            const u32 pa[4] = {pack2<T>(sacc[2 * kk][0], sacc[2 * kk][1]), pack2<T>(sacc[2 * kk][2], sacc[2 * kk][3]),
                               pack2<T>(sacc[2 * kk + 1][0], sacc[2 * kk + 1][1]),
                               pack2<T>(sacc[2 * kk + 1][2], sacc[2 * kk + 1][3])};
            const int kr = kk * 16 + 2 * c;
#pragma unroll
            for (int d = 0; d < DT; d++) {
                const int col = d * 8 + g;
                const u32 b0 = (u32)vs[kr][col] | ((u32)vs[kr + 1][col] << 16);
                const u32 b1 = (u32)vs[kr + 8][col] | ((u32)vs[kr + 9][col] << 16);
                mma16816<T>(oacc[d], pa, b0, b1);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = r ? rb : ra;
        if (row >= p.s) continue;
        T* orow = o + ((long long)bh * p.s + row) * D;
        float m = mr[r], l = lr[r];
        if (m <= MASKED) {
            // Fully hidden row (see the file comment): the uniform average of all t values.
            for (int d = 0; d < DT; d++) {
                for (int e = 0; e < 2; e++) {
                    const int col = d * 8 + 2 * c + e;
                    float sum = 0.f;
                    for (int j = 0; j < p.t; j++) sum += to_f32(vb[(long long)j * D + col]);
                    orow[col] = from_f32<T>(sum / p.t);
                }
            }
            m = MASKED;
            l = (float)p.t;
        } else {
            const float inv = 1.f / l;
#pragma unroll
            for (int d = 0; d < DT; d++) {
                *reinterpret_cast<u32*>(orow + d * 8 + 2 * c) = pack2<T>(oacc[d][2 * r] * inv, oacc[d][2 * r + 1] * inv);
            }
        }
        if (row_m != nullptr && c == 0) {
            row_m[(long long)bh * p.s + row] = m;
            row_l[(long long)bh * p.s + row] = l;
        }
    }
}

// ------------------------------------------------------------------ backward (SIMT, f32 math)
// Given the forward's per-row max m and normalizer l, p_ij = exp(score_ij - m_i) / l_i.
// delta_i = sum_c dO_ic O_ic;  ds_ij = p_ij (dO_i . v_j - delta_i);
// dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i;  dv_j = sum_i p_ij dO_i.
// dk/dv are owned per key by one warp (looping over the group's query heads: no atomics),
// dq per query row by one warp: deterministic.

template <typename T, int D>
__device__ void attn_bwd_delta(const T* o, const T* go, float* delta, int rows) {
    constexpr int E = D / 32;
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= rows) return;
    float part = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) part += to_f32(o[row * D + lane + 32 * e]) * to_f32(go[row * D + lane + 32 * e]);
    part = warp_sum(part);
    if (lane == 0) delta[row] = part;
}

#define BWD_QT 16

template <typename T, int D>
__device__ void attn_bwd_dkdv(const T* q, const T* k, const T* v, const T* go, const float* row_m,
                              const float* row_l, const float* delta, T* dk, T* dv, const float* mask,
                              const int* range, AttnParams p) {
    constexpr int E = D / 32;
    __shared__ float qs[BWD_QT][D];
    __shared__ float gs[BWD_QT][D];
    __shared__ float sm[BWD_QT], sl[BWD_QT], sd[BWD_QT];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bi = blockIdx.y / p.hkv, kvh = blockIdx.y % p.hkv, n_rep = p.hq / p.hkv;
    const int jb0 = blockIdx.x * 8, j = jb0 + warp;
    const T* kb = k + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    const T* vb = v + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    float kr[E], vr[E], dkr[E], dvr[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        kr[e] = j < p.t ? to_f32(kb[(long long)j * D + lane + 32 * e]) : 0.f;
        vr[e] = j < p.t ? to_f32(vb[(long long)j * D + lane + 32 * e]) : 0.f;
        dkr[e] = dvr[e] = 0.f;
    }
    for (int r = 0; r < n_rep; r++) {
        const int h = kvh * n_rep + r;
        const long long bh = (long long)bi * p.hq + h;
        for (int i0 = 0; i0 < p.s; i0 += BWD_QT) {
            const int n = min(BWD_QT, p.s - i0);
            __syncthreads();
            for (int idx = threadIdx.x; idx < n * D; idx += 256) {
                const long long off = (bh * p.s + i0) * D + idx;
                qs[idx / D][idx % D] = to_f32(q[off]);
                gs[idx / D][idx % D] = to_f32(go[off]);
            }
            if (threadIdx.x < n) {
                sm[threadIdx.x] = row_m[bh * p.s + i0 + threadIdx.x];
                sl[threadIdx.x] = row_l[bh * p.s + i0 + threadIdx.x];
                sd[threadIdx.x] = delta[bh * p.s + i0 + threadIdx.x];
            }
            __syncthreads();
            // Causal: skip a tile whose rows all hide this block's keys, unless one of them is
            // fully hidden (its probabilities are uniform over every key, hidden ones included).
            bool skip = p.causal && jb0 > i0 + n - 1 + (p.t - p.s);
            for (int ii = 0; skip && ii < n; ii++) skip = sm[ii] > MASKED;
            if (skip || j >= p.t) continue;
            for (int ii = 0; ii < n; ii++) {
                float part = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) part += qs[ii][lane + 32 * e] * kr[e];
                const float sc = attn_score(p, mask, range, bi, h, i0 + ii, j, warp_sum(part));
                const float pij = expf(sc - sm[ii]) / sl[ii];
                if (pij == 0.f) continue;  // warp-uniform
                float dpp = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) dpp += gs[ii][lane + 32 * e] * vr[e];
                const float ds = pij * (warp_sum(dpp) - sd[ii]) * p.scale;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    dvr[e] += pij * gs[ii][lane + 32 * e];
                    dkr[e] += ds * qs[ii][lane + 32 * e];
                }
            }
        }
    }
    if (j < p.t) {
        const long long off = ((long long)blockIdx.y * p.t + j) * D;
#pragma unroll
        for (int e = 0; e < E; e++) {
            dk[off + lane + 32 * e] = from_f32<T>(dkr[e]);
            dv[off + lane + 32 * e] = from_f32<T>(dvr[e]);
        }
    }
}

template <typename T, int D>
__device__ void attn_bwd_dq(const T* q, const T* k, const T* v, const T* go, const float* row_m,
                            const float* row_l, const float* delta, T* dq, const float* mask,
                            const int* range, AttnParams p) {
    constexpr int E = D / 32;
    __shared__ float ks[SIMT_TK][D];
    __shared__ float vs[SIMT_TK][D];
    __shared__ int any_full;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.y, bi = bh / p.hq, h = bh % p.hq, kvh = h / (p.hq / p.hkv);
    const int row0 = blockIdx.x * 8, row = row0 + warp;
    const bool live = row < p.s;
    const T* kb = k + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    const T* vb = v + bi * p.kv_batch_stride + kvh * p.kv_head_stride;
    const long long ro = (long long)bh * p.s + (live ? row : 0);
    float qr[E], gr[E], dqr[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        qr[e] = live ? to_f32(q[ro * D + lane + 32 * e]) : 0.f;
        gr[e] = live ? to_f32(go[ro * D + lane + 32 * e]) : 0.f;
        dqr[e] = 0.f;
    }
    const float m = row_m[ro], l = row_l[ro], dl = delta[ro];
    if (threadIdx.x == 0) any_full = 0;
    __syncthreads();
    if (live && lane == 0 && m <= MASKED) any_full = 1;
    __syncthreads();
    int lo = 0, hi = p.t;
    if (!any_full) key_span(p, range, bi, row0, min(row0 + 8, p.s), lo, hi);
    for (int j0 = lo; j0 < hi; j0 += SIMT_TK) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < SIMT_TK * D; idx += 256) {
            const int jj = idx / D, cc = idx % D, j = j0 + jj;
            ks[jj][cc] = j < hi ? to_f32(kb[(long long)j * D + cc]) : 0.f;
            vs[jj][cc] = j < hi ? to_f32(vb[(long long)j * D + cc]) : 0.f;
        }
        __syncthreads();
        if (!live) continue;
        const int n = min(SIMT_TK, hi - j0);
        for (int jj = 0; jj < n; jj++) {
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) part += qr[e] * ks[jj][lane + 32 * e];
            const float sc = attn_score(p, mask, range, bi, h, row, j0 + jj, warp_sum(part));
            const float pij = expf(sc - m) / l;
            if (pij == 0.f) continue;
            float dpp = 0.f;
#pragma unroll
            for (int e = 0; e < E; e++) dpp += gr[e] * vs[jj][lane + 32 * e];
            const float ds = pij * (warp_sum(dpp) - dl) * p.scale;
#pragma unroll
            for (int e = 0; e < E; e++) dqr[e] += ds * ks[jj][lane + 32 * e];
        }
    }
    if (live) {
#pragma unroll
        for (int e = 0; e < E; e++) dq[ro * D + lane + 32 * e] = from_f32<T>(dqr[e]);
    }
}

// ------------------------------------------------------------------ entry points
// Names: attn_<pass>_<dtype>_d<D>. Block sizes: fwd_simt 128, fwd_mma 128, bwd_* 256.

#define ATTN_SIMT(T, NAME, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                                   \
        attn_fwd_simt_##NAME##_d##D(const T* q, const T* k, const T* v, T* o, float* m, float* l,       \
                                    const float* mask, const int* range, AttnParams p) {                \
        attn_fwd_simt<T, D>(q, k, v, o, m, l, mask, range, p);                                          \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                   \
        attn_bwd_delta_##NAME##_d##D(const T* o, const T* go, float* delta, int rows) {                 \
        attn_bwd_delta<T, D>(o, go, delta, rows);                                                       \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 2) attn_bwd_dkdv_##NAME##_d##D(                      \
        const T* q, const T* k, const T* v, const T* go, const float* m, const float* l,                \
        const float* delta, T* dk, T* dv, const float* mask, const int* range, AttnParams p) {          \
        attn_bwd_dkdv<T, D>(q, k, v, go, m, l, delta, dk, dv, mask, range, p);                          \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) attn_bwd_dq_##NAME##_d##D(                        \
        const T* q, const T* k, const T* v, const T* go, const float* m, const float* l,                \
        const float* delta, T* dq, const float* mask, const int* range, AttnParams p) {                 \
        attn_bwd_dq<T, D>(q, k, v, go, m, l, delta, dq, mask, range, p);                                \
    }

#define ATTN_MMA(T, NAME, D)                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 2)                                                   \
        attn_fwd_mma_##NAME##_d##D(const T* q, const T* k, const T* v, T* o, float* m, float* l,        \
                                   const float* mask, const int* range, AttnParams p) {                 \
        attn_fwd_mma<T, D>(q, k, v, o, m, l, mask, range, p);                                           \
    }

ATTN_SIMT(float, f32, 64)
ATTN_SIMT(float, f32, 128)
ATTN_SIMT(bf16, bf16, 64)
ATTN_SIMT(bf16, bf16, 128)
ATTN_SIMT(f16, f16, 64)
ATTN_SIMT(f16, f16, 128)
ATTN_MMA(bf16, bf16, 64)
ATTN_MMA(bf16, bf16, 128)
ATTN_MMA(f16, f16, 64)
ATTN_MMA(f16, f16, 128)
