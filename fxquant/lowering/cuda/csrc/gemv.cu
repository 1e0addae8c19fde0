// CUDA kernels of fxquant's C++ weight-only ops for M <= 16 (int4 on tensor cores: M <= 32);
// dequantize + cuBLAS (ops.cpp's path) for everything else.
//
// int4 with K % 128 == 0 on sm_80+: int4_mma_kernel (below) dequantizes into the A operand of
// bf16/fp16 tensor-core MMAs; int8 with K % 64 == 0 at 2 <= M <= 16: int8_mma.cu. Otherwise
// gemv_kernel, CUDA-core fp32 FMAs.
// gemv_kernel's work split: a row batch is R consecutive output rows and all of K. Thread t takes
// 16-byte slices t, t + blockDim.x, ... of each of the batch's rows (32 int4 or 16 int8 weights per
// slice), so a warp reads 512 contiguous bytes per row. Partial dots are reduced with warp
// shuffles, then across warps in shared memory. At M = 1 each block does one batch (few
// registers, many warps); at M >= 2 a grid sized to the GPU loops over batches and loads the
// next tile before computing the current one.
// Nibbles and bytes become floats with one byte_perm into the mantissa of 2^23 and one FADD
// (no int->float conversion instructions, which run at a quarter of the FMA rate).
// c10's CUDA headers only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a bare
// CUDA toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <torch/library.h>

#include "device.cuh"
#include "mma.cuh"
#include "ops.h"

namespace fxquant {
namespace {
using mma::Pair;

constexpr int kMaxM = 16;      // the GEMV's range; larger M is compute-bound: dequantize + cuBLAS
constexpr int kMaxMmaM = 32;   // the int4 tensor-core kernel's range
constexpr int kMaxThreads = 256;  // up to 255 registers per thread where a tile is prefetched

using device::blocks_per_sm;
using device::from_f;
using device::load_stream;
using device::sm_count;
using device::to_f;

// Two packed 16-bit values (element 0 in the low half) -> float2.
__device__ __forceinline__ float2 unpack2(uint32_t u, const __nv_bfloat16*) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t u, const __half*) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}

// Byte b of v (a value 0..255) as a float: placed in the mantissa of 2^23, then 2^23 subtracted
// by the caller (folded with any offset: -8 for int4 happens in the epilogue, +128 for int8).
__device__ __forceinline__ float byte_as_float(uint32_t v, int b) {
  return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540u | b));
}

// The 16-byte slice s of R consecutive rows (and, for int4, each row's (scale, zero) word).
template <bool INT4, int R>
struct Tile {
  uint4 w[R];
  uint32_t sz[R];

  template <typename T>
  __device__ __forceinline__ void load(const uint8_t* wp, const T* scales, int rb, int s, int N, int64_t row_bytes,
                                       int group) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = min(rb * R + r, N - 1);  // rows past N repeat the last one; never stored
      w[r] = load_stream(wp + n * row_bytes + s * 16);
      if constexpr (INT4) {
        sz[r] = __ldg(reinterpret_cast<const unsigned int*>(scales) + (int64_t)(s * 32 / group) * N + n);
      }
    }
  }
};

