"""The quantization pass: canonicalize -> match -> quantize/pack -> rewrite, on any ATen graph."""
from __future__ import annotations

from torch import fx

from ..report import LinearRecord
from .rewrite import RewriteContext, activate


def run(graph: fx.Graph, ctx: RewriteContext) -> list[LinearRecord]:
    """Rewrite every eligible linear of `graph` in place; returns one record per linear seen."""
    from ..patterns import LINEAR_PATTERNS  # patterns import passes.rewrite: import late

    with activate(ctx):
        LINEAR_PATTERNS.apply(graph)
    graph.eliminate_dead_code()
    if graph.owning_module is not None:
        graph.owning_module.recompile()
    return ctx.ordered_records(graph)


def unused_weights(graph: fx.Graph, ctx: RewriteContext) -> list:
    """Quantized weights whose constant node has no users left (safe to release)."""
    return [t for t, node in ctx.quantized_weights.values() if node.graph is graph and not node.users]
