// Large-M weight-only GEMMs for Hopper (sm_90a): CUTLASS's mixed-input warp-specialized kernel.
// TMA brings quantized weight tiles and bf16 x tiles into shared memory; the weight is
// dequantized in registers and fed to wgmma as its register operand.
//
// int4 (fxquant::cutlass_int4_weight_only_linear): fxquant's packed [N, K/2] bytes, low nibble
// first, are CUTLASS's K-major unsigned int4 [N, K]. CUTLASS computes w = q * scale + zero, so the
// caller passes zero - 8 * scale for fxquant's (q - 8) * scale + zero, and both as [K / group, N]
// arrays (N contiguous). The bias is added in the epilogue (acc + bias, one rounding to bf16).
// int4 in the MMA-fragment layout (fxquant::cutlass_int4_mma_weight_only_linear, int4_mma.cu): the same
// GEMM on numerics.pack_int4_mma's bytes, which are CUTLASS's reordered operand (example 55:
// compute_memory_reordering_atom, four k-steps per thread, value order [0,2,4,6,1,3,5,7]) with the
// 16 x 64 blocks tiled K first. Each thread finds its nibbles contiguous in shared memory: one wide
// load and the LOP3 conversion replace byte loads and shuffles (session 24's probe: 0.96-1.06x of
// bf16 at M = 4096 where the row-major op ran 0.90-0.93x).
// int8 and fp8 (fxquant::cutlass_int8_weight_only_linear, fxquant::cutlass_float8_weight_only_linear):
// the int8 / e4m3 [N, K] weight converted to bf16 in registers (exact: every int8 and e4m3 value is
// a bf16 value; CUTLASS's convert-only mode), its per-row scales (int8: bf16, fp8: float32) and the
// bias applied in the epilogue, as the Triton kernels do: out = acc * scale[n] + bias[n] in float32,
// rounded once to bf16. (int8 with its scale as a K-spanning group in the mainloop measured the
// same, session 13, and needed the bias added afterwards.)
// All GEMMs are computed transposed: out^T [N, M] = W [N, K] x^T, so the weight is the operand
// that goes through registers and out [M, N] row-major is out^T column-major.
//
// Built as its own library (fxquant/lowering/cuda/build.py, load_cutlass) only on sm_90 with the
// CUTLASS headers present (CUDA only). int4.cu, int8.cu and fp8.cu instantiate this header, one op each
// (one translation unit per op: ninja compiles them in parallel).
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
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
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

// How the weight is scaled: per K-group in the mainloop (q * scale + zero), or per row in the
// epilogue with the bias (float32 scales, or scales in the activation dtype; the mainloop only
// converts q).
// kGroupScaleZeroMma: kGroupScaleZero on the MMA-fragment layout (int4 only).
enum Mode : int { kGroupScaleZero = 1, kRowScaleEpilogue = 2, kRowScaleEpilogueAct = 3, kGroupScaleZeroMma = 4 };

// The MMA-fragment int4 layout as a CuTe layout of the (N, K, L) weight: the 16-row x 64-k atom (in
// nibbles: row g + 8h, k e + 2t + 8kh + 16j at h + 2kh + 4e + 8j + 32t + 128g) tiled along K first, so
// the blocks of 16 weight rows are contiguous (numerics.pack_int4_mma). The atom is written in the form
// that CUTLASS 4.2's compute_memory_reordering_atom<bf16, (_1, _4), [0,2,4,6,1,3,5,7]> returns (checked
// equal at every coordinate, session 25); that helper's header needs curand, which fxquant does not.
using MmaAtom = Layout<Shape<Shape<Shape<_8, _2>, _1>, Shape<Shape<_2, _4, _2>, _4>>,
                       Stride<Stride<Stride<_128, _1>, _0>, Stride<Stride<_4, _32, _2>, _8>>>;
using BlocksKFirst = Step<_2, _1, _3>;
inline auto mma_layout(int N, int K) { return cute::tile_to_shape(MmaAtom{}, cute::make_shape(N, K, 1), BlocksKFirst{}); }
using MmaLayout = decltype(mma_layout(0, 0));

// Quant: the weight's element type; kMode: see Mode; Scheduler: void (persistent, one output tile
// per CTA turn) or cutlass::gemm::StreamKScheduler (tiles' K ranges spread over all SMs, so a grid
// of few tiles still fills the GPU).
template <class Quant, int kMode, class TileShape, class Cluster, class KernelSchedule, class EpiSchedule,
          class Scheduler = void>
