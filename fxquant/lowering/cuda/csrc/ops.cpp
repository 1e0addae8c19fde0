// Schemas and CPU kernels of fxquant's C++ ops.
//
// Each cxx_* op has exactly the schema of the Python op of the same scheme in
// fxquant/lowering/ops.py (tests/test_cxx_ops.py checks it), so a C++ program that loads this
// library can call them with the same arguments. CUDA kernels: gemv.cu (built only with CUDA).
#include <torch/library.h>

#include <limits>

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

void check_w_scales(const at::Tensor& w_scales, int64_t n, const char* op) {
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.dim() == 1 &&
                  (w_scales.size(0) == n || w_scales.size(0) == 1),
              "fxquant.", op, ": w_scales must be float32 [", num(n), "] or [1], got ", w_scales.scalar_type(), " ",
              dims(w_scales.sizes()));
}

at::Tensor finish(const at::Tensor& out2d, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  at::Tensor out = bias.has_value() ? out2d + bias->to(out2d.scalar_type()) : out2d;
  auto shape = x.sizes().vec();
  shape.back() = out2d.size(1);
  return out.to(x.scalar_type()).reshape(shape);
}
}  // namespace

namespace {
void check_int4_op(const char* op, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                   const std::optional<at::Tensor>& bias, int64_t group_size) {
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
}  // namespace

void check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                const std::optional<at::Tensor>& bias, int64_t group_size) {
  check_int4_op("cxx_int4_weight_only_linear", x, qweight, scales_zeros, bias, group_size);
}

void check_int4_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                    const std::optional<at::Tensor>& bias, int64_t group_size) {
  const char* op = "cxx_int4_mma_weight_only_linear";
  check_int4_op(op, x, qweight, scales_zeros, bias, group_size);
  TORCH_CHECK(qweight.size(0) % 16 == 0 && qweight.size(1) % 32 == 0 && group_size >= 64 &&
                  (group_size & (group_size - 1)) == 0,
              "fxquant.", op, ": the MMA-fragment layout needs N % 16 == 0, K % 64 == 0 and a power-of-two "
              "group_size >= 64, got N=", num(qweight.size(0)), ", K=", num(qweight.size(1) * 2), ", group_size=",
              num(group_size));
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

namespace {
// The packed bytes as nibbles [N * K / 2, 2] (low first), as numerics' unpacking reads them.
at::Tensor nibbles(const at::Tensor& qweight) {
  return at::stack({at::bitwise_and(qweight, 15), at::bitwise_right_shift(qweight, 4)}, -1);
}

// x @ dequantize(q)^T + bias for q the nibbles in row-major order ([N, K] float32): the same order of
// float32 operations as numerics.dequantize_int4, so the results are identical.
at::Tensor int4_linear_from_q(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales_zeros,
                              const std::optional<at::Tensor>& bias, int64_t group_size) {
  const int64_t n = q.size(0), k = q.size(1);
  at::Tensor sz = scales_zeros.to(at::kFloat).transpose(0, 1);  // [N, G, 2]
  at::Tensor g = q.reshape({n, k / group_size, group_size});
  at::Tensor w = ((g - 8) * sz.narrow(-1, 0, 1) + sz.narrow(-1, 1, 1)).reshape({n, k}).to(x.scalar_type());
  return finish(at::linear(x.reshape({-1, k}), w), x, bias);
}
}  // namespace

at::Tensor int4_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                               int64_t group_size) {
  check_int4(x, qweight, scales_zeros, bias, group_size);
  const at::Tensor q = nibbles(qweight).reshape({qweight.size(0), qweight.size(1) * 2}).to(at::kFloat);
  return int4_linear_from_q(x, q, scales_zeros, bias, group_size);
}

at::Tensor int4_mma_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                                   int64_t group_size) {
  check_int4_mma(x, qweight, scales_zeros, bias, group_size);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2;
  // numerics.unpack_int4_mma: the bytes as (R, S, g, t, j, e, kh, h) -> (R, h, g, S, j, kh, t, e).
  const at::Tensor q = nibbles(qweight).reshape({n / 16, k / 64, 8, 4, 4, 2, 2, 2})
                           .permute({0, 7, 2, 1, 4, 6, 3, 5}).reshape({n, k}).to(at::kFloat);
  return int4_linear_from_q(x, q, scales_zeros, bias, group_size);
}

at::Tensor int8_dequant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& bias) {
  check_int8(x, qweight, scales, bias);
  at::Tensor w = (qweight.to(at::kFloat) * scales.to(at::kFloat).unsqueeze(1)).to(x.scalar_type());
  return finish(at::linear(x.reshape({-1, qweight.size(1)}), w), x, bias);
}