// Row batches (R rows each) are spread over a grid sized to what fits on the GPU at once; each
// thread loads its next (row batch, slice) tile before it computes the current one, so weight
// loads stay in flight while the FMAs run (without this the int4 kernel reached 1.9 TB/s).
template <bool INT4, typename T, int MC, int R, bool PIPE>
// Without the prefetch: 4 blocks of 256 threads per SM (<= 64 registers), for latency hiding.
__global__ void __launch_bounds__(kMaxThreads, PIPE ? 1 : 4) gemv_kernel(
    const T* __restrict__ x, int64_t x_stride, const uint8_t* __restrict__ w, const T* __restrict__ scales,
    const T* __restrict__ bias, T* __restrict__ out, int64_t out_stride, int M, int N, int K, int group) {
  constexpr int KS = INT4 ? 32 : 16;  // weights per 16-byte slice
  const int slices = K / KS;
  const int nb = (N + R - 1) / R;
  const int64_t row_bytes = INT4 ? K / 2 : K;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __shared__ float red[kMaxThreads / 32][R * MC];

  for (int m0 = 0; m0 < M; m0 += MC) {  // one pass unless M > MC
    Tile<INT4, R> cur, nxt;
    if (PIPE && threadIdx.x < slices) nxt.load(w, scales, blockIdx.x, threadIdx.x, N, row_bytes, group);
    for (int rb = blockIdx.x; rb < nb; rb += gridDim.x) {
      float acc[R][MC];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < MC; ++j) acc[r][j] = 0.f;

      for (int s = threadIdx.x; s < slices; s += blockDim.x) {
        if constexpr (PIPE) {
          cur = nxt;
          int s2 = s + blockDim.x, rb2 = rb;
          if (s2 >= slices) {
            s2 = threadIdx.x;
            rb2 += gridDim.x;
          }
          if (rb2 < nb) nxt.load(w, scales, rb2, s2, N, row_bytes, group);
        } else {
          cur.load(w, scales, rb, s, N, row_bytes, group);
        }

        const int k0 = s * KS;
        float xf[MC][KS], xsum[MC];
#pragma unroll
        for (int j = 0; j < MC; ++j) {
          const int m = min(m0 + j, M - 1);  // rows past M repeat the last one; never stored
          const uint4* xp = reinterpret_cast<const uint4*>(x + m * x_stride + k0);
#pragma unroll
          for (int v = 0; v < KS / 8; ++v) {
            const uint4 u = __ldg(xp + v);
            const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float2 f = unpack2(words[i], x);
              xf[j][8 * v + 2 * i] = f.x;
              xf[j][8 * v + 2 * i + 1] = f.y;
            }
          }
          xsum[j] = 0.f;
          if constexpr (INT4) {
#pragma unroll
            for (int i = 0; i < KS; ++i) xsum[j] += xf[j][i];
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t words[4] = {cur.w[r].x, cur.w[r].y, cur.w[r].z, cur.w[r].w};
          float dot[MC];
#pragma unroll
          for (int j = 0; j < MC; ++j) dot[j] = 0.f;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            if constexpr (INT4) {
              // nibble 2b of the word is k = 8i + 2b (low), nibble 2b+1 is k = 8i + 2b + 1
              const uint32_t lo = words[i] & 0x0F0F0F0Fu, hi = (words[i] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
              for (int b = 0; b < 4; ++b) {
                const float q0 = byte_as_float(lo, b) - 8388608.f, q1 = byte_as_float(hi, b) - 8388608.f;
#pragma unroll
                for (int j = 0; j < MC; ++j) {
                  dot[j] = fmaf(q0, xf[j][8 * i + 2 * b], dot[j]);
                  dot[j] = fmaf(q1, xf[j][8 * i + 2 * b + 1], dot[j]);
                }
              }
            } else {
              const uint32_t u = words[i] ^ 0x80808080u;  // int8 q -> q + 128 in each byte
#pragma unroll
              for (int b = 0; b < 4; ++b) {
                const float q = byte_as_float(u, b) - 8388736.f;
#pragma unroll
                for (int j = 0; j < MC; ++j) dot[j] = fmaf(q, xf[j][4 * i + b], dot[j]);
              }
            }
          }
          if constexpr (INT4) {
            const float2 f = unpack2(cur.sz[r], scales);  // w = (q - 8) * scale + zero
            const float zc = f.y - 8.f * f.x;
#pragma unroll
            for (int j = 0; j < MC; ++j) acc[r][j] += f.x * dot[j] + zc * xsum[j];
          } else {
#pragma unroll
            for (int j = 0; j < MC; ++j) acc[r][j] += dot[j];
          }
        }
      }

#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < MC; ++j) {
          float v = acc[r][j];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          if (lane == 0) red[warp][r * MC + j] = v;
        }
      __syncthreads();
      if (threadIdx.x < R * MC) {
        const int r = threadIdx.x / MC, j = threadIdx.x % MC;
        const int n = rb * R + r, m = m0 + j;
        float v = 0.f;
        for (int i = 0; i < nwarps; ++i) v += red[i][threadIdx.x];
        if (n < N && m < M) {
          if constexpr (!INT4) v *= to_f(scales[n]);
          if (bias != nullptr) v += to_f(bias[n]);
          from_f(v, out + m * out_stride + n);
        }
      }
      __syncthreads();
    }
  }
}


