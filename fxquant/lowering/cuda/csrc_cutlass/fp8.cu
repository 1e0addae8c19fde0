// fxquant::cutlass_float8_weight_only_linear: see mixed_input_gemm.cuh.
#include "mixed_input_gemm.cuh"

// qweight e4m3 [N, K]; w_scales float32 [N]; bias bf16 [N] (both applied in the epilogue).
at::Tensor cutlass_float8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                                 const std::optional<at::Tensor>& bias, int64_t variant) {
  TORCH_CHECK(qweight.scalar_type() == at::kFloat8_e4m3fn, "fxquant.cutlass_float8_weight_only_linear: bad qweight");
  return fxq_wgmma::linear<cutlass::float_e4m3_t, fxq_wgmma::kRowScaleEpilogue>(
      "cutlass_float8_weight_only_linear", x, qweight, qweight.size(1), w_scales, nullptr, bias, qweight.size(1),
      variant);
}

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cutlass_float8_weight_only_linear(Tensor x, Tensor qweight, Tensor w_scales, Tensor? bias, int variant) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cutlass_float8_weight_only_linear", &cutlass_float8_linear); }
