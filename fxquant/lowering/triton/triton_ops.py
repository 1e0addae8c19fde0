"""The Triton kernels as `torch.library.triton_op` ops, so Inductor and AOTInductor can see them.

The ops in register.py are opaque to torch.compile: Inductor calls their Python launcher,
which picks a kernel (Triton, CUDA C++, CUTLASS, cuBLAS) from M at run time. Here each scheme
(except int4 in the MMA-fragment layout, whose fast kernels are CUDA C++ and CUTLASS only) is also a triton_op, `torch.ops.fxquant.triton_<op>`, with the same schema, whose body launches our
Triton kernels through `wrap_triton`. torch.compile (`embed_kernels=True` in the backend) and
torch.export / AOTInductor (`fxquant.export(..., ops="triton")`) trace that body into the graph,
so the kernels are compiled into Inductor's code and into AOTInductor packages.

The body must not branch on M (a symbolic size when traced: a branch would guard on it, one
recompile per M range). So it launches the kernel of *every* M range of the shipped table, each
with its grid multiplied by a 0/1 factor that is 1 only where M falls in that range: the launches
outside it have an empty grid and do nothing. The ranges merge adjacent table buckets that
choose the same kernel. Only Triton kernels take part: table entries of another kind (CUTLASS,
CUDA C++, cuBLAS through "deq" / "scaled_mm") are replaced by their Triton fallback, else by the
best Triton kernel measured for that point ("triton|" entries of the table, tuned with
`benchmarks/linear.py --tune --triton-only`), else by a default Triton GEMM; so this path is
slower than the run-time dispatcher where those win (BENCHMARKS.md).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import triton
from torch.library import triton_op, wrap_triton

from .. import ops
from . import common as C
from . import dispatch as D
from .act_quant import quantize_activations, quantize_swiglu



TRITON_KINDS = ("gemv", "gemm", "deqgemm")  # the kinds whose kernels are all ours, in Triton


@dataclasses.dataclass(frozen=True)
class MRange:
    """Rows lo < M <= hi (hi None: no upper end) run `cfg` (one of TRITON_KINDS)."""
    lo: int
    hi: int | None
    cfg: D.KernelConfig


def _triton_config(scheme: str, bucket: int, n: int, k: int, group: int, dtype: torch.dtype,
                   device: torch.device) -> D.KernelConfig:
    """The table's Triton choice for M = bucket, made independent of the exact M: a GEMV gets
    BLOCK_M (in .bm) for the bucket's top, a GEMM its split-K count and no TMA."""
    cfg = D.get_config(scheme, bucket, n, k, group, dtype, device, allow_cxx=False, allow_scaled_mm=False,
                       allow_cutlass=False)
    if cfg.kind not in TRITON_KINDS:  # "deq" (the other kinds' fallback): a tuned Triton kernel, if any
        cfg = D.triton_only_config(scheme, bucket, n, k, group, dtype, device) or cfg
    if cfg.kind == "deqgemm" and scheme in D.WEIGHT_ONLY:
        return cfg
    if (cfg.kind not in ("gemv", "gemm") or D._known_bad(scheme, cfg)
            or (cfg.kind == "gemv" and bucket > D.GEMV_MAX_M)):
        cfg = D.default_config(scheme, max(bucket, 17), n, k, group)
        if cfg.kind != "gemm":  # "deq" at large M: the default square tile instead
            cfg = D.KernelConfig("gemm", bm=128, bn=128, bk=64, warps=8, stages=3)
    if cfg.kind == "gemv":
        return dataclasses.replace(cfg, bm=max(1, triton.next_power_of_2(bucket)))
    bk = D._fix_bk(cfg.bk, scheme, group, k, "gemm")
    split = cfg.split_k or D._auto_split(triton.cdiv(bucket, cfg.bm) * triton.cdiv(n, cfg.bn),
                                         triton.cdiv(k, bk), D._device_info(device)[1])
    return dataclasses.replace(cfg, split_k=max(1, min(split, triton.cdiv(k, bk))), tma=False)  # as _run_gemm


