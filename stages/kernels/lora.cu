// Fused LoRA linear: y = x W^T + b + (s x A^T) B^T, and the GEMMs of its backward.
//
// The LoRA path is folded into the base GEMM as extra K: with u = s x A^T ([M, r], one
// skinny GEMM), y = [x | u] . [W | B]^T + b, so the main kernel runs K = in + r steps over
// one accumulator and writes y once. The rank-r tail adds r / in of the base GEMM's work
// (16 / 4096 = 0.4% for a 7B model's projections) and no extra pass over y.
//
// gemm2_<dtype>: C[M, N] = alpha1 A1 B1 + alpha2 A2 B2 (+ bias[n]), every operand given
//   by (pointer, row stride, column stride), so one SIMT kernel serves all layouts: u, the
//   f32 forward, and the backward (dx = g W + (s g B) A, dA = (s g B)^T x, dB = g^T u).
//   64x64 tiles, 256 threads, 4x4 outputs per thread, f32 accumulation.
// lora_fwd_mma_<dtype>: the forward for bf16/f16 on tensor cores (mma.sync m16n8k16),
//   64x64 tiles, 4 warps of 32x32, K step 32, "NT" layout: x [M, K1], W [N, K1],
//   u [M, K2], B [N, K2], all row-major with even K (32-bit pair loads).

struct GemmParams {
    long long sa1m, sa1k, sb1k, sb1n;  // A1 [M, K1], B1 [K1, N] strides, in elements
    long long sa2m, sa2k, sb2k, sb2n;  // A2 [M, K2], B2 [K2, N]
    int m, n, k1, k2;
    float alpha1, alpha2;
    int has_bias;
    int pad_;
};

#define G_BM 64
#define G_BN 64
#define G_BK 16