template <bool INT4, typename T, int MC, int R, bool PIPE>
void launch(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
            const std::optional<at::Tensor>& bias, at::Tensor& out, int group) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  const int slices = K / (INT4 ? 32 : 16);
  // As few passes over the slices as the thread limit allows, spread evenly over the threads.
  const int passes = (slices + kMaxThreads - 1) / kMaxThreads;
  const int threads = std::max(32, ((slices + passes - 1) / passes + 31) / 32 * 32);
  const int bps = blocks_per_sm<gemv_kernel<INT4, T, MC, R, PIPE>>(threads);
  const int nb = (N + R - 1) / R;
  const dim3 grid(PIPE ? std::min(nb, bps * sm_count()) : nb);
  auto stream = c10::cuda::getCurrentCUDAStream();
  gemv_kernel<INT4, T, MC, R, PIPE><<<grid, threads, 0, stream>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0),
      reinterpret_cast<const uint8_t*>(qweight.data_ptr()), reinterpret_cast<const T*>(scales.data_ptr()),
      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
      reinterpret_cast<T*>(out.data_ptr()), out.stride(0), M, N, K, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// int4 on tensor cores (M <= 32, K % 128 == 0): the dequantized weights are the A operand of
// mma.m16n8k16 (16 output features x 16 k, bf16/fp16), x^T the B operand (16 k x 8 tokens), fp32
// accumulators. Dequantizing costs ~1.5 instructions per weight (a mask, a bf16x2 subtract and a
// bf16x2 FMA per pair) instead of 3 fp32 ones per weight and token; the MMA does the products.
// The k order inside a 16-k MMA step is free (it must only match in A and B), so each lane reads
// 32 consecutive packed k (16 bytes) per row and K-tile, and takes them in the pairs that one
// mask of a 32-bit word yields: nibbles (i, i + 4).
constexpr int kMmaWarps = 16;  // at most, per block of 16 or 32 rows; they split K (more loads in flight)
static_assert(kMmaWarps * 32 <= 512 && kMaxThreads <= 512, "blocks_per_sm caches blocks of <= 512 threads");

// Pair p (0..15) of a lane's 32 nibbles of one row, dequantized: word p / 4, nibbles (i, i + 4).
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(const uint32_t (&w)[4], int p, typename Pair<T>::T2 s2,
                                                 typename Pair<T>::T2 z2) {
  using T2 = typename Pair<T>::T2;
  const uint32_t v = ((w[p / 4] >> (4 * (p % 4))) & 0x000F000Fu) | Pair<T>::kMagic;
  const T2 q = __hsub2(*reinterpret_cast<const T2*>(&v), Pair<T>::offset());  // q - 8, exact
  const T2 r = __hfma2(q, s2, z2);  // (q - 8) * scale + zero, rounded once
  return *reinterpret_cast<const uint32_t*>(&r);
}

// The same value with the mask and the magic in one LOP3 ((a & b) | c): the compiler's own
// lowering takes two, since a LOP3 holds one immediate; ptxas keeps the constant in a register.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair_lop3(const uint32_t (&w)[4], int p, typename Pair<T>::T2 s2,
                                                      typename Pair<T>::T2 z2) {
  return mma::dequant_nibbles_0_4<T>(w[p / 4] >> (4 * (p % 4)), s2, z2);
}

