// Device helpers shared by the CUDA kernels of this library (gemv.cu, dynamic_mma.cu).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace fxquant {
namespace device {

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* p) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void from_f(float v, __half* p) { *p = __float2half(v); }

// Experiment (FXQUANT_CXX_L2_PREFETCH, read per launch by l2_prefetch_bytes(); default 0 = off): at
// its start a block asks L2 for `per_row` bytes of each of its weight rows, from byte `offset` on (the
// block's first loads already ask for the bytes before it), with one bulk prefetch per row from one
// thread each (sm_90+; a no-op below). The bytes a kernel keeps in flight are otherwise bounded by its
// registers and occupancy (Nsight Compute: 33-67 % of DRAM peak for the int4 decode kernel at M = 1,
// BENCHMARKS.md S10 / S16); a prefetch holds no registers and no shared memory.
__device__ __forceinline__ void prefetch_rows_l2(const uint8_t* w, int64_t row_bytes, int row0, int rows, int n,
                                                 uint32_t per_row, int64_t offset) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (per_row == 0 || offset >= row_bytes) return;
  // the instruction takes a multiple of 16 bytes, at most 1048560
  const uint32_t bytes = static_cast<uint32_t>(std::min<int64_t>({per_row, row_bytes - offset, 1048560})) & ~15u;
  for (int r = threadIdx.x; r < rows && row0 + r < n && bytes > 0; r += blockDim.x)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(w + (row0 + r) * row_bytes + offset), "r"(bytes)
                 : "memory");
#endif
}

// Weights are read once: skip L1, and let L2 fetch whole 256-byte lines.
__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

// Facts of the current device that never change, queried once per device (racing first calls
// store the same value).
template <cudaDeviceAttr kAttr>
inline int attr() {
  static std::atomic<int> cache[64];  // zero-initialised (static storage)
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>& slot = cache[std::min(dev, 63)];
  int v = slot.load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, dev));
    slot.store(v, std::memory_order_relaxed);
  }
  return v;
}

inline int sm_count() { return attr<cudaDevAttrMultiProcessorCount>(); }
inline int capability() {  // 90 for sm_90
  return attr<cudaDevAttrComputeCapabilityMajor>() * 10 + attr<cudaDevAttrComputeCapabilityMinor>();
}

// FXQUANT_CXX_L2_PREFETCH: bytes of each weight row a block prefetches into L2 (prefetch_rows_l2);
// unset, 0 or not a plain number: off. Read at every launch (experiments switch it per process).
inline uint32_t l2_prefetch_bytes() {
  const char* e = std::getenv("FXQUANT_CXX_L2_PREFETCH");
  if (e == nullptr || *e == '\0') return 0;
  char* end = nullptr;
  const unsigned long v = std::strtoul(e, &end, 10);
  return *end == '\0' && v <= (1ul << 30) ? static_cast<uint32_t>(v) : 0;
}

}  // namespace device
}  // namespace fxquant
