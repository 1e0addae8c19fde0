"""One-pass per-token (or per-tensor) dynamic activation quantization, as numerics.py defines it.

int8: scale = max(amax / 127, tiny), q = clamp(rint(x / scale), -127, 127)
fp8 : scale = max(amax / 448, tiny), q = e4m3(clamp(x / scale, -448, 448))
Division is IEEE round-to-nearest (div_rn) and rint is half-to-even, so q matches torch bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents

from .common import INTERPRETED, eager

FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(float32).tiny
# Rows up to this many elements are held in registers (one read of x); longer rows take two passes.
ONE_PASS_MAX_K = 16384


@triton.jit
def rint_f32(v):
    # Round half to even for |v| < 2**22, without libdevice so the interpreter runs it too.
    return (v + 12582912.0) - 12582912.0


# Triton 3.9's interpreter rounds fp32 -> e4m3 wrongly when rounding carries into the next
# binade (-125.36 became -64, not -128); under the interpreter, round on the e4m3 grid first.
@triton.jit
def round_to_e4m3_grid(v):
    """Round-half-even of fp32 v (|v| <= 448) to the nearest e4m3 value, in fp32 arithmetic."""
    a = tl.abs(v)
    e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) & 0xFF, 121)  # subnormals: step 2**-9
    c = ((e + 20) << 23).to(tl.float32, bitcast=True)  # ulp(c) == e4m3's step at |v|
    r = (a + c) - c
    return tl.where(v < 0, -r, r)


@triton.jit
def quantize_values(x, scale, FP8: tl.constexpr):
    """x float32 / scale -> int8 or e4m3 values (as their storage dtype)."""
    v = tl.math.div_rn(x, scale)
    if FP8:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        if INTERPRETED:
            v = round_to_e4m3_grid(v)
        return v.to(tl.float8e4nv)
    else:
        return tl.minimum(tl.maximum(rint_f32(v), -127.0), 127.0).to(tl.int8)


@triton.jit
def act_scale(amax, FP8: tl.constexpr):
    """numerics.py's scale: max(amax / QMAX, tiny), with an IEEE division."""
    if FP8:
        s = tl.math.div_rn(amax, 448.0)
    else:
        s = tl.math.div_rn(amax, 127.0)
    return tl.maximum(s, FP32_TINY)