template <typename T>
__device__ void gemm2_simt(const T* a1, const T* b1, const T* a2, const T* b2, const T* bias, T* c,
                           GemmParams p) {
    __shared__ float as[G_BK][G_BM];
    __shared__ float bs[G_BK][G_BN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * G_BM, n0 = blockIdx.x * G_BN;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;

    for (int seg = 0; seg < 2; seg++) {
        const T* a = seg ? a2 : a1;
        const T* b = seg ? b2 : b1;
        const int kdim = seg ? p.k2 : p.k1;
        const long long sam = seg ? p.sa2m : p.sa1m, sak = seg ? p.sa2k : p.sa1k;
        const long long sbk = seg ? p.sb2k : p.sb1k, sbn = seg ? p.sb2n : p.sb1n;
        const float alpha = seg ? p.alpha2 : p.alpha1;
        for (int k0 = 0; k0 < kdim; k0 += G_BK) {
            __syncthreads();
            for (int idx = tid; idx < G_BK * G_BM; idx += 256) {
                const int mm = idx % G_BM, kk = idx / G_BM, gm = m0 + mm, gk = k0 + kk;
                as[kk][mm] = (gm < p.m && gk < kdim) ? alpha * to_f32(a[gm * sam + gk * sak]) : 0.f;
            }
            for (int idx = tid; idx < G_BK * G_BN; idx += 256) {
                const int nn = idx % G_BN, kk = idx / G_BN, gn = n0 + nn, gk = k0 + kk;
                bs[kk][nn] = (gn < p.n && gk < kdim) ? to_f32(b[gk * sbk + gn * sbn]) : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < G_BK; kk++) {
                float av[4], bv[4];
#pragma unroll
                for (int i = 0; i < 4; i++) av[i] = as[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; j++) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int gm = m0 + ty + 16 * i;
        if (gm >= p.m) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gn = n0 + tx + 16 * j;
            if (gn >= p.n) continue;
            const float bv = p.has_bias ? to_f32(bias[gn]) : 0.f;
            c[(long long)gm * p.n + gn] = from_f32<T>(acc[i][j] + bv);
        }
    }
}

#define L_BM 64
#define L_BN 64
#define L_BK 32
#define L_LDS (L_BK + 8)

template <typename T>
__device__ void lora_fwd_mma(const T* x, const T* w, const T* u, const T* bm, const T* bias, T* y, int m,
                             int n, int k1, int k2, int has_bias) {
    __shared__ __align__(16) u16 as[L_BM][L_LDS];
    __shared__ __align__(16) u16 bs[L_BN][L_LDS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;
    const int m0 = blockIdx.y * L_BM, n0 = blockIdx.x * L_BN;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

    for (int seg = 0; seg < 2; seg++) {
        const T* a = seg ? u : x;
        const T* b = seg ? bm : w;
        const int kdim = seg ? k2 : k1;
        for (int k0 = 0; k0 < kdim; k0 += L_BK) {
            __syncthreads();
            for (int idx = tid; idx < L_BM * (L_BK / 2); idx += 128) {
                const int rr = idx / (L_BK / 2), kk = (idx % (L_BK / 2)) * 2, gk = k0 + kk;
                const int gm = m0 + rr, gn = n0 + rr;
                *reinterpret_cast<u32*>(&as[rr][kk]) = (gm < m && gk < kdim) ? ld2(a + (long long)gm * kdim + gk) : 0u;
                *reinterpret_cast<u32*>(&bs[rr][kk]) = (gn < n && gk < kdim) ? ld2(b + (long long)gn * kdim + gk) : 0u;
            }
            __syncthreads();
#pragma unroll
            for (int ks = 0; ks < L_BK / 16; ks++) {
                const int kc = ks * 16 + 2 * c;
                u32 af[2][4];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const int r = wm * 32 + i * 16 + g;
                    af[i][0] = *reinterpret_cast<const u32*>(&as[r][kc]);
                    af[i][1] = *reinterpret_cast<const u32*>(&as[r + 8][kc]);
                    af[i][2] = *reinterpret_cast<const u32*>(&as[r][kc + 8]);
                    af[i][3] = *reinterpret_cast<const u32*>(&as[r + 8][kc + 8]);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const int nn = wn * 32 + j * 8 + g;
                    const u32 b0 = *reinterpret_cast<const u32*>(&bs[nn][kc]);
                    const u32 b1 = *reinterpret_cast<const u32*>(&bs[nn][kc + 8]);
#pragma unroll
                    for (int i = 0; i < 2; i++) mma16816<T>(acc[i][j], af[i], b0, b1);
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int gm = m0 + wm * 32 + i * 16 + g + 8 * h;
            if (gm >= m) continue;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int gn = n0 + wn * 32 + j * 8 + 2 * c;
                if (gn >= n) continue;  // n is even, so gn + 1 < n too
                float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                if (has_bias) {
                    v0 += to_f32(bias[gn]);
                    v1 += to_f32(bias[gn + 1]);
                }
                *reinterpret_cast<u32*>(y + (long long)gm * n + gn) = pack2<T>(v0, v1);
            }
        }
    }
}

#define GEMM2(T, NAME)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256) gemm2_##NAME(                                      \
        const T* a1, const T* b1, const T* a2, const T* b2, const T* bias, T* c, GemmParams p) {         \
        gemm2_simt<T>(a1, b1, a2, b2, bias, c, p);                                                       \
    }

#define LORA_MMA(T, NAME)                                                                                \
    extern "C" __global__ void __launch_bounds__(128) lora_fwd_mma_##NAME(                               \
        const T* x, const T* w, const T* u, const T* bm, const T* bias, T* y, int m, int n, int k1,     \
        int k2, int has_bias) {                                                                          \
        lora_fwd_mma<T>(x, w, u, bm, bias, y, m, n, k1, k2, has_bias);                                   \
    }

GEMM2(float, f32)
GEMM2(bf16, bf16)
GEMM2(f16, f16)
LORA_MMA(bf16, bf16)
LORA_MMA(f16, f16)
