// Probe (benchmarks/probe_int4_mma_scales.py), not part of fxquant: the shipped MMA-layout int4 decode
// kernel (csrc/int4_mma_layout.cu at M <= 8, x staged per warp step) with three ways of reading the
// scales and zeros. SL 0 reads them as fxquant stores them ([K / group, N] pairs: the 16 rows of a row
// block are 64 bytes, and the next group is N * 4 bytes on); SL 1 from a row-block-major copy
// ([N / 16, K / group, 16]: a row block's scales for all of K are contiguous); SL 2 reads group 0's once
// and reuses them (wrong output, timing only: what any scale layout could save at most). SL 3 reads them
// as SL 0, but once per scale group instead of once per 64-k block (the shipped kernel reloads them,
// from L1, for every block of a group). SL 4 reads a copy in which rows g and g + 8 of a row block and
// group are adjacent ([K / group, N / 16, 8, 2] pairs): one 8-byte load instead of two 4-byte loads.
// SL 5 copies the block's scales for all of K from the row-block-major copy into shared memory at the
// start (cp.async, whole lines, one block barrier in each warp's first step) and reads them there.
// SL 6 reads them as SL 0 without allocating them in L1 (as the weights are read); SL 7 also copies x
// past L1 (cp.async.cg). SL 8 is SL 0 held to 40 registers (three 16-warp blocks per SM). SL 9 knows the
// group (128) at compile time and holds one scale register pair per group; SL 10 is SL 9 held to 40.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "mma.cuh"
#include "probe_util.cuh"

namespace {
using T = __nv_bfloat16;
using T2 = __nv_bfloat162;
using fxquant::mma::dequant_nibbles_0_4;
using fxquant::mma::mma16816;

using probe::cp_async16;
using probe::ldmatrix_x4;

// minimum blocks 0: unasked, as the shipped kernel (an explicit 1 lets ptxas take more registers)
template <int RT, int U, int SL>
__global__ void __launch_bounds__(512, SL == 8 || SL == 10 ? 3 : 0) scales_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                     const unsigned* __restrict__ sz, T* __restrict__ out, int M,
                                                     int N, int K, int group_shift) {
  extern __shared__ uint4 x_smem[];
  constexpr int pitch = U * 64 + 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2;
  const int kb = K / 64, rb0 = blockIdx.x * RT, nrb = N / 16, G = K >> group_shift;
  float acc[RT][1][4];
  const uint8_t* wr[RT];
  int row[RT], rbv[RT];
  unsigned ca[RT], cb[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    acc[r][0][0] = acc[r][0][1] = acc[r][0][2] = acc[r][0][3] = 0.f;
    const int rb = min(rb0 + r, nrb - 1);
    wr[r] = w + static_cast<int64_t>(rb) * kb * 512 + 16 * lane;
    row[r] = rb * 16 + g;
    rbv[r] = rb;
    if constexpr (SL == 2) ca[r] = __ldg(sz + row[r]), cb[r] = __ldg(sz + row[r] + 8);
  }
  T* const tile = reinterpret_cast<T*>(x_smem) + warp * M * pitch;
  const T* xs = tile + min(lane & 7, M - 1) * pitch + 8 * (lane >> 3);
  // SL 5: the block's scales for all of K (RT x G x 16 pairs, contiguous in the row-block-major copy)
  unsigned* const ssm = reinterpret_cast<unsigned*>(reinterpret_cast<T*>(x_smem) + nwarps * M * pitch);
  if constexpr (SL == 5) {
    const int chunks = RT * G * 4, last = (nrb - 1) * G * 16;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x)  // a row block past N copies the last one
      cp_async16(ssm + 4 * c, sz + min(rb0 * G * 16 + 4 * c, last + (4 * c) % (G * 16)));
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  for (int s0 = warp * U; s0 < kb; s0 += nwarps * U) {
    __syncwarp();
    for (int c = lane; c < M * 8 * U; c += 32) {
      const int tok = c / (8 * U), chunk = c % (8 * U);
      if constexpr (SL == 7)
        probe::cp_async16_cg(tile + tok * pitch + 8 * chunk, x + static_cast<int64_t>(tok) * K + s0 * 64 + 8 * chunk);
      else
        cp_async16(tile + tok * pitch + 8 * chunk, x + static_cast<int64_t>(tok) * K + s0 * 64 + 8 * chunk);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    uint4 wv[U][RT];
    unsigned sa[U][RT], sb[U][RT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int grp = ((s0 + u) * 64) >> group_shift;
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        wv[u][r] = fxquant::device::load_stream(wr[r] + (s0 + u) * 512);
        if constexpr (SL == 6 || SL == 7) {  // as SL 0, without allocating in L1
          sa[u][r] = probe::load_no_l1(sz + grp * N + row[r]);
          sb[u][r] = probe::load_no_l1(sz + grp * N + row[r] + 8);
        } else if constexpr (SL == 9 || SL == 10) {  // group 128, U even: blocks 2i and 2i + 1 share a group
          if (u % 2 == 0) {  // u is a constant once unrolled: no branch, one register pair per group
            sa[u][r] = __ldg(sz + grp * N + row[r]);
            sb[u][r] = __ldg(sz + grp * N + row[r] + 8);
          } else {
            sa[u][r] = sa[u > 0 ? u - 1 : 0][r], sb[u][r] = sb[u > 0 ? u - 1 : 0][r];
          }
        } else if constexpr (SL == 0 || SL == 8) {
          sa[u][r] = __ldg(sz + grp * N + row[r]);
          sb[u][r] = __ldg(sz + grp * N + row[r] + 8);
        } else if constexpr (SL == 3) {  // once per scale group: a step's later blocks of the same group reuse them
          if (u == 0 || (((s0 + u) * 64) & ((1 << group_shift) - 1)) == 0) {
            sa[u][r] = __ldg(sz + grp * N + row[r]);
            sb[u][r] = __ldg(sz + grp * N + row[r] + 8);
          } else {
            sa[u][r] = sa[u - 1 > 0 ? u - 1 : 0][r], sb[u][r] = sb[u - 1 > 0 ? u - 1 : 0][r];
          }
        } else if constexpr (SL == 5) {  // read after the barrier below
        } else if constexpr (SL == 4) {  // [G, N / 16, 8, 2 rows]: rows g and g + 8 in one 8-byte load
          const uint2 v = __ldg(reinterpret_cast<const uint2*>(sz) + (grp * nrb + rbv[r]) * 8 + g);
          sa[u][r] = v.x, sb[u][r] = v.y;
        } else if constexpr (SL == 1) {
          const unsigned* p = sz + (rbv[r] * G + grp) * 16 + g;
          sa[u][r] = __ldg(p);
          sb[u][r] = __ldg(p + 8);
        } else {
          sa[u][r] = ca[r], sb[u][r] = cb[r];
        }
      }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncwarp();
    if constexpr (SL == 5) {
      if (s0 == warp * U) __syncthreads();  // every warp's first step: the block's scales are in
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int grp = ((s0 + u) * 64) >> group_shift;
#pragma unroll
        for (int r = 0; r < RT; ++r) sa[u][r] = ssm[(r * G + grp) * 16 + g], sb[u][r] = ssm[(r * G + grp) * 16 + g + 8];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      T2 s2[RT][2], z2[RT][2];
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        const T2 pa = *reinterpret_cast<const T2*>(&sa[u][r]), pb = *reinterpret_cast<const T2*>(&sb[u][r]);
        s2[r][0] = __low2bfloat162(pa), z2[r][0] = __high2bfloat162(pa);
        s2[r][1] = __low2bfloat162(pb), z2[r][1] = __high2bfloat162(pb);
      }
      uint32_t bx[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j % 2 == 0) ldmatrix_x4(bx, xs + u * 64 + 16 * j);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          const uint32_t word = j == 0 ? wv[u][r].x : j == 1 ? wv[u][r].y : j == 2 ? wv[u][r].z : wv[u][r].w;
          mma16816<T>(acc[r][0], dequant_nibbles_0_4<T>(word, s2[r][0], z2[r][0]),
                      dequant_nibbles_0_4<T>(word >> 4, s2[r][1], z2[r][1]),
                      dequant_nibbles_0_4<T>(word >> 8, s2[r][0], z2[r][0]),
                      dequant_nibbles_0_4<T>(word >> 12, s2[r][1], z2[r][1]), bx[2 * (j % 2)], bx[2 * (j % 2) + 1]);
        }
      }
    }
  }
  fxquant::mma::reduce_store<T, RT, 1, 16>(acc, rb0 * 16, M, N, static_cast<const T*>(nullptr),
                                           static_cast<const T*>(nullptr), out, N);
}

