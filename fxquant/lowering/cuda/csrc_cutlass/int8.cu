// fxquant::cutlass_int8_weight_only_linear: see mixed_input_gemm.cuh.
#include "mixed_input_gemm.cuh"

// qweight int8 [N, K]; scales bf16 [N], bias bf16 [N] (both applied in the epilogue).
at::Tensor cutlass_int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& bias, int64_t variant) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar, "fxquant.cutlass_int8_weight_only_linear: bad qweight");
  return fxq_wgmma::linear<int8_t, fxq_wgmma::kRowScaleEpilogueAct>("cutlass_int8_weight_only_linear", x, qweight,
                                                                   qweight.size(1), scales, nullptr, bias,
                                                                   qweight.size(1), variant);
}

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cutlass_int8_weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int variant) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cutlass_int8_weight_only_linear", &cutlass_int8_linear); }
