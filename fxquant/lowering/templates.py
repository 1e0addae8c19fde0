"""fxquant's GEMM ops as an Inductor Triton template (backend option `templates=True`).

Lowered this way, a quantized linear becomes one of Inductor's template kernels, so Inductor
fuses the pointwise work after it (activation, residual add, casts) into the GEMM's epilogue
instead of running it as a separate kernel. The template's main loop and scaling are the same
`@triton.jit` functions as fxquant's own Triton GEMM (`gemm_tiles`, `scale_acc` in
triton/gemm.py), imported by the generated kernel, not a second copy.

The template is one candidate among two or more. Inductor benchmarks them while it compiles: the
fxquant op itself (the dispatcher: C++, CUTLASS, cuBLAS or Triton per M) and the template with
its tile configs (the shipped table's Triton config for this shape and M, plus a few fixed ones;
more under max-autotune, where Inductor also benchmarks fused against unfused epilogues).
Where M is not a number at compile time (a dynamic batch or sequence length), or is below
TEMPLATE_MIN_M, or the op's inputs are not what the template reads, the op stays as it is
(decode-sized M belongs to the C++ GEMV kernels, which a tile GEMM cannot match).
"""
from __future__ import annotations

import contextlib
import hashlib
import functools
import warnings
from pathlib import Path
from typing import Any, Iterator

import sympy
import torch

from .triton import common as C

TEMPLATE_MIN_M = 64
_CPU_TRITON_FOR_TESTS = False  # tests/test_templates.py: lower for the CPU device's Triton backend too

# op name -> (scheme, weight kind, activation-scale mode, is it a prequant op)
_OPS = {
    "int8_weight_only_linear": ("int8_wo", C.WK_INT8, C.SC_NONE, False),
    "int4_weight_only_linear": ("int4_wo", C.WK_INT4, C.SC_NONE, False),
    "float8_weight_only_linear": ("fp8_wo", C.WK_FP8, C.SC_NONE, False),
    "int8_dynamic_linear_prequant": ("int8_dyn", C.WK_INT8_MMA, C.SC_ROW, True),
    "float8_dynamic_linear_prequant": ("fp8_dyn_row", C.WK_FP8_MMA, C.SC_ROW, True),
}

