"""Each `torch.ops.fxquant.*` op written as plain ATen ops, for programs that must run without
fxquant (AOTInductor packages): `ep.run_decompositions(fxquant_decompositions())`.

Each function is the op's CPU kernel (lowering/cpu.py) minus its run-time branches on M (a
traced branch on a dynamic dim would specialize it), built from the same numerics helpers, so
the package computes what the compiled model computes. The packed tensors stay the program's
constants; the dequantization runs inside the program, per call, exactly as in the CPU kernel.

Differences from the CPU op, both deliberate:
- int8 weight-only in bf16/fp16 at M <= 16 (K % 16 == 0): the CPU op calls ATen's `_weight_int8pack_mm`;
  here it always dequantizes and multiplies (the op's large-M path), which rounds differently
  in the last bits (float32 activations: identical).
- int8 dynamic on CUDA: `torch._int_mm` needs M > 16 there, so rows are padded with zeros
  (a padded row quantizes to zeros and is sliced off; the other rows are unchanged).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import numerics as nq
from .cpu import _finish, _finish_prequant, _fp8_scaled_mm, _rows, int8_mm

_CUDA_INT_MM_MIN_M = 17


def int8_weight_only_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    w = nq.dequantize_int8_per_channel(qweight, scales, x.dtype)
    return _finish(F.linear(_rows(x), w), x, bias)


def int4_weight_only_linear(x: Tensor, qweight: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                            group_size: int) -> Tensor:
    # unpack_int4 is bitwise ops (& 0xF, >> 4) on the packed bytes: Inductor fuses it into the dequant.
    w = nq.dequantize_int4(qweight, scales_zeros, group_size, x.dtype)
    return _finish(F.linear(_rows(x), w), x, bias)


def int4_mma_weight_only_linear(x: Tensor, qweight: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                                group_size: int) -> Tensor:
    w = nq.dequantize_int4(qweight, scales_zeros, group_size, x.dtype, layout="mma")
    return _finish(F.linear(_rows(x), w), x, bias)


def _int8_scaled_mm(xq: Tensor, xs: Tensor, qweight: Tensor, w_scales: Tensor) -> Tensor:
    if qweight.shape[1] == 1:  # K is static here; see cpu.int8_mm
        acc = int8_mm(xq, qweight)
    elif xq.device.type == "cuda":
        m = xq.shape[0]
        acc = torch._int_mm(F.pad(xq, (0, 0, 0, _CUDA_INT_MM_MIN_M)), qweight.t())[:m]
    else:
        acc = torch._int_mm(xq, qweight.t())
    return acc.float() * xs * w_scales.float()[None, :]


def int8_dynamic_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None) -> Tensor:
    xq, xs = nq.quantize_int8_per_token(_rows(x))
    return _finish(_int8_scaled_mm(xq, xs, qweight, w_scales), x, bias)


def int8_dynamic_linear_prequant(xq: Tensor, x_scales: Tensor, qweight: Tensor, w_scales: Tensor,
                                 bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    out = _int8_scaled_mm(_rows(xq), x_scales.reshape(-1, 1), qweight, w_scales)
    return _finish_prequant(out, xq, bias, out_dtype)


def float8_dynamic_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None,
                          per_row: bool) -> Tensor:
    xq, xs = nq.quantize_fp8(_rows(x), per_row)
    return _finish(_fp8_scaled_mm(xq, xs, qweight, w_scales), x, bias)


def float8_dynamic_linear_prequant(xq: Tensor, x_scales: Tensor, qweight: Tensor, w_scales: Tensor,
                                   bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    out = _fp8_scaled_mm(_rows(xq), x_scales.reshape(-1, 1), qweight, w_scales)
    return _finish_prequant(out, xq, bias, out_dtype)


def float8_weight_only_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None) -> Tensor:
    w = nq.dequantize_fp8_weight(qweight, w_scales, x.dtype)
    return _finish(F.linear(_rows(x), w), x, bias)


def swiglu_quantize(gate: Tensor, up: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    q, s = nq.quantize_swiglu_per_token(_rows(gate), _rows(up), fp8)
    return q.reshape(gate.shape), s.reshape(*gate.shape[:-1], 1)


def fxquant_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """{fxquant op overload: its ATen decomposition}, one entry per op."""
    ops = torch.ops.fxquant
    return {
        ops.int8_weight_only_linear.default: int8_weight_only_linear,
        ops.int4_weight_only_linear.default: int4_weight_only_linear,
        ops.int4_mma_weight_only_linear.default: int4_mma_weight_only_linear,
        ops.int8_dynamic_linear.default: int8_dynamic_linear,
        ops.float8_dynamic_linear.default: float8_dynamic_linear,
        ops.float8_weight_only_linear.default: float8_weight_only_linear,
        ops.int8_dynamic_linear_prequant.default: int8_dynamic_linear_prequant,
        ops.float8_dynamic_linear_prequant.default: float8_dynamic_linear_prequant,
        ops.swiglu_quantize.default: swiglu_quantize,
    }
