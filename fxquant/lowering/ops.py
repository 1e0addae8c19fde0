"""The fxquant op boundary: one `torch.ops.fxquant.*` op per scheme.

Every op has the form `op(x, <packed weight tensors>, bias, <static args>) -> out` with
x [..., K] in bf16/fp16/fp32, out [..., N] in x's dtype; N is always qweight.shape[0].
The fake kernels work with symbolic M. Kernels per device are registered beside them:
CPU here (lowering/cpu.py), CUDA in lowering/triton/ (when triton and a GPU are present).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import cpu

LIB = "fxquant"


def _out_like(x: Tensor, qweight: Tensor) -> Tensor:
    torch._check(x.dim() >= 1, lambda: "fxquant linear: x must have at least one dim")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _check_k(x: Tensor, k: int, op: str) -> None:
    torch._check(x.shape[-1] == k, lambda: f"fxquant.{op}: x has K={x.shape[-1]} but the weight has K={k}")
    torch._check(x.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"fxquant.{op}: x must be float32/float16/bfloat16, got {x.dtype}")


@torch.library.custom_op(f"{LIB}::int8_weight_only_linear", mutates_args=(), device_types="cpu")
def int8_weight_only_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    _check_k(x, qweight.shape[1], "int8_weight_only_linear")
    return cpu.int8_weight_only_linear(x, qweight, scales, bias)


@int8_weight_only_linear.register_fake
def _(x, qweight, scales, bias):
    _check_k(x, qweight.shape[1], "int8_weight_only_linear")
    return _out_like(x, qweight)


@torch.library.custom_op(f"{LIB}::int4_weight_only_linear", mutates_args=(), device_types="cpu")
def int4_weight_only_linear(x: Tensor, qweight: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                            group_size: int) -> Tensor:
    _check_k(x, qweight.shape[1] * 2, "int4_weight_only_linear")
    return cpu.int4_weight_only_linear(x, qweight, scales_zeros, bias, group_size)


@int4_weight_only_linear.register_fake
def _(x, qweight, scales_zeros, bias, group_size):
    _check_k(x, qweight.shape[1] * 2, "int4_weight_only_linear")
    return _out_like(x, qweight)


@torch.library.custom_op(f"{LIB}::int4_mma_weight_only_linear", mutates_args=(), device_types="cpu")
def int4_mma_weight_only_linear(x: Tensor, qweight: Tensor, scales_zeros: Tensor, bias: Tensor | None,
                                group_size: int) -> Tensor:
    """int4_weight_only_linear on a weight in the MMA-fragment layout (numerics.pack_int4_mma)."""
    _check_int4_mma(x, qweight, group_size)
    return cpu.int4_weight_only_linear(x, qweight, scales_zeros, bias, group_size, layout="mma")


@int4_mma_weight_only_linear.register_fake
def _(x, qweight, scales_zeros, bias, group_size):
    _check_int4_mma(x, qweight, group_size)
    return _out_like(x, qweight)


def _check_int4_mma(x: Tensor, qweight: Tensor, group_size: int) -> None:
    _check_k(x, qweight.shape[1] * 2, "int4_mma_weight_only_linear")
    torch._check(qweight.shape[0] % 16 == 0 and qweight.shape[1] % 32 == 0 and group_size >= 64
                 and group_size & (group_size - 1) == 0,
                 lambda: f"fxquant.int4_mma_weight_only_linear: the MMA-fragment layout needs N % 16 == 0, "
                         f"K % 64 == 0 and group_size % 64 == 0 (a power of two), got N={qweight.shape[0]}, "
                         f"K={qweight.shape[1] * 2}, group_size={group_size}")


@torch.library.custom_op(f"{LIB}::int8_dynamic_linear", mutates_args=(), device_types="cpu")
def int8_dynamic_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None) -> Tensor:
    _check_k(x, qweight.shape[1], "int8_dynamic_linear")
    return cpu.int8_dynamic_linear(x, qweight, w_scales, bias)


@int8_dynamic_linear.register_fake
def _(x, qweight, w_scales, bias):
    _check_k(x, qweight.shape[1], "int8_dynamic_linear")
    return _out_like(x, qweight)


@torch.library.custom_op(f"{LIB}::float8_dynamic_linear", mutates_args=(), device_types="cpu")
def float8_dynamic_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None,
                          per_row: bool) -> Tensor:
    _check_k(x, qweight.shape[1], "float8_dynamic_linear")
    return cpu.float8_dynamic_linear(x, qweight, w_scales, bias, per_row)


@float8_dynamic_linear.register_fake
def _(x, qweight, w_scales, bias, per_row):
    _check_k(x, qweight.shape[1], "float8_dynamic_linear")
    return _out_like(x, qweight)


@torch.library.custom_op(f"{LIB}::float8_weight_only_linear", mutates_args=(), device_types="cpu")
def float8_weight_only_linear(x: Tensor, qweight: Tensor, w_scales: Tensor, bias: Tensor | None) -> Tensor:
    _check_k(x, qweight.shape[1], "float8_weight_only_linear")
    return cpu.float8_weight_only_linear(x, qweight, w_scales, bias)


@float8_weight_only_linear.register_fake
def _(x, qweight, w_scales, bias):
    _check_k(x, qweight.shape[1], "float8_weight_only_linear")
    return _out_like(x, qweight)


# Dynamic-activation ops on activations quantized beforehand (passes/act_quant.py writes the
# per-token quantization as ATen ops so Inductor fuses it into the kernel producing x).
# xq [..., K] int8 / e4m3, x_scales [..., 1] float32 (per token), out [..., N] in out_dtype.
def _check_prequant(xq: Tensor, x_scales: Tensor, qweight: Tensor, out_dtype: torch.dtype, op: str,
                    q_dtype: torch.dtype) -> None:
    torch._check(xq.dim() >= 1, lambda: f"fxquant.{op}: xq must have at least one dim")
    torch._check(xq.dtype == q_dtype and qweight.dtype == q_dtype,
                 lambda: f"fxquant.{op}: xq and the weight must be {q_dtype}, got {xq.dtype} and {qweight.dtype}")
    torch._check(xq.shape[-1] == qweight.shape[1],
                 lambda: f"fxquant.{op}: xq has K={xq.shape[-1]} but the weight has K={qweight.shape[1]}")
    torch._check(x_scales.dtype == torch.float32 and x_scales.dim() == xq.dim() and x_scales.shape[-1] == 1,
                 lambda: f"fxquant.{op}: x_scales must be float32 [..., 1] (one scale per token), got "
                         f"{x_scales.dtype} {tuple(x_scales.shape)}")
    torch._check(x_scales.shape[:-1] == xq.shape[:-1],
                 lambda: f"fxquant.{op}: x_scales {tuple(x_scales.shape)} must have one scale per token of xq "
                         f"{tuple(xq.shape)}")
    torch._check(out_dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"fxquant.{op}: out_dtype must be float32/float16/bfloat16, got {out_dtype}")


@torch.library.custom_op(f"{LIB}::int8_dynamic_linear_prequant", mutates_args=(), device_types="cpu")
def int8_dynamic_linear_prequant(xq: Tensor, x_scales: Tensor, qweight: Tensor, w_scales: Tensor,
                                 bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    _check_prequant(xq, x_scales, qweight, out_dtype, "int8_dynamic_linear_prequant", torch.int8)
    return cpu.int8_dynamic_linear_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype)


@int8_dynamic_linear_prequant.register_fake
def _(xq, x_scales, qweight, w_scales, bias, out_dtype):
    _check_prequant(xq, x_scales, qweight, out_dtype, "int8_dynamic_linear_prequant", torch.int8)
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=out_dtype)


@torch.library.custom_op(f"{LIB}::float8_dynamic_linear_prequant", mutates_args=(), device_types="cpu")
def float8_dynamic_linear_prequant(xq: Tensor, x_scales: Tensor, qweight: Tensor, w_scales: Tensor,
                                   bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    _check_prequant(xq, x_scales, qweight, out_dtype, "float8_dynamic_linear_prequant",
                    torch.float8_e4m3fn)
    return cpu.float8_dynamic_linear_prequant(xq, x_scales, qweight, w_scales, bias, out_dtype)


@float8_dynamic_linear_prequant.register_fake
def _(xq, x_scales, qweight, w_scales, bias, out_dtype):
    _check_prequant(xq, x_scales, qweight, out_dtype, "float8_dynamic_linear_prequant",
                    torch.float8_e4m3fn)
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=out_dtype)


# A gated MLP's activation, quantized per token for the down projection's prequant op
# (passes/act_quant.py): one kernel reads gate and up once and writes int8 / e4m3.
def _check_swiglu(gate: Tensor, up: Tensor) -> None:
    torch._check(gate.dim() >= 1 and gate.shape == up.shape,
                 lambda: f"fxquant.swiglu_quantize: gate {tuple(gate.shape)} and up {tuple(up.shape)} "
                         f"must have the same shape")
    torch._check(gate.dtype == up.dtype and gate.dtype in (torch.float32, torch.float16, torch.bfloat16),
                 lambda: f"fxquant.swiglu_quantize: gate and up must share one float dtype, got "
                         f"{gate.dtype} and {up.dtype}")


@torch.library.custom_op(f"{LIB}::swiglu_quantize", mutates_args=(), device_types="cpu")
def swiglu_quantize(gate: Tensor, up: Tensor, fp8: bool) -> tuple[Tensor, Tensor]:
    """(q, scales) = per-token quantization (int8, or e4m3 if fp8) of silu(gate) * up:
    q [..., I], scales float32 [..., 1]."""
    _check_swiglu(gate, up)
    return cpu.swiglu_quantize(gate, up, fp8)


@swiglu_quantize.register_fake
def _(gate, up, fp8):
    _check_swiglu(gate, up)
    q = gate.new_empty(gate.shape, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    return q, gate.new_empty((*gate.shape[:-1], 1), dtype=torch.float32)


ALL_OPS = (int8_weight_only_linear, int4_weight_only_linear, int4_mma_weight_only_linear, int8_dynamic_linear,
           float8_dynamic_linear, float8_weight_only_linear)
PREQUANT_OPS = (int8_dynamic_linear_prequant, float8_dynamic_linear_prequant)
ACT_OPS = (swiglu_quantize,)

# Device kernels that want something made once per packed weight (the CUTLASS int4 GEMM's scale /
# zero arrays) register a hook here (lowering/triton/register.py); the backend calls
# prepare_args for every fxquant op node of its final graph (after sibling fusion), at compile
# time, outside any CUDA-graph pool.
_PREPARE: dict[str, list] = {}


def register_prepare(op_name: str, fn) -> None:
    """fn(*args): the op's arguments after x (packed tensors, bias, static args), for the op named
    "fxquant::<name>"."""
    if fn not in _PREPARE.setdefault(op_name, []):
        _PREPARE[op_name].append(fn)


def has_prepare(op: torch._ops.OpOverload) -> bool:
    return bool(_PREPARE.get(op.name()))


def prepare_args(op: torch._ops.OpOverload, args) -> None:
    for fn in _PREPARE.get(op.name(), ()):
        fn(*args)
