// fxquant::cxx_int4_mma_weight_only_linear on CUDA: int4 decode (M <= 16) on the MMA-fragment layout
// (numerics.pack_int4_mma, Int4WeightOnly(layout="mma")); dequantize + cuBLAS (ops.cpp) elsewhere.
//
// The layout stores each 16-row x 64-k block as 512 bytes in which lane l = 4g + t of a warp owns 16
// contiguous bytes: one word per 16-k MMA step j, whose nibble pairs (i, i + 4) are the A registers
// a0..a3 of mma.m16n8k16 for rows g / g + 8 and k 2t, 2t + 1 / 2t + 8, 2t + 9 of that step. So a warp
// reads a block with one 16-byte load per lane (512 contiguous bytes) and dequantizes it with one
// LOP3, a subtract and an FMA per pair (mma.cuh), without the byte shuffles the row-major layout
// needs. x^T is the B operand (lane g takes token g of each 8-token tile) at the k the weight's pairs
// hold, 2t, 2t + 1 (mod 8): read from global memory as 4-byte pairs (XS false; one cache line per token
// per load, cheap when M <= 2 since all lanes then read one or two tokens), or (XS true) copied per
// warp step into the warp's shared memory with cp.async (16-byte chunks, whole lines) and read with
// ldmatrix, which hands each lane exactly those pairs. The warps of a block split K in steps of U
// blocks; RT 16-row blocks share each x fragment; partial sums are added across warps in shared
// memory (mma::reduce_store).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "device.cuh"
#include "mma.cuh"
#include "ops.h"

namespace fxquant {
namespace {
using mma::Pair;

constexpr int kWarps = 16;  // at most per block

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(a), "l"(gmem) : "memory");
}

// Four 8 x 8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8, and receives
// (row l / 4, elements 2 (l % 4), + 1) of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}

// XS: a warp's x tile for one step, M rows of U * 64 elements, each row padded by 16 bytes so that the
// 8 rows of an ldmatrix fall in distinct banks.
template <int U>
constexpr int x_pitch() {
  return U * 64 + 8;
}

// x modes: global reads, shared memory, shared memory with the scale and zero applied after the MMAs
enum XMode { kXGlobal = 0, kXShared = 1, kXSharedScaleAfter = 2 };

// Scale-after at one token tile and one row block is held to 3 blocks of 16 warps per SM (40 registers,
// as the other modes take unasked); 0 leaves every other kernel to ptxas's own register choice (an
// explicit 1 made it take up to 16 more registers).
template <int MODE, int NT, int RT>
constexpr int kMinBlocks = MODE == kXSharedScaleAfter && NT * RT == 1 ? 3 : 0;

