// Large-M weight-only GEMMs for Hopper (sm_90a): CUTLASS's mixed-input warp-specialized kernel.
// TMA brings quantized weight tiles and bf16 x tiles into shared memory; the weight is
// dequantized in registers and fed to wgmma as its register operand.
//
// int4 (fxquant::cutlass_int4_weight_only_linear): fxquant's packed [N, K/2] bytes, low nibble
// first, are CUTLASS's K-major unsigned int4 [N, K]. CUTLASS computes w = q * scale + zero, so the
// caller passes zero - 8 * scale for fxquant's (q - 8) * scale + zero, and both as [K / group, N]
// arrays (N contiguous).
// int8 (fxquant::cutlass_int8_weight_only_linear): the int8 [N, K] weight as it is, and its
// per-channel scales [N] as one scale group spanning K (w = q * scale, rounded to bf16 as
// numerics.dequantize_int8_per_channel does).
// Both GEMMs are computed transposed: out^T [N, M] = W [N, K] x^T, so the weight is the operand
// that goes through registers and out [M, N] row-major is out^T column-major.
//
// Built as its own library (fxquant/lowering/cuda/build.py, load_cutlass) only on sm_90 with the
// CUTLASS headers present (CUDA only). int4.cu and int8.cu instantiate this header, one op each
// (two translation units: ninja compiles them in parallel).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fxq_wgmma {
using namespace cute;

using Act = cutlass::bfloat16_t;
using Acc = float;

inline int sm_count(int device) {
  static int counts[64] = {0};  // per device, asked once
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (counts[device] == 0) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return counts[device];
}

// Quant: the weight's element type; kZero: w = q * scale + zero (else q * scale); Scheduler: void
// (persistent, one output tile per CTA turn) or cutlass::gemm::StreamKScheduler (tiles' K ranges
// spread over all SMs, so a grid of few tiles still fills the GPU).
template <class Quant, bool kZero, class TileShape, class Cluster, class KernelSchedule, class EpiSchedule,
          class Scheduler = void>
