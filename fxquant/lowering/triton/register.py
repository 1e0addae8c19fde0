"""Registers the Triton launchers as the CUDA kernels of the existing torch.ops.fxquant.* ops.

Uses CustomOpDef.register_kernel("cuda", ...) rather than torch.library.triton_op: triton_op
defines a *new* op (its own schema, and the launcher itself becomes the fake kernel and the
functional decomposition), so it cannot be attached to the ops that ops.py already defines with
CPU kernels; and its decomposition would trace the launcher's Python branch on M, which guards
on the symbolic M (a recompile per M-bucket). Here the op stays opaque to torch.compile and the
per-M choice happens at run time in the launcher. Triton is imported on the first CUDA call.
"""
from __future__ import annotations

import torch

from .. import ops

_registered = False


def _dispatch():
    from . import dispatch  # imports triton: deferred so CPU-only processes never need it
    return dispatch


def _int8_wo(x, qweight, scales, bias):
    return _dispatch().linear("int8_wo", x, qweight, scales, bias)


def _int4_wo(x, qweight, scales_zeros, bias, group_size):
    return _dispatch().linear("int4_wo", x, qweight, scales_zeros, bias, group_size)


def _int4_mma(x, qweight, scales_zeros, bias, group_size):
    return _dispatch().linear("int4_mma", x, qweight, scales_zeros, bias, group_size)


def _int8_dyn(x, qweight, w_scales, bias):
    return _dispatch().linear("int8_dyn", x, qweight, w_scales, bias)


def _fp8_dyn(x, qweight, w_scales, bias, per_row):
    return _dispatch().linear("fp8_dyn_row" if per_row else "fp8_dyn_tensor", x, qweight, w_scales, bias)


def _fp8_wo(x, qweight, w_scales, bias):
    return _dispatch().linear("fp8_wo", x, qweight, w_scales, bias)


def _int8_dyn_pre(xq, x_scales, qweight, w_scales, bias, out_dtype):
    return _dispatch().linear_prequant("int8_dyn", xq, x_scales, qweight, w_scales, bias, out_dtype)


def _fp8_dyn_pre(xq, x_scales, qweight, w_scales, bias, out_dtype):
    return _dispatch().linear_prequant("fp8_dyn_row", xq, x_scales, qweight, w_scales, bias, out_dtype)


def _swiglu_quantize(gate, up, fp8):
    from .act_quant import quantize_swiglu
    I = gate.shape[-1]
    g2, u2 = gate.reshape(-1, I), up.reshape(-1, I)
    if g2.shape[0] == 0:
        return ops.cpu.swiglu_quantize(gate, up, fp8)  # empty: no launch
    q, s = quantize_swiglu(g2, u2, fp8)
    return q.reshape(gate.shape), s.reshape(*gate.shape[:-1], 1)


def _prepare_int4(qweight, scales_zeros, bias, group_size):
    from ..cuda import cutlass  # plain torch: no library build, no triton import
    if isinstance(qweight, torch.Tensor) and isinstance(scales_zeros, torch.Tensor):
        cutlass.prepare_int4(qweight, scales_zeros, group_size)


def register() -> bool:
    """Idempotent. Returns False (and registers nothing) when torch has no CUDA support."""
    global _registered
    if _registered:
        return True
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return False
    for op, fn in ((ops.int8_weight_only_linear, _int8_wo), (ops.int4_weight_only_linear, _int4_wo),
                   (ops.int4_mma_weight_only_linear, _int4_mma),
                   (ops.int8_dynamic_linear, _int8_dyn), (ops.float8_dynamic_linear, _fp8_dyn),
                   (ops.float8_weight_only_linear, _fp8_wo),
                   (ops.int8_dynamic_linear_prequant, _int8_dyn_pre),
                   (ops.float8_dynamic_linear_prequant, _fp8_dyn_pre),
                   (ops.swiglu_quantize, _swiglu_quantize)):
        op.register_kernel("cuda")(fn)
    ops.register_prepare("fxquant::int4_weight_only_linear", _prepare_int4)
    ops.register_prepare("fxquant::int4_mma_weight_only_linear", _prepare_int4)
    from .. import attention
    attention.register_cuda()
    _registered = True
    return True
