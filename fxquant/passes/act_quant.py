"""Activation-quantization prologue: split each per-token dynamic op into its quantization,
written as ATen ops, and a GEMM op on the quantized activations.

`int8_dynamic_linear(x, ...)` becomes `numerics.quantize_int8_per_token(x)` (abs, amax, divide,
round, clamp, cast) feeding `int8_dynamic_linear_prequant(xq, x_scales, ...)`; likewise fp8 with
per-row scales. Inductor then fuses the quantization into the kernel that produces x (the
RMSNorm / LayerNorm before Q/K/V and gate/up, the SiLU-and-multiply before down): x goes through
memory once, as int8/e4m3, instead of being written in bf16, read, quantized and written again.
Per-tensor fp8 is left whole (its scale needs every row first). Runs after horizontal fusion,
so fused siblings share one quantization.

Where x is a gated MLP's `silu(gate) * up` (patterns/swiglu.py) on a GPU, the quantization is
instead `fxquant.swiglu_quantize(gate, up)`: one kernel that reads each row of gate and up once.
Inductor's fusion of the same work reads the 14336-wide rows of an 8B model twice (a looped
reduction), or spills registers when kept persistent (BENCHMARKS.md S7, S8). The kernel rounds
silu(gate) and the product to the model dtype as eager does; Inductor's fusion keeps float32, so
a few quantized values differ by one step between the two. FXQUANT_SWIGLU_QUANT=0 leaves it to
Inductor.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import fx
from torch._inductor.pattern_matcher import Arg, CallFunction, Match, PatternMatcherPass, register_graph_pattern

from .. import numerics as nq
from ..patterns import swiglu

fxq = torch.ops.fxquant
_PASS = PatternMatcherPass(pass_name="fxquant_act_quant_prologue")


def _int8(x, qweight, w_scales, bias):
    xq, xs = nq.quantize_int8_per_token(x)
    return fxq.int8_dynamic_linear_prequant(xq, xs, qweight, w_scales, bias, x.dtype)


def _fp8_row(x, qweight, w_scales, bias):
    xq, xs = nq.quantize_fp8(x, per_row=True)
    return fxq.float8_dynamic_linear_prequant(xq, xs, qweight, w_scales, bias, x.dtype)


# Devices whose graphs get the SwiGLU kernel (CPU: Inductor's fused C++ is the faster choice).
SWIGLU_DEVICES = ("cuda",)


def _swiglu_here(match: Match) -> bool:
    if os.environ.get("FXQUANT_SWIGLU_QUANT", "1") == "0":
        return False
    sw = swiglu.operands(match.args[0])
    return sw is not None and sw.gate.meta["val"].device.type in SWIGLU_DEVICES


def _prequant_swiglu(fp8: bool, flatten: bool, gate, up, qweight, w_scales, bias):
    xq, xs = fxq.swiglu_quantize(gate, up, fp8)
    if flatten:  # x was silu(gate) * up viewed as [-1, I]
        xq, xs = xq.reshape(-1, xq.shape[-1]), xs.reshape(-1, 1)
    op = fxq.float8_dynamic_linear_prequant if fp8 else fxq.int8_dynamic_linear_prequant
    return op(xq, xs, qweight, w_scales, bias, gate.dtype)


def _replace_swiglu(match: Match, fp8: bool, x, qweight, w_scales, bias):
    sw = swiglu.operands(x)
    match.replace_by_example(functools.partial(_prequant_swiglu, fp8, sw.flatten),
                             [sw.gate, sw.up, qweight, w_scales, bias])


# Registered before the generic splits: the first pattern whose check passes rewrites the node.
@register_graph_pattern(CallFunction(fxq.int8_dynamic_linear.default, Arg(), Arg(), Arg(), Arg()),
                        pass_dict=_PASS, extra_check=_swiglu_here)
def _split_int8_swiglu(match: Match, x, qweight, w_scales, bias):
    _replace_swiglu(match, False, x, qweight, w_scales, bias)


@register_graph_pattern(CallFunction(fxq.float8_dynamic_linear.default, Arg(), Arg(), Arg(), Arg(), True),
                        pass_dict=_PASS, extra_check=_swiglu_here)
def _split_fp8_row_swiglu(match: Match, x, qweight, w_scales, bias):
    _replace_swiglu(match, True, x, qweight, w_scales, bias)


@register_graph_pattern(CallFunction(fxq.int8_dynamic_linear.default, Arg(), Arg(), Arg(), Arg()),
                        pass_dict=_PASS)
def _split_int8(match: Match, x, qweight, w_scales, bias):
    match.replace_by_example(_int8, [x, qweight, w_scales, bias])


@register_graph_pattern(CallFunction(fxq.float8_dynamic_linear.default, Arg(), Arg(), Arg(), Arg(), True),
                        pass_dict=_PASS)
def _split_fp8_row(match: Match, x, qweight, w_scales, bias):
    match.replace_by_example(_fp8_row, [x, qweight, w_scales, bias])


def splits(config) -> bool:
    """Whether this pass rewrites the ops of `config` (per-token dynamic schemes only)."""
    from ..configs import Float8DynamicActivationFloat8Weight, Int8DynamicActivationInt8Weight
    return isinstance(config, Int8DynamicActivationInt8Weight) or (
        isinstance(config, Float8DynamicActivationFloat8Weight) and config.granularity == "row")


# Inductor's Triton code divides float32 approximately (and by a constant as a multiplication by
# its reciprocal) unless this is set; the quantization's x / scale and amax / qmax must round
# as numerics.py does (measured on an H100 without it: 0.015 % of int8 values one step off).
EXACT_DIVISION = "eager_numerics.division_rounding"


def inductor_patches(config) -> dict:
    import torch._inductor.config as inductor_config
    has = hasattr(getattr(inductor_config, "eager_numerics", None), "division_rounding")
    return {EXACT_DIVISION: True} if has and splits(config) else {}


def split_activation_quant(graph: fx.Graph) -> int:
    """Rewrite in place; returns the number of ops split."""
    n = _PASS.apply(graph)
    if n:
        graph.eliminate_dead_code()  # a replaced SwiGLU's silu and mul
    return n
