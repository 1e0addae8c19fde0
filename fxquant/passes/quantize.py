"""The quantization pass: canonicalize -> match -> quantize/pack -> rewrite, on any ATen graph."""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..lowering import ops
from ..report import LinearRecord
from .constants import GetAttrConstants
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


def prepare_kernels(graph: fx.Graph) -> int:
    """Run the device kernels' once-per-weight preparations (ops.register_prepare) on the packed
    constants of every fxquant op node left in `graph`: after sibling fusion, so fused weights are
    prepared and the members they replaced are not. Returns how many distinct nodes' args."""
    gm = graph.owning_module
    if gm is None:
        return 0
    constants = GetAttrConstants(gm)  # the packed weights are get_attr constants in every graph kind
    seen: set = set()
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
                or not ops.has_prepare(target):
            continue
        args = tuple(constants.tensor(a) if isinstance(a, fx.Node) else a for a in node.args[1:])
        key = (target, *(id(a) if isinstance(a, torch.Tensor) else a for a in args))
        if key in seen:
            continue  # a tied weight: the same constants under two nodes
        seen.add(key)
        with unset_fake_temporarily():
            ops.prepare_args(target, args)
    return len(seen)

