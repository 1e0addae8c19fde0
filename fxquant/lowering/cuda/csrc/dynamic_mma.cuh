// The 8-bit tensor-core kernel of the dynamic-activation ops and its launcher (see dynamic_mma.cu).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "device.cuh"

namespace fxquant {
namespace dyn {

using device::from_f;
using device::load_stream;
using device::to_f;

constexpr int kMaxQuantM = 4;   // plain ops: x rows quantized into shared memory (M * K bytes)
constexpr int kMaxDynM = 32;    // prequant ops
constexpr int kMaxWarps = 16;   // per block; they split K in 64-k steps
constexpr int kRedBytes = 32768;  // shared memory for summing the warps' partial tiles (at most)
constexpr int red_slots(int tile) { return kMaxWarps < kRedBytes / (tile * 4) ? kMaxWarps : kRedBytes / (tile * 4); }

template <bool FP8>
__device__ __forceinline__ void mma8(std::conditional_t<FP8, float, int> (&d)[4], uint32_t a0, uint32_t a1,
                                     uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (FP8) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // the host never launches the e4m3 kernels below sm_89
#endif
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// numerics.quantize_int8_per_token / quantize_fp8 for one value and its token's scale.
template <bool FP8>
__device__ __forceinline__ uint32_t quantize(float x, float scale) {
  const float v = __fdiv_rn(x, scale);
  if constexpr (FP8) {
    return __nv_cvt_float_to_fp8(fminf(fmaxf(v, -448.f), 448.f), __NV_SATFINITE, __NV_E4M3);
  } else {
    return static_cast<uint32_t>(static_cast<int>(fminf(fmaxf(rintf(v), -127.f), 127.f))) & 0xffu;
  }
}

struct Args {
  const void* x;         // quantizing: T [M, K]; prequant: 8-bit [M, K]
  int64_t x_stride;      // elements of x's dtype
  const float* x_scales;  // prequant: [M]
  const uint8_t* w;      // [N, K], 8-bit
  const float* w_scales;  // [N] or [1]
  int ws_stride;         // 1 (per row) or 0 (per tensor)
  const void* bias;      // T [N] or null
  void* out;             // T [M, N]
  int64_t out_stride;
  int M, N, K;
  bool x_per_tensor;     // quantizing: one scale for all of x (fp8 per tensor)
  bool pdl;              // prequant: launch with programmatic dependent launch (the op's `pdl` argument)
};

// NT 8-token tiles (M <= 8 * NT), RT 16-row tiles per block, U 64-k pieces per warp step (1 or 2); QUANT: x is T and quantized here.
// PDL (prequant only): launched with programmatic dependent launch; the first weights are loaded, then
// griddepcontrol.wait before x, its scales, the bias and out are touched (so the packed weight must not
// be written by the kernel right before). The kernels without it compile as before it existed.
template <bool FP8, int NT, int RT, int U, bool QUANT, typename T, bool PDL = false>
__global__ void __launch_bounds__(kMaxWarps * 32) dynamic_mma_kernel(const Args a) {
  using Acc = std::conditional_t<FP8, float, int>;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float amax_part[kMaxWarps][kMaxQuantM];
  __shared__ float scale_s[kMaxQuantM];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int M = a.M, N = a.N, K = a.K, steps = K / (64 * U);
  const int row0 = blockIdx.x * 16 * RT;
  const int64_t xq_stride = K + 16;  // shared-memory rows, padded: tokens g fall in different banks

  int ra[RT], rb[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {  // rows past N repeat the last one: never stored
    ra[r] = min(row0 + 16 * r + g, N - 1);
    rb[r] = min(row0 + 16 * r + g + 8, N - 1);
  }
  uint4 wa[RT][U], wb[RT][U];
  auto load_w = [&](int step) {
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        wa[r][u] = load_stream(a.w + (int64_t)ra[r] * K + (step * U + u) * 64 + 16 * t);
        wb[r][u] = load_stream(a.w + (int64_t)rb[r] * K + (step * U + u) * 64 + 16 * t);
      }
  };
  if (warp < steps) load_w(warp);  // in flight while x is quantized (PDL: while the kernel before runs)
  if constexpr (PDL) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  }

  if constexpr (QUANT) {
    // Token scales: amax over K (over all of x for a per-tensor scale), then max(amax / QMAX, tiny).
    const T* x = static_cast<const T*>(a.x);
    const int vecs = K / 8;
    for (int m = 0; m < M; ++m) {
      float amax = 0.f;
      for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * a.x_stride) + i);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_f(e[j])));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (lane == 0) amax_part[warp][m] = amax;
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float amax = 0.f;
      for (int m = 0; m < M; ++m) {
        if (m != static_cast<int>(threadIdx.x) && !a.x_per_tensor) continue;
        for (int i = 0; i < nwarps; ++i) amax = fmaxf(amax, amax_part[i][m]);
      }
      scale_s[threadIdx.x] = fmaxf(__fdiv_rn(amax, FP8 ? 448.f : 127.f), FLT_MIN);
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {
      const float s = scale_s[m];
      for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(x + m * a.x_stride) + i);
        const T* e = reinterpret_cast<const T*>(&u);
        uint2 q;
        q.x = quantize<FP8>(to_f(e[0]), s) | quantize<FP8>(to_f(e[1]), s) << 8 | quantize<FP8>(to_f(e[2]), s) << 16 |
              quantize<FP8>(to_f(e[3]), s) << 24;
        q.y = quantize<FP8>(to_f(e[4]), s) | quantize<FP8>(to_f(e[5]), s) << 8 | quantize<FP8>(to_f(e[6]), s) << 16 |
              quantize<FP8>(to_f(e[7]), s) << 24;
        *reinterpret_cast<uint2*>(smem + m * xq_stride + 8 * i) = q;
      }
    }
    __syncthreads();
  }

  Acc acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0;

  for (int step = warp; step < steps; step += nwarps) {
    uint4 ca[RT][U], cb[RT][U];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) ca[r][u] = wa[r][u], cb[r][u] = wb[r][u];
    if (step + nwarps < steps) load_w(step + nwarps);  // the next step's weights, during these MMAs
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k0 = (step * U + u) * 64 + 16 * t;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int m = n * 8 + g;  // tokens past M are zeros
        uint4 xv = make_uint4(0, 0, 0, 0);
        if (m < M) {
          if constexpr (QUANT) xv = *reinterpret_cast<const uint4*>(smem + m * xq_stride + k0);
          else {
            const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(a.x) + m * a.x_stride + k0);
            if constexpr (PDL) xv = *p;  // x was written while this kernel ran: not a read-only (.nc) load
            else xv = __ldg(p);
          }
        }
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          mma8<FP8>(acc[r][n], ca[r][u].x, cb[r][u].x, ca[r][u].y, cb[r][u].y, xv.x, xv.y);
          mma8<FP8>(acc[r][n], ca[r][u].z, cb[r][u].z, ca[r][u].w, cb[r][u].w, xv.z, xv.w);
        }
      }
    }
  }

  // acc[r][n] = D[rows g, g + 8][tokens 8n + 2t, + 1] of this warp's steps: summed over the warps
  // through `slots` per-warp copies in shared memory (the quantized x is dead by now), in a fixed
  // order (float sums are the same on every call).
  constexpr int kTile = RT * NT * 128;
  constexpr int kSlots = red_slots(kTile);
  Acc* red = reinterpret_cast<Acc*>(smem);
  __syncthreads();
  const int rounds = (nwarps + kSlots - 1) / kSlots;
  for (int round = 0; round < rounds; ++round) {
    if (warp / kSlots == round) {
      Acc* p = red + (warp % kSlots) * kTile;
#pragma unroll
      for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          Acc* q = p + (r * NT + n) * 128;
          const int idx[4] = {g * 8 + 2 * t, g * 8 + 2 * t + 1, (g + 8) * 8 + 2 * t, (g + 8) * 8 + 2 * t + 1};
#pragma unroll
          for (int e = 0; e < 4; ++e) q[idx[e]] = round == 0 ? acc[r][n][e] : q[idx[e]] + acc[r][n][e];
        }
    }
    __syncthreads();
  }
  const int used = nwarps < kSlots ? nwarps : kSlots;
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  for (int i = threadIdx.x; i < kTile; i += blockDim.x) {
    const int rn = i / 128, rr = (i / 8) % 16, c = i % 8;
    const int row = row0 + 16 * (rn / NT) + rr, m = (rn % NT) * 8 + c;
    if (row < N && m < M) {
      Acc s = 0;
      for (int j = 0; j < used; ++j) s += red[j * kTile + i];
      float v = static_cast<float>(s) * (QUANT ? scale_s[a.x_per_tensor ? 0 : m] : a.x_scales[m]);
      v *= a.w_scales[row * a.ws_stride];
      if (bias != nullptr) v += to_f(bias[row]);
      from_f(v, out + m * a.out_stride + row);
    }
  }
}