// LEAN (experiment, S23): the same arithmetic with fewer instructions per K-tile: one LOP3 per
// pair, per-lane addresses and the group shift computed once, and tokens past M reading row M - 1
// (their columns are never stored) instead of a masked load.
template <typename T, int NT, int RT, bool LEAN>  // NT 8-token tiles (M <= 8 * NT), RT 16-row tiles per block
__global__ void __launch_bounds__(kMmaWarps * 32) int4_mma_kernel(const T* __restrict__ x, int64_t x_stride,
                                                       const uint8_t* __restrict__ w, const T* __restrict__ sz,
                                                       const T* __restrict__ bias, T* __restrict__ out,
                                                       int64_t out_stride, int M, int N, int K, int group,
                                                       int group_shift) {  // log2(group), or -1
  using T2 = typename Pair<T>::T2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16 * RT;
  int ra[RT], rb[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {  // rows past N repeat the last one: never stored
    ra[r] = min(row0 + 16 * r + g, N - 1);
    rb[r] = min(row0 + 16 * r + g + 8, N - 1);
  }
  const int64_t row_bytes = K / 2;
  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.f;

  // LEAN: byte offsets fit in 32 bits (the launcher requires N * K < 2^31).
  int64_t xrow[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xrow[n] = min(n * 8 + g, M - 1) * x_stride + 32 * t;

  for (int kt = warp; kt < K / 128; kt += nwarps) {
    const int k0 = kt * 128 + 32 * t;  // this lane's 32 k
    uint4 wa4[RT], wb4[RT];
    uint32_t sza[RT], szb[RT];
    if constexpr (LEAN) {
      const uint8_t* wk = w + (kt * 64 + 16 * t);
      const unsigned int* szw = reinterpret_cast<const unsigned int*>(sz) +
                                (group_shift >= 0 ? k0 >> group_shift : k0 / group) * N;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        wa4[r] = load_stream(wk + ra[r] * static_cast<int>(row_bytes));
        wb4[r] = load_stream(wk + rb[r] * static_cast<int>(row_bytes));
        sza[r] = __ldg(szw + ra[r]);
        szb[r] = __ldg(szw + rb[r]);
      }
    } else {
      const unsigned int* szw = reinterpret_cast<const unsigned int*>(sz) + (int64_t)(k0 / group) * N;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        wa4[r] = load_stream(w + ra[r] * row_bytes + k0 / 2);
        wb4[r] = load_stream(w + rb[r] * row_bytes + k0 / 2);
        sza[r] = __ldg(szw + ra[r]);
        szb[r] = __ldg(szw + rb[r]);
      }
    }
    auto load_x = [&](int n, int v) -> uint4 {
      if constexpr (LEAN) return __ldg(reinterpret_cast<const uint4*>(x + (xrow[n] + kt * 128)) + v);
      const int m = n * 8 + g;  // rows past M read as zeros
      return m < M ? __ldg(reinterpret_cast<const uint4*>(x + m * x_stride + k0) + v) : make_uint4(0, 0, 0, 0);
    };
    T2 s2[RT][2], z2[RT][2];  // (scale, scale) and (zero, zero) of rows g, g + 8
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const T2 pa = *reinterpret_cast<const T2*>(&sza[r]), pb = *reinterpret_cast<const T2*>(&szb[r]);
      s2[r][0] = Pair<T>::lo2(pa), z2[r][0] = Pair<T>::hi2(pa), s2[r][1] = Pair<T>::lo2(pb), z2[r][1] = Pair<T>::hi2(pb);
    }
    // x piece v (8 k of each token, 4 words) feeds MMA steps 2v and 2v + 1: only NT x 4 words
    // of x are live at a time (loading all 16 up front cost registers and spilled at RT = 2).
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      uint32_t xw[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint4 xv = load_x(n, v);
        xw[n][0] = xv.x, xw[n][1] = xv.y, xw[n][2] = xv.z, xw[n][3] = xv.w;
      }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = 2 * v + jj;  // one MMA step per 16 k: pairs 2j and 2j + 1
        uint32_t b[NT][2];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // x of the same k as the pairs: k = c and c + 4 with c = 8 * (p / 4) + p % 4
            const int p = 2 * j + h, c = 8 * (p / 4) + p % 4, cw = (c / 2) % 4;
            b[n][h] = __byte_perm(xw[n][cw], xw[n][cw + 2], (c % 2) ? 0x7632u : 0x5410u);
          }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const uint32_t wa[4] = {wa4[r].x, wa4[r].y, wa4[r].z, wa4[r].w};
          const uint32_t wb[4] = {wb4[r].x, wb4[r].y, wb4[r].z, wb4[r].w};
          // A fragment: a0/a2 row g, a1/a3 row g + 8; a0/a1 the MMA's k 2t, 2t + 1, a2/a3 k 2t + 8, + 9
          auto dq = [&](const uint32_t(&wv)[4], int p, int h) {
            return LEAN ? dequant_pair_lop3<T>(wv, p, s2[r][h], z2[r][h]) : dequant_pair<T>(wv, p, s2[r][h], z2[r][h]);
          };
          const uint32_t a0 = dq(wa, 2 * j, 0), a1 = dq(wb, 2 * j, 1), a2 = dq(wa, 2 * j + 1, 0), a3 = dq(wb, 2 * j + 1, 1);
