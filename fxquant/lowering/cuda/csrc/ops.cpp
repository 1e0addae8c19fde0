// Schemas and CPU kernels of fxquant's C++ ops.
//
// Each cxx_* op has exactly the schema of the Python op of the same scheme in
// fxquant/lowering/ops.py (tests/test_cxx_ops.py checks it), so a C++ program that loads this
// library can call them with the same arguments. CUDA kernels: gemv.cu (built only with CUDA).
#include <torch/library.h>

#include "ops.h"

namespace fxquant {

namespace {
bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_x(const at::Tensor& x, int64_t k, const char* op) {
  TORCH_CHECK(x.dim() >= 1, "fxquant.", op, ": x must have at least one dim");
  TORCH_CHECK(x.size(-1) == k, "fxquant.", op, ": x has K=", num(x.size(-1)), " but the weight has K=", num(k));
  TORCH_CHECK(is_float(x.scalar_type()), "fxquant.", op, ": x must be float32/float16/bfloat16, got ",
              x.scalar_type());
}

void check_device(const at::Tensor& x, const at::Tensor& t, const char* what, const char* op) {
  TORCH_CHECK(t.device() == x.device(), "fxquant.", op, ": ", what, " is on ", t.device(), " but x is on ",
              x.device());
}

void check_bias(const std::optional<at::Tensor>& bias, int64_t n, const char* op) {
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "fxquant.", op, ": bias must have shape [", num(n),
                "], got ", dims(bias->sizes()));
  }
}

at::Tensor finish(const at::Tensor& out2d, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  at::Tensor out = bias.has_value() ? out2d + bias->to(out2d.scalar_type()) : out2d;
  auto shape = x.sizes().vec();
  shape.back() = out2d.size(1);
  return out.to(x.scalar_type()).reshape(shape);
}
}  // namespace

void check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                const std::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "cxx_int4_weight_only_linear";
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "fxquant.", op,
              ": qweight must be uint8 [N, K // 2], got ", qweight.scalar_type(), " ", dims(qweight.sizes()));
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  check_x(x, k, op);
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "fxquant.", op, ": K=", num(k),
              " is not a multiple of group_size=", num(group_size));
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.size(0) == k / group_size &&
                  scales_zeros.size(1) == n && scales_zeros.size(2) == 2,
              "fxquant.", op, ": scales_zeros must have shape [", num(k / group_size), ", ", num(n), ", 2], got ",
              dims(scales_zeros.sizes()));
  check_bias(bias, n, op);
  check_device(x, qweight, "qweight", op);
  check_device(x, scales_zeros, "scales_zeros", op);
  if (bias.has_value()) check_device(x, *bias, "bias", op);
}

void check_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& bias) {
  const char* op = "cxx_int8_weight_only_linear";
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "fxquant.", op,
              ": qweight must be int8 [N, K], got ", qweight.scalar_type(), " ", dims(qweight.sizes()));
  check_x(x, qweight.size(1), op);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == qweight.size(0), "fxquant.", op,
              ": scales must have shape [", num(qweight.size(0)), "], got ", dims(scales.sizes()));
  check_bias(bias, qweight.size(0), op);
  check_device(x, qweight, "qweight", op);
  check_device(x, scales, "scales", op);
  if (bias.has_value()) check_device(x, *bias, "bias", op);
}

at::Tensor int4_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                               int64_t group_size) {
  check_int4(x, qweight, scales_zeros, bias, group_size);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  // Same order of float32 operations as numerics.dequantize_int4, so the results are identical.
  at::Tensor q = at::stack({at::bitwise_and(qweight, 15), at::bitwise_right_shift(qweight, 4)}, -1)
                     .reshape({n, k}).to(at::kFloat);
  at::Tensor sz = scales_zeros.to(at::kFloat).transpose(0, 1);  // [N, G, 2]
  at::Tensor g = q.reshape({n, k / group_size, group_size});
  at::Tensor w = ((g - 8) * sz.narrow(-1, 0, 1) + sz.narrow(-1, 1, 1)).reshape({n, k}).to(x.scalar_type());
  return finish(at::linear(x.reshape({-1, k}), w), x, bias);
}

at::Tensor int8_dequant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& bias) {
  check_int8(x, qweight, scales, bias);
  at::Tensor w = (qweight.to(at::kFloat) * scales.to(at::kFloat).unsqueeze(1)).to(x.scalar_type());
  return finish(at::linear(x.reshape({-1, qweight.size(1)}), w), x, bias);
}

// Bumped whenever a schema or a kernel's contract changes; the Python loader checks it.
int64_t abi_version() { return 1; }

}  // namespace fxquant

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cxx_int4_weight_only_linear(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor? bias, "
        "SymInt group_size) -> Tensor");
  m.def("cxx_int8_weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("cxx_abi_version() -> int", &fxquant::abi_version);
}

TORCH_LIBRARY_IMPL(fxquant, CPU, m) {
  m.impl("cxx_int4_weight_only_linear", &fxquant::int4_dequant_linear);
  m.impl("cxx_int8_weight_only_linear", &fxquant::int8_dequant_linear);
}
