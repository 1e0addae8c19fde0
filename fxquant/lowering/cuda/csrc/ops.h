// fxquant's C++ ops: shared declarations of the CPU (ops.cpp) and CUDA (*.cu) halves.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fxquant {

// Numbers and shapes for error messages, made into strings here: streaming an integer from this
// library (std::ostream::operator<<(long), instantiated in it) crashed inside libstdc++'s locale
// code on the GPU machine (torch 2.11, gcc 13.3; BENCHMARKS.md S11); strings stream safely.
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string dims(at::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Argument checks shared by every kernel of an op; messages name the op and the bad value.
void check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                const std::optional<at::Tensor>& bias, int64_t group_size);
void check_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const std::optional<at::Tensor>& bias);
// int4 in the MMA-fragment layout (numerics.pack_int4_mma): check_int4's rules plus N % 16, K % 64 and
// group_size a power of two >= 64.
void check_int4_mma(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_zeros,
                    const std::optional<at::Tensor>& bias, int64_t group_size);

// The dynamic-activation ops (int8 and e4m3): x, or xq with its per-token scales, against an 8-bit
// weight with float32 scales [N] or [1].
void check_dynamic(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                   const std::optional<at::Tensor>& bias, bool fp8);
void check_prequant(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                    const at::Tensor& w_scales, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                    bool fp8);

// Dequantize + GEMM in ATen, with the arithmetic of fxquant/numerics.py and lowering/cpu.py:
// the CPU kernels, and the CUDA kernels' path outside the GEMV's range (M > 16, float32 x).
at::Tensor int4_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                               int64_t group_size);
at::Tensor int4_mma_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                                   const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                                   int64_t group_size);
at::Tensor int8_dequant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& bias);


// int8 weight-only on tensor cores (int8_mma.cu) for x2 [M, K] rows (unit stride along K, 16-byte
// aligned) into out [M, N]: false, with nothing launched, outside its range (M <= kMaxInt8MmaM,
// K % 64 == 0, sm_80+; FXQUANT_CXX_INT8_MMA). bias: x's dtype, or none.
constexpr int64_t kMaxInt8MmaM = 16;
// The MMA-fragment int4 decode kernel's range (int4_mma_layout.cu).
constexpr int64_t kMaxInt4MmaLayoutM = 32;
bool int8_mma_linear(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, at::Tensor& out);

// The dynamic ops in ATen, with lowering/cpu.py's arithmetic (the CPU kernels; the CUDA kernels'
// path outside their range).
at::Tensor dynamic_reference(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scales,
                             const std::optional<at::Tensor>& bias, bool fp8, bool per_row);
at::Tensor prequant_reference(const at::Tensor& xq, const at::Tensor& x_scales, const at::Tensor& qweight,
                              const at::Tensor& w_scales, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype, bool fp8);

}  // namespace fxquant