#pragma unroll
          for (int n = 0; n < NT; ++n) mma::mma16816<T>(acc[r][n], a0, a1, a2, a3, b[n][0], b[n][1]);
        }
      }
    }
  }

  mma::reduce_store<T, RT, NT, kMmaWarps>(acc, row0, M, N, static_cast<const T*>(nullptr), bias, out, out_stride);
}

// Block shape: RT 16-row tiles per block and the warps that split K. More rows per warp put more
// weight bytes in flight per warp and reuse each x fragment for more rows; more warps per block
// give more blocks' worth of loads at once. The launcher takes the first shape of a preference
// list whose grid fits on the GPU in one wave (occupancy from the CUDA runtime), else the last.
// Measured on the H100 (speedup over bf16, 6144x4096 / 4096x4096 / 28672x4096 / 4096x14336), the
// best shapes were: M <= 8 (NT = 1) 1x8 / 1x16 / 2x4 / 1x16 (2.36 / 2.45 / 3.14 / 2.71 at M = 1);
// M <= 16 2x8 / 2x16 / 2x4 / 2x16 (1.87 / 2.10 / 2.42 / 2.47); M <= 32 2x8 / 2x16 / 2x4 / 2x16
// (1.29 / 1.30 / 1.66 / 1.54) -- the rule below picks each of them, except 28672x4096 at M <= 16,
// which since S23 takes 4x4 (2x4 no longer fits one wave with LEAN's fewer registers).
// FXQUANT_CXX_INT4_VARIANT="RT,WARPS" (e.g. "2,8"; RT 4 at M <= 16 too) overrides the choice, for experiments; it is
// read at every call (a getenv is cheap next to a launch; a CUDA graph keeps what capture saw).
struct MmaShape {
  int rt, warps;
};

// LEAN at M <= 16, classic above (S23, H100, against each other in one call: LEAN 1.02-1.18x at
// M = 1, faster at M <= 16 except 4096x14336 at M = 16, 0.94-0.96x; at M = 17-32 1.04-1.09x on the
// small shapes, 0.93-0.98x on 28672x4096). FXQUANT_CXX_INT4_KERNEL=lean / classic forces one (experiments; read at every call).
bool lean_kernel(int nt) {
  const char* e = std::getenv("FXQUANT_CXX_INT4_KERNEL");
  if (e != nullptr && std::strcmp(e, "classic") == 0) return false;
  if (e != nullptr && std::strcmp(e, "lean") == 0) return true;
  return nt <= 2;
}


