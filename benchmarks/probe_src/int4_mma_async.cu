// Probe (benchmarks/probe_int4_mma_async.py), not part of fxquant: the int4 decode kernel on the
// MMA-fragment layout (numerics.pack_int4_mma) with the weight bytes in flight held in shared memory
// instead of registers. Each lane copies its own 16 bytes of each 16 x 64 block with cp.async, D - 1
// warp steps ahead of the step it computes, and reads them back with one 16-byte shared load: no block
// barrier in the loop (a lane reads only its own bytes; the 64-byte scale row of a step is copied by
// 4 lanes and read after __syncwarp). The question it answers: is the shipped kernel short of bytes
// in flight (register-bound occupancy), as docs/int4-decode.md suspects? XS = true also stages x in
// shared memory in the MMA's k order (two 16-byte loads per lane per block instead of eight 4-byte).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mma.cuh"

namespace {
using T = __nv_bfloat16;
using T2 = __nv_bfloat162;
using fxquant::mma::dequant_nibbles_0_4;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <int RT, int D, bool XS>  // RT 16-row blocks per thread block, D stages (power of two), x staged
__global__ void __launch_bounds__(512) async_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                    const unsigned* __restrict__ sz, T* __restrict__ out, int M,
                                                    int N, int K, int group_shift) {
  extern __shared__ uint4 dyn[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, gm = min(g, M - 1);
  const int kb = K / 64, nrb = N / 16, rb0 = blockIdx.x * RT;
  uint4* wring = dyn;                                                              // [D][nwarps][RT][32]
  unsigned* sring = reinterpret_cast<unsigned*>(wring + D * nwarps * RT * 32);      // [D][nwarps][RT][16]
  unsigned* xs = sring + D * nwarps * RT * 16;                                     // [kb][M][4][8] words
  const uint8_t* wb[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) wb[r] = w + static_cast<int64_t>(min(rb0 + r, nrb - 1)) * kb * 512 + 16 * lane;
  const int srow = min(rb0 + (lane >> 2), nrb - 1) * 16 + 4 * (lane & 3);  // lanes < 4 RT copy scales
  const int nsteps = warp < kb ? (kb - warp + nwarps - 1) / nwarps : 0;
  auto issue = [&](int i) {
    const int s = warp + i * nwarps;
    if (i < nsteps) {
      const int slot = i & (D - 1);
#pragma unroll
      for (int r = 0; r < RT; ++r) cp_async16(&wring[((slot * nwarps + warp) * RT + r) * 32 + lane], wb[r] + s * 512);
      if (lane < 4 * RT) {
        cp_async16(&sring[((slot * nwarps + warp) * RT) * 16 + 4 * lane],
                   sz + static_cast<int64_t>((s * 64) >> group_shift) * N + srow);
      }
    }
    cp_commit();
  };
#pragma unroll
  for (int i = 0; i < D - 1; ++i) issue(i);
  if constexpr (XS) {  // word (s, m, t, 2j + h) = x[m][64 s + 16 j + 2 t + 8 h .. + 1]
    const unsigned* xw = reinterpret_cast<const unsigned*>(x);
    for (int i = threadIdx.x; i < M * K / 2; i += blockDim.x) {
      const int m = i / (K / 2), p = i % (K / 2), s = p / 32, kk = (2 * p) % 64, j = kk / 16, r = kk % 16;
      xs[((s * M + m) * 4 + (r % 8) / 2) * 8 + 2 * j + r / 8] = xw[i];
    }
    __syncthreads();
  }
  float acc[RT][1][4] = {};
  const T* xr = x + gm * K + 2 * t;
  for (int i = 0; i < nsteps; ++i) {
    cp_wait<D - 2>();
    __syncwarp();
    issue(i + D - 1);
    const int slot = i & (D - 1), s = warp + i * nwarps;
    uint4 wv[RT];
    T2 s2[RT][2], z2[RT][2];
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      const int base = (slot * nwarps + warp) * RT + r;
      wv[r] = wring[base * 32 + lane];
      const unsigned a = sring[base * 16 + g], b = sring[base * 16 + g + 8];
      const T2 pa = *reinterpret_cast<const T2*>(&a), pb = *reinterpret_cast<const T2*>(&b);
      s2[r][0] = __low2bfloat162(pa), z2[r][0] = __high2bfloat162(pa);
      s2[r][1] = __low2bfloat162(pb), z2[r][1] = __high2bfloat162(pb);
    }
    uint32_t b[4][2];
    if constexpr (XS) {
      const uint4* xp = reinterpret_cast<const uint4*>(xs + ((s * M + gm) * 4 + t) * 8);
      const uint4 lo = xp[0], hi = xp[1];
      b[0][0] = lo.x, b[0][1] = lo.y, b[1][0] = lo.z, b[1][1] = lo.w;
      b[2][0] = hi.x, b[2][1] = hi.y, b[3][0] = hi.z, b[3][1] = hi.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        b[j][0] = __ldg(reinterpret_cast<const unsigned*>(xr + s * 64 + 16 * j));
        b[j][1] = __ldg(reinterpret_cast<const unsigned*>(xr + s * 64 + 16 * j + 8));
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const uint32_t word = j == 0 ? wv[r].x : j == 1 ? wv[r].y : j == 2 ? wv[r].z : wv[r].w;
        fxquant::mma::mma16816<T>(acc[r][0], dequant_nibbles_0_4<T>(word, s2[r][0], z2[r][0]),
                                  dequant_nibbles_0_4<T>(word >> 4, s2[r][1], z2[r][1]),
                                  dequant_nibbles_0_4<T>(word >> 8, s2[r][0], z2[r][0]),
                                  dequant_nibbles_0_4<T>(word >> 12, s2[r][1], z2[r][1]), b[j][0], b[j][1]);
      }
  }
  cp_wait<0>();
  fxquant::mma::reduce_store<T, RT, 1, 16>(acc, rb0 * 16, M, N, static_cast<const T*>(nullptr),
                                           static_cast<const T*>(nullptr), out, N);
}

