"""Public entry points besides the backend: compile, quantize_graph, quantize_exported."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .backend import Backend
from .configs import Int8WeightOnly, QuantConfig
from .passes import quantize as qpass
from .passes.constants import GetAttrConstants
from .passes.rewrite import LayerFilter, RewriteContext
from .report import LinearRecord, format_report


def backend(config: QuantConfig | None = None, **options: Any) -> Backend:
    """A backend object for `torch.compile(model, backend=...)`; its `.report` lists every linear."""
    return Backend(config, **options)


_BACKEND_ONLY = ("inductor", "fuse_siblings", "fuse_act_quant", "embed_kernels", "templates", "fold_gqa", "gqa_kernel")


def compile(model: Any, config: QuantConfig | None = None, *, skip: Sequence[str] = (),  # noqa: A001
            filter: LayerFilter | None = None, release_weights: bool = False, verbose: bool = False,  # noqa: A002
            prepacked: Any = None, **torch_compile_kwargs: Any):
    """`torch.compile(model, backend=fxquant.backend(config, ...), **torch_compile_kwargs)`.

    The result has `.fxquant_report` (filled on the first call, when Dynamo compiles).
    `prepacked=fxquant.load(path)` uses saved packed weights instead of quantizing."""
    # the backend's other options (fuse_siblings, templates, ...) by name; the rest is torch.compile's
    mine = {k: torch_compile_kwargs.pop(k) for k in _BACKEND_ONLY if k in torch_compile_kwargs}
    be = Backend(config, skip=skip, filter=filter, release_weights=release_weights, verbose=verbose,
                 prepacked=prepacked, **mine)
    compiled = torch.compile(model, backend=be, **torch_compile_kwargs)
    compiled.fxquant_backend = be
    compiled.fxquant_report = be.report  # the backend fills this list in place when it compiles
    return compiled


def quantize_graph(gm: torch.fx.GraphModule, config: QuantConfig | None = None, *,
                   skip: Sequence[str] = (), filter: LayerFilter | None = None,  # noqa: A002
                   verbose: bool = False) -> torch.fx.GraphModule:
    """Rewrite, in place, every eligible linear of an ATen GraphModule whose weights are
    `get_attr` constants. Returns the module; its `.fxquant_report` lists every linear."""
    config = Int8WeightOnly() if config is None else config
    ctx = RewriteContext(config, GetAttrConstants(gm), skip=skip, layer_filter=filter)
    records = qpass.run(gm.graph, ctx)
    qpass.prepare_kernels(gm.graph)
    _drop_unused_attrs(gm)
    gm.fxquant_report = records
    if verbose:
        print(format_report(records))
    return gm


def _drop_unused_attrs(gm: torch.fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and "." not in name:
            delattr(gm, name)


def records_of(obj: Any) -> list[LinearRecord]:
    return list(getattr(obj, "fxquant_report", []))