template <typename T, int NT, bool LEAN>
MmaShape mma_shape(int n, int k) {
  // NT = 2 ends with 64-row blocks: 28672x4096 at M = 9-16 overflowed one wave at 2x4 (1.92 / 1.68
  // LEAN) and took 2.75 at 4x4 (S23).
  static constexpr MmaShape kOne[] = {{1, 16}, {1, 8}, {2, 8}, {2, 4}};  // NT = 1
  static constexpr MmaShape kTwo[] = {{2, 16}, {2, 8}, {2, 4}, {4, 4}};
  static constexpr MmaShape kFour[] = {{2, 16}, {2, 8}, {2, 4}};
  const MmaShape* list = NT == 1 ? kOne : NT == 2 ? kTwo : kFour;
  const int count = NT == 4 ? 3 : 4;
  MmaShape s = list[count - 1];
  for (int i = 0; i < count; ++i) {
    const int warps = std::min(list[i].warps, k / 128), blocks = (n + 16 * list[i].rt - 1) / (16 * list[i].rt);
    int per_sm = list[i].rt == 1 ? blocks_per_sm<int4_mma_kernel<T, NT, 1, LEAN>>(warps * 32)
                                 : blocks_per_sm<int4_mma_kernel<T, NT, 2, LEAN>>(warps * 32);
    if constexpr (NT <= 2) {
      if (list[i].rt == 4) per_sm = blocks_per_sm<int4_mma_kernel<T, NT, 4, LEAN>>(warps * 32);
    }
    if (blocks <= per_sm * sm_count()) {
      s = list[i];
      break;
    }
  }
  if (const char* e = std::getenv("FXQUANT_CXX_INT4_VARIANT")) {  // exactly "RT,WARPS", else ignored
    MmaShape o{0, 0};
    int used = 0;
    if (std::sscanf(e, "%d,%d%n", &o.rt, &o.warps, &used) == 2 && e[used] == '\0' &&
        (o.rt == 1 || o.rt == 2 || (o.rt == 4 && NT <= 2)) && o.warps >= 1 && o.warps <= kMmaWarps)
      s = o;
  }
  return s;
}

template <typename T, int NT, int RT, bool LEAN>
void launch_mma(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
                at::Tensor& out, int group, int max_warps) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  const int warps = std::min(max_warps, K / 128);  // the block's warps split K
  const dim3 grid((N + 16 * RT - 1) / (16 * RT));
  int4_mma_kernel<T, NT, RT, LEAN><<<grid, warps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), b, reinterpret_cast<T*>(out.data_ptr()), out.stride(0), M, N, K,
      group, (group & (group - 1)) == 0 ? __builtin_ctz(group) : -1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int NT, bool LEAN>
void launch_mma_nt(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
                   at::Tensor& out, int group) {
  const MmaShape s = mma_shape<T, NT, LEAN>(qweight.size(0), x2.size(1));
  if constexpr (NT <= 2) {  // 64-row blocks: NT = 2's last choice (mma_shape), or FXQUANT_CXX_INT4_VARIANT="4,W"
    if (s.rt == 4) return launch_mma<T, NT, 4, LEAN>(x2, qweight, scales, b, out, group, s.warps);
  }
  if (s.rt == 1) launch_mma<T, NT, 1, LEAN>(x2, qweight, scales, b, out, group, s.warps);
  else launch_mma<T, NT, 2, LEAN>(x2, qweight, scales, b, out, group, s.warps);
}

template <typename T, int NT>
void launch_mma_nt(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
                   at::Tensor& out, int group) {
  if (lean_kernel(NT)) launch_mma_nt<T, NT, true>(x2, qweight, scales, b, out, group);
  else launch_mma_nt<T, NT, false>(x2, qweight, scales, b, out, group);
}

template <typename T>
void launch_int4_mma(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, at::Tensor& out, int group) {
  const int M = x2.size(0);
  const T* b = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  if (M <= 8) launch_mma_nt<T, 1>(x2, qweight, scales, b, out, group);
  else if (M <= 16) launch_mma_nt<T, 2>(x2, qweight, scales, b, out, group);
  else launch_mma_nt<T, 4>(x2, qweight, scales, b, out, group);
}

template <bool INT4, typename T>
void dispatch_tile(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                   const std::optional<at::Tensor>& bias, at::Tensor& out, int group) {
  // (M chunk, rows per batch, prefetch): x for the chunk's rows stays in registers.
  const int M = x2.size(0);
  // Measured on the H100 at M = 1 (speedup over bf16, 4 Llama shapes, int4 / int8): 4 rows
  // without the prefetch (<= 64 registers: 32 warps per SM) 1.84-2.27x / 1.84-2.01x; 8 rows
  // 1.59-1.97x / 1.67-2.00x; 2 rows 1.92-2.19x / 1.76-1.89x; 4 or 8 rows with the prefetch
  // (128-166 registers) 1.80-2.18x / 1.56-1.93x. At M >= 2 the prefetch wins (int4 M = 2:
  // 1.39-1.67x against 0.96-1.40x without).
  if (M == 1) {
    launch<INT4, T, 1, 4, false>(x2, qweight, scales, bias, out, group);
  } else if (M == 2) {
    launch<INT4, T, 2, 4, true>(x2, qweight, scales, bias, out, group);
  } else {
    launch<INT4, T, 4, 4, true>(x2, qweight, scales, bias, out, group);
  }
}

