// int4 decode on Hopper (sm_90+, M <= 8): int4_mma_kernel's arithmetic, fed from shared memory
// that the Tensor Memory Accelerator fills with bulk copies (cp.async.bulk) through a ring of
// stages. The register-fed kernel keeps at most a few 16-byte loads in flight per thread, so its
// bytes in flight are capped by occupancy (33-67 % of DRAM peak at M = 1, BENCHMARKS.md S10); a
// bulk copy holds no register and no thread, and one producer warp keeps every stage of the ring
// requested. Included by gemv.cu (uses Pair, dequant_pair and mma16816 from there).
//
// A block owns 16 output rows and all of K. Chunk c is the K-tiles (128 k each) c * W * TPW ..
// (c + 1) * W * TPW - 1 for W consumer warps: warp w takes tiles w, w + W, ... as int4_mma_kernel
// assigns them, so both kernels add the same products in the same order. A stage holds one chunk:
// each row's W * TPW * 64 bytes, one copy per row (row pitch padded by 64 bytes so that the two
// rows a quarter-warp reads sit in different banks). Barriers: full[s] (the producer's expected
// bytes) and empty[s] (one arrival per consumer warp). The (scale, zero) words come through
// registers, loaded a chunk ahead: as bulk copies they were 64 bytes each, and the first version,
// which copied them so, was slower than the register-fed kernel at every point (BENCHMARKS.md S21).
#pragma once

namespace bulk {

__device__ __forceinline__ uint32_t smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void bar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(bar)) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "LAB_WAIT:\n"  // a label inside braces is local to them: inlined copies do not clash
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra LAB_WAIT;\n}" ::"r"(smem(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem(dst)),
               "l"(src), "r"(bytes), "r"(smem(bar))
               : "memory");
}

constexpr int kMaxWarps = 16;  // consumer warps per block, at most

__host__ __device__ constexpr int pitch(int chunk_bytes) { return chunk_bytes + 64; }  // per row, in a stage

}  // namespace bulk

// TPW: tiles per warp per chunk (a stage holds 16 rows x W * TPW * 64 bytes).
template <typename T, int TPW>
__global__ void __launch_bounds__((bulk::kMaxWarps + 1) * 32) int4_bulk_kernel(
    const T* __restrict__ x, int64_t x_stride, const uint8_t* __restrict__ w, const T* __restrict__ sz,
    const T* __restrict__ bias, T* __restrict__ out, int64_t out_stride, int M, int N, int K, int group,
    int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using T2 = typename Pair<T>::T2;
  extern __shared__ __align__(128) uint8_t smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = (blockDim.x >> 5) - 1;  // the last warp copies
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int tiles = K / 128, per_chunk = nw * TPW, chunks = (tiles + per_chunk - 1) / per_chunk;
  const int pitch = bulk::pitch(per_chunk * 64), sbytes = 16 * pitch;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw);
  uint64_t* empty = full + stages;
  uint8_t* ring = smem_raw + ((16 * stages + 127) / 128) * 128;
  __shared__ float red[bulk::kMaxWarps][16][8];
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) bulk::bar_init(&full[s], 1), bulk::bar_init(&empty[s], nw);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == nw) {  // producer: fill stage c % stages with chunk c once its consumers let go of it
    const int64_t row_bytes = K / 2;
    for (int c = 0; c < chunks; ++c) {
      const int s = c % stages, ct = min(per_chunk, tiles - c * per_chunk);  // tiles in this chunk
      if (c >= stages) bulk::bar_wait(&empty[s], ((c / stages) - 1) & 1);
      if (lane == 0) bulk::bar_expect(&full[s], 16 * ct * 64);
      __syncwarp();
      if (lane < 16)
        bulk::copy(ring + s * sbytes + lane * pitch, w + (row0 + lane) * row_bytes + int64_t(c) * per_chunk * 64,
                   ct * 64, &full[s]);
    }
  } else {
    const uint32_t* szw = reinterpret_cast<const uint32_t*>(sz);
    // (scale, zero) words of rows g and g + 8 for this warp's tiles of chunk c (0 past the last tile)
    auto load_sz = [&](int c, uint32_t (&a)[TPW], uint32_t (&b)[TPW]) {
#pragma unroll
      for (int j = 0; j < TPW; ++j) {
        const int kt = c * per_chunk + warp + j * nw;
        const int64_t base = kt < tiles ? int64_t((kt * 128 + 32 * t) / group) * N + row0 : 0;
        a[j] = kt < tiles ? __ldg(szw + base + g) : 0u;
        b[j] = kt < tiles ? __ldg(szw + base + g + 8) : 0u;
      }
    };
    uint32_t sza[TPW], szb[TPW], nxa[TPW], nxb[TPW];
    load_sz(0, sza, szb);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = 0; c < chunks; ++c) {
      const int s = c % stages;
      if (c + 1 < chunks) load_sz(c + 1, nxa, nxb);  // in flight while this chunk is computed
      bulk::bar_wait(&full[s], (c / stages) & 1);
      const uint8_t* st = ring + s * sbytes;
#pragma unroll
      for (int j = 0; j < TPW; ++j) {
        const int i = warp + j * nw, kt = c * per_chunk + i;  // tile i of the chunk
        if (kt < tiles) {
          const uint4 wa4 = *reinterpret_cast<const uint4*>(st + g * pitch + i * 64 + t * 16);
          const uint4 wb4 = *reinterpret_cast<const uint4*>(st + (g + 8) * pitch + i * 64 + t * 16);
          const T2 pa = *reinterpret_cast<const T2*>(&sza[j]), pb = *reinterpret_cast<const T2*>(&szb[j]);
          const T2 s2a = Pair<T>::lo2(pa), z2a = Pair<T>::hi2(pa), s2b = Pair<T>::lo2(pb), z2b = Pair<T>::hi2(pb);
          const int k0 = kt * 128 + 32 * t;
          const uint32_t wa[4] = {wa4.x, wa4.y, wa4.z, wa4.w};
          const uint32_t wb[4] = {wb4.x, wb4.y, wb4.z, wb4.w};
#pragma unroll
          for (int v = 0; v < 4; ++v) {  // token row g of the B fragment; rows past M read as zeros
            const uint4 u = g < M ? __ldg(reinterpret_cast<const uint4*>(x + g * x_stride + k0) + v)
                                  : make_uint4(0, 0, 0, 0);
            const uint32_t xw[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int q = 2 * v + jj;
              uint32_t b[2];
#pragma unroll
              for (int h = 0; h < 2; ++h) {  // as int4_mma_kernel: x of k = cc and cc + 4
                const int p = 2 * q + h, cc = 8 * (p / 4) + p % 4, cw = (cc / 2) % 4;
                b[h] = __byte_perm(xw[cw], xw[cw + 2], (cc % 2) ? 0x7632u : 0x5410u);
              }
              const uint32_t a0 = dequant_pair<T>(wa, 2 * q, s2a, z2a);
              const uint32_t a1 = dequant_pair<T>(wb, 2 * q, s2b, z2b);
              const uint32_t a2 = dequant_pair<T>(wa, 2 * q + 1, s2a, z2a);
              const uint32_t a3 = dequant_pair<T>(wb, 2 * q + 1, s2b, z2b);
              mma16816<T>(acc, a0, a1, a2, a3, b[0], b[1]);
            }
          }
        }
      }
      __syncwarp();
      if (lane == 0) bulk::bar_arrive(&empty[s]);
#pragma unroll
      for (int j = 0; j < TPW; ++j) sza[j] = nxa[j], szb[j] = nxb[j];
    }
    red[warp][g][2 * t] = acc[0], red[warp][g][2 * t + 1] = acc[1];
    red[warp][g + 8][2 * t] = acc[2], red[warp][g + 8][2 * t + 1] = acc[3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 128; i += blockDim.x) {  // warps summed in order, as int4_mma_kernel does
    const int rr = i / 8, cidx = i % 8, row = row0 + rr;
    if (row < N && cidx < M) {
      float v = 0.f;
      for (int s = 0; s < nw; ++s) v += red[s][rr][cidx];
      if (bias != nullptr) v += to_f(bias[row]);
      from_f(v, out + cidx * out_stride + row);
    }
  }