template <int RT, int U, int SL>
void run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int group, int warps) {
  const int N = q.size(0), K = q.size(1) * 2, M = x.numel() / K;
  const int smem = warps * M * (U * 64 + 8) * 2 + (SL == 5 ? RT * (K / group) * 64 : 0);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(scales_kernel<RT, U, SL>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  scales_kernel<RT, U, SL><<<(N / 16 + RT - 1) / RT, warps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), q.data_ptr<uint8_t>(), reinterpret_cast<const unsigned*>(sz.data_ptr()),
      reinterpret_cast<T*>(out.data_ptr()), M, N, K, __builtin_ctz(static_cast<unsigned>(group)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int SL>
void by_shape(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int group, int rt,
              int warps, int u) {
  if (rt == 1 && u == 2) return run<1, 2, SL>(x, q, sz, out, group, warps);
  if (rt == 2 && u == 2) return run<2, 2, SL>(x, q, sz, out, group, warps);
  if (rt == 1 && u == 4) return run<1, 4, SL>(x, q, sz, out, group, warps);
  if (rt == 2 && u == 4) return run<2, 4, SL>(x, q, sz, out, group, warps);
  TORCH_CHECK(false, "shapes RT x U: 1 x 2, 2 x 2, 1 x 4, 2 x 4");
}

at::Tensor scales_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, int64_t group, int64_t rt,
                         int64_t warps, int64_t u, int64_t sl) {
  const int N = q.size(0), K = q.size(1) * 2, M = x.numel() / K;
  TORCH_CHECK(M >= 1 && M <= 8 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && N % 16 == 0 &&
              K % (64 * u) == 0 && warps >= 1 && warps <= 16);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (sl == 0) by_shape<0>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 1) by_shape<1>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 2) by_shape<2>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 3) by_shape<3>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 4) by_shape<4>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 5) by_shape<5>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 6) by_shape<6>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 7) by_shape<7>(x, q, sz, out, group, rt, warps, u);
  else if (sl == 8) by_shape<8>(x, q, sz, out, group, rt, warps, u);
  else {
    TORCH_CHECK(group == 128 && u % 2 == 0, "sl 9 and 10: group 128 and an even U only");
    if (sl == 9) by_shape<9>(x, q, sz, out, group, rt, warps, u);
    else by_shape<10>(x, q, sz, out, group, rt, warps, u);
  }
  return out;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_mma_scales_linear(Tensor x, Tensor qweight, Tensor scales_zeros, int group, int rt, int warps, int u, int sl) -> Tensor");
}
TORCH_LIBRARY_IMPL(fxquant_probe, CUDA, m) { m.impl("int4_mma_scales_linear", &scales_linear); }