# Text before def_kernel is copied to the top of the generated kernel's source: the shared bodies.
_SOURCE = r"""
from fxquant.lowering.triton.gemm import gemm_tiles, scale_acc, tile_of
{{def_kernel(%ARGS%)}}
    M = {{size("X", 0)}}
    N = {{size("W", 0)}}
    K = {{size("X", 1)}}
    if M * N == 0:
        return
    stride_xm = {{stride("X", 0)}}
    pid_m, pid_n, offs_m, offs_n, rm, rn = tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = gemm_tiles(X, W, S, None, None, rm, rn, pid_m, pid_n, 0, 1, N, K, stride_xm, 1, WKIND, GROUP,
                     False, False, True, BLOCK_M, BLOCK_N, BLOCK_K, FP8_ACC, False)
    out = scale_acc(acc, %XS%, S, rm[:, None], rn[None, :], XS_MODE, WS_MODE)
%BIAS%
    idx_m = offs_m[:, None]
    idx_n = offs_n[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "out", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages); BLOCK_K doubles for 8-bit x (one byte each)
_FIXED = [(128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)]
_AUTOTUNE = [(128, 256, 64, 8, 8, 3), (256, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4), (128, 128, 32, 8, 4, 4),
             (64, 256, 64, 8, 8, 3)]


@functools.lru_cache(maxsize=None)
def _template(prequant: bool, has_bias: bool):
    """One template per argument list: x (8-bit with its scales XS, or float), W, S, bias B."""
    from torch._inductor.kernel.mm_common import mm_grid
    from torch._inductor.select_algorithm import TritonTemplate
    names = ["X"] + (["XS"] if prequant else []) + ["W", "S"] + (["B"] if has_bias else [])
    # Inductor keys its caches on the template's text; the body lives in gemm.py, so name its hash
    from .triton import gemm
    body = hashlib.sha256(Path(gemm.__file__).read_bytes()).hexdigest()[:16]
    source = (f"# gemm.py {body}\n" + _SOURCE.replace("%ARGS%", ", ".join(f'"{a}"' for a in names))
              .replace("%XS%", "XS" if prequant else "S")
              .replace("%BIAS%", "    out = out + tl.load(B + rn[None, :]).to(tl.float32)" if has_bias else ""))
    return TritonTemplate(name=f"fxquant_gemm{'_xs' if prequant else ''}{'_bias' if has_bias else ''}",
                          grid=mm_grid, source=source)


@functools.lru_cache(maxsize=None)
def _extern(name: str):
    from torch._inductor.select_algorithm import ExternKernelChoice
    op = getattr(torch.ops.fxquant, name).default
    # the fallback-kernel form: the op as Inductor would have called it without this lowering
    return ExternKernelChoice(op, name=f"fxquant_{name}", has_out_variant=False, op_overload=op,
                              use_fallback_kernel=True)


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    warnings.warn(msg, stacklevel=2)


@functools.lru_cache(maxsize=None)
def _graph_timing() -> dict[str, bool]:
    """Time the op's choice in a CUDA graph where this torch's selector can: outside one, fxquant's
    Python dispatch is on the clock and the template wins where it is slower (BENCHMARKS.md S17)."""
    import inspect

    from torch._inductor.select_algorithm import AlgorithmSelectorCache
    ok = "benchmark_with_cudagraphs" in inspect.signature(AlgorithmSelectorCache.__call__).parameters
    return {"benchmark_with_cudagraphs": True} if ok else {}


def _static_int(v) -> int | None:
    v = sympy.sympify(v)
    return int(v) if v.is_Integer else None


def _tiles(scheme: str, m: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device,
           eight_bit_x: bool, autotune: bool) -> list[tuple[int, int, int, int, int, int]]:
    """Tile configs to try: the shipped table's Triton GEMM for this shape and M (when it has one that
    is not swapped), then the fixed ones (more under max-autotune). int4: BLOCK_K fits the group."""
    from .triton import dispatch as D
    out = []
    cfg = D.get_config(scheme, m, n, k, group, dtype, device, allow_cxx=False, allow_scaled_mm=False,
                       allow_cutlass=False)
    if cfg.kind == "gemm" and not cfg.swap:
        out.append((cfg.bm, cfg.bn, cfg.bk, cfg.group_m, cfg.warps, cfg.stages))
    for bm, bn, bk, gm, w, s in _FIXED + (_AUTOTUNE if autotune else []):
        out.append((bm, bn, bk * 2 if eight_bit_x else bk, gm, w, s))
    ok = []
    for t in out:
        bk = t[2]
        if scheme == "int4_wo" and not (bk <= group and group % bk == 0 or bk % group == 0):
            continue
        if t not in ok:
            ok.append(t)
    return ok


def _lowering(name: str, always: bool, fallback_lowering):
    scheme, wkind, xs_mode, prequant = _OPS[name]
    op = getattr(torch.ops.fxquant, name).default

    def lower(*args, **kwargs):
        from torch._inductor import config as inductor_config
        from torch._inductor import ir
        from torch._inductor.lowering import lowerings
        from torch._inductor.select_algorithm import autotune_select_algorithm, realize_inputs
        from torch._inductor.utils import sympy_product

        aten = torch.ops.aten
        bound = op._schema  # positional and keyword arguments by schema name
        vals = {a.name: (args[i] if i < len(args) else kwargs.get(a.name, a.default_value))
                for i, a in enumerate(bound.arguments)}

        def fallback():  # what Inductor does with the op without this lowering
            return fallback_lowering(*args, **kwargs)

        x = vals["xq" if prequant else "x"]
        qweight = vals["qweight"]
        scales = vals["w_scales" if "w_scales" in vals else ("scales_zeros" if scheme == "int4_wo" else "scales")]
        bias = vals.get("bias")
        x_scales = vals.get("x_scales")
        group = int(vals.get("group_size") or 0)
        out_dtype = vals["out_dtype"] if prequant else x.get_dtype()
        device = x.get_device()
        on_gpu = device is not None and (device.type == "cuda" or (
            _CPU_TRITON_FOR_TESTS and device.type == "cpu" and inductor_config.cpu_backend == "triton"))
        if not on_gpu or out_dtype not in (torch.bfloat16, torch.float16):
            return fallback()
        if not prequant and x.get_dtype() != out_dtype:
            return fallback()
        *lead, k = x.get_size()
        n, m = qweight.get_size()[0], sympy_product(lead)
        m_int, n_int, k_int = _static_int(m), _static_int(n), _static_int(k)
        if m_int is None or n_int is None or k_int is None or m_int < TEMPLATE_MIN_M:
            return fallback()
        ws_mode = C.SC_NONE if scheme == "int4_wo" else (C.SC_ROW if _static_int(
            sympy_product(scales.get_size())) == n_int else C.SC_TENSOR)
        # The op's positional order, for every choice (Inductor benchmarks them all on one input list).
        inputs = [lowerings[aten.view.default](x, [m_int, k_int])]
        if prequant:
            inputs.append(lowerings[aten.view.default](x_scales, [m_int, 1]))
        inputs += [qweight, scales] + ([bias] if bias is not None else [])
        inputs = [ir.ExternKernel.require_contiguous(t) for t in realize_inputs(*inputs)]
        layout = ir.FixedLayout(device, out_dtype, [m_int, n_int])
        autotune = bool(inductor_config.max_autotune or inductor_config.max_autotune_gemm)

        choices: list[Any] = []
        extra: dict[str, Any] = {} if bias is not None else {"bias": None}
        if scheme == "int4_wo":
            extra["group_size"] = group
        if prequant:
            extra["out_dtype"] = out_dtype
        if not always:
            _extern(name).maybe_append_choice(choices, input_nodes=tuple(inputs), layout=layout, **extra)
        from .triton.dispatch import _fp8_acc
        for bm, bn, bk, gm, warps, stages in _tiles(scheme, m_int, n_int, k_int, group, out_dtype, device,
                                                    prequant, autotune):
            err = _template(prequant, bias is not None).maybe_append_choice(
                choices, input_nodes=tuple(inputs), layout=layout, num_stages=stages, num_warps=warps,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, WKIND=int(wkind.value),
                GROUP=group, XS_MODE=int(xs_mode.value), WS_MODE=int(ws_mode.value),
                FP8_ACC=_fp8_acc(bk) if wkind == C.WK_FP8_MMA else 0)
            if err is not None:
                _warn_once(f"fxquant: a {name} template config did not generate ({err})")
            elif always:
                break  # the first config that generates
        if not choices:
            return fallback()
        node = autotune_select_algorithm(f"fxquant_{name}", choices, inputs, layout, **_graph_timing())
        node = node[0] if isinstance(node, tuple) else node  # (node, choice) from torch 2.12 on
        return lowerings[aten.view.default](node, [*lead, n_int])

    return lower


def _fallback(op):
    """Inductor's own lowering of `op` (an opaque call), made as its implicit fallback would be,
    layout constraint included, if no compile has made it yet; it stays registered afterwards."""
    from torch._inductor import lowering as L
    if op not in L.lowerings:
        try:
            constraint = L.tag_to_layout_constraint(L.get_layout_constraint_tag(op, with_default=True))
        except (AttributeError, TypeError):  # a torch without these helpers
            constraint = None
        L.make_fallback(op, layout_constraint=constraint, warn=False)
    return L.lowerings[op]


@contextlib.contextmanager
def template_lowerings(always: bool = False) -> Iterator[None]:
    """Inside: Inductor lowers fxquant's GEMM ops with the template (see the module docstring).
    always: the template's first tile config only, no benchmark against the op (nothing runs
    while compiling). Outside, the lowerings table is as it was."""
    from torch._inductor import lowering as L
    from torch._inductor.lowering import register_lowering

    saved = {}
    for name in _OPS:
        op = getattr(torch.ops.fxquant, name).default
        fallback = _fallback(op)
        saved[op] = L.lowerings.get(op)
        register_lowering(op, type_promotion_kind=None)(_lowering(name, always, fallback))
    try:
        yield
    finally:
        L.lowerings.update(saved)  # (each op has Inductor's fallback by now: _fallback)