template <typename T, int NT, int RT, int U, int MODE>  // NT 8-token tiles (M <= 8 NT), RT 16-row blocks,
// U 64-k blocks per step, MODE an XMode
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<MODE, NT, RT>) int4_mma_layout_kernel(
    const T* __restrict__ x, int64_t x_stride,
                                                                      const uint8_t* __restrict__ w,
                                                                      const T* __restrict__ sz,
                                                                      const T* __restrict__ bias, T* __restrict__ out,
                                                                      int64_t out_stride, int M, int N, int K,
                                                                      int group_shift) {
  using T2 = typename Pair<T>::T2;
  constexpr bool XS = MODE != kXGlobal;
  // kXSharedScaleAfter: the MMAs take magic + q (one LOP3 per pair) and a second MMA on ones sums x;
  // (q - 8) s + z = (magic + q) s + (z - (magic + 8) s) is then applied per row to the fp32 sums once
  // per step (the launcher asks for one scale group per step). The weights are not rounded to T first,
  // unlike the other modes and the reference: they differ by T's rounding. The default at 9-16 tokens.
  constexpr bool SA = MODE == kXSharedScaleAfter;
  extern __shared__ uint4 x_smem[];  // XS: nwarps tiles of M x x_pitch<U>() elements
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kb = K / 64, rb0 = blockIdx.x * RT, nrb = N / 16;
  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.f;
  const uint8_t* wr[RT];  // this lane's 16 bytes of block (rb, 0); blocks past N repeat the last (never stored)
  int row[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int rb = min(rb0 + r, nrb - 1);
    wr[r] = w + static_cast<int64_t>(rb) * kb * 512 + 16 * lane;
    row[r] = rb * 16 + g;
  }
  const T* xr[NT];  // !XS: token n * 8 + g (past M: row M - 1, never stored), at k 2t
  const T* xs[NT];  // XS: the ldmatrix row this lane names: token n * 8 + l % 8 (clamped), k 8 (l / 8)
  T* const tile = reinterpret_cast<T*>(x_smem) + warp * M * x_pitch<U>();
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    xr[n] = x + min(n * 8 + g, M - 1) * x_stride + 2 * t;
    xs[n] = tile + min(n * 8 + (lane & 7), M - 1) * x_pitch<U>() + 8 * (lane >> 3);
  }

  for (int s0 = warp * U; s0 < kb; s0 += nwarps * U) {
    if constexpr (XS) {  // this step's x, M x U * 64, in flight with the weights below
      __syncwarp();  // the last step's ldmatrix reads are done
      for (int c = lane; c < M * 8 * U; c += 32) {
        const int tok = c / (8 * U), chunk = c % (8 * U);
        cp_async16(tile + tok * x_pitch<U>() + 8 * chunk, x + tok * x_stride + s0 * 64 + 8 * chunk);
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
    uint4 wv[U][RT];
    uint32_t sa[U][RT], sb[U][RT];  // (scale, zero) of rows g and g + 8
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every load of the step first: U x RT x 512 bytes per warp in flight
      const unsigned int* szw = reinterpret_cast<const unsigned int*>(sz) + ((s0 + u) * 64 >> group_shift) * N;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        wv[u][r] = device::load_stream(wr[r] + (s0 + u) * 512);
        sa[u][r] = __ldg(szw + row[r]);
        sb[u][r] = __ldg(szw + row[r] + 8);
      }
    }
    if constexpr (XS) {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
      __syncwarp();
    }
    float part[RT][NT][4], xsum[NT][4];  // SA: this step's sums of (magic + q) x per row, of x per token
    if constexpr (SA) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        xsum[n][0] = xsum[n][1] = xsum[n][2] = xsum[n][3] = 0.f;
#pragma unroll
        for (int r = 0; r < RT; ++r) part[r][n][0] = part[r][n][1] = part[r][n][2] = part[r][n][3] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      T2 s2[RT][2], z2[RT][2];
#pragma unroll
      for (int r = 0; r < RT && !SA; ++r) {
        const T2 pa = *reinterpret_cast<const T2*>(&sa[u][r]), pb = *reinterpret_cast<const T2*>(&sb[u][r]);
        s2[r][0] = Pair<T>::lo2(pa), z2[r][0] = Pair<T>::hi2(pa), s2[r][1] = Pair<T>::lo2(pb), z2[r][1] = Pair<T>::hi2(pb);
      }
      uint32_t bx[NT][4];  // XS: (b0, b1) of steps j and j + 1 from one ldmatrix at even j
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int k = (s0 + u) * 64 + 16 * j;
        uint32_t b[NT][2];
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if constexpr (XS) {
            if (j % 2 == 0) ldmatrix_x4(bx[n], xs[n] + u * 64 + 16 * j);
            b[n][0] = bx[n][2 * (j % 2)], b[n][1] = bx[n][2 * (j % 2) + 1];
          } else {
            b[n][0] = __ldg(reinterpret_cast<const unsigned int*>(xr[n] + k));
            b[n][1] = __ldg(reinterpret_cast<const unsigned int*>(xr[n] + k + 8));
          }
        }
        if constexpr (SA) {
#pragma unroll
          for (int n = 0; n < NT; ++n)
            mma::mma16816<T>(xsum[n], Pair<T>::kOnes, Pair<T>::kOnes, Pair<T>::kOnes, Pair<T>::kOnes, b[n][0], b[n][1]);
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            const uint32_t word = j == 0 ? wv[u][r].x : j == 1 ? wv[u][r].y : j == 2 ? wv[u][r].z : wv[u][r].w;
            const uint32_t a0 = mma::nibbles_0_4<T>(word), a1 = mma::nibbles_0_4<T>(word >> 4);
            const uint32_t a2 = mma::nibbles_0_4<T>(word >> 8), a3 = mma::nibbles_0_4<T>(word >> 12);
#pragma unroll
            for (int n = 0; n < NT; ++n) mma::mma16816<T>(part[r][n], a0, a1, a2, a3, b[n][0], b[n][1]);
          }
          continue;
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const uint32_t word = j == 0 ? wv[u][r].x : j == 1 ? wv[u][r].y : j == 2 ? wv[u][r].z : wv[u][r].w;
          const uint32_t a0 = mma::dequant_nibbles_0_4<T>(word, s2[r][0], z2[r][0]);
          const uint32_t a1 = mma::dequant_nibbles_0_4<T>(word >> 4, s2[r][1], z2[r][1]);
          const uint32_t a2 = mma::dequant_nibbles_0_4<T>(word >> 8, s2[r][0], z2[r][0]);
          const uint32_t a3 = mma::dequant_nibbles_0_4<T>(word >> 12, s2[r][1], z2[r][1]);
