// int8 weight-only on tensor cores at decode sizes (M <= 16, K % 64 == 0, sm_80+): the int8 weights,
// converted exactly to bf16/fp16, are the A operand of mma.m16n8k16 (16 output features x 16 k),
// x^T the B operand (16 k x 8 tokens), fp32 accumulators; the per-channel scale multiplies each
// output once, after the K sum. gemv.cu's CUDA-core GEMV does M (fp32) FMAs per weight, which made
// it 4-5x slower than bf16 at M = 16; here the MMA does the products.
//
// Work split (as gemv.cu's int4 kernel): a block takes 16 * RT rows; its warps split K into 64-k
// tiles. In a tile, lane (g, t) loads 16 bytes (16 consecutive k) of rows g and g + 8 of each
// 16-row tile, and the same 16 k of x for token g of each 8-token tile (two 16-byte loads). The k
// order inside an MMA step is free as long as A and B agree: MMA step j takes the lane's k
// 16 t + 4 j + {0, 1} (its A pair a0 / a1, B word b0) and 16 t + 4 j + {2, 3} (a2 / a3, b1), so x
// words need no permutation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "device.cuh"
#include "mma.cuh"
#include "ops.h"

namespace fxquant {
namespace {

constexpr int kWarps = 16;  // at most, per block; they split K

// Bytes 2h, 2h + 1 of u (int8 weights with 128 added, 0..255) as the pair (q, q') in T, exact:
// fp16 holds 1024 + u in its mantissa (one byte_perm, one subtract); bf16 has 7 mantissa bits, so
// the bytes go through fp32 (2^23 + u, minus 2^23 + 128) and are packed.
template <typename T>
__device__ __forceinline__ uint32_t int8_pair(uint32_t u, int h) {
  if constexpr (std::is_same_v<T, __half>) {
    const uint32_t v = __byte_perm(u, 0x64u, h ? 0x4342u : 0x4140u);  // bytes (u_2h, 0x64, u_2h+1, 0x64)
    const __half2 q = __hsub2(*reinterpret_cast<const __half2*>(&v), __float2half2_rn(1152.f));
    return *reinterpret_cast<const uint32_t*>(&q);
  } else {
    const float q0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | (2 * h))) - 8388736.f;
    const float q1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | (2 * h + 1))) - 8388736.f;
    const __nv_bfloat162 q = __floats2bfloat162_rn(q0, q1);
    return *reinterpret_cast<const uint32_t*>(&q);
  }
}

template <typename T, int NT, int RT>  // NT 8-token tiles (M <= 8 * NT), RT 16-row tiles per block
__global__ void __launch_bounds__(kWarps * 32) int8_mma_kernel(const T* __restrict__ x, int64_t x_stride,
                                                               const uint8_t* __restrict__ w,
                                                               const T* __restrict__ scales,
                                                               const T* __restrict__ bias, T* __restrict__ out,
                                                               int64_t out_stride, int M, int N, int K) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16 * RT;
  int ra[RT], rb[RT];  // byte offsets of this lane's rows (N * K < 2^31: the launcher checks)
#pragma unroll
  for (int r = 0; r < RT; ++r) {  // rows past N repeat the last one: never stored
    ra[r] = min(row0 + 16 * r + g, N - 1) * K;
    rb[r] = min(row0 + 16 * r + g + 8, N - 1) * K;
  }
  int64_t xrow[NT];  // tokens past M read row M - 1: their output columns are never stored
#pragma unroll
  for (int n = 0; n < NT; ++n) xrow[n] = min(n * 8 + g, M - 1) * x_stride + 16 * t;
  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.f;

  for (int kt = warp; kt < K / 64; kt += nwarps) {
    const uint8_t* wk = w + (kt * 64 + 16 * t);
    uint4 wa[RT], wb[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      wa[r] = device::load_stream(wk + ra[r]);
      wb[r] = device::load_stream(wk + rb[r]);
    }
    uint32_t xw[NT][8];
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint4* xp = reinterpret_cast<const uint4*>(x + (xrow[n] + kt * 64));
      const uint4 lo = __ldg(xp), hi = __ldg(xp + 1);
      xw[n][0] = lo.x, xw[n][1] = lo.y, xw[n][2] = lo.z, xw[n][3] = lo.w;
      xw[n][4] = hi.x, xw[n][5] = hi.y, xw[n][6] = hi.z, xw[n][7] = hi.w;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const uint32_t wa_j[4] = {wa[r].x, wa[r].y, wa[r].z, wa[r].w};
        const uint32_t wb_j[4] = {wb[r].x, wb[r].y, wb[r].z, wb[r].w};
        const uint32_t ua = wa_j[j] ^ 0x80808080u, ub = wb_j[j] ^ 0x80808080u;  // q + 128 per byte
        const uint32_t a0 = int8_pair<T>(ua, 0), a1 = int8_pair<T>(ub, 0);
        const uint32_t a2 = int8_pair<T>(ua, 1), a3 = int8_pair<T>(ub, 1);
#pragma unroll
        for (int n = 0; n < NT; ++n) mma::mma16816<T>(acc[r][n], a0, a1, a2, a3, xw[n][2 * j], xw[n][2 * j + 1]);
      }
    }
  }
  mma::reduce_store<T, RT, NT, kWarps>(acc, row0, M, N, scales, bias, out, out_stride);
}

