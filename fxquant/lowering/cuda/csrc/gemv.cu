// CUDA kernels of fxquant's C++ weight-only ops: a GEMV for M <= 16 that streams the packed
// weight once with 16-byte loads; dequantize + cuBLAS (ops.cpp's path) for everything else.
//
// Work split: a row batch is R consecutive output rows and all of K. Thread t takes 16-byte
// slices t, t + blockDim.x, ... of each of the batch's rows (32 int4 or 16 int8 weights per
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
#include <torch/library.h>

#include "ops.h"

namespace fxquant {
namespace {

constexpr int kMaxM = 16;      // the GEMV's range; larger M is compute-bound: dequantize + cuBLAS
constexpr int kMaxThreads = 256;  // up to 255 registers per thread where a tile is prefetched

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* p) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void from_f(float v, __half* p) { *p = __float2half(v); }

// Two packed 16-bit values (element 0 in the low half) -> float2.
__device__ __forceinline__ float2 unpack2(uint32_t u, const __nv_bfloat16*) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
__device__ __forceinline__ float2 unpack2(uint32_t u, const __half*) {
  __half2 h = *reinterpret_cast<__half2*>(&u);
  return __half22float2(h);
}

// Weights are read once: skip L1, and let L2 fetch whole 256-byte lines.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
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

int sm_count() {
  static int count[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 64) dev = 63;
  if (count[dev] == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&count[dev], cudaDevAttrMultiProcessorCount, dev));
  return count[dev];
}

template <bool INT4, typename T, int MC, int R, bool PIPE>
void launch(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
            const std::optional<at::Tensor>& bias, at::Tensor& out, int group) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  const int slices = K / (INT4 ? 32 : 16);
  // As few passes over the slices as the thread limit allows, spread evenly over the threads.
  const int passes = (slices + kMaxThreads - 1) / kMaxThreads;
  const int threads = std::max(32, ((slices + passes - 1) / passes + 31) / 32 * 32);
  // Resident blocks per SM for this block size (the same on every GPU of one kind: cached).
  static int per_sm[kMaxThreads / 32 + 1] = {0};
  int& bps = per_sm[threads / 32];
  if (bps == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, gemv_kernel<INT4, T, MC, R, PIPE>, threads, 0));
    bps = std::max(bps, 1);
  }
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
  const bool gemv = m >= 1 && m <= kMaxM && (dt == at::kBFloat16 || dt == at::kHalf) &&
                    scales.scalar_type() == dt && k % (INT4 ? 32 : 16) == 0 && (!INT4 || group % 32 == 0) &&
                    qweight.is_contiguous() && aligned16(qweight) && scales.is_contiguous() &&
                    n * std::max<int64_t>(k, 1) < (int64_t(1) << 31) &&
                    reinterpret_cast<uintptr_t>(scales.data_ptr()) % 4 == 0;  // int4: (scale, zero) pairs as one word
  if (!gemv) {
    return INT4 ? int4_dequant_linear(x, qweight, scales, bias, group) : int8_dequant_linear(x, qweight, scales, bias);
  }
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor x2 = gemv_rows(x, k);
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt).contiguous();  // the reference adds bias in x's dtype too
  at::Tensor out = at::empty({m, n}, x.options());
  if (dt == at::kBFloat16) {
    dispatch_tile<INT4, __nv_bfloat16>(x2, qweight, scales, b, out, static_cast<int>(group));
  } else {
    dispatch_tile<INT4, __half>(x2, qweight, scales, b, out, static_cast<int>(group));
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