@functools.lru_cache(maxsize=None)
def m_ranges(scheme: str, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device
             ) -> tuple[MRange, ...]:
    """The kernel for every M, as contiguous ranges (adjacent buckets with one config merged)."""
    out: list[MRange] = []
    lo = 0
    for b in D.M_BUCKETS:
        cfg = _triton_config(scheme, b, n, k, group, dtype, device)
        if out and out[-1].cfg == cfg:
            out[-1] = MRange(out[-1].lo, b, cfg)
        else:
            out.append(MRange(lo, b, cfg))
        lo = b
    out[-1] = MRange(out[-1].lo, None, out[-1].cfg)  # the largest bucket's kernel beyond it
    return tuple(out)


def in_range(m, r: MRange):
    """1 where r.lo < m <= r.hi, else 0, written with sym_min / sym_max so that a symbolic m
    gives an expression (no guard), evaluated at run time."""
    above = torch.sym_min(torch.sym_max(m - r.lo, 0), 1)
    if r.hi is None:
        return above
    return above * torch.sym_min(torch.sym_max(r.hi + 1 - m, 0), 1)


def _plain(v):
    return v.value if isinstance(v, triton.language.constexpr) else v


class _Traced:
    """wrap_triton(kernel), launched with tl.constexpr values (our mode constants, common.py)
    passed as plain Python values: Inductor writes each constant argument's repr into the code it
    generates, where `constexpr[0]` is a NameError (seen on torch 2.11)."""

    def __init__(self, kernel):
        self.run = wrap_triton(kernel)

    def __getitem__(self, grid):
        launch = self.run[grid]
        return lambda *a, **k: launch(*map(_plain, a), **{n: _plain(v) for n, v in k.items()})


def _check_device(t: torch.Tensor, op: str) -> None:
    if not (t.is_cuda or t.device.type == "meta" or (bool(C.INTERPRETED) and t.device.type == "cpu")):
        raise RuntimeError(f"fxquant.{op}: the Triton ops take CUDA tensors (CPU tensors only under "
                           f"TRITON_INTERPRET=1); got {t.device}. Use torch.ops.fxquant.{op.removeprefix('triton_')}.")


def linear_body(scheme: str, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, group: int = 0, pre=None, out_dtype: torch.dtype | None = None,
                op: str = "") -> torch.Tensor:
    """out[..., N] for `scheme` from our Triton kernels, every M range launched (see above).
    pre = (xq [..., K], scales [..., 1]): activations quantized beforehand (x is then xq)."""
    _check_device(x, op)
    if pre is None:
        ops._check_k(x, qweight.shape[1] * (2 if scheme == "int4_wo" else 1), op)
    else:
        ops._check_prequant(x, pre[1], qweight, out_dtype, op, qweight.dtype)
    if scheme in D._FP8 and x.is_cuda:
        D.check_fp8_supported(x.device)
    K, N = qweight.shape[1] * (2 if scheme == "int4_wo" else 1), qweight.shape[0]  # static, unlike x's
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    dtype = out_dtype or x.dtype
    out = torch.empty((M, N), device=x.device, dtype=dtype)
    if scheme in D.DYNAMIC:
        if pre is None:
            pre = quantize_activations(x2, fp8=scheme != "int8_dyn", per_row=scheme != "fp8_dyn_tensor",
                                       wrap=_Traced)
        else:
            pre = (x2, pre[1].reshape(-1))
    scales = scales if scales.is_contiguous() else scales.contiguous()
    live = [(r, in_range(M, r)) for r in m_ranges(scheme, N, K, group, dtype, x.device)]
    live = [(r, a) for r, a in live if not (type(a) is int and a == 0)]  # concrete M: its range only
    split = [(r.cfg, r.cfg.split_k, a) for r, a in live if r.cfg.kind == "gemm" and r.cfg.split_k > 1]
    buffers = D.splitk_buffers_for(M, N, split, x.device) if split else None  # one pair, for all ranges
    for r, active in live:
        if r.cfg.kind == "gemv":
            D._run_gemv(scheme, x2, qweight, scales, bias, group, r.cfg, out, pre, wrap=_Traced,
                        active=active, block_m=r.cfg.bm)
        elif r.cfg.kind == "deqgemm":
            D._run_deqgemm(scheme, x2, qweight, scales, bias, group, r.cfg, out, wrap=_Traced, active=active)
        else:
            D._run_gemm(scheme, x2, qweight, scales, bias, group, r.cfg, out, pre, wrap=_Traced,
                        active=active, splitk_buffers=buffers)
    return out.reshape(*x.shape[:-1], N)