#pragma unroll
          for (int n = 0; n < NT; ++n) mma::mma16816<T>(acc[r][n], a0, a1, a2, a3, b[n][0], b[n][1]);
        }
      }
    }
    if constexpr (SA) {  // one group per step: rows g and g + 8's (scale, zero) of block s0
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const T* pa = reinterpret_cast<const T*>(&sa[0][r]);
        const T* pb = reinterpret_cast<const T*>(&sb[0][r]);
        const float sg = device::to_f(pa[0]), sh = device::to_f(pb[0]);
        const float cg = device::to_f(pa[1]) - Pair<T>::kOffset * sg, ch = device::to_f(pb[1]) - Pair<T>::kOffset * sh;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          acc[r][n][0] += sg * part[r][n][0] + cg * xsum[n][0];
          acc[r][n][1] += sg * part[r][n][1] + cg * xsum[n][1];
          acc[r][n][2] += sh * part[r][n][2] + ch * xsum[n][2];
          acc[r][n][3] += sh * part[r][n][3] + ch * xsum[n][3];
        }
      }
    }
  }
  mma::reduce_store<T, RT, NT, kWarps>(acc, rb0 * 16, M, N, static_cast<const T*>(nullptr), bias, out, out_stride);
}

// Block shape (RT 16-row blocks, warps splitting K, U blocks per warp step): 1 x 16 x 4 for a long K at
// M <= 8, else the first of a preference list whose grid fits on the GPU in one wave, else the last (as
// gemv.cu's int4 kernel). U = 2 gives a warp step LEAN's 1 KB per 16 rows.
// FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT="RT,WARPS,U" overrides it (RT 1, 2 or 4, U 1, 2 or 4 with RT * U <= 8;
// experiments; read at every call).
struct Shape {
  int rt, warps, u;
};

// The kernel, its dynamic shared memory allowed up to what the device lets a block opt in to (once
// per device).
template <typename T, int NT, int RT, int U, int MODE>
const void* kernel_ptr() {
  auto k = int4_mma_layout_kernel<T, NT, RT, U, MODE>;
  if constexpr (MODE != kXGlobal) {
    static std::atomic<bool> opted[64];
    int dev = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    if (!opted[std::min(dev, 63)].load(std::memory_order_relaxed)) {
      cudaFuncAttributes fa{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&fa, k));
      C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          device::attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>() -
                                              static_cast<int>(fa.sharedSizeBytes)));
      opted[std::min(dev, 63)].store(true, std::memory_order_relaxed);
    }
  }
  return reinterpret_cast<const void*>(k);
}

template <typename T>
int x_smem_bytes(int mode, int warps, int m, int u) {
  return mode != kXGlobal ? warps * m * (u * 64 + 8) * static_cast<int>(sizeof(T)) : 0;
}

template <typename T, int NT, int RT, int U = 2>
int per_sm(int warps, int m, int mode) {
  const void* k = mode == kXGlobal   ? kernel_ptr<T, NT, RT, U, kXGlobal>()
                  : mode == kXShared ? kernel_ptr<T, NT, RT, U, kXShared>()
                                     : kernel_ptr<T, NT, RT, U, kXSharedScaleAfter>();
  return device::blocks_per_sm(k, warps * 32, x_smem_bytes<T>(mode, warps, m, U));
}