template <typename T, int NT, int RT>
void launch(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b, at::Tensor& out,
            int warps) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  warps = std::min(warps, K / 64);
  int8_mma_kernel<T, NT, RT><<<(N + 16 * RT - 1) / (16 * RT), warps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), b, reinterpret_cast<T*>(out.data_ptr()), out.stride(0), M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block shape (16-row tiles per block, warps): the first of a preference list whose grid fits on the
// GPU in one wave, else the last (the int4 kernel's rule). FXQUANT_CXX_INT8_VARIANT="RT,WARPS" (RT 1 or
// 2; 4 at 9-16 tokens) overrides it, read at every call.
template <typename T, int NT>
void launch_nt(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
               at::Tensor& out) {
  struct Shape {
    int rt, warps;
  };
  // 64-row blocks last at NT = 2: 28672x4096 at M = 9-16 overflowed one wave at 2x4 (six blocks per SM
  // fit) and ran at 1.03-1.13x of bf16, against 1.75-1.92x on the other shapes (S23).
  static constexpr Shape kList[] = {{1, 16}, {1, 8}, {2, 8}, {2, 4}, {4, 4}};
  constexpr int count = NT == 2 ? 5 : 4;
  const int n = qweight.size(0), ktiles = x2.size(1) / 64;
  Shape s = kList[count - 1];
  for (int i = 0; i < count; ++i) {
    const Shape& c = kList[i];
    const int warps = std::min(c.warps, ktiles), blocks = (n + 16 * c.rt - 1) / (16 * c.rt);
    int per_sm = c.rt == 1 ? device::blocks_per_sm<int8_mma_kernel<T, NT, 1>>(warps * 32)
                           : device::blocks_per_sm<int8_mma_kernel<T, NT, 2>>(warps * 32);
    if constexpr (NT == 2) {
      if (c.rt == 4) per_sm = device::blocks_per_sm<int8_mma_kernel<T, NT, 4>>(warps * 32);
    }
    if (blocks <= per_sm * device::sm_count()) {
      s = c;
      break;
    }
  }
  if (const char* e = std::getenv("FXQUANT_CXX_INT8_VARIANT")) {  // exactly "RT,WARPS" (tests, experiments)
    Shape o{0, 0};
    int used = 0;
    if (std::sscanf(e, "%d,%d%n", &o.rt, &o.warps, &used) == 2 && e[used] == '\0' &&
        (o.rt == 1 || o.rt == 2 || (o.rt == 4 && NT == 2)) && o.warps >= 1 && o.warps <= kWarps)
      s = o;
  }
  if constexpr (NT == 2) {
    if (s.rt == 4) return launch<T, NT, 4>(x2, qweight, scales, b, out, s.warps);
  }
  if (s.rt == 1) launch<T, NT, 1>(x2, qweight, scales, b, out, s.warps);
  else launch<T, NT, 2>(x2, qweight, scales, b, out, s.warps);
}

}  // namespace

// FXQUANT_CXX_INT8_MMA: "0" never, "1" at every M <= 16; unset or anything else: M >= 2 (at M = 1 the CUDA-core GEMV
// measured as fast; BENCHMARKS.md S23). Read at every call (experiments; a CUDA graph keeps what
// capture saw).
bool int8_mma_linear(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const int64_t M = x2.size(0), K = x2.size(1);
  const char* e = std::getenv("FXQUANT_CXX_INT8_MMA");
  int64_t min_m = 2;
  if (e != nullptr && std::strcmp(e, "1") == 0) min_m = 1;
  if (e != nullptr && std::strcmp(e, "0") == 0) min_m = kMaxInt8MmaM + 1;
  if (M < min_m || M > kMaxInt8MmaM || K % 64 != 0 || device::capability() < 80) return false;
  const auto dt = x2.scalar_type();
  if (dt == at::kBFloat16) {
    const auto* b = bias.has_value() ? reinterpret_cast<const __nv_bfloat16*>(bias->data_ptr()) : nullptr;
    if (M <= 8) launch_nt<__nv_bfloat16, 1>(x2, qweight, scales, b, out);
    else launch_nt<__nv_bfloat16, 2>(x2, qweight, scales, b, out);
  } else {
    const auto* b = bias.has_value() ? reinterpret_cast<const __half*>(bias->data_ptr()) : nullptr;
    if (M <= 8) launch_nt<__half, 1>(x2, qweight, scales, b, out);
    else launch_nt<__half, 2>(x2, qweight, scales, b, out);
  }
  return true;
}

}  // namespace fxquant
