// W8A8 int8 dynamic GEMM for Hopper (sm_90a): int8 x int8 wgmma with int32 accumulation, loads
// through TMA, warp-specialized. The scales and the bias are applied in the epilogue (a CUTLASS
// epilogue visitor tree), so the int32 product never goes to memory:
//   out[m, n] = (acc[m, n] * w_scale[n]) * x_scale[m] + bias[n]     (float32, rounded once to bf16)
// xq int8 [M, K] and the weight int8 [N, K] are both K-major (wgmma's int8 operands must be), so
// this is the plain (not transposed) product; out [M, N] bf16 row-major.
//
// The variants live in three translation units (int8_dyn_tiles_a.cu / _b.cu / _c.cu, compiled in
// parallel); int8_dyn.cu defines the op and asks each unit in turn.
#pragma once
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fxq_i8 {

struct Problem {
  const void* xq;       // int8 [M, K]
  const void* w;        // int8 [N, K]
  const float* xs;      // [M]
  const float* ws;      // [N]
  const void* bias;     // bf16 [N] or nullptr
  void* out;            // bf16 [M, N]
  int M, N, K;
  int sms;              // the GPU's SM count (sizes persistent grids and stream-K workspace)
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
};

// Run `variant` on p (rc 0 ok; 2 workspace too small; 3 shape not supported; 4 initialization
// failed; 5 launch failed), or with need != nullptr only store its workspace size. -1: this unit
// does not hold that variant.
int run_tiles_a(int variant, const Problem& p, size_t* need);
int run_tiles_b(int variant, const Problem& p, size_t* need);
int run_tiles_c(int variant, const Problem& p, size_t* need);

#ifdef FXQ_I8_DEFINE_CONFIG
using namespace cute;
using Out = cutlass::bfloat16_t;
namespace fusion = cutlass::epilogue::fusion;

template <class TileShape, class Cluster, class KernelSchedule, class EpiSchedule, class Scheduler = void>
struct Config {
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  // Broadcast vectors: null pointers read as 0 (the bias, when there is none).
  using XScale = fusion::Sm90ColBroadcast<0, TileShape, float>;   // one per row m
  using WScale = fusion::Sm90RowBroadcast<0, TileShape, float>;   // one per column n
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, Out, float>;
  using AccTimesW = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                                    fusion::Sm90AccFetch, WScale>;
  using Fusion = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Out, float, kRound>,
                                 XScale, AccTimesW, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, 8,  // no source tensor C
      Out, cutlass::layout::RowMajor, 8, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      int8_t, cutlass::layout::RowMajor, 16,      // xq [M, K]
      int8_t, cutlass::layout::ColumnMajor, 16,   // the weight [N, K] as K x N column-major
      int32_t, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments args(const Problem& p) {
    auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(p.M, p.K, 1));
    auto sb = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(p.N, p.K, 1));
    auto sd = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(p.M, p.N, 1));
    typename Gemm::Arguments a{};
    a.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    a.problem_shape = {p.M, p.N, p.K, 1};
    a.mainloop = {static_cast<const int8_t*>(p.xq), sa, static_cast<const int8_t*>(p.w), sb};
    a.epilogue.thread = {
        {p.xs, 0.f, {}},                     // XScale
        {{}, {p.ws, 0.f, {}}, {}},           // acc * WScale
        {static_cast<const Out*>(p.bias), Out(0), {}},  // Bias
        {}};                                 // multiply-add
    a.epilogue.ptr_C = nullptr;
    a.epilogue.dC = sd;
    a.epilogue.ptr_D = static_cast<Out*>(p.out);
    a.epilogue.dD = sd;
    int device = 0;
    cudaGetDevice(&device);
    a.hw_info = cutlass::KernelHardwareInfo{device, p.sms};
    return a;
  }

  static int run(const Problem& p, size_t* need) {
    auto a = args(p);
    if (need != nullptr) {
      *need = Gemm::get_workspace_size(a);
      return 0;
    }
    Gemm gemm;
    if (Gemm::get_workspace_size(a) > p.workspace_bytes) return 2;
    if (gemm.can_implement(a) != cutlass::Status::kSuccess) return 3;
    if (gemm.initialize(a, p.workspace, p.stream) != cutlass::Status::kSuccess) return 4;
    return gemm.run(p.stream) == cutlass::Status::kSuccess ? 0 : 5;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using One = Shape<_1, _1, _1>;
using Cl2 = Shape<_2, _1, _1>;  // two CTAs along M share each weight tile (TMA multicast)
using StreamK = cutlass::gemm::StreamKScheduler;
#endif  // FXQ_I8_DEFINE_CONFIG
}  // namespace fxq_i8
