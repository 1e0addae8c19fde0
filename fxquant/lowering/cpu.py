"""CPU kernels of the fxquant ops: ATen's fast kernels where they exist, else dequantize + GEMM.

ATen's CPU weight-only kernels win only at small M in half precision (measured on a 2-core
x86 machine: `_weight_int8pack_mm` is 2-5x faster than F.linear at M <= 16 in bf16, but 3-60x
slower in float32 or at M >= 256). Dequantizing once per call costs O(N*K), which is small next
to the O(M*N*K) GEMM at large M, so that is the large-M path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import numerics as nq

ATEN_WOQ_MAX_M = 16
_HALF = (torch.bfloat16, torch.float16)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _finish(out2d: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        out2d = out2d + bias.to(out2d.dtype)
    return out2d.to(x.dtype).reshape(*x.shape[:-1], out2d.shape[-1])


def int8_weight_only_linear(x, qweight, scales, bias):
    x2 = _rows(x)
    # _weight_int8pack_mm in bf16 with K % 16 != 0 crashed or returned garbage (torch 2.13 CPU,
    # x86); fp16 was fine, but K % 16 == 0 is required for both.
    if x.dtype in _HALF and 0 < x2.shape[0] <= ATEN_WOQ_MAX_M and x2.shape[1] % 16 == 0:
        out = torch._weight_int8pack_mm(x2.contiguous(), qweight, scales.to(x.dtype))
    else:
        out = F.linear(x2, nq.dequantize_int8_per_channel(qweight, scales, x.dtype))
    return _finish(out, x, bias)


def int4_weight_only_linear(x, qweight, scales_zeros, bias, group_size, layout: str = "rows"):
    w = nq.dequantize_int4(qweight, scales_zeros, group_size, x.dtype, layout)
    return _finish(F.linear(_rows(x), w), x, bias)


def int8_mm(xq2: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact int32 xq2 @ qweight.T. torch._int_mm on the CPU returns uninitialised memory when
    K == 1 (seen with torch 2.13): that case is an outer product."""
    if qweight.shape[1] == 1:
        return xq2.to(torch.int32) * qweight.to(torch.int32).reshape(1, -1)
    return torch._int_mm(xq2, qweight.t())


def _int8_scaled_mm(xq2, xs, qweight, w_scales):
    if xq2.shape[0] == 0:
        return xq2.new_zeros(0, qweight.shape[0], dtype=torch.float32)
    return int8_mm(xq2, qweight).float() * xs * w_scales.float()[None, :]


def _fp8_scaled_mm(xq2, xs, qweight, w_scales):
    # Reference arithmetic: fp8 values are exact in float32, accumulate in float32.
    return (xq2.float() @ qweight.float().t()) * xs * w_scales.float().reshape(1, -1)


def _finish_prequant(out2d, xq, bias, out_dtype):
    if bias is not None:
        out2d = out2d + bias.to(out2d.dtype)
    return out2d.to(out_dtype).reshape(*xq.shape[:-1], out2d.shape[-1])


def int8_dynamic_linear(x, qweight, w_scales, bias):
    xq, xs = nq.quantize_int8_per_token(_rows(x))
    return _finish(_int8_scaled_mm(xq, xs, qweight, w_scales), x, bias)


def int8_dynamic_linear_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype):
    out = _int8_scaled_mm(_rows(xq), x_scales.reshape(-1, 1), qweight, w_scales)
    return _finish_prequant(out, xq, bias, out_dtype)


def float8_dynamic_linear(x, qweight, w_scales, bias, per_row):
    xq, xs = nq.quantize_fp8(_rows(x), per_row)
    return _finish(_fp8_scaled_mm(xq, xs, qweight, w_scales), x, bias)


def float8_dynamic_linear_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype):
    out = _fp8_scaled_mm(_rows(xq), x_scales.reshape(-1, 1), qweight, w_scales)
    return _finish_prequant(out, xq, bias, out_dtype)


def float8_weight_only_linear(x, qweight, w_scales, bias):
    w = nq.dequantize_fp8_weight(qweight, w_scales, x.dtype)
    return _finish(F.linear(_rows(x), w), x, bias)


def swiglu_quantize(gate, up, fp8):
    q, s = nq.quantize_swiglu_per_token(_rows(gate), _rows(up), fp8)
    return q.reshape(gate.shape), s.reshape(*gate.shape[:-1], 1)