template <typename T, int NT>
Shape pick_shape(int n, int k, int m, int mode) {
  static constexpr Shape kOne[] = {{1, 16, 2}, {1, 8, 2}, {2, 8, 2}, {2, 4, 2}};
  static constexpr Shape kTwo[] = {{2, 16, 2}, {2, 8, 2}, {2, 4, 2}, {4, 4, 2}};
  // 17-32 tokens: 2 x 16 where it fits one wave (N <= 4096 on an H100), else 2 x 8, the best or within
  // 0.1x of the best of seven shapes at M = 32 on the four Llama shapes (BENCHMARKS.md S26)
  static constexpr Shape kFour[] = {{2, 16, 2}, {2, 8, 2}};
  const Shape* list = NT == 1 ? kOne : NT == 2 ? kTwo : kFour;
  const int len = NT == 4 ? 2 : 4;
  const int kb = k / 64;
  // At most 8 tokens, K >= 8192 and a grid of at most two waves: 1 x 16 x 4, four k-blocks per warp step.
  // On the H100 at M = 1-8 (BENCHMARKS.md S29) it beat the list's choice by 1-8 % on 4096x14336 and
  // 4096x11008 and by 8-18 % on 8192x28672; on 14336x8192 (3.4 waves) the list's 2 x 8 x 2 was 8-15 %
  // ahead of it, and at K = 4096 the list's shapes are ahead.
  const bool long_k = NT == 1 && kb >= 128 && kb % 4 == 0 &&
                      n / 16 <= 2 * per_sm<T, NT, 1, 4>(16, m, mode) * device::sm_count();
  Shape s = long_k ? Shape{1, 16, 4} : list[len - 1];
  for (int i = 0; i < len && !long_k; ++i) {
    const int warps = std::max(1, std::min(list[i].warps, kb / list[i].u));
    const int blocks = (n / 16 + list[i].rt - 1) / list[i].rt;
    const int fit = list[i].rt == 1   ? per_sm<T, NT, 1>(warps, m, mode)
                    : list[i].rt == 2 ? per_sm<T, NT, 2>(warps, m, mode)
                                      : per_sm<T, NT, 4>(warps, m, mode);
    if (blocks <= fit * device::sm_count()) {
      s = list[i];
      break;
    }
  }
  if (const char* e = std::getenv("FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT")) {  // exactly "RT,WARPS,U", else ignored
    Shape o{0, 0, 0};
    int used = 0;
    if (std::sscanf(e, "%d,%d,%d%n", &o.rt, &o.warps, &o.u, &used) == 3 && e[used] == '\0' &&
        (o.rt == 1 || o.rt == 2 || o.rt == 4) && (o.u == 1 || o.u == 2 || o.u == 4) && o.rt * o.u <= 8 &&
        o.warps >= 1 && o.warps <= kWarps)
      s = o;
  }
  if (kb % s.u) s.u = kb % 2 ? 1 : 2;  // U must divide the K blocks
  if (kb % s.u) s.u = 1;
  s.warps = std::max(1, std::min(s.warps, kb / s.u));
  // staged x within what a block may opt in to, beside mma::reduce_store's 32 KB at most
  const int smem_cap = device::attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>() - 32 * 1024;
  while (s.warps > 1 && x_smem_bytes<T>(mode, s.warps, m, s.u) > smem_cap) s.warps /= 2;
  return s;
}

