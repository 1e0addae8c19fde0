// Probe (benchmarks/probe_int4_modes.py), not part of fxquant: the int4 GEMM of csrc_cutlass on a weight
// reordered at setup the way CUTLASS's example 55 recommends (compute_memory_reordering_atom with the
// [0,2,4,6,1,3,5,7] value order): each thread's nibbles contiguous in shared memory, so one wide load
// and CUTLASS's LOP3 conversion replace byte loads and shuffles. Same math as the shipped op
// (q * scale + zero' per group of k, bf16 tensor cores, 128 x 256 cooperative tile); only its time and
// its agreement with the shipped op are of interest. The reordered copy would double int4's weight memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace {
using namespace cute;
using Quant = cutlass::uint4b_t;
using Act = cutlass::bfloat16_t;
using StrideW = cutlass::detail::TagToStrideB_t<cutlass::layout::ColumnMajor>;  // (N, K, L), K contiguous
using ValueOrder = Layout<Shape<_2, _4>, Stride<_4, _1>>;                        // [0,2,4,6,1,3,5,7]
using Tile = Shape<_128, _256, _64>;
using One = Shape<_1, _1, _1>;

// kAtoms: MMA k-steps whose nibbles one thread finds contiguous (1: 4 bytes, as example 55; 4: 16 bytes,
// one 128-bit load per thread per 64 k, which a decode kernel would want too).
using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, One, cutlass::epilogue::collective::EpilogueTileAuto,
    float, float, void, cutlass::layout::ColumnMajor, 8, Act, cutlass::layout::ColumnMajor, 8,
    cutlass::epilogue::TmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Act, float, void, float>>::CollectiveOp;

namespace atoms1 {
constexpr int kAtoms = 1;
#include "int4_shuffled_body.inc"
}  // namespace atoms1
namespace atoms4 {
constexpr int kAtoms = 4;
#include "int4_shuffled_body.inc"
}  // namespace atoms4

at::Tensor int4_reorder(const at::Tensor& qweight, int64_t atoms) {
  TORCH_CHECK(atoms == 1 || atoms == 4, "int4_reorder: atoms is 1 or 4");
  return atoms == 1 ? atoms1::reorder(qweight) : atoms4::reorder(qweight);
}

at::Tensor int4_shuffled_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t group, int64_t atoms) {
  TORCH_CHECK(atoms == 1 || atoms == 4, "int4_shuffled_linear: atoms is 1 or 4");
  return atoms == 1 ? atoms1::linear(x, qweight, scales, zeros, group)
                    : atoms4::linear(x, qweight, scales, zeros, group);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_reorder(Tensor qweight, int atoms) -> Tensor", &int4_reorder);
  m.def("int4_shuffled_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group, int atoms) -> Tensor",
        &int4_shuffled_linear);
}
