// Probe (benchmarks/probe_int4_mma_stream.py), not part of fxquant: a persistent int4 decode kernel on the
// MMA-fragment layout (numerics.pack_int4_mma), M <= 8. The weight's 16 x 64 blocks are numbered in
// memory order (unit u = row block * K / 64 + k block, at byte 512 u), and each warp of a grid sized to
// the GPU takes one contiguous run of T / P units: every warp reads the same number of bytes (no partial
// wave), keeps D units in flight in registers for its whole run (the next load is issued before each
// unit is computed), and there is no block barrier after x is staged. A row block split between warps
// is summed by whichever of them arrives last (a counter per row block; the parts are added in warp
// order, so the result does not depend on timing). RO = true only reads the same bytes: the ceiling
// for this access pattern.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <tuple>

#include "mma.cuh"
#include "probe_util.cuh"

namespace {
using T = __nv_bfloat16;
using T2 = __nv_bfloat162;
using fxquant::mma::dequant_nibbles_0_4;
using fxquant::mma::mma16816;

using probe::cp_async16;
using probe::ldmatrix_x4;

// first warp whose run holds unit u: the largest w with floor(w T / P) <= u
__device__ __forceinline__ int owner(int64_t u, int64_t units, int64_t warps) {
  return static_cast<int>(((u + 1) * warps + units - 1) / units - 1);
}

template <int D, bool RO, int MAXT>
__global__ void __launch_bounds__(MAXT) stream_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                      const unsigned* __restrict__ sz, T* __restrict__ out,
                                                      float* __restrict__ ws, int* __restrict__ cnt,
                                                      unsigned* __restrict__ sink, int M, int N, int K,
                                                      int group_shift, int maxp) {
  extern __shared__ uint4 dyn[];
  T* xs = reinterpret_cast<T*>(dyn);  // M rows of K + 8 elements (16-byte pad: ldmatrix rows in distinct banks)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kb = K / 64, nrb = N / 16, pitch = K + 8;
  const int64_t units = static_cast<int64_t>(nrb) * kb, P = static_cast<int64_t>(gridDim.x) * nwarps;
  const int gw = blockIdx.x * nwarps + warp;
  const int a = static_cast<int>(gw * units / P), b = static_cast<int>((gw + 1) * units / P);
  if constexpr (!RO) {
    for (int c = threadIdx.x; c < M * (K / 8); c += blockDim.x) {
      const int tok = c / (K / 8), ch = c % (K / 8);
      cp_async16(xs + tok * pitch + 8 * ch, x + static_cast<int64_t>(tok) * K + 8 * ch);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  uint4 wv[D];
  unsigned sa[D], sb[D];
  int lrt = a / kb, ls = a % kb;  // the next unit to load
  const uint8_t* wp = w + static_cast<int64_t>(a) * 512 + 16 * lane;
  auto issue = [&](int d) {
    wv[d] = fxquant::device::load_stream(wp);
    const unsigned* s = sz + (((ls * 64) >> group_shift) * N + lrt * 16 + g);
    sa[d] = __ldg(s);
    sb[d] = __ldg(s + 8);
    wp += 512;
    if (++ls == kb) ls = 0, ++lrt;
  };
#pragma unroll
  for (int d = 0; d < D; ++d)
    if (a + d < b) issue(d);
  if constexpr (RO) {
    unsigned h = 0;
    for (int base = a; base < b; base += D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (base + d < b) {
          h ^= wv[d].x ^ wv[d].y ^ wv[d].z ^ wv[d].w ^ sa[d] ^ sb[d];
          if (base + d + D < b) issue(d);
        }
      }
    }
    sink[gw * 32 + lane] = h;
    return;
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();
  const T* xrow = xs + min(lane & 7, M - 1) * pitch + 8 * (lane >> 3);
  // Only a run's first and last row blocks can be shared with other warps: their part index and count
  // now, so that the loop holds no 64-bit division.
  int part_first = 0, parts_first = 1, part_last = 0, parts_last = 1;
  if (b > a) {
    const int64_t f0 = static_cast<int64_t>(a / kb) * kb, f1 = static_cast<int64_t>((b - 1) / kb) * kb;
    const int w0 = owner(f0, units, P), w1 = owner(f1, units, P);
    part_first = gw - w0, parts_first = owner(f0 + kb - 1, units, P) - w0 + 1;
    part_last = gw - w1, parts_last = owner(f1 + kb - 1, units, P) - w1 + 1;
  }
  const int rt_first = a / kb;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int crt = a / kb, cs = a % kb;  // the unit being computed
  bool whole = cs == 0;           // this warp began the current row block
  for (int base = a; base < b; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (base + d >= b) break;
      const uint4 q = wv[d];
      const unsigned pa = sa[d], pb = sb[d];
      if (base + d + D < b) issue(d);
      const T2 s0 = __low2bfloat162(*reinterpret_cast<const T2*>(&pa)), z0 = __high2bfloat162(*reinterpret_cast<const T2*>(&pa));
      const T2 s1 = __low2bfloat162(*reinterpret_cast<const T2*>(&pb)), z1 = __high2bfloat162(*reinterpret_cast<const T2*>(&pb));
      uint32_t bx[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (j % 2 == 0) ldmatrix_x4(bx, xrow + cs * 64 + 16 * j);
        const uint32_t word = j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
        mma16816<T>(acc, dequant_nibbles_0_4<T>(word, s0, z0), dequant_nibbles_0_4<T>(word >> 4, s1, z1),
                    dequant_nibbles_0_4<T>(word >> 8, s0, z0), dequant_nibbles_0_4<T>(word >> 12, s1, z1),
                    bx[2 * (j % 2)], bx[2 * (j % 2) + 1]);
      }
      const bool end = ++cs == kb;
      if (end || base + d + 1 == b) {  // this warp's share of row block crt is done
        if (whole && end) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int tok = 2 * t + (e & 1), row = crt * 16 + g + 8 * (e >> 1);
            if (tok < M) out[static_cast<int64_t>(tok) * N + row] = __float2bfloat16(acc[e]);
          }
        } else {
          const bool first = crt == rt_first;
          const int np = first ? parts_first : parts_last;
          float* part = ws + (crt * maxp + (first ? part_first : part_last)) * 128;
#pragma unroll
          for (int e = 0; e < 4; ++e) __stcg(part + (g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1), acc[e]);
          __threadfence();
          __syncwarp();
          int old = 0;
          if (lane == 0) old = atomicAdd(cnt + crt, 1);
          old = __shfl_sync(0xffffffffu, old, 0);
          if (old == np - 1) {  // the last part in: add all in warp order
            __threadfence();
            float v[4] = {0.f, 0.f, 0.f, 0.f};
            for (int p = 0; p < np; ++p) {
              const float* pp = ws + (crt * maxp + p) * 128;
#pragma unroll
              for (int e = 0; e < 4; ++e) v[e] += __ldcg(pp + (g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1));
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int tok = 2 * t + (e & 1), row = crt * 16 + g + 8 * (e >> 1);
              if (tok < M) out[static_cast<int64_t>(tok) * N + row] = __float2bfloat16(v[e]);
            }
            if (lane == 0) cnt[crt] = 0;  // ready for the next launch
          }
        }
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
        whole = true;
        if (end) cs = 0, ++crt;
      }
    }
  }
}

struct Scratch {
  at::Tensor ws, cnt, sink;
};

Scratch& scratch(const at::Tensor& like, int nrb, int maxp, int64_t warps) {
  static std::map<std::tuple<int, int, int, int64_t>, Scratch> cache;
  auto key = std::make_tuple(static_cast<int>(like.get_device()), nrb, maxp, warps);
  auto it = cache.find(key);
  if (it == cache.end()) {
    Scratch s{at::empty({static_cast<int64_t>(nrb) * maxp * 128}, like.options().dtype(at::kFloat)),
              at::zeros({nrb}, like.options().dtype(at::kInt)), at::empty({warps * 32}, like.options().dtype(at::kInt))};
    it = cache.emplace(key, s).first;
  }
  return it->second;
}

template <int D, bool RO, int MAXT>
void run(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int group, int warps,
         int bps, int M, int N, int K) {
  int sms = 0, dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int grid = sms * bps;
  const int64_t P = static_cast<int64_t>(grid) * warps, units = static_cast<int64_t>(N / 16) * (K / 64);
  TORCH_CHECK(P <= units, "more warps than 16 x 64 blocks");  // every run then holds at least one unit
  const int maxp = static_cast<int>((K / 64) / (units / P) + 2);
  Scratch& s = scratch(q, N / 16, maxp, P);
  const int smem = RO ? 0 : M * (K + 8) * 2;
  auto k = stream_kernel<D, RO, MAXT>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  k<<<grid, warps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(
      RO ? nullptr : reinterpret_cast<const T*>(x.data_ptr()), q.data_ptr<uint8_t>(),
      reinterpret_cast<const unsigned*>(sz.data_ptr()), RO ? nullptr : reinterpret_cast<T*>(out.data_ptr()),
      s.ws.data_ptr<float>(), s.cnt.data_ptr<int>(), reinterpret_cast<unsigned*>(s.sink.data_ptr<int>()), M, N, K,
      __builtin_ctz(static_cast<unsigned>(group)), maxp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool RO>
void dispatch(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, at::Tensor& out, int group, int warps,
              int bps, int depth, int M, int N, int K) {
  TORCH_CHECK(warps * 32 <= (depth == 2 ? 1024 : 512), "too many warps for depth ", depth);
  if (depth == 2) return run<2, RO, 1024>(x, q, sz, out, group, warps, bps, M, N, K);
  if (depth == 4) return run<4, RO, 512>(x, q, sz, out, group, warps, bps, M, N, K);
  if (depth == 8) return run<8, RO, 512>(x, q, sz, out, group, warps, bps, M, N, K);
  TORCH_CHECK(false, "depth 2, 4 or 8");
}

at::Tensor stream_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sz, int64_t group, int64_t warps,
                         int64_t bps, int64_t depth) {
  const int N = q.size(0), K = q.size(1) * 2, M = x.numel() / K;
  TORCH_CHECK(M >= 1 && M <= 8 && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && N % 16 == 0 && K % 64 == 0);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  dispatch<false>(x, q, sz, out, group, warps, bps, depth, M, N, K);
  return out;
}

at::Tensor stream_read(const at::Tensor& q, const at::Tensor& sz, int64_t group, int64_t warps, int64_t bps,
                       int64_t depth) {
  const int N = q.size(0), K = q.size(1) * 2;
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  at::Tensor none;
  dispatch<true>(none, q, sz, none, group, warps, bps, depth, 1, N, K);
  return at::empty({0}, q.options());
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_mma_stream_linear(Tensor x, Tensor qweight, Tensor scales_zeros, int group, int warps, int bps, int depth) -> Tensor");
  m.def("int4_mma_stream_read(Tensor qweight, Tensor scales_zeros, int group, int warps, int bps, int depth) -> Tensor");
}
TORCH_LIBRARY_IMPL(fxquant_probe, CUDA, m) {
  m.impl("int4_mma_stream_linear", &stream_linear);
  m.impl("int4_mma_stream_read", &stream_read);
}
