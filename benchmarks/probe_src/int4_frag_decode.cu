// Probe (benchmarks/probe_int4_frag_decode.py), not part of fxquant: the int4 decode kernel's arithmetic
// (LOP3 pairs, bf16x2 scale and zero, mma.m16n8k16; M <= 8) on the weight in CUTLASS's reordered
// layout with 16 bytes per thread (int4_shuffled.cu's int4_reorder(q, 4); docs/int4-decode.md, "One
// int4 layout for both ends"). Each lane loads 16 bytes per 16-row x 64-k block (512 contiguous bytes
// per warp load); word j's nibble pairs (i, i + 4) are the A registers a0..a3 of MMA step j, and x is
// read in the MMA's own k order. Only its time and its agreement with the shipped op matter here.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mma.cuh"

namespace {
using T = __nv_bfloat16;
using T2 = __nv_bfloat162;

// Nibbles i and i + 4 of w as a bf16 pair, (q - 8) * scale + zero: one LOP3 (mask | 128.0 magic), a
// subtract of 136 and an FMA, as the shipped kernel's dequant_pair_lop3.
__device__ __forceinline__ uint32_t pair(uint32_t w, int i, T2 s2, T2 z2) {
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(v) : "r"(w >> (4 * i)), "n"(0x000F000F), "n"(0x43004300));
  const T2 q = __hsub2(*reinterpret_cast<const T2*>(&v), __float2bfloat162_rn(136.f));
  const T2 r = __hfma2(q, s2, z2);
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <int RT, int U>  // RT 16-row blocks per thread block; the block's warps split K in steps of U x 64 k
__global__ void __launch_bounds__(512) frag_kernel(const T* __restrict__ x, int x_stride, const uint8_t* __restrict__ wf,
                                                   const T* __restrict__ sz, T* __restrict__ out, int M, int N, int K,
                                                   int group_shift) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nrb = N / 16, rb0 = blockIdx.x * RT;
  float acc[RT][1][4];
#pragma unroll
  for (int r = 0; r < RT; ++r) acc[r][0][0] = acc[r][0][1] = acc[r][0][2] = acc[r][0][3] = 0.f;
  const T* xr = x + min(g, M - 1) * x_stride + 2 * t;  // token g (past M: row M - 1, never stored)
  int rb[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) rb[r] = min(rb0 + r, nrb - 1);
  for (int s0 = warp * U; s0 < K / 64; s0 += nwarps * U) {
    uint4 wu[U][RT];
    uint32_t sau[U][RT], sbu[U][RT];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all loads of the step first: U x 512 bytes per row block in flight
      const int s = s0 + u;
      const unsigned int* szw = reinterpret_cast<const unsigned int*>(sz) + ((s * 64) >> group_shift) * N;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        wu[u][r] = fxquant::device::load_stream(wf + (static_cast<int64_t>(s) * nrb + rb[r]) * 512 + 16 * lane);
        sau[u][r] = __ldg(szw + rb[r] * 16 + g);
        sbu[u][r] = __ldg(szw + rb[r] * 16 + g + 8);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
    const int s = s0 + u;
    const uint4 (&w)[RT] = wu[u];
    const uint32_t (&sa)[RT] = sau[u];
    const uint32_t (&sb)[RT] = sbu[u];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T* xk = xr + s * 64 + 16 * j;
      const uint32_t b0 = __ldg(reinterpret_cast<const unsigned int*>(xk));
      const uint32_t b1 = __ldg(reinterpret_cast<const unsigned int*>(xk + 8));
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const uint32_t word = j == 0 ? w[r].x : j == 1 ? w[r].y : j == 2 ? w[r].z : w[r].w;
        const T2 pa = *reinterpret_cast<const T2*>(&sa[r]), pb = *reinterpret_cast<const T2*>(&sb[r]);
        const T2 s0 = __low2bfloat162(pa), z0 = __high2bfloat162(pa), s8 = __low2bfloat162(pb), z8 = __high2bfloat162(pb);
        fxquant::mma::mma16816<T>(acc[r][0], pair(word, 0, s0, z0), pair(word, 1, s8, z8), pair(word, 2, s0, z0),
                                  pair(word, 3, s8, z8), b0, b1);
      }
    }
    }
  }
  fxquant::mma::reduce_store<T, RT, 1, 16>(acc, rb0 * 16, M, N, static_cast<const T*>(nullptr),
                                           static_cast<const T*>(nullptr), out, N);
}

// x [M <= 8, K] bf16 contiguous; wf: the reordered weight (uint8 [N, K / 2]); sz: fxquant's
// scales_zeros [K / group, N, 2] bf16; rt 16-row blocks per thread block (1, 2 or 4), warps 1..16,
// u 64-k blocks loaded per warp step (1 or 2; 2 needs K % 128 == 0).
at::Tensor int4_frag_linear(const at::Tensor& x, const at::Tensor& wf, const at::Tensor& sz, int64_t group, int64_t rt,
                            int64_t warps, int64_t u) {
  const int M = x.size(0), K = x.size(1), N = wf.size(0);
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && M >= 1 && M <= 8 && K % 64 == 0 &&
                  N % 16 == 0 && wf.size(1) * 2 == K && (group & (group - 1)) == 0 && group >= 64 &&
                  sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && warps >= 1 && warps <= 16 &&
                  (u == 1 || (u == 2 && K % 128 == 0)),
              "int4_frag_linear: bad input");
  auto out = at::empty({M, N}, x.options());
  const int shift = __builtin_ctz(static_cast<unsigned>(group));
  const int w = std::min<int>(warps, K / 64 / u);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(wf.data_ptr());
  const T* sp = reinterpret_cast<const T*>(sz.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int blocks16 = N / 16;
  auto launch = [&](auto kernel, int rows) {
    kernel<<<(blocks16 + rows - 1) / rows, w * 32, 0, stream>>>(xp, K, wp, sp, op, M, N, K, shift);
  };
  if (rt == 1) u == 1 ? launch(frag_kernel<1, 1>, 1) : launch(frag_kernel<1, 2>, 1);
  else if (rt == 2) u == 1 ? launch(frag_kernel<2, 1>, 2) : launch(frag_kernel<2, 2>, 2);
  else if (rt == 4 && u == 1) launch(frag_kernel<4, 1>, 4);
  else TORCH_CHECK(false, "int4_frag_linear: rt is 1, 2 or 4 (4 with u = 1)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_frag_linear(Tensor x, Tensor wf, Tensor sz, int group, int rt, int warps, int u) -> Tensor",
        &int4_frag_linear);
}
