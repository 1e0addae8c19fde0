"""Grouped-query attention without copying the K/V cache (backend option `fold_gqa`).

HF's Llama (and gpt-fast) repeat each of Hkv key/value heads G times before
`scaled_dot_product_attention` whenever a mask is passed, which a static KV cache always does.
That is a copy of the whole cache, G times over, in every layer at every step: at batch 32 with
a 384-position cache it is about 0.2 GB written and read again per layer of a Llama-3-8B shape.

This pass gives the attention the cache itself. With `kernel=True` (what the backend passes by
default: option gqa_kernel) the call becomes fxquant::gqa_attention(q, k_cache, v_cache, mask,
scale) at any query length: its CUDA kernels read each K/V head once for the G query heads that
share it, and at prefill skip the key tiles the mask allows nothing in (lowering/attention.py).
Otherwise (this function's default), for few query rows (decode; speculative verification when
its length is a number in the graph), it folds the G query heads that share a K/V head into the
query-length dim of SDPA:

    q [B, Hkv*G, Lq, D] -> [B, Hkv, G*Lq, D]     (row g*Lq + i is query head kv*G + g, position i)
    mask [Bm, 1 or Hkv*G, Lq, Lk] -> [Bm, 1 or Hkv, G*Lq, Lk] (the same rows)
    out = sdpa(q, k, v, mask)                     (k, v: the cache itself, [B, Hkv, Lk, D])
    out [B, Hkv, G*Lq, D] -> [B, Hkv*G, Lq, D]

Each output row is the same softmax over the same keys as before; only which kernel tile it sits
in changes. It runs on the Dynamo graph, before any lowering, so SDPA still picks its backend
(and pads masks) for the folded shapes itself. Left alone: is_causal (its diagonal would move),
dropout, enable_gqa, masks of other ranks or that broadcast over query rows, a K/V cache written
between the repeat and the attention, head counts that are symbols in the graph, and by the SDPA
fold more than MAX_QUERY_ROWS query positions (a prefill's mask copy would cost about what the K/V
copy does). A query length that is a symbol in the graph (under Dynamo's automatic dynamic shapes
a second query length > 1 makes it one, and that graph also serves long prefills) gets the op,
which decides per call, or no rewrite without it.

A scale that is a symbol in the graph is left to the SDPA fold. The SDPA fold (not the op) also
leaves alone a static batch with fewer than MIN_KV_HEADS_IN_BATCH K/V heads in all (B * Hkv).
Folded, each (batch, K/V head) is one query tile that walks the whole cache, and that kernel's time
hardly depends on the batch; unfolded, copy + attention grow with it. On an H100 with 8 layers of
a Llama-3-8B shape and a 2304-position cache (BENCHMARKS.md S18), attention per step took 0.40 /
0.42 ms folded at batch 1 / 8, against 0.27 / 1.94 ms unfolded; at batch 32 with 384 positions
folding saved 1.1 ms. So batch 1 (8 K/V heads) stays unfolded and batch 2 and up fold. A symbolic
batch (Dynamo's automatic dynamic batch; batch 1 then keeps its own static graph) is folded
whatever sizes it later serves: a model with fewer K/V heads (e.g. 2) folds a static batch of 8
but also the dynamic graph's batches 2-7. Measured only for 8 K/V heads.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..patterns.repeat_kv import example_value as _val
from ..patterns.repeat_kv import match_repeat_kv, same_size, static_int

MAX_QUERY_ROWS = 64
MIN_KV_HEADS_IN_BATCH = 16  # B * Hkv below this (B a number): not folded (see the docstring)
_SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _args(node: Node) -> dict | None:
    if len(node.args) > len(_SDPA_ARGS) or set(node.kwargs) - set(_SDPA_ARGS):
        return None
    a = {**_DEFAULTS, **dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}
    return a if all(k in a for k in ("query", "key", "value")) else None


def _fold(gm: GraphModule, node: Node, kernel: bool) -> bool:
    a = _args(node)
    if a is None or a["dropout_p"] != 0.0 or a["is_causal"] is not False or a["enable_gqa"] is not False:
        return False
    k, v = match_repeat_kv(a["key"]), match_repeat_kv(a["value"])
    if k is None or v is None or k[1] != v[1]:
        return False
    groups = k[1]
    q, mask = _val(a["query"]), a["attn_mask"]
    if q is None or q.dim() != 4:
        return False
    batch, heads, rows = (static_int(d) for d in q.shape[:3])
    kernel = kernel and not isinstance(a["scale"], Node)  # the op takes a number
    if heads is None or heads % groups or (not kernel and rows is not None and rows > MAX_QUERY_ROWS):
        return False
    if rows is None and not kernel:  # a symbolic query length: only the op, which picks its path per call
        return False
    hkv = heads // groups
    if not kernel and batch is not None and batch * hkv < MIN_KV_HEADS_IN_BATCH:
        return False
    m = _val(mask) if isinstance(mask, Node) else None
    if mask is not None:
        if m is None or m.dim() != 4 or not same_size(m.shape[2], q.shape[2]) or static_int(m.shape[1]) not in (1, heads):
            return False  # a float scalar mask, another rank, or one that broadcasts over queries
    if _written_between(gm.graph, [a["key"], a["value"]], node):
        return False  # the repeat copied K/V before a write that the cache itself would now show
    g = gm.graph
    if kernel:  # fxquant::gqa_attention on the cache itself (lowering/attention.py)
        with g.inserting_before(node):
            out = g.call_function(torch.ops.fxquant.gqa_attention.default,
                                  (a["query"], k[0], v[0], mask, a["scale"]))
        out.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack")
                         if key in node.meta})
        node.replace_all_uses_with(out)
        _erase_unused(g, [node, a["key"], a["value"]])
        return True
    with g.inserting_before(node):
        qf = g.call_method("flatten", (g.call_method("unflatten", (a["query"], 1, (hkv, groups))), 2, 3))
        if mask is None:
            mf = None
        elif static_int(m.shape[1]) == 1:  # one mask row per position, shared by every head: repeat it per group
            mf = g.call_method("flatten", (g.call_method("expand", (
                g.call_method("unsqueeze", (mask, 2)), -1, -1, groups, -1, -1)), 2, 3))
        else:
            mf = g.call_method("flatten", (g.call_method("unflatten", (mask, 1, (hkv, groups))), 2, 3))
        out = g.call_function(node.target, (qf, k[0], v[0]),
                              {"attn_mask": mf, "dropout_p": 0.0, "is_causal": False, "scale": a["scale"]})
        unfolded = g.call_method("flatten", (g.call_method("unflatten", (out, 2, (groups, rows))), 1, 2))
    for new in (qf, out, unfolded):  # where they came from, for profiles and error messages
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack")
                         if key in node.meta})
    node.replace_all_uses_with(unfolded)
    _erase_unused(g, [node, a["key"], a["value"]])  # and what only fed them
    return True


def _written_between(g: torch.fx.Graph, repeats: list[Node], sdpa: Node) -> bool:
    """Whether any node from the first node of the repeats' chains up to `sdpa` may write a tensor
    in place (an in-place method or op, setitem, or anything FX calls impure)."""
    chain, stack = set(), list(repeats)
    while stack:  # the repeat nodes and the view steps under them (not their sources)
        n = stack.pop()
        if n in chain or n.op not in ("call_function", "call_method"):
            continue
        chain.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(g.nodes)}
    start = min(order[n] for n in chain)
    for n in list(g.nodes)[start:order[sdpa]]:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op in ("call_function", "call_method") and (
                name.endswith("_") and not name.startswith("_") or n.target is operator.setitem or n.is_impure()):
            return True
    return False


def _erase_unused(g: torch.fx.Graph, nodes: list[Node]) -> None:
    """Erase `nodes` and then their inputs, while each is unused and a pure view or copy step."""
    stack, erased = list(nodes), set()
    while stack:
        n = stack.pop()
        if n in erased or n.op not in ("call_function", "call_method") or n.users:
            continue
        if n.op == "call_method" and n.target not in ("reshape", "expand", "unsqueeze", "repeat_interleave"):
            continue
        if n.op == "call_function" and n.target not in (*_SDPA, torch.reshape, torch.unsqueeze,
                                                         torch.repeat_interleave, operator.getitem):
            continue
        inputs = list(n.all_input_nodes)
        g.erase_node(n)
        erased.add(n)
        stack.extend(inputs)


def fold_gqa_attention(gm: GraphModule, kernel: bool = False) -> int:
    """Fold every eligible grouped-query `scaled_dot_product_attention` of a Dynamo graph in place
    (see the module docstring); with `kernel`, replace it by fxquant::gqa_attention instead, at
    any batch. Returns how many were rewritten."""
    import fxquant.lowering  # noqa: F401  (registers torch.ops.fxquant.gqa_attention)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SDPA and _fold(gm, node, kernel):
            folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded
