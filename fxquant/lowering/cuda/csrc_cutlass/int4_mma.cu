// fxquant::cutlass_int4_mma_weight_only_linear: the int4 GEMM of int4.cu on a weight in the MMA-fragment
// layout (numerics.pack_int4_mma; mixed_input_gemm.cuh, kGroupScaleZeroMma).
#include "mixed_input_gemm.cuh"

// qweight uint8 [N, K/2] in the MMA-fragment layout (N % 16, K % 64); scales, zeros [K/g, N] as int4.cu's.
at::Tensor cutlass_int4_mma_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                                   int64_t variant) {
  TORCH_CHECK(zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous(),
              "fxquant.cutlass_int4_mma_weight_only_linear: bad zeros");
  TORCH_CHECK(qweight.size(0) % 16 == 0 && qweight.size(1) % 32 == 0 && qweight.is_contiguous(),
              "fxquant.cutlass_int4_mma_weight_only_linear: the MMA-fragment layout needs N % 16 and K % 64");
  return fxq_wgmma::linear<cutlass::uint4b_t, fxq_wgmma::kGroupScaleZeroMma>(
      "cutlass_int4_mma_weight_only_linear", x, qweight, qweight.size(1) * 2, scales, &zeros, bias, group_size,
      variant);
}

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cutlass_int4_mma_weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
        "int group_size, int variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cutlass_int4_mma_weight_only_linear", &cutlass_int4_mma_linear); }