# ------------------------------------------------------------------------------ the ops
# Same schemas as lowering/ops.py; the body is also each op's fake kernel (torch.library.triton_op).
@triton_op("fxquant::triton_int8_weight_only_linear", mutates_args=())
def triton_int8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                   bias: torch.Tensor | None) -> torch.Tensor:
    return linear_body("int8_wo", x, qweight, scales, bias, op="triton_int8_weight_only_linear")


@triton_op("fxquant::triton_int4_weight_only_linear", mutates_args=())
def triton_int4_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor,
                                   bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    return linear_body("int4_wo", x, qweight, scales_zeros, bias, group_size,
                       op="triton_int4_weight_only_linear")


@triton_op("fxquant::triton_int8_dynamic_linear", mutates_args=())
def triton_int8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    return linear_body("int8_dyn", x, qweight, w_scales, bias, op="triton_int8_dynamic_linear")


@triton_op("fxquant::triton_float8_dynamic_linear", mutates_args=())
def triton_float8_dynamic_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                                 bias: torch.Tensor | None, per_row: bool) -> torch.Tensor:
    return linear_body("fp8_dyn_row" if per_row else "fp8_dyn_tensor", x, qweight, w_scales, bias,
                       op="triton_float8_dynamic_linear")


@triton_op("fxquant::triton_float8_weight_only_linear", mutates_args=())
def triton_float8_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                                     bias: torch.Tensor | None) -> torch.Tensor:
    return linear_body("fp8_wo", x, qweight, w_scales, bias, op="triton_float8_weight_only_linear")


@triton_op("fxquant::triton_int8_dynamic_linear_prequant", mutates_args=())
def triton_int8_dynamic_linear_prequant(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor,
                                        w_scales: torch.Tensor, bias: torch.Tensor | None,
                                        out_dtype: torch.dtype) -> torch.Tensor:
    return linear_body("int8_dyn", xq, qweight, w_scales, bias, pre=(xq, x_scales), out_dtype=out_dtype,
                       op="triton_int8_dynamic_linear_prequant")


@triton_op("fxquant::triton_float8_dynamic_linear_prequant", mutates_args=())
def triton_float8_dynamic_linear_prequant(xq: torch.Tensor, x_scales: torch.Tensor, qweight: torch.Tensor,
                                          w_scales: torch.Tensor, bias: torch.Tensor | None,
                                          out_dtype: torch.dtype) -> torch.Tensor:
    return linear_body("fp8_dyn_row", xq, qweight, w_scales, bias, pre=(xq, x_scales), out_dtype=out_dtype,
                       op="triton_float8_dynamic_linear_prequant")


@triton_op("fxquant::triton_swiglu_quantize", mutates_args=())
def triton_swiglu_quantize(gate: torch.Tensor, up: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(gate, "triton_swiglu_quantize")
    ops._check_swiglu(gate, up)
    I = gate.shape[-1]
    q, s = quantize_swiglu(gate.reshape(-1, I), up.reshape(-1, I), fp8, wrap=_Traced)  # M = 0: empty grid
    return q.reshape(gate.shape), s.reshape(*gate.shape[:-1], 1)


# The ops of lowering/ops.py that have a triton_op here (named "triton_" + theirs).
TWINS = ("int8_weight_only_linear", "int4_weight_only_linear", "int8_dynamic_linear", "float8_dynamic_linear",
         "float8_weight_only_linear", "int8_dynamic_linear_prequant", "float8_dynamic_linear_prequant",
         "swiglu_quantize")


def triton_target(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The triton_op with `op`'s schema (a torch.ops.fxquant.* op), or None."""
    name = op.name().removeprefix("fxquant::")
    if name not in TWINS:
        return None
    return getattr(torch.ops.fxquant, f"triton_{name}").default
