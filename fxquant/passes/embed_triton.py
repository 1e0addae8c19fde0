"""Lowering for `embed_kernels=True`: each CUDA fxquant op node becomes its Triton kernels,
traced from the op's `torch.library.triton_op` (lowering/triton/triton_ops.py), so Inductor
compiles and launches them itself (and AOTInductor embeds them) instead of calling the op's
Python launcher.

The trace is functionalized, as AOTAutograd's own trace is: each kernel launch becomes a
`triton_kernel_wrapper_functional` node, and Inductor's reinplacing pass turns it back into a
launch on the freshly allocated output.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.functional_tensor import dispatch_functionalize

from .inline_cpu import inline_node


def embed_triton_kernels(graph: fx.Graph, fake_mode) -> int:
    """Replace every fxquant op node with a triton_op twin (the linears, swiglu_quantize) whose
    first input is a CUDA tensor. Returns how many."""
    from torch._inductor.decomposition import select_decomp_table

    from ..lowering.triton.triton_ops import triton_target
    # Inductor's own decompositions: the graph has been decomposed already, and Inductor refuses
    # an op it decomposes but does not lower (aten.zeros, from a split-K counter buffer).
    decomps = select_decomp_table()
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        target = triton_target(node.target)
        x = node.args[0] if target is not None else None
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if target is None or val is None or not val.is_cuda:
            continue
        if inline_node(graph, node, target, fake_mode, decomps, wrap=dispatch_functionalize):
            count += 1
    return count