void check_dynamic(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                   const std::optional<at::Tensor>& bias, bool fp8) {
  const char* op = fp8 ? "cxx_float8_dynamic_linear" : "cxx_int8_dynamic_linear";
  const auto qt = fp8 ? at::kFloat8_e4m3fn : at::kChar;
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == qt, "fxquant.", op, ": qweight must be ",
              fp8 ? "float8_e4m3fn" : "int8", " [N, K], got ", qweight.scalar_type(), " ", dims(qweight.sizes()));
  check_x(x, qweight.size(1), op);
  const int64_t n = qweight.size(0);
  check_w_scales(w_scales, n, op);
  check_bias(bias, n, op);
  check_device(x, qweight, "qweight", op);
  check_device(x, w_scales, "w_scales", op);
  if (bias.has_value()) check_device(x, *bias, "bias", op);
}

void check_prequant(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                    const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                    bool fp8) {
  const char* op = fp8 ? "cxx_float8_dynamic_linear_prequant" : "cxx_int8_dynamic_linear_prequant";
  const auto qt = fp8 ? at::kFloat8_e4m3fn : at::kChar;
  TORCH_CHECK(xq.dim() >= 1 && xq.scalar_type() == qt && qweight.dim() == 2 && qweight.scalar_type() == qt,
              "fxquant.", op, ": xq and qweight must be ", fp8 ? "float8_e4m3fn" : "int8", ", got ",
              xq.scalar_type(), " and ", qweight.scalar_type());
  TORCH_CHECK(xq.size(-1) == qweight.size(1), "fxquant.", op, ": xq has K=", num(xq.size(-1)),
              " but the weight has K=", num(qweight.size(1)));
  TORCH_CHECK(x_scales.scalar_type() == at::kFloat && x_scales.dim() == xq.dim() && x_scales.size(-1) == 1 &&
                  x_scales.sizes().slice(0, xq.dim() - 1) == xq.sizes().slice(0, xq.dim() - 1),
              "fxquant.", op, ": x_scales must be float32 [..., 1] with one scale per token of xq ",
              dims(xq.sizes()), ", got ", x_scales.scalar_type(), " ", dims(x_scales.sizes()));
  const int64_t n = qweight.size(0);
  check_w_scales(w_scales, n, op);
  TORCH_CHECK(is_float(out_dtype), "fxquant.", op, ": out_dtype must be float32/float16/bfloat16, got ", out_dtype);
  check_bias(bias, n, op);
  check_device(xq, x_scales, "x_scales", op);
  check_device(xq, qweight, "qweight", op);
  check_device(xq, w_scales, "w_scales", op);
  if (bias.has_value()) check_device(xq, *bias, "bias", op);
}

namespace {
// float32 [M, N] = (xq2 @ qweight^T) * x_scales * w_scales, as lowering/cpu.py: int8 sums exact (in
// double: every int32 sum is exact there, and rounds to float32 as the int32 would), e4m3 in float32.
at::Tensor scaled_mm(const at::Tensor& xq2, const at::Tensor& xs, const at::Tensor& qweight,
                     const at::Tensor& w_scales, bool fp8) {
  const auto acc_t = fp8 ? at::kFloat : at::kDouble;
  at::Tensor acc = at::matmul(xq2.to(acc_t), qweight.to(acc_t).t()).to(at::kFloat);
  return acc * xs * w_scales.to(at::kFloat).reshape({1, -1});
}

at::Tensor finish_dtype(const at::Tensor& out2d, at::IntArrayRef lead, const std::optional<at::Tensor>& bias,
                        at::ScalarType dt) {
  at::Tensor out = bias.has_value() ? out2d + bias->to(out2d.scalar_type()) : out2d;
  auto shape = lead.vec();
  shape.push_back(out2d.size(1));
  return out.to(dt).reshape(shape);
}
}  // namespace

