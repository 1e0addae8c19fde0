// Device helpers shared by the CUDA kernels of this library (gemv.cu, dynamic_mma.cu).
#pragma once
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

namespace fxquant {
namespace device {

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ void from_f(float v, __nv_bfloat16* p) { *p = __float2bfloat16(v); }
__device__ __forceinline__ void from_f(float v, __half* p) { *p = __float2half(v); }

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

// A kernel's resident blocks per SM at a block size, queried once per (device, block size).
template <auto kKernel>
int blocks_per_sm(int threads) {  // threads: a multiple of 32, at most 512
  static std::atomic<int> cache[64][17];
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::atomic<int>& slot = cache[std::min(dev, 63)][threads / 32];
  int b = slot.load(std::memory_order_relaxed);
  if (b == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kKernel, threads, 0));
    b = std::max(b, 1);
    slot.store(b, std::memory_order_relaxed);
  }
  return b;
}

// The same for a kernel with dynamic shared memory, cached per (kernel, device, block size, bytes).
inline int blocks_per_sm(const void* kernel, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_tuple(kernel, dev, threads, smem);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int b = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, threads, smem));
  return cache[key] = std::max(b, 1);
}

}  // namespace device
}  // namespace fxquant