struct Config {
  using WeightOperand = std::conditional_t<kZero, cute::tuple<Quant, Act, Act>, cute::tuple<Quant, Act>>;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;  // 16-byte TMA rows
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, cutlass::layout::ColumnMajor, 8,  // no source tensor C
      Act, cutlass::layout::ColumnMajor, 8, EpiSchedule>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      WeightOperand, cutlass::layout::RowMajor, kAlignW,           // the weight, K-major
      Act, cutlass::layout::ColumnMajor, 8,                          // x^T, K-major
      Acc, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments args(const void* w, const void* x, const void* scale, const void* zero, void* out,
                                       int M, int N, int K, int group) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    using StrideS = typename Mainloop::StrideScale;
    const int scale_k = K / group;
    auto sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(N, K, 1));
    auto sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(M, K, 1));
    auto sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(N, M, 1));
    auto ss = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, scale_k, 1));
    typename Mainloop::Arguments mainloop;
    if constexpr (kZero) {
      mainloop = {static_cast<const Quant*>(w), sa, static_cast<const Act*>(x), sb, static_cast<const Act*>(scale),
                  ss, group, static_cast<const Act*>(zero)};
    } else {
      mainloop = {static_cast<const Quant*>(w), sa, static_cast<const Act*>(x), sb, static_cast<const Act*>(scale),
                  ss, group};
    }
    // The SM count sizes the persistent grid and stream-K's workspace (unset, CUTLASS asks per call).
    int device = 0;
    cudaGetDevice(&device);
    cutlass::KernelHardwareInfo hw{device, sm_count(device)};
    return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGemm, {N, M, K, 1}, mainloop,
                                    {{1.f, 0.f}, nullptr, sd, static_cast<Act*>(out), sd}, hw};
  }

  static int run(const void* w, const void* x, const void* scale, const void* zero, void* out, int M, int N, int K,
                 int group, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    auto a = args(w, x, scale, zero, out, M, N, K, group);
    Gemm gemm;
    if (Gemm::get_workspace_size(a) > workspace_bytes) return 2;
    if (gemm.can_implement(a) != cutlass::Status::kSuccess) return 3;
    if (gemm.initialize(a, workspace, stream) != cutlass::Status::kSuccess) return 4;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 5;
  }

  static size_t workspace(int M, int N, int K, int group) {
    return Gemm::get_workspace_size(args(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, group));
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using One = Shape<_1, _1, _1>;
template <class Q, bool Z> using Coop128 = Config<Q, Z, Shape<_128, _128, _64>, One, Coop, CoopEpi>;
template <class Q, bool Z> using Coop256 = Config<Q, Z, Shape<_128, _256, _64>, One, Coop, CoopEpi>;
template <class Q, bool Z> using Ping64 = Config<Q, Z, Shape<_64, _128, _64>, One, Ping, PingEpi>;
template <class Q, bool Z>
using Coop256StreamK = Config<Q, Z, Shape<_128, _256, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, bool Z> using Ping128 = Config<Q, Z, Shape<_128, _128, _64>, One, Ping, PingEpi>;
template <class Q, bool Z> using Ping64x256 = Config<Q, Z, Shape<_64, _256, _64>, One, Ping, PingEpi>;

// variant: 0 = 128 (N) x 128 (M) cooperative, 1 = 128 x 256 cooperative, 2 = 64 x 128 ping-pong,
// 3 = 128 x 256 cooperative with stream-K, 4 = 128 x 128 ping-pong, 5 = 64 x 256 ping-pong.
// Returns 0 on success; 1 unknown variant, 2 workspace too small, 3 shape not supported
// (K % group, alignment), 4 initialization failed, 5 launch failed.
template <class Q, bool Z>
int run_variant(int variant, const void* w, const void* x, const void* scale, const void* zero, void* out, int M,
                int N, int K, int group, void* workspace, size_t workspace_bytes, cudaStream_t s) {
  switch (variant) {
    case 0: return Coop128<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    case 1: return Coop256<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    case 2: return Ping64<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    case 3: return Coop256StreamK<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    case 4: return Ping128<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    case 5: return Ping64x256<Q, Z>::run(w, x, scale, zero, out, M, N, K, group, workspace, workspace_bytes, s);
    default: return 1;
  }
}

template <class Q, bool Z>
size_t workspace_bytes(int variant, int M, int N, int K, int group) {
  switch (variant) {
    case 0: return Coop128<Q, Z>::workspace(M, N, K, group);
    case 1: return Coop256<Q, Z>::workspace(M, N, K, group);
    case 2: return Ping64<Q, Z>::workspace(M, N, K, group);
    case 3: return Coop256StreamK<Q, Z>::workspace(M, N, K, group);
    case 4: return Ping128<Q, Z>::workspace(M, N, K, group);
    case 5: return Ping64x256<Q, Z>::workspace(M, N, K, group);
    default: return 0;
  }
}

// x [..., K] bf16 (rows contiguous after reshape), the weight, scales (and zeros) bf16 in
// CUTLASS's layout. The Python caller checks everything (fxquant/lowering/cuda/cutlass.py: fits);
// the checks here only guard direct calls.
template <class Q, bool Z>
at::Tensor linear(const char* op, const at::Tensor& x, const at::Tensor& qweight, int64_t k, const at::Tensor& scales,
                  const at::Tensor* zeros, const std::optional<at::Tensor>& bias, int64_t group, int64_t variant) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // launch, stream and attributes on x's GPU
  const int64_t n = qweight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(-1) == k, "fxquant.", op, ": bad x");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(), "fxquant.", op, ": bad scales");
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto out = at::empty({m, n}, x.options());
  if (m > 0) {
    const size_t ws_bytes = workspace_bytes<Q, Z>(static_cast<int>(variant), m, n, k, group);
    auto ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, x.options().dtype(at::kByte));
    const int rc = run_variant<Q, Z>(static_cast<int>(variant), qweight.data_ptr(), x2.data_ptr(),
                                     scales.data_ptr(), zeros ? zeros->data_ptr() : nullptr, out.data_ptr(), m, n,
                                     k, group, ws.data_ptr(), ws_bytes, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "fxquant.", op, ": CUTLASS status ", std::to_string(rc));  // a string: see csrc/ops.h, num
  }
  if (bias.has_value()) out.add_(*bias);
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.reshape(shape);
}
}  // namespace fxq_wgmma