struct Config {
  static constexpr bool kEpi = kMode == kRowScaleEpilogue || kMode == kRowScaleEpilogueAct;
  static constexpr bool kMma = kMode == kGroupScaleZeroMma;
  using LayoutW = std::conditional_t<kMma, MmaLayout, cutlass::layout::RowMajor>;  // the weight, K-major
  using ScaleT = std::conditional_t<kMode == kRowScaleEpilogueAct, Act, float>;  // epilogue scales' type
  using WeightOperand = std::conditional_t<kEpi, Quant, cute::tuple<Quant, Act, Act>>;
  static constexpr int kAlignW = 128 / cutlass::sizeof_bits<Quant>::value;  // 16-byte TMA rows
  // The epilogue modes: acc * scale[n] + bias[n]; n is the transposed product's row, so both are
  // column broadcasts. A null bias reads as 0.
  using RowScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ScaleT, float>;
  using RowBias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, Act, float>;
  using ScaleBias = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::homogeneous_multiply_add, Act, float,
                                             cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, RowScale, RowBias>;
  // kGroupScaleZero (scales in the mainloop): acc + bias[n], rounded once (not a second pass over out).
  using BiasOnly = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, Act, float, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90AccFetch, RowBias>;
  using Fusion = std::conditional_t<kEpi, ScaleBias, BiasOnly>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc,
      void, cutlass::layout::ColumnMajor, 8,  // no source tensor C
      Act, cutlass::layout::ColumnMajor, 8, EpiSchedule, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      WeightOperand, LayoutW, kAlignW,                               // the weight
      Act, cutlass::layout::ColumnMajor, 8,                          // x^T, K-major
      Acc, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // scale / zero: the mainloop's bf16 [K / group, N] arrays (kGroupScaleZero), or the epilogue modes'
  // scale [N] (zero unused); bias bf16 [N] or null, in the epilogue either way.
  // sched (see kSchedShift): bits 0-1 log2 of the swizzle, bits 2-3 the raster order (0 CUTLASS's
  // heuristic, 1 along the weight rows, 2 along the tokens); stream-K tiles only: bit 4 the partial
  // sums added in any order (else in K order, one CTA after another), bits 5-7 log2 of a split-K count.
  static typename Gemm::Arguments args(const void* w, const void* x, const void* scale, const void* zero,
                                       const void* bias, void* out, int M, int N, int K, int group, int sched = 0) {
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    using StrideS = typename Mainloop::StrideScale;
    auto sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(M, K, 1));
    auto sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(N, M, 1));
    typename Gemm::Arguments a{};
    a.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    a.problem_shape = {N, M, K, 1};
    if constexpr (kMma) {
      auto ss = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, K / group, 1));
      a.mainloop = {static_cast<const Quant*>(w), mma_layout(N, K), static_cast<const Act*>(x), sb,
                    static_cast<const Act*>(scale), ss, group, static_cast<const Act*>(zero)};
      a.epilogue.thread = {{}, {static_cast<const Act*>(bias), Act(0), {}}, {}};
    } else if constexpr (kEpi) {
      auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(N, K, 1));
      a.mainloop = {static_cast<const Quant*>(w), sa, static_cast<const Act*>(x), sb};
      a.epilogue.thread = {{}, {static_cast<const ScaleT*>(scale), ScaleT(0), {}},
                           {static_cast<const Act*>(bias), Act(0), {}}, {}};
    } else {
      auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(N, K, 1));
      auto ss = cutlass::make_cute_packed_stride(StrideS{}, cute::make_shape(N, K / group, 1));
      a.mainloop = {static_cast<const Quant*>(w), sa, static_cast<const Act*>(x), sb,
                    static_cast<const Act*>(scale), ss, group, static_cast<const Act*>(zero)};
      a.epilogue.thread = {{}, {static_cast<const Act*>(bias), Act(0), {}}, {}};
    }
    a.epilogue.ptr_C = nullptr;
    a.epilogue.dC = sd;
    a.epilogue.ptr_D = static_cast<Act*>(out);
    a.epilogue.dD = sd;
    // The SM count sizes the persistent grid and stream-K's workspace (unset, CUTLASS asks per call).
    int device = 0;
    cudaGetDevice(&device);
    a.hw_info = cutlass::KernelHardwareInfo{device, sm_count(device)};
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    a.scheduler.max_swizzle_size = 1 << (sched & 3);
    const int raster = (sched >> 2) & 3;
    a.scheduler.raster_order = raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;
    if constexpr (std::is_same_v<Scheduler, cutlass::gemm::StreamKScheduler>) {
      using Reduction = cutlass::gemm::kernel::detail::ReductionMode;
      a.scheduler.reduction_mode = sched >> 4 & 1 ? Reduction::Nondeterministic : Reduction::Deterministic;
      a.scheduler.splits = 1 << (sched >> 5 & 7);  // > 1: split-K instead of stream-K's own split
    }
    return a;
  }

  static int run(const void* w, const void* x, const void* scale, const void* zero, const void* bias, void* out,
                 int M, int N, int K, int group, int sched, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    auto a = args(w, x, scale, zero, bias, out, M, N, K, group, sched);
    Gemm gemm;
    if (Gemm::get_workspace_size(a) > workspace_bytes) return 2;
    if (gemm.can_implement(a) != cutlass::Status::kSuccess) return 3;
    if (gemm.initialize(a, workspace, stream) != cutlass::Status::kSuccess) return 4;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 5;
  }

  static size_t workspace(int M, int N, int K, int group, int sched) {
    return Gemm::get_workspace_size(args(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K, group, sched));
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;
using One = Shape<_1, _1, _1>;
template <class Q, int Md> using Coop128 = Config<Q, Md, Shape<_128, _128, _64>, One, Coop, CoopEpi>;
template <class Q, int Md> using Coop256 = Config<Q, Md, Shape<_128, _256, _64>, One, Coop, CoopEpi>;
template <class Q, int Md> using Ping64 = Config<Q, Md, Shape<_64, _128, _64>, One, Ping, PingEpi>;
template <class Q, int Md>
using Coop256StreamK = Config<Q, Md, Shape<_128, _256, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md> using Ping128 = Config<Q, Md, Shape<_128, _128, _64>, One, Ping, PingEpi>;
template <class Q, int Md>
using Coop128StreamK = Config<Q, Md, Shape<_128, _128, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md> using Ping64x256 = Config<Q, Md, Shape<_64, _256, _64>, One, Ping, PingEpi>;
// Narrow token tiles for 17-128 tokens: a 128-token tile at M = 64 computes half zeros, and N = 4096 makes
// only 32 of them; stream-K spreads their K loops over the SMs.
template <class Q, int Md>
using Coop128x64StreamK = Config<Q, Md, Shape<_128, _64, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md>
using Coop128x32StreamK = Config<Q, Md, Shape<_128, _32, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md>
using Coop128x16StreamK = Config<Q, Md, Shape<_128, _16, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
// 256 weight rows: each consumer warpgroup has two independent 64-row slices per k step to convert and
// multiply (the 128-row tiles took about the same time per k tile at 64 and 128 tokens: latency); they
// won at 32-128 tokens on 28672x4096 (BENCHMARKS.md S27).
template <class Q, int Md>
using Coop256x64StreamK = Config<Q, Md, Shape<_256, _64, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md>
using Coop256x32StreamK = Config<Q, Md, Shape<_256, _32, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
template <class Q, int Md>
using Coop256x128StreamK = Config<Q, Md, Shape<_256, _128, _64>, One, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;

// One GEMM's pointers and sizes (see Config::args).
struct Problem {
  const void *w, *x, *scale, *zero, *bias;
  void* out;
  int M, N, K, group;
};

// A variant number is a tile (below) plus the scheduler order (Config::args' sched) << kSchedShift.
constexpr int kSchedShift = 4;

// Calls f(Config) for the variant's tile: 0 = 128 (N) x 128 (M) cooperative, 1 = 128 x 256 cooperative,
// 2 = 64 x 128 ping-pong, 3 = 128 x 256 cooperative with stream-K, 4 = 128 x 128 ping-pong,
// 5 = 64 x 256 ping-pong, 6 = 128 x 128 cooperative with stream-K (few tiles, long K: N = 4096 at
// M <= 128 makes 32 tiles for 132 SMs), 7 / 8 / 9 = 128 x 64 / 32 / 16 and 10 / 11 / 12 = 256 x 64 / 32 / 128
// cooperative with stream-K; `otherwise` for an unknown tile or scheduler order.
template <class Q, int Md, class F, class R>
R with_variant(int variant, F f, R otherwise) {
  if (variant < 0 || variant >> kSchedShift >= 256 || (variant >> (kSchedShift + 2) & 3) == 3) return otherwise;
  switch (variant & ((1 << kSchedShift) - 1)) {
    case 0: return f(Coop128<Q, Md>{});
    case 1: return f(Coop256<Q, Md>{});
    case 2: return f(Ping64<Q, Md>{});
    case 3: return f(Coop256StreamK<Q, Md>{});
    case 4: return f(Ping128<Q, Md>{});
    case 5: return f(Ping64x256<Q, Md>{});
    case 6: return f(Coop128StreamK<Q, Md>{});
    case 7: return f(Coop128x64StreamK<Q, Md>{});
    case 8: return f(Coop128x32StreamK<Q, Md>{});
    case 9: return f(Coop128x16StreamK<Q, Md>{});
    case 10: return f(Coop256x64StreamK<Q, Md>{});
    case 11: return f(Coop256x32StreamK<Q, Md>{});
    case 12: return f(Coop256x128StreamK<Q, Md>{});
    default: return otherwise;
  }
}

// Returns 0 on success; 1 unknown variant, 2 workspace too small, 3 shape not supported
// (K % group, alignment), 4 initialization failed, 5 launch failed.
template <class Q, int Md>
int run_variant(int variant, const Problem& p, void* workspace, size_t workspace_bytes, cudaStream_t s) {
  return with_variant<Q, Md>(variant, [&](auto c) {
    return decltype(c)::run(p.w, p.x, p.scale, p.zero, p.bias, p.out, p.M, p.N, p.K, p.group,
                            variant >> kSchedShift, workspace, workspace_bytes, s);
  }, 1);
}

template <class Q, int Md>
size_t workspace_bytes(int variant, int M, int N, int K, int group) {
  return with_variant<Q, Md>(variant, [&](auto c) { return decltype(c)::workspace(M, N, K, group, variant >> kSchedShift); },
                             size_t{0});
}

// x [..., K] bf16 (rows contiguous after reshape), the weight, scales (and zeros) in CUTLASS's layout
// (kGroupScaleZero: bf16 [K / group, N]; kRowScaleEpilogue: float32 [N]; kRowScaleEpilogueAct: bf16 [N]).
// The Python caller checks everything (fxquant/lowering/cuda/cutlass.py: fits); the checks here only
// guard direct calls.
template <class Q, int Md>
at::Tensor linear(const char* op, const at::Tensor& x, const at::Tensor& qweight, int64_t k, const at::Tensor& scales,
                  const at::Tensor* zeros, const std::optional<at::Tensor>& bias, int64_t group, int64_t variant) {
  constexpr bool kEpi = Md == kRowScaleEpilogue || Md == kRowScaleEpilogueAct;  // (kGroupScaleZeroMma: not)
  const c10::cuda::OptionalCUDAGuard guard(x.device());  // launch, stream and attributes on x's GPU
  const int64_t n = qweight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(-1) == k, "fxquant.", op, ": bad x");
  TORCH_CHECK(scales.scalar_type() == (Md == kRowScaleEpilogue ? at::kFloat : at::kBFloat16) && scales.is_contiguous() &&
                  (!kEpi || scales.numel() == n), "fxquant.", op, ": bad scales");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == n && bias->is_contiguous() &&
                                     reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0),
              "fxquant.", op, ": bad bias");
  auto x2 = x.reshape({-1, k}).contiguous();
  const int64_t m = x2.size(0);
  auto out = at::empty({m, n}, x.options());
  if (m > 0) {
    const size_t ws_bytes = workspace_bytes<Q, Md>(static_cast<int>(variant), m, n, k, group);
    auto ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, x.options().dtype(at::kByte));
    const Problem p{qweight.data_ptr(), x2.data_ptr(), scales.data_ptr(), zeros ? zeros->data_ptr() : nullptr,
                    bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(),
                    static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(group)};
    const int rc = run_variant<Q, Md>(static_cast<int>(variant), p, ws.data_ptr(), ws_bytes,
                                      c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "fxquant.", op, ": CUTLASS status ", std::to_string(rc));  // a string: see csrc/ops.h, num
  }
  auto shape = x.sizes().vec();
  shape.back() = n;
  return out.reshape(shape);
}
}  // namespace fxq_wgmma