// Block shape: RT row tiles, the warps that split K, and U (64-k pieces per warp step: U KB per
// weight load round trip, warp and row tile). Rule: U = 1, then the first (RT, warps) of a
// preference list whose grid fits on the GPU in one wave, else the last (the rule of gemv.cu's int4
// tensor-core kernel). Measured on the H100 (int8, M = 1, 2, 8; BENCHMARKS.md S12): U = 2 was within
// the run-to-run spread of U = 1 (better on two shapes, worse on one), U = 4 lost 5-30 %, and
// 8 warps of two row tiles lost to 16 warps of one on three of four shapes.
// FXQUANT_CXX_DYN_VARIANT="RT,WARPS,U" overrides it (experiments; read at every call).
struct Shape {
  int rt, warps, u;
};

using device::blocks_per_sm;  // (kernel, threads, dynamic shared memory)

template <bool FP8, int NT, int RT, int U, bool QUANT, typename T, bool PDL = false>
const void* kernel_ptr() {
  auto k = dynamic_mma_kernel<FP8, NT, RT, U, QUANT, T, PDL>;
  static std::atomic<bool> opted[64];  // once per device: allow up to the opt-in shared memory
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (!opted[std::min(dev, 63)].load(std::memory_order_relaxed)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        device::attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>() - 1024));
    opted[std::min(dev, 63)].store(true, std::memory_order_relaxed);
  }
  return reinterpret_cast<const void*>(k);
}

