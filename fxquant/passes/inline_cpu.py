"""Lowering for CPU float32 graphs: replace each fxquant op node by its plain-ATen decomposition
(lowering/decompose.py) so Inductor fuses unpack + dequantize into one loop before its GEMM.

ATen has no fast float32 weight-only kernel on CPU (`_weight_int8pack_mm` measured 3-60x
slower than F.linear in float32), and the op's eager dequantize runs several kernels per call.
bf16/fp16 graphs keep the op, whose small-M path uses ATen's int8 kernel. The packed weights
stay constants: nothing here is folded back into float weights.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

from ..lowering.decompose import fxquant_decompositions


def inline_cpu_float32(graph: fx.Graph, fake_mode) -> int:
    """Inline decompositions of fxquant nodes whose input is a float32 CPU tensor. Returns how many."""
    decomps = fxquant_decompositions()
    count = 0
    for node in list(graph.nodes):
        fn = decomps.get(node.target) if node.op == "call_function" else None
        x = node.args[0] if fn is not None else None
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if fn is None or val is None or val.device.type != "cpu" or val.dtype != torch.float32:
            continue
        if inline_node(graph, node, fn, fake_mode, select_decomp_table()):
            count += 1
    return count


def inline_node(graph: fx.Graph, node: fx.Node, fn, fake_mode, decomposition_table=None,
                wrap=lambda trace: trace) -> bool:
    """Replace `node` by the graph of `fn` (called with node's args) traced on its args' fake
    values, with symbolic shapes where the graph has them. wrap(trace) may wrap the traced
    callable (e.g. to functionalize it). False (nothing changed) where an arg has no fake value."""
    if any(isinstance(a, fx.Node) and "val" not in a.meta for a in node.args):
        return False
    tensor_pos = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    consts = list(node.args)

    def call(*tensors):
        args = list(consts)
        for i, t in zip(tensor_pos, tensors):
            args[i] = t
        return fn(*args)

    with fake_mode:
        sub = make_fx(wrap(call), decomposition_table=decomposition_table,
                      tracing_mode="symbolic" if fake_mode.shape_env else "real")(
            *[node.args[i].meta["val"] for i in tensor_pos])
    with graph.inserting_before(node):
        val_map = {ph: node.args[i] for ph, i in zip(sub.graph.find_nodes(op="placeholder"), tensor_pos)}
        out = graph.graph_copy(sub.graph, val_map)
    if isinstance(out, (tuple, list)):  # a multi-output op: its users are getitem nodes
        for user in list(node.users):
            user.replace_all_uses_with(out[user.args[1]])
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True