template <typename T, int NT, int RT, int U>
void launch(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& sz, const T* b, at::Tensor& out,
            int group, int warps, int mode) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  const dim3 grid((N / 16 + RT - 1) / RT);
  if (mode == kXSharedScaleAfter && group < 64 * U) mode = kXShared;  // it needs one scale group per step
  const int smem = x_smem_bytes<T>(mode, warps, M, U);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto run = [&](auto kernel, int bytes) {
    kernel<<<grid, warps * 32, bytes, stream>>>(
        reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
        reinterpret_cast<const T*>(sz.data_ptr()), b, reinterpret_cast<T*>(out.data_ptr()), out.stride(0), M, N, K,
        __builtin_ctz(static_cast<unsigned>(group)));
  };
  if (mode == kXShared) {
    kernel_ptr<T, NT, RT, U, kXShared>();
    run(int4_mma_layout_kernel<T, NT, RT, U, kXShared>, smem);
  } else if (mode == kXSharedScaleAfter) {
    kernel_ptr<T, NT, RT, U, kXSharedScaleAfter>();
    run(int4_mma_layout_kernel<T, NT, RT, U, kXSharedScaleAfter>, smem);
  } else {
    run(int4_mma_layout_kernel<T, NT, RT, U, kXGlobal>, 0);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT, int RT>
void launch_u(const Shape& s, const at::Tensor& x2, const at::Tensor& q, const at::Tensor& sz, const T* b,
              at::Tensor& out, int group, int mode) {
  if constexpr (RT <= 2) {
    if (s.u == 4) return launch<T, NT, RT, 4>(x2, q, sz, b, out, group, s.warps, mode);
  }
  if (s.u == 2) return launch<T, NT, RT, 2>(x2, q, sz, b, out, group, s.warps, mode);
  launch<T, NT, RT, 1>(x2, q, sz, b, out, group, s.warps, mode);
}

template <typename T, int NT>
void launch_nt(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& sz, const T* b, at::Tensor& out,
               int group, int mode) {
  if (mode < 0) mode = NT == 2 ? kXSharedScaleAfter : kXShared;
  const Shape s = pick_shape<T, NT>(q.size(0), x2.size(1), x2.size(0), mode);
  if (s.rt == 4) launch_u<T, NT, 4>(s, x2, q, sz, b, out, group, mode);
  else if (s.rt == 2) launch_u<T, NT, 2>(s, x2, q, sz, b, out, group, mode);
  else launch_u<T, NT, 1>(s, x2, q, sz, b, out, group, mode);
}

// x through shared memory: faster than the global reads at every M measured, 1 included (fewer load
// instructions); the scale and zero after the MMAs at 9-16 tokens, where that was faster on three of the
// four Llama shapes (BENCHMARKS.md S26). FXQUANT_CXX_INT4_MMA_X=global|smem|smem_sa forces one at every M
// (experiments; read at every call). -1: the default.
int x_mode() {
  const char* e = std::getenv("FXQUANT_CXX_INT4_MMA_X");
  if (e == nullptr) return -1;
  if (std::strcmp(e, "global") == 0) return kXGlobal;
  if (std::strcmp(e, "smem") == 0) return kXShared;
  if (std::strcmp(e, "smem_sa") == 0) return kXSharedScaleAfter;
  return -1;
}

bool aligned(const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; }

at::Tensor int4_mma_layout_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                                const std::optional<at::Tensor>& bias, int64_t group_size) {
  check_int4_mma(x, qweight, scales_zeros, bias, group_size);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  const int64_t m = k > 0 && x.numel() > 0 ? x.numel() / k : 0;
  const auto dt = x.scalar_type();
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const bool fits = m >= 1 && m <= kMaxInt4MmaLayoutM && (dt == at::kBFloat16 || dt == at::kHalf) &&
                    scales_zeros.scalar_type() == dt && scales_zeros.is_contiguous() && aligned(scales_zeros, 4) &&
                    qweight.is_contiguous() && aligned(qweight, 16) && (group_size & (group_size - 1)) == 0 &&
                    device::capability() >= 80;
  if (!fits) return int4_mma_dequant_linear(x, qweight, scales_zeros, bias, group_size);
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1 || x2.stride(0) % 2 != 0 || !aligned(x2, 4)) x2 = x2.clone(at::MemoryFormat::Contiguous);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt).contiguous();  // the reference adds bias in x's dtype too
  at::Tensor out = at::empty({m, n}, x.options());
  const int group = static_cast<int>(group_size);
  // cp.async copies 16-byte chunks: x rows off 16 bytes are read from global memory
  const int xs = x2.stride(0) % 8 == 0 && aligned(x2, 16) ? x_mode() : kXGlobal;
  if (dt == at::kBFloat16) {
    using T = __nv_bfloat16;
    const T* bp = b.has_value() ? reinterpret_cast<const T*>(b->data_ptr()) : nullptr;
    m <= 8    ? launch_nt<T, 1>(x2, qweight, scales_zeros, bp, out, group, xs)
    : m <= 16 ? launch_nt<T, 2>(x2, qweight, scales_zeros, bp, out, group, xs)
              : launch_nt<T, 4>(x2, qweight, scales_zeros, bp, out, group, xs);
  } else {
    using T = __half;
    const T* bp = b.has_value() ? reinterpret_cast<const T*>(b->data_ptr()) : nullptr;
    m <= 8    ? launch_nt<T, 1>(x2, qweight, scales_zeros, bp, out, group, xs)
    : m <= 16 ? launch_nt<T, 2>(x2, qweight, scales_zeros, bp, out, group, xs)
              : launch_nt<T, 4>(x2, qweight, scales_zeros, bp, out, group, xs);
  }
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.reshape(shape);
}

}  // namespace
}  // namespace fxquant

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cxx_int4_mma_weight_only_linear", &fxquant::int4_mma_layout_cuda); }
