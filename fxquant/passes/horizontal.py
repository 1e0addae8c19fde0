"""Horizontal fusion: sibling fxquant ops that read the same activation (Q/K/V, gate/up) become
one op over weights concatenated along N, followed by a split.

One launch instead of two or three, one activation quantization for the dynamic schemes, and a
larger N for the kernels (K/V projections of GQA models are only 1024 rows). Packing is along N
for every scheme (int4 scales/zeros are [K/gs, N, 2]), so concatenation is exact: each output
column is computed from the same bytes as before. Runs after the quantization rewrite.
"""
from __future__ import annotations

import operator
import weakref
from collections import defaultdict

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..lowering import ops
from .rewrite import RewriteContext, _set_fake_val, drop_when_dead, graph_fake_mode

aten = torch.ops.aten
_OPS = {op._opoverload for op in ops.ALL_OPS}


def fuse_siblings(graph: fx.Graph, ctx: RewriteContext) -> int:
    """Fuse every group of >= 2 fxquant ops with the same input, op and static args whose packed
    weights are constants of this graph. Returns the number of ops removed."""
    owner = {n: key for key, nodes in ctx.graph_nodes.items() for n in nodes}
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _OPS:
            continue
        x, qw, sc, bias, *static = node.args
        if qw not in owner or sc not in owner or owner[qw] != owner[sc]:
            continue
        w = ctx.constants.tensor(qw)
        s = ctx.constants.tensor(sc)
        if w is None or s is None or s.numel() == 1 and w.shape[0] > 1:
            continue  # per-tensor weight scales differ between siblings
        if bias is not None and _const(ctx, bias) is None:
            continue
        groups[(node.target, _source(x), tuple(static), bias is None, w.dtype, w.shape[1:], s.dim())].append(node)

    removed = 0
    for members in groups.values():
        keys = [owner[n.args[1]] for n in members]
        if len(members) < 2 or len(set(keys)) < len(keys):
            continue
        _fuse(graph, ctx, members, keys)
        removed += len(members) - 1
    if removed:
        graph.eliminate_dead_code()
        _drop_unused_constants(graph)
    return removed


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _source(x: object) -> object:
    """Siblings on a 3-D input each flatten it with a view of their own: same base, same shape."""
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target in _VIEWS:
        return (x.args[0], tuple(str(a) for a in x.args[1]))
    return x


def _const(ctx: RewriteContext, node: object) -> torch.Tensor | None:
    return ctx.constants.tensor(node) if isinstance(node, fx.Node) else None


def _fuse(graph: fx.Graph, ctx: RewriteContext, members: list[fx.Node], keys: list[tuple]) -> None:
    first = members[0]
    sizes = [int(ctx.constants.tensor(n.args[1]).shape[0]) for n in members]
    biases = [_const(ctx, n.args[3]) for n in members] if first.args[3] is not None else []
    # Keyed by the members' packed weights and by each bias's identity and version: a bias
    # changed in place must not be served from a stale concatenation.
    fkey = ("fused", *keys, *((id(b), b._version) for b in biases))
    drop = drop_when_dead(ctx.pack_cache, fkey)  # the fused copy goes when any member's tensor dies
    alive = [weakref.ref(ctx.pack_cache[k][0](), drop) for k in keys] + [weakref.ref(b, drop) for b in biases]
    cached = ctx.pack_cache.get(fkey)
    if cached is not None and all(r() is not None for r in cached[0]):
        fused = cached[1]
    else:
        with unset_fake_temporarily(), torch.no_grad():
            w = torch.cat([ctx.constants.tensor(n.args[1]) for n in members], 0)
            scales = [ctx.constants.tensor(n.args[2]) for n in members]
            s = torch.cat(scales, 1 if scales[0].dim() == 3 else 0)  # int4 [K/gs, N, 2]: N is dim 1
            b = torch.cat([t.to(w.device) for t in biases]) if biases else None
            fused = (w, s, b)
            ctx.pack_cache[fkey] = (alive, fused)
            _share_storage(ctx, keys, w, s, sizes)
    fake = graph_fake_mode(graph)
    consts = []
    for t, hint in zip(fused, ("w", "s", "b")):
        if t is None:
            consts.append(None)
            continue
        node = ctx.constants.add(graph, t, f"fused_{hint}")
        if fake is not None:
            node.meta["val"] = fake.from_tensor(t, static_shapes=True)
        consts.append(node)
    with graph.inserting_before(first):
        new = graph.call_function(first.target, (first.args[0], *consts, *first.args[4:]))
        split = graph.call_function(aten.split_with_sizes.default, (new, sizes, -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
    for node in (new, split, *parts):
        _set_fake_val(node)
    for old, part in zip(members, parts):
        old.replace_all_uses_with(part)
        graph.erase_node(old)


def _share_storage(ctx: RewriteContext, keys: list[tuple], w: torch.Tensor, s: torch.Tensor,
                   sizes: list[int]) -> None:
    """Point each member's cached packed weight at its slice of the fused tensors, so a recompile
    reuses them and the per-layer copies can be freed."""
    n0 = 0
    for key, n in zip(keys, sizes):
        ref, packed, *rest = ctx.pack_cache[key]  # rest: static args, config, note
        ws = w[n0:n0 + n]
        ss = s[:, n0:n0 + n] if s.dim() == 3 else s[n0:n0 + n]
        ctx.pack_cache[key] = (ref, [ws, ss, *packed[2:]], *rest)
        n0 += n


def _drop_unused_constants(graph: fx.Graph) -> None:
    gm = graph.owning_module
    if gm is None:
        return
    used = {str(n.target) for n in graph.find_nodes(op="get_attr")}
    for name, _ in list(gm.named_buffers()):
        if name.startswith("_fxquant_") and name not in used:
            delattr(gm, name)