// Dynamic shared memory: the quantized x (quantizing kernels), then the warps' partial tiles.
inline int smem_bytes(const Args& a, bool quant, int rt, int nt, int warps) {
  const int tile = rt * nt * 128;
  return std::max(quant ? a.M * (a.K + 16) : 0, std::min(warps, red_slots(tile)) * tile * 4);
}

template <bool FP8, int NT, int RT, int U, bool QUANT, typename T, bool PDL>
void launch_shape(const Args& a, int warps) {
  const int smem = smem_bytes(a, QUANT, RT, NT, warps);
  kernel_ptr<FP8, NT, RT, U, QUANT, T, PDL>();
  const dim3 grid((a.N + 16 * RT - 1) / (16 * RT));
  if constexpr (PDL) {  // may start while the kernel before runs; waits (griddepcontrol.wait) before reading x
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(warps * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c10::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, dynamic_mma_kernel<FP8, NT, RT, U, QUANT, T, PDL>, a));
  } else {
    dynamic_mma_kernel<FP8, NT, RT, U, QUANT, T, PDL><<<grid, warps * 32, smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool FP8, int NT, int RT, bool QUANT, typename T, bool PDL>
void launch_pdl(const Args& a, int warps, int u) {  // U = 2 is built for NT = 1 only (registers)
  if constexpr (NT == 1) {
    if (u == 2) return launch_shape<FP8, NT, RT, 2, QUANT, T, PDL>(a, warps);
  }
  launch_shape<FP8, NT, RT, 1, QUANT, T, PDL>(a, warps);
}

template <bool FP8, int NT, int RT, bool QUANT, typename T>
void launch_u(const Args& a, int warps, int u) {
  if constexpr (!QUANT) {
    if (a.pdl) return launch_pdl<FP8, NT, RT, QUANT, T, true>(a, warps, u);
  }
  launch_pdl<FP8, NT, RT, QUANT, T, false>(a, warps, u);
}

template <bool FP8, int NT, bool QUANT, typename T>
void launch_nt(const Args& a) {
  static constexpr Shape kOne[] = {{1, 16, 0}, {1, 8, 0}, {2, 8, 0}, {2, 4, 0}};  // NT = 1
  static constexpr Shape kMore[] = {{2, 16, 0}, {2, 8, 0}, {2, 4, 0}};
  const Shape* list = NT == 1 ? kOne : kMore;
  const int count = NT == 1 ? 4 : 3;
  Shape s = list[count - 1];
  for (int i = 0; i < count; ++i) {
    const int warps = std::min(list[i].warps, a.K / 64), blocks = (a.N + 16 * list[i].rt - 1) / (16 * list[i].rt);
    const void* k = list[i].rt == 1 ? kernel_ptr<FP8, NT, 1, 1, QUANT, T>() : kernel_ptr<FP8, NT, 2, 1, QUANT, T>();
    if (blocks <= blocks_per_sm(k, warps * 32, smem_bytes(a, QUANT, list[i].rt, NT, warps)) * device::sm_count()) {
      s = list[i];
      break;
    }
  }
  s.u = 1;
  if (const char* e = std::getenv("FXQUANT_CXX_DYN_VARIANT")) {  // exactly "RT,WARPS,U", else ignored
    Shape o{0, 0, 0};
    int used = 0;
    if (std::sscanf(e, "%d,%d,%d%n", &o.rt, &o.warps, &o.u, &used) == 3 && e[used] == '\0' && o.rt >= 1 &&
        o.rt <= 2 && o.warps >= 1 && o.warps <= kMaxWarps && (o.u == 1 || (NT == 1 && o.u == 2)) &&
        a.K % (64 * o.u) == 0)
      s = o;
  }
  const int warps = std::max(1, std::min(s.warps, a.K / (64 * s.u)));
  if (s.rt == 1) launch_u<FP8, NT, 1, QUANT, T>(a, warps, s.u);
  else launch_u<FP8, NT, 2, QUANT, T>(a, warps, s.u);
}

// The launcher of one scheme (FP8), form (QUANT: x quantized here, M <= kMaxQuantM) and output
// type; instantiated in dynamic_mma_int8.cu / dynamic_mma_fp8.cu (built in parallel).
template <bool FP8, bool QUANT, typename T>
void launch(const Args& a) {
  if (a.M <= 8) launch_nt<FP8, 1, QUANT, T>(a);
  else if constexpr (!QUANT) {
    if (a.M <= 16) launch_nt<FP8, 2, QUANT, T>(a);
    else launch_nt<FP8, 4, QUANT, T>(a);
  }
}

}  // namespace dyn
}  // namespace fxquant
