// Probe (benchmarks/probe_int4_modes.py), not part of fxquant: CUTLASS's mixed-input GEMM on the int4
// weight in convert-only mode (unsigned nibbles to bf16, a per-row scale in the epilogue, no group
// scale or zero in the mainloop). Its numbers are not fxquant's int4; only its time is of interest:
// against the shipped int4 op it separates the nibble unpacking from the group scale / zero work.
#include "mixed_input_gemm.cuh"

at::Tensor int4_convert_only(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& row_scales,
                             int64_t variant) {
  return fxq_wgmma::linear<cutlass::uint4b_t, fxq_wgmma::kRowScaleEpilogueAct>(
      "probe_int4_convert_only", x, qweight, qweight.size(1) * 2, row_scales, nullptr, std::nullopt, 0, variant);
}

TORCH_LIBRARY_FRAGMENT(fxquant_probe, m) {
  m.def("int4_convert_only(Tensor x, Tensor qweight, Tensor row_scales, int variant) -> Tensor", &int4_convert_only);
}
