"""fxquant's C++/CUDA op library: hand-written CUDA kernels registered with TORCH_LIBRARY.

csrc/ops.cpp defines `torch.ops.fxquant.cxx_*` (each with the schema of the Python op of the same
scheme) and their CPU kernels; csrc/gemv.cu adds CUDA kernels (int4 on tensor cores at M <= 32,
a CUDA-core GEMV at M <= 16 otherwise; dequantize + cuBLAS beyond), csrc/int8_mma.cu int8 on tensor
cores at 2 <= M <= 16, csrc/int4_mma_layout.cu int4 in the MMA-fragment layout (Int4WeightOnly(layout="mma"))
at M <= 16, csrc/dynamic_mma*.cu the 8-bit dynamic schemes at small M. build.py compiles them just in time on first use, into a persistent cache.
The Triton launchers (lowering/triton/dispatch.py) treat these kernels as one more candidate
(config kind "cxx"); where the library cannot be built, the Triton kernels are used.
"""
from .build import CxxUnavailable, available, library_path, load, unavailable_reason

__all__ = ["CxxUnavailable", "available", "library_path", "load", "unavailable_reason"]
