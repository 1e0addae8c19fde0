// CUDA kernels of fxquant's C++ dynamic-activation ops at small M: W8A8 int8 and FP8 (e4m3, per-row
// or per-tensor scales) on 8-bit tensor cores (mma.m16n8k32; int32 or float32 accumulators).
//
// The weight rows are the MMA's A operand, read straight from memory (both operands are 8-bit:
// nothing to convert); x^T is B. The k order inside one MMA is free as long as A and B agree, so
// lane (g, t) loads the 16 bytes at k0 + 16t of weight rows g and g + 8, and its token's 16 bytes
// at the same k: words 0, 1 feed the first MMA of a 64-k step, words 2, 3 the second.
// The plain ops (x in bf16/fp16) quantize x inside the kernel for M <= kMaxQuantM: every block
// computes the token scales and writes the quantized x into shared memory, with numerics.py's
// arithmetic (IEEE division, round half to even, clamp). One launch: at M = 1 a separate
// quantization kernel and the gap before the GEMV cost about as much as the GEMV's weight read.
// The prequant ops (x quantized beforehand by the norm or SwiGLU) read xq and its per-token
// scales from memory, for M <= kMaxDynM.
// Epilogue as lowering/cpu.py: float(acc) * x_scale * w_scale (+ bias), rounded once.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dynamic_mma.cuh"
#include "ops.h"

namespace fxquant {
namespace dyn {
// Instantiated in dynamic_mma_int8.cu and dynamic_mma_fp8.cu.
#define FXQ_DYN_EXTERN(FP8, QUANT)                                  \
  extern template void launch<FP8, QUANT, __nv_bfloat16>(const Args&); \
  extern template void launch<FP8, QUANT, __half>(const Args&);
FXQ_DYN_EXTERN(false, false)
FXQ_DYN_EXTERN(false, true)
FXQ_DYN_EXTERN(true, false)
FXQ_DYN_EXTERN(true, true)
#undef FXQ_DYN_EXTERN
}  // namespace dyn

namespace {
using dyn::Args;
using dyn::kMaxDynM;
using dyn::kMaxQuantM;
using dyn::launch;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// What the kernels take; anything else runs the ATen reference (ops.cpp).
bool kernel_fits(const at::Tensor& qweight, const at::Tensor& w_scales, int64_t m, at::ScalarType out_dtype, bool fp8, bool quant) {
  const int64_t n = qweight.size(0), k = qweight.size(1);
  if (m < 1 || m > (quant ? kMaxQuantM : kMaxDynM) || k % 64 != 0 || n < 1 || n * k >= (int64_t(1) << 31)) return false;
  if (out_dtype != at::kBFloat16 && out_dtype != at::kHalf) return false;
  if (!qweight.is_contiguous() || !aligned16(qweight.data_ptr())) return false;
  if (w_scales.scalar_type() != at::kFloat || !w_scales.is_contiguous()) return false;
  if (quant && m * (k + 16) > device::attr<cudaDevAttrMaxSharedMemoryPerBlockOptin>() - 1024) return false;
  return !fp8 || device::capability() >= 89;
}

// x rows with unit stride along K and 16-byte aligned rows (copied if not).
at::Tensor rows16(const at::Tensor& x, int64_t k) {
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1 || (x2.stride(0) * x2.element_size()) % 16 != 0 || !aligned16(x2.data_ptr()))
    x2 = x2.clone(at::MemoryFormat::Contiguous);
  return x2;
}

template <bool FP8, bool QUANT>
at::Tensor run(const at::Tensor& x2, const at::Tensor& x_scales, const at::Tensor& qweight, const at::Tensor& w_scales,
               const std::optional<at::Tensor>& bias, at::ScalarType out_dtype, bool x_per_tensor, bool pdl) {
  const int64_t m = x2.size(0), n = qweight.size(0);
  at::Tensor out = at::empty({m, n}, qweight.options().dtype(out_dtype));
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(out_dtype).contiguous();  // the reference adds bias in float32 from this dtype
  Args a{x2.data_ptr(), x2.stride(0) /* elements: T, or bytes */, QUANT ? nullptr : x_scales.data_ptr<float>(),
         static_cast<const uint8_t*>(qweight.data_ptr()), w_scales.data_ptr<float>(), w_scales.numel() == 1 ? 0 : 1,
         b.has_value() ? b->data_ptr() : nullptr, out.data_ptr(), out.stride(0), static_cast<int>(m),
         static_cast<int>(n), static_cast<int>(qweight.size(1)), x_per_tensor,
         !QUANT && pdl && device::capability() >= 90};
  if (out_dtype == at::kBFloat16) launch<FP8, QUANT, __nv_bfloat16>(a);
  else launch<FP8, QUANT, __half>(a);
  return out;
}

at::Tensor shaped(const at::Tensor& out2d, const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() = out2d.size(1);
  return out2d.reshape(shape);
}

template <bool FP8>
at::Tensor dynamic_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                        const std::optional<at::Tensor>& bias, bool per_row) {
  check_dynamic(x, qweight, w_scales, bias, FP8);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t k = qweight.size(1), m = x.numel() / std::max<int64_t>(k, 1);
  if (x.scalar_type() != at::kFloat &&  // (check_dynamic put every tensor on x's device)
      kernel_fits(qweight, w_scales, m, x.scalar_type(), FP8, true)) {
    at::Tensor x2 = rows16(x, k);
    return shaped(run<FP8, true>(x2, x2, qweight, w_scales, bias, x.scalar_type(), FP8 && !per_row, false), x);
  }
  return dynamic_reference(x, qweight, w_scales, bias, FP8, per_row);
}

template <bool FP8>
at::Tensor prequant_cuda(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                         const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                         bool pdl) {
  check_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype, FP8);
  const c10::cuda::OptionalCUDAGuard guard(xq.device());
  const int64_t k = qweight.size(1), m = xq.numel() / std::max<int64_t>(k, 1);
  if (kernel_fits(qweight, w_scales, m, out_dtype, FP8, false)) {
    at::Tensor xs = x_scales.reshape({-1}).contiguous();
    return shaped(run<FP8, false>(rows16(xq, k), xs, qweight, w_scales, bias, out_dtype, false, pdl), xq);
  }
  return prequant_reference(xq, x_scales, qweight, w_scales, bias, out_dtype, FP8);
}

at::Tensor int8_dynamic(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                        const std::optional<at::Tensor>& bias) {
  return dynamic_cuda<false>(x, qweight, w_scales, bias, true);
}

at::Tensor float8_dynamic(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                          const std::optional<at::Tensor>& bias, bool per_row) {
  return dynamic_cuda<true>(x, qweight, w_scales, bias, per_row);
}

at::Tensor int8_prequant(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                         const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                         bool pdl) {
  return prequant_cuda<false>(xq, x_scales, qweight, w_scales, bias, out_dtype, pdl);
}

at::Tensor float8_prequant(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                           const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                           bool pdl) {
  return prequant_cuda<true>(xq, x_scales, qweight, w_scales, bias, out_dtype, pdl);
}

}  // namespace
}  // namespace fxquant

TORCH_LIBRARY_IMPL(fxquant, CUDA, m) {
  m.impl("cxx_int8_dynamic_linear", &fxquant::int8_dynamic);
  m.impl("cxx_float8_dynamic_linear", &fxquant::float8_dynamic);
  m.impl("cxx_int8_dynamic_linear_prequant", &fxquant::int8_prequant);
  m.impl("cxx_float8_dynamic_linear_prequant", &fxquant::float8_prequant);
}
