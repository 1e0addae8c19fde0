// fxquant::cutlass_int4_weight_only_linear (and the library's ABI version): see mixed_input_gemm.cuh.
#include "mixed_input_gemm.cuh"

// qweight uint8 [N, K/2]; scales, zeros [K/g, N] (zeros already shifted: zero - 8 * scale).
at::Tensor cutlass_int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, int64_t group_size,
                               int64_t variant) {
  TORCH_CHECK(zeros.scalar_type() == at::kBFloat16 && zeros.is_contiguous(),
              "fxquant.cutlass_int4_weight_only_linear: bad zeros");
  return fxq_wgmma::linear<cutlass::uint4b_t, fxq_wgmma::kGroupScaleZero>(
      "cutlass_int4_weight_only_linear", x, qweight, qweight.size(1) * 2, scales, &zeros, bias, group_size, variant);
}

int64_t cutlass_abi_version() { return 7; }  // 2: the int8 op (int8.cu); 3: int8 dynamic (int8_dyn.cu); 4: fp8 (fp8.cu); 5: int4_mma.cu; 6: tile 6; 7: tiles 7-12, stream-K options

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cutlass_int4_weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, Tensor? bias, "
        "int group_size, int variant) -> Tensor");
  m.def("cutlass_abi_version() -> int", &cutlass_abi_version);
}

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cutlass_int4_weight_only_linear", &cutlass_int4_linear); }