template <int RT, int D, bool XS>
void launch(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int warps, int shift) {
  const int M = x.size(0), K = x.size(1), N = q.size(0);
  const size_t smem = static_cast<size_t>(D) * warps * RT * (512 + 64) + (XS ? static_cast<size_t>(M) * K * 2 : 0);
  auto kernel = async_kernel<RT, D, XS>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<(N / 16 + RT - 1) / RT, warps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const uint8_t*>(q.data_ptr()),
      reinterpret_cast<const unsigned*>(sz.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), M, N, K, shift);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int RT, int D>
void launch_xs(bool xs, const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int warps,
               int shift) {
  xs ? launch<RT, D, true>(x, q, sz, out, warps, shift) : launch<RT, D, false>(x, q, sz, out, warps, shift);
}

template <int RT>
void launch_d(int d, bool xs, const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out,
              int warps, int shift) {
  if (d == 2) launch_xs<RT, 2>(xs, x, q, sz, out, warps, shift);
  else if (d == 4) launch_xs<RT, 4>(xs, x, q, sz, out, warps, shift);
  else launch_xs<RT, 8>(xs, x, q, sz, out, warps, shift);
}

// x [M <= 8, K] bf16 contiguous; q: numerics.pack_int4_mma's bytes [N, K / 2]; sz [K / group, N, 2] bf16.
at::Tensor int4_mma_async_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, int64_t group,
                                 int64_t rt, int64_t warps, int64_t stages, bool xs) {
  const int M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && M >= 1 && M <= 8 &&
                  K % 64 == 0 && N % 16 == 0 && q.is_contiguous() && q.size(1) * 2 == K && group >= 64 &&
                  (group & (group - 1)) == 0 && sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() &&
                  warps >= 1 && warps <= 16 && (rt == 1 || rt == 2 || rt == 4) &&
                  (stages == 2 || stages == 4 || stages == 8) && (!xs || M * K * 2 <= 64 * 1024),
              "int4_mma_async_linear: bad input");
  auto out = at::empty({M, N}, x.options());
  const int shift = __builtin_ctz(static_cast<unsigned>(group));
  const int w = std::min<int>(warps, K / 64);
  if (rt == 1) launch_d<1>(stages, xs, x, q, sz, out, w, shift);
  else if (rt == 2) launch_d<2>(stages, xs, x, q, sz, out, w, shift);
  else launch_d<4>(stages, xs, x, q, sz, out, w, shift);
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_mma_async_linear(Tensor x, Tensor q, Tensor sz, int group, int rt, int warps, int stages, bool xs) -> Tensor",
        &int4_mma_async_linear);
}