// bf16 mma.m16n8k16 needs sm_80; the env var FXQUANT_CXX_INT4_MMA=0 keeps the CUDA-core GEMV.
bool tensor_cores() {
  static const bool env_off = [] {
    const char* v = std::getenv("FXQUANT_CXX_INT4_MMA");
    return v != nullptr && v[0] == '0';
  }();
  return !env_off && device::attr<cudaDevAttrComputeCapabilityMajor>() >= 8;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// x as [M, K] rows with unit stride along K and 16-byte aligned rows (copied if not).
at::Tensor gemv_rows(const at::Tensor& x, int64_t k) {
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1 || x2.stride(0) % 8 != 0 || !aligned16(x2)) x2 = x2.clone(at::MemoryFormat::Contiguous);
  return x2;
}

template <bool INT4>
at::Tensor weight_only_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const std::optional<at::Tensor>& bias, int64_t group) {
  const int64_t n = qweight.size(0), k = INT4 ? qweight.size(1) * 2 : qweight.size(1);
  const int64_t m = k > 0 && x.numel() > 0 ? x.numel() / k : 0;
  const auto dt = x.scalar_type();
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // device queries below are x's device's
  const bool mma = INT4 && k % 128 == 0 && tensor_cores();
  const bool gemv = m >= 1 && m <= (mma ? kMaxMmaM : kMaxM) && (dt == at::kBFloat16 || dt == at::kHalf) &&
                    scales.scalar_type() == dt && k % (INT4 ? 32 : 16) == 0 && (!INT4 || group % 32 == 0) &&
                    qweight.is_contiguous() && aligned16(qweight) && scales.is_contiguous() &&
                    n > 0 && n * std::max<int64_t>(k, 1) < (int64_t(1) << 31) &&
                    reinterpret_cast<uintptr_t>(scales.data_ptr()) % 4 == 0;  // int4: (scale, zero) pairs as one word
  if (!gemv) {
    return INT4 ? int4_dequant_linear(x, qweight, scales, bias, group) : int8_dequant_linear(x, qweight, scales, bias);
  }
  at::Tensor x2 = gemv_rows(x, k);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt).contiguous();  // the reference adds bias in x's dtype too
  at::Tensor out = at::empty({m, n}, x.options());
  if (!INT4 && int8_mma_linear(x2, qweight, scales, b, out)) {  // int8_mma.cu: tensor cores, 2 <= M <= 16
  } else if (dt == at::kBFloat16) {
    if (mma) launch_int4_mma<__nv_bfloat16>(x2, qweight, scales, b, out, static_cast<int>(group));
    else dispatch_tile<INT4, __nv_bfloat16>(x2, qweight, scales, b, out, static_cast<int>(group));
  } else {
    if (mma) launch_int4_mma<__half>(x2, qweight, scales, b, out, static_cast<int>(group));
    else dispatch_tile<INT4, __half>(x2, qweight, scales, b, out, static_cast<int>(group));
  }
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.reshape(shape);
}

at::Tensor int4_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                     const std::optional<at::Tensor>& bias, int64_t group_size) {
  check_int4(x, qweight, scales_zeros, bias, group_size);
  return weight_only_cuda<true>(x, qweight, scales_zeros, bias, group_size);
}

at::Tensor int8_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias) {
  check_int8(x, qweight, scales, bias);
  return weight_only_cuda<false>(x, qweight, scales, bias, 0);
}

}  // namespace
}  // namespace fxquant

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) {
  m.impl("cxx_int4_weight_only_linear", &fxquant::int4_cuda);
  m.impl("cxx_int8_weight_only_linear", &fxquant::int8_cuda);
}