at::Tensor dynamic_reference(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                             const std::optional<at::Tensor>& bias, bool fp8, bool per_row) {
  check_dynamic(x, qweight, w_scales, bias, fp8);
  const int64_t k = qweight.size(1);
  at::Tensor x32 = x.reshape({-1, k}).to(at::kFloat);
  const float tiny = std::numeric_limits<float>::min();
  at::Tensor amax;
  if (fp8 && !per_row) {  // one scale for all of x (an empty x: any scale)
    amax = x32.numel() ? x32.abs().amax().reshape({1, 1}) : at::zeros({1, 1}, x32.options());
  } else {
    amax = x32.abs().amax(-1, true);
  }
  // numerics._div: an IEEE division on every device (CUDA divides by a scalar via its reciprocal)
  at::Tensor scale = at::div(amax, at::full_like(amax, fp8 ? 448.0 : 127.0)).clamp_min(tiny);
  at::Tensor xq = fp8 ? (x32 / scale).clamp(-448, 448).to(at::kFloat8_e4m3fn)
                      : at::round(x32 / scale).clamp(-127, 127).to(at::kChar);
  at::Tensor out2d = x32.size(0) ? scaled_mm(xq, scale, qweight, w_scales, fp8)
                                 : at::zeros({0, qweight.size(0)}, x32.options());
  return finish_dtype(out2d, x.sizes().slice(0, x.dim() - 1), bias, x.scalar_type());
}

at::Tensor prequant_reference(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                              const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype, bool fp8) {
  check_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype, fp8);
  const int64_t k = qweight.size(1);
  at::Tensor xq2 = xq.reshape({-1, k});
  at::Tensor out2d = xq2.size(0) ? scaled_mm(xq2, x_scales.reshape({-1, 1}), qweight, w_scales, fp8)
                                 : at::zeros({0, qweight.size(0)}, xq.options().dtype(at::kFloat));
  return finish_dtype(out2d, xq.sizes().slice(0, xq.dim() - 1), bias, out_dtype);
}

namespace {
at::Tensor int8_dynamic_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                            const std::optional<at::Tensor>& bias) {
  return dynamic_reference(x, qweight, w_scales, bias, false, true);
}
at::Tensor float8_dynamic_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                              const std::optional<at::Tensor>& bias, bool per_row) {
  return dynamic_reference(x, qweight, w_scales, bias, true, per_row);
}
at::Tensor int8_prequant_cpu(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                             const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                             at::ScalarType out_dtype, bool /*pdl: CUDA only*/) {
  return prequant_reference(xq, x_scales, qweight, w_scales, bias, out_dtype, false);
}
at::Tensor float8_prequant_cpu(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                               const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype, bool /*pdl: CUDA only*/) {
  return prequant_reference(xq, x_scales, qweight, w_scales, bias, out_dtype, true);
}
}  // namespace

// Bumped whenever a schema or a kernel's contract changes; the Python loader checks it.
int64_t abi_version() { return 4; }  // 2: the dynamic-activation ops; 3: the prequant ops' pdl; 4: int4 mma layout

}  // namespace fxquant

TORCH_LIBRARY_FRAGMENT(fxquant, m) {
  m.def("cxx_int4_weight_only_linear(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor? bias, "
        "SymInt group_size) -> Tensor");
  m.def("cxx_int4_mma_weight_only_linear(Tensor x, Tensor qweight, Tensor scales_zeros, Tensor? bias, "
        "SymInt group_size) -> Tensor");
  m.def("cxx_int8_weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> Tensor");
  m.def("cxx_int8_dynamic_linear(Tensor x, Tensor qweight, Tensor w_scales, Tensor? bias) -> Tensor");
  m.def("cxx_float8_dynamic_linear(Tensor x, Tensor qweight, Tensor w_scales, Tensor? bias, bool per_row) -> Tensor");
  m.def("cxx_int8_dynamic_linear_prequant(Tensor xq, Tensor x_scales, Tensor qweight, Tensor w_scales, "
        "Tensor? bias, ScalarType out_dtype, bool pdl=False) -> Tensor");
  m.def("cxx_float8_dynamic_linear_prequant(Tensor xq, Tensor x_scales, Tensor qweight, Tensor w_scales, "
        "Tensor? bias, ScalarType out_dtype, bool pdl=False) -> Tensor");
  m.def("cxx_abi_version() -> int", &fxquant::abi_version);
}

TORCH_LIBRARY_IMPL(fxquant, CPU, m) {
  m.impl("cxx_int4_weight_only_linear", &fxquant::int4_dequant_linear);
  m.impl("cxx_int4_mma_weight_only_linear", &fxquant::int4_mma_dequant_linear);
  m.impl("cxx_int8_weight_only_linear", &fxquant::int8_dequant_linear);
  m.impl("cxx_int8_dynamic_linear", &fxquant::int8_dynamic_cpu);
  m.impl("cxx_float8_dynamic_linear", &fxquant::float8_dynamic_cpu);
  m.impl("cxx_int8_dynamic_linear_prequant", &fxquant::int8_prequant_cpu);
  m.impl("cxx_float8_dynamic_linear_prequant", &fxquant::float8_prequant_cpu);
}
