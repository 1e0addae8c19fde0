// fxquant::cutlass_int8_dynamic_linear: the W8A8 int8 GEMM of scaled_int8_gemm.cuh on activations
// quantized beforehand (the caller quantizes x per token: Triton, or fused into its producer).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "scaled_int8_gemm.cuh"

namespace {
int sm_count(int device) {
  static int counts[64] = {0};  // per device, asked once
  int n = device >= 0 && device < 64 ? counts[device] : 0;
  if (n == 0) {
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    if (device >= 0 && device < 64) counts[device] = n;
  }
  return n;
}

int run(int variant, const fxq_i8::Problem& p, size_t* need) {
  int rc = fxq_i8::run_tiles_a(variant, p, need);
  if (rc == -1) rc = fxq_i8::run_tiles_b(variant, p, need);
  return rc != -1 ? rc : fxq_i8::run_tiles_c(variant, p, need);
}

}  // namespace

// xq int8 [M, K], x_scales float32 [M], qweight int8 [N, K], w_scales float32 [N], bias bf16 [N]
// -> bf16 [M, N]. The Python caller (cutlass.py: fits) checks alignment and shapes; the checks
// here guard direct calls.
at::Tensor cutlass_int8_dynamic_linear(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                                       const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                                       int64_t variant) {
  const c10::cuda::OptionalCUDAGuard guard(xq.device());
  const char* op = "fxquant.cutlass_int8_dynamic_linear";
  TORCH_CHECK(xq.is_cuda() && x_scales.device() == xq.device() && qweight.device() == xq.device() &&
                  w_scales.device() == xq.device() && (!bias.has_value() || bias->device() == xq.device()),
              op, ": every tensor must be on xq's CUDA device");
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && xq.is_contiguous(), op,
              ": xq must be a contiguous int8 [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
                  qweight.size(1) == xq.size(1), op, ": qweight must be a contiguous int8 [N, K]");
  const int64_t m = xq.size(0), k = xq.size(1), n = qweight.size(0);
  TORCH_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.numel() == m && x_scales.is_contiguous(), op,
              ": x_scales must be float32 with one scale per row");
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.numel() == n && w_scales.is_contiguous(), op,
              ": w_scales must be float32 with one scale per weight row");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == n &&
                                    bias->is_contiguous()), op, ": bias must be bf16 [N]");
  TORCH_CHECK(k % 16 == 0 && n % 8 == 0, op, ": needs K % 16 == 0 and N % 8 == 0");
  auto out = at::empty({m, n}, xq.options().dtype(at::kBFloat16));
  if (m == 0) return out;
  int device = 0;
  cudaGetDevice(&device);
  fxq_i8::Problem p{xq.data_ptr(), qweight.data_ptr(), x_scales.data_ptr<float>(), w_scales.data_ptr<float>(),
                    bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(),
                    static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), sm_count(device),
                    nullptr, 0, c10::cuda::getCurrentCUDAStream().stream()};
  size_t need = 0;
  // (numbers go into messages as strings: see csrc/ops.h, num)
  TORCH_CHECK(run(static_cast<int>(variant), p, &need) == 0, op, ": unknown variant ", std::to_string(variant));
  auto ws = at::empty({static_cast<int64_t>(std::max<size_t>(need, 1))}, xq.options().dtype(at::kByte));
  p.workspace = ws.data_ptr();
  p.workspace_bytes = need;
  const int rc = run(static_cast<int>(variant), p, nullptr);
  TORCH_CHECK(rc == 0, op, ": CUTLASS status ", std::to_string(rc));
  return out;
}

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cutlass_int8_dynamic_linear(Tensor xq, Tensor x_scales, Tensor qweight, Tensor w_scales, Tensor? bias, "
        "int variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) { m.impl("cutlass_int8_dynamic_linear", &cutlass_int8_dynamic_linear); }
