// fxquant's C++ ops: shared declarations of the CPU (ops.cpp) and CUDA (gemv.cu) halves.
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

// Dequantize + GEMM in ATen, with the arithmetic of fxquant/numerics.py and lowering/cpu.py:
// the CPU kernels, and the CUDA kernels' path outside the GEMV's range (M > 16, float32 x).
at::Tensor int4_dequant_linear(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales_zeros, const std::optional<at::Tensor>& bias,
                               int64_t group_size);
at::Tensor int8_dequant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& bias);

}  // namespace fxquant
