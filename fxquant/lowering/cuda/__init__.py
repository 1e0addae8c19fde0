"""fxquant's C++/CUDA op library: hand-written CUDA kernels registered with TORCH_LIBRARY.

csrc/ops.cpp defines `torch.ops.fxquant.cxx_*` (each with the schema of the Python op of the same
scheme) and their CPU kernels; csrc/gemv.cu adds CUDA kernels (int4 on tensor cores at M <= 32,
a CUDA-core GEMV at M <= 16 otherwise; dequantize + cuBLAS beyond), csrc/int8_mma.cu int8 on tensor
cores at 2 <= M <= 16, csrc/int4_mma_layout.cu int4 in the MMA-fragment layout (Int4WeightOnly(layout="mma"))
at M <= 16, csrc/dynamic_mma*.cu the 8-bit dynamic schemes at small M. build.py compiles them just in
time on first use, into a persistent cache. int4_mma_layout_unfit tells Int4WeightOnly(layout="auto")
whether that layout's kernels run here.
The Triton launchers (lowering/triton/dispatch.py) treat these kernels as one more candidate
(config kind "cxx"); where the library cannot be built, the Triton kernels are used.
"""
from __future__ import annotations

import torch

from .build import CxxUnavailable, available, library_path, load, unavailable_reason

__all__ = ["CxxUnavailable", "available", "int4_mma_layout_unfit", "library_path", "load", "unavailable_reason"]


def int4_mma_layout_unfit(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why int4 weights in the MMA-fragment layout would not get their fast kernels (the C++ decode
    kernel at M <= 32, CUTLASS above) for `dtype` activations on `device`, or None when they would.
    Loads both libraries (on first use: builds them, as the first linear call would)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip is not None:
        return f"{device.type} device: the layout's fast kernels are CUDA (sm_90) only"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"sm_{cap[0]}{cap[1]} GPU: the layout's large-M GEMM is CUTLASS for sm_90a"
    if dtype != torch.bfloat16:
        return f"{str(dtype).removeprefix('torch.')} activations: the layout's CUTLASS GEMM takes bfloat16"
    if not available():
        return f"the C++ library is unavailable ({_first_line(unavailable_reason())})"
    from . import build
    if not build.cutlass_available():
        return f"the CUTLASS library is unavailable ({_first_line(build._cutlass_state['error'])})"
    return None


def _first_line(reason: str | None) -> str:
    # a failed build's reason ends with compiler output: one report cell gets its first line
    lines = (reason or "").strip().splitlines()
    return lines[0] if lines else "unknown reason"
