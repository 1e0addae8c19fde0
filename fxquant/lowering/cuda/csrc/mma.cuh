// Pieces shared by the weight-only tensor-core kernels (gemv.cu's int4, int4_mma_layout.cu, int8_mma.cu's
// int8): the bf16/fp16 MMA, int4 pair dequantization and the block's sum of its warps' partial output tiles.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "device.cuh"

namespace fxquant {
namespace mma {

// D += A (16 x 16, row) * B (16 x 8, col), fp32 accumulators; A and B bf16 or fp16 pairs.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0 twice: 128 + q is exact
  static constexpr uint32_t kOnes = 0x3F803F80u;   // bf16 1.0 twice
  static constexpr float kOffset = 136.f;          // 128 + 8
  static __device__ __forceinline__ T2 offset() { return __float2bfloat162_rn(kOffset); }
  static __device__ __forceinline__ T2 lo2(T2 v) { return __low2bfloat162(v); }  // (lo, lo)
  static __device__ __forceinline__ T2 hi2(T2 v) { return __high2bfloat162(v); }
};
template <>
struct Pair<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024.0 twice
  static constexpr uint32_t kOnes = 0x3C003C00u;   // fp16 1.0 twice
  static constexpr float kOffset = 1032.f;         // 1024 + 8
  static __device__ __forceinline__ T2 offset() { return __float2half2_rn(kOffset); }
  static __device__ __forceinline__ T2 lo2(T2 v) { return __low2half2(v); }
  static __device__ __forceinline__ T2 hi2(T2 v) { return __high2half2(v); }
};

// Nibbles 0 and 4 of w as a pair, (q - 8) * scale + zero: the mask and the magic in one LOP3
// ((a & b) | c; the compiler's own lowering takes two, since a LOP3 holds one immediate), then a
// subtract (q - 8, exact) and an FMA rounded once.
template <typename T>
__device__ __forceinline__ uint32_t nibbles_0_4(uint32_t w) {  // (magic + q0, magic + q4), exact
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v) : "r"(w), "n"(0x000F000F), "n"(Pair<T>::kMagic));
  return v;
}

template <typename T>
__device__ __forceinline__ uint32_t dequant_nibbles_0_4(uint32_t w, typename Pair<T>::T2 s2, typename Pair<T>::T2 z2) {
  using T2 = typename Pair<T>::T2;
  const uint32_t v = nibbles_0_4<T>(w);
  const T2 q = __hsub2(*reinterpret_cast<const T2*>(&v), Pair<T>::offset());
  const T2 r = __hfma2(q, s2, z2);
  return *reinterpret_cast<const uint32_t*>(&r);
}

// acc[r][n] = D[row g / g + 8][tokens n * 8 + 2t, + 1] of this warp's K-tiles (rows row0 + 16 r ...):
// summed over the block's warps through kSlots per-warp copies in 32 KB of shared memory (warps
// beyond kSlots add into a slot in later rounds), times row_scale[row] when given, plus bias[row],
// stored to out[m, row] for row < N and m < M. Every thread of the block calls it.
template <typename T, int RT, int NT, int kMaxWarps>
__device__ __forceinline__ void reduce_store(const float (&acc)[RT][NT][4], int row0, int M, int N,
                                             const T* __restrict__ row_scale, const T* __restrict__ bias,
                                             T* __restrict__ out, int64_t out_stride) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  constexpr int kSlots = kMaxWarps < 8192 / (RT * NT * 128) ? kMaxWarps : 8192 / (RT * NT * 128);
  __shared__ float red[kSlots][RT * NT][16][8];
  const int rounds = (nwarps + kSlots - 1) / kSlots;
  for (int round = 0; round < rounds; ++round) {
    if (warp / kSlots == round) {
      float(*p)[16][8] = red[warp % kSlots];
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          float* q[4] = {&p[r * NT + n][g][2 * t], &p[r * NT + n][g][2 * t + 1], &p[r * NT + n][g + 8][2 * t],
                         &p[r * NT + n][g + 8][2 * t + 1]};
#pragma unroll
          for (int e = 0; e < 4; ++e) *q[e] = round == 0 ? acc[r][n][e] : *q[e] + acc[r][n][e];
        }
    }
    __syncthreads();
  }
  const int used = nwarps < kSlots ? nwarps : kSlots;
  for (int i = threadIdx.x; i < RT * NT * 128; i += blockDim.x) {
    const int rn = i / 128, rr = (i / 8) % 16, c = i % 8;
    const int row = row0 + 16 * (rn / NT) + rr, m = (rn % NT) * 8 + c;
    if (row < N && m < M) {
      float v = 0.f;
      for (int s = 0; s < used; ++s) v += red[s][rn][rr][c];
      if (row_scale != nullptr) v *= device::to_f(row_scale[row]);
      if (bias != nullptr) v += device::to_f(bias[row]);
      device::from_f(v, out + m * out_stride + row);
    }
  }
}

}  // namespace mma
}  // namespace fxquant