@triton.jit
def _row_amax(xrow, K, stride_xk, BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        x = tl.load(xrow + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return tl.max(amax, 0)


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, K, stride_xm, stride_xk,
                     FP8: tl.constexpr, MODE: tl.constexpr, ONE_PASS: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One program per row. MODE 0: per-row scale, written to s_ptr[row].
    MODE 1: per-tensor pass 1, atomic max of |x| into amax_ptr[0] (zeroed by the caller).
    MODE 2: per-tensor pass 2, quantize with the scale from amax_ptr[0] (program 0 writes s_ptr[0]).
    PDL (sm_90+): let a kernel launched with programmatic dependent launch start now; it waits
    (griddepcontrol.wait) for this kernel's writes before it reads them."""
    if PDL:  # (per-tensor: both passes trigger; only the GEMM after pass 2 uses it)
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    xrow = x_ptr + row * stride_xm
    qrow = q_ptr + row * K
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(xrow + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), 0)
    else:
        amax = _row_amax(xrow, K, stride_xk, BLOCK_K)
    if MODE == 1:
        tl.atomic_max(amax_ptr, amax)
    else:
        if MODE == 2:
            amax = tl.load(amax_ptr)
        scale = act_scale(amax, FP8)
        if MODE == 0:
            tl.store(s_ptr + row, scale)
        else:
            tl.store(s_ptr, scale, mask=row == 0)
        if ONE_PASS:
            tl.store(qrow + offs, quantize_values(x, scale, FP8), mask=mask)
        else:
            for k0 in range(0, K, BLOCK_K):
                k = k0 + offs
                xk = tl.load(xrow + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
                tl.store(qrow + k, quantize_values(xk, scale, FP8), mask=k < K)


def quantize_activations(x2: torch.Tensor, fp8: bool, per_row: bool = True, pdl: bool = False,
                         wrap=eager) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] float (any strides), M > 0 -> (q [M, K] int8/e4m3 contiguous, scale fp32 [M] or [1]).
    pdl: the next kernel is launched with programmatic dependent launch (sm_90+ only); this
    kernel triggers it early but is itself launched plainly, which the C++ prequant kernel's
    weight reads before its wait rely on (dispatch._run_cxx_dynamic).
    wrap: torch.library.wrap_triton where traced (triton_ops.py)."""
    M, K = x2.shape
    q = torch.empty((M, K), device=x2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    one_pass = K <= ONE_PASS_MAX_K
    block_k = triton.next_power_of_2(K) if one_pass else 4096
    warps = max(1, min(16, block_k // 1024))  # ~8 elements per thread in the one-pass case
    args = (K, x2.stride(0), x2.stride(1))
    meta = dict(FP8=fp8, ONE_PASS=one_pass, BLOCK_K=block_k, PDL=pdl, num_warps=warps)
    if per_row:
        s = torch.empty((M,), device=x2.device, dtype=torch.float32)
        wrap(act_quant_kernel)[(M,)](x2, q, s, s, *args, MODE=0, **meta)
    else:
        s = torch.empty((1,), device=x2.device, dtype=torch.float32)
        amax = torch.zeros((1,), device=x2.device, dtype=torch.float32)
        wrap(act_quant_kernel)[(M,)](x2, q, s, amax, *args, MODE=1, **meta)
        wrap(act_quant_kernel)[(M,)](x2, q, s, amax, *args, MODE=2, **meta)
    return q, s


# --------------------------------------------------------------------------- SwiGLU, then quantize
@triton.jit
def round_to(v, DTYPE: tl.constexpr):
    """float32 v rounded (to nearest even) to DTYPE's precision, kept in float32. Triton 3.9's
    interpreter truncates float32 -> bfloat16, so there the rounding is done on the bits."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def swiglu_values(g, u, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """numerics.swiglu, returned in DTYPE: silu(g) rounded to DTYPE, times u, rounded to DTYPE
    (eager's two roundings). FAST: the hardware's approximate exp and division inside silu (a
    few float32 ulps, which the rounding to DTYPE almost always absorbs); else libdevice's exp
    and an IEEE division, as ATen computes it."""
    g = g.to(tl.float32)
    if FAST:
        s = g / (1.0 + tl.exp(-g))
    else:
        if INTERPRETED:
            e = tl.exp(-g)
        else:
            e = libdevice.exp(-g)
        s = tl.math.div_rn(g, 1.0 + e)
    return round_to(round_to(s, DTYPE) * u.to(tl.float32), DTYPE).to(DTYPE)


@triton.jit
def swiglu_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, I, stride_gm, stride_um,
                        FP8: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr,
                        FAST: tl.constexpr):
    """One program per row: h = swiglu(gate, up), per-row scale from max |h|, q = h / scale.
    ONE_PASS keeps the row's h in registers (in the inputs' dtype; gate and up read once);
    otherwise h is recomputed in a second pass. Rows are contiguous in their last dim."""
    row = tl.program_id(0).to(tl.int64)
    grow = g_ptr + row * stride_gm
    urow = u_ptr + row * stride_um
    qrow = q_ptr + row * I
    offs = tl.arange(0, BLOCK)
    dtype = g_ptr.dtype.element_ty
    if ONE_PASS:
        mask = offs < I
        h = swiglu_values(tl.load(grow + offs, mask=mask, other=0.0),
                          tl.load(urow + offs, mask=mask, other=0.0), dtype, FAST)
        amax = tl.max(tl.abs(h.to(tl.float32)), 0)
    else:
        acc = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, I, BLOCK):
            k = k0 + offs
            hk = swiglu_values(tl.load(grow + k, mask=k < I, other=0.0),
                               tl.load(urow + k, mask=k < I, other=0.0), dtype, FAST)
            acc = tl.maximum(acc, tl.abs(hk.to(tl.float32)))
        amax = tl.max(acc, 0)
    scale = act_scale(amax, FP8)
    tl.store(s_ptr + row, scale)
    if ONE_PASS:
        tl.store(qrow + offs, quantize_values(h.to(tl.float32), scale, FP8), mask=mask)
    else:
        for k0 in range(0, I, BLOCK):
            k = k0 + offs
            hk = swiglu_values(tl.load(grow + k, mask=k < I, other=0.0),
                               tl.load(urow + k, mask=k < I, other=0.0), dtype, FAST)
            tl.store(qrow + k, quantize_values(hk.to(tl.float32), scale, FP8), mask=k < I)


def quantize_swiglu(gate2: torch.Tensor, up2: torch.Tensor, fp8: bool, *, one_pass: bool | None = None,
                    block: int | None = None, warps: int | None = None, fast: bool | None = None,
                    wrap=eager) -> tuple[torch.Tensor, torch.Tensor]:
    """gate2, up2 [M, I] (same dtype; any row stride), M > 0 -> (q [M, I] int8/e4m3 contiguous,
    scale float32 [M]): numerics.quantize_swiglu_per_token in one kernel. The keywords override
    the launch shape (benchmarks/swiglu_quant.py sweeps them).

    Defaults, measured on an H100 at M = 2048, I = 14336 (BENCHMARKS.md S8): one pass with 16 warps,
    fast silu math for bfloat16 inputs (68 us against 134 us with libdevice exp and IEEE division,
    and not one quantized value different in 29M). float16 (8x finer rounding, not measured) and
    float32 keep the precise math. wrap: torch.library.wrap_triton where traced (triton_ops.py)."""
    gate2 = gate2 if gate2.stride(1) == 1 else gate2.contiguous()
    up2 = up2 if up2.stride(1) == 1 else up2.contiguous()
    M, I = gate2.shape
    q = torch.empty((M, I), device=gate2.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    s = torch.empty((M,), device=gate2.device, dtype=torch.float32)
    one_pass = I <= ONE_PASS_MAX_K if one_pass is None else one_pass
    block = block or (triton.next_power_of_2(I) if one_pass else 4096)
    if one_pass and block < I:
        raise ValueError(f"quantize_swiglu: a one-pass block of {block} cannot hold a row of {I}")
    warps = warps or max(1, min(16, block // 1024))
    fast = gate2.dtype == torch.bfloat16 if fast is None else fast
    wrap(swiglu_quant_kernel)[(M,)](gate2, up2, q, s, I, gate2.stride(0), up2.stride(0), FP8=fp8,
                              ONE_PASS=one_pass, BLOCK=block, FAST=fast, num_warps=warps)
    return q, s