#endif
}

// (stages, consumer warps, tiles per warp per chunk): FXQUANT_CXX_INT4_BULK="S,W,TPW" for
// experiments (TPW 1, 2 or 4), "0" turns the kernel off; read at every call like
// FXQUANT_CXX_INT4_VARIANT.
struct BulkShape {
  int stages, warps, tpw;
};

inline BulkShape bulk_shape() {
  BulkShape s{3, 8, 2};
  if (const char* e = std::getenv("FXQUANT_CXX_INT4_BULK")) {
    if (e[0] == '0' && e[1] == '\0') return {0, 0, 0};
    BulkShape o{0, 0, 0};
    int used = 0;
    if (std::sscanf(e, "%d,%d,%d%n", &o.stages, &o.warps, &o.tpw, &used) == 3 && e[used] == '\0' &&
        o.stages >= 2 && o.stages <= 16 && o.warps >= 1 && o.warps <= bulk::kMaxWarps &&
        (o.tpw == 1 || o.tpw == 2 || o.tpw == 4))
      s = o;
  }
  return s;
}

template <typename T, int TPW>
void launch_bulk_tpw(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
                     at::Tensor& out, int group, int stages, int warps, int bytes) {
  static std::atomic<bool> raised[64];  // per device: may the kernel take more than 48 KB (set once)
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (bytes > 48 * 1024 && !raised[std::min(dev, 63)].load()) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(int4_bulk_kernel<T, TPW>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    raised[std::min(dev, 63)].store(true);
  }
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  int4_bulk_kernel<T, TPW><<<N / 16, (warps + 1) * 32, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x2.data_ptr()), x2.stride(0), reinterpret_cast<const uint8_t*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), b, reinterpret_cast<T*>(out.data_ptr()), out.stride(0), M, N, K,
      group, stages);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches int4_bulk_kernel where it applies (sm_90+, M <= 8, N % 16 == 0, K % 128 == 0);
// returns false otherwise.
template <typename T>
bool launch_int4_bulk(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales, const T* b,
                      at::Tensor& out, int group) {
  const int M = x2.size(0), N = qweight.size(0), K = x2.size(1);
  if (M > 8 || N % 16 != 0 || K % 128 != 0 || device::capability() < 90) return false;
  const BulkShape shape = bulk_shape();
  if (shape.stages == 0) return false;
  const int warps = std::min(shape.warps, K / 128), per_chunk = warps * shape.tpw;
  const int stages = std::min(shape.stages, (K / 128 + per_chunk - 1) / per_chunk);  // no more than the chunks
  const int bytes = ((16 * stages + 127) / 128) * 128 + stages * 16 * bulk::pitch(per_chunk * 64);
  if (bytes > 200 * 1024) return false;
  if (shape.tpw == 1) launch_bulk_tpw<T, 1>(x2, qweight, scales, b, out, group, stages, warps, bytes);
  else if (shape.tpw == 2) launch_bulk_tpw<T, 2>(x2, qweight, scales, b, out, group, stages, warps, bytes);
  else launch_bulk_tpw<T, 4>(x2, qweight, scales, b, out, group, stages, warps, bytes);
  return true;
}
