// Shared device helpers for the custom kernels. Prepended to every .cu file of this
// directory before NVRTC compiles it (the runtime and the compile check both do this), so
// the kernels need no #include at all: NVRTC runs without a CUDA toolkit, and the 16-bit
// types are handled as raw bits with PTX conversions instead of cuda_fp16.h/cuda_bf16.h.
//
// Requires sm_80 or newer (bf16 conversions and bf16 mma.sync).

typedef unsigned short u16;
typedef unsigned int u32;

// Raw 16-bit float storage types. Distinct structs so templates can tell them apart.
struct bf16 { u16 x; };
struct f16 { u16 x; };

// HF fills masked attention scores with the most negative finite f32.
#define MASKED (-3.402823466e38f)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((u32)v.x) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v.x));
    return r;
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(v));
    return r;
}

// Two floats rounded into one register of 16-bit pairs, `lo` in the low half: the element
// order mma.sync fragments use (lower column / k index in the low half).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)from_f32<T>(lo).x | ((u32)from_f32<T>(hi).x << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// D(16x8, f32) += A(16x16, row) * B(16x8, col) on tensor cores, for bf16 or f16 inputs.
// Fragment layout (g = lane / 4, c = lane % 4):
//   a0: (g, 2c..2c+1)  a1: (g+8, 2c..)  a2: (g, 8+2c..)  a3: (g+8, 8+2c..)
//   b0: (k = 2c..2c+1, n = g)  b1: (k = 8+2c.., n = g)
//   d0,d1: (g, 2c..2c+1)  d2,d3: (g+8, 2c..2c+1)
template <typename T> __device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two adjacent 16-bit elements as one 32-bit load (callers guarantee even element offsets).
template <typename T> __device__ __forceinline__ u32 ld2(const T* p) {
    return *reinterpret_cast<const u32*>(p);
}
