"""Grouped-query attention's repeated K/V heads in a Dynamo (torch-level) graph.

Two forms copy each of Hkv key/value heads G times, head h = kv * G + g:
- HF `repeat_kv`: `x[:, :, None, :, :].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)`
  (also with `x.unsqueeze(2)`);
- gpt-fast: `x.repeat_interleave(G, dim=1)` (method or `torch.repeat_interleave`).

Both make a copy of the whole K/V cache on every call. `match_repeat_kv` returns the source node
and G, judged by the shapes Dynamo recorded, so a look-alike that repeats another dim is no match.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

_ALL = slice(None, None, None)


def example_value(node) -> torch.Tensor | None:
    """The tensor Dynamo recorded for `node`, if any."""
    v = node.meta.get("example_value") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def static_int(d) -> int | None:
    """d as a number if it is one, or a symbol Dynamo has already fixed to one (no new guard)."""
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        return d.node.maybe_as_int()
    return None


def same_size(a, b) -> bool:
    """Whether two sizes (numbers or symbols) are known equal without a new guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return bool(statically_known_true(a == b))


def _unsqueezed_dim2(node: Node) -> Node | None:
    """x[:, :, None] (or x[:, :, None, :, :]) and x.unsqueeze(2): the source x."""
    if node.op == "call_function" and node.target is operator.getitem:
        src, idx = node.args
        if isinstance(idx, tuple) and len(idx) >= 3 and idx[:3] == (_ALL, _ALL, None) \
                and all(i == _ALL for i in idx[3:]):
            return src
    if node.op == "call_method" and node.target == "unsqueeze" or (
            node.op == "call_function" and node.target is torch.unsqueeze):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dim == 2:
            return node.args[0]
    return None


def _expand_reshape(node: Node) -> Node | None:
    if not (node.op == "call_method" and node.target == "reshape" or
            node.op == "call_function" and node.target is torch.reshape):
        return None
    expanded = node.args[0]
    if not (isinstance(expanded, Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    src = expanded.args[0]
    return _unsqueezed_dim2(src) if isinstance(src, Node) else None


def _repeat_interleave(node: Node) -> Node | None:
    if not (node.op == "call_method" and node.target == "repeat_interleave" or
            node.op == "call_function" and node.target is torch.repeat_interleave):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    if dim != 1 or not isinstance(repeats, int) or "output_size" in node.kwargs:
        return None
    return node.args[0]


def match_repeat_kv(node) -> tuple[Node, int] | None:
    """(x, G) if `node` is x [B, Hkv, L, D] with each head repeated G > 1 times along dim 1."""
    if not isinstance(node, Node):
        return None
    src = _expand_reshape(node)
    # Row-major reshape of [B, Hkv, G, L, D] to [B, Hkv * G, L, D] puts head kv * G + g in order.
    five = example_value(node.args[0]) if src is not None else None
    if src is None:
        src = _repeat_interleave(node)
    out, x = example_value(node), example_value(src)
    if src is None or out is None or x is None or out.dim() != 4 or x.dim() != 4:
        return None
    hkv, h = static_int(x.shape[1]), static_int(out.shape[1])
    if hkv is None or h is None or h % hkv or h == hkv:
        return None
    if not all(same_size(out.shape[i], x.shape[i]) for i in (0, 2, 3)):
        return None
    if five is not None and not (five.dim() == 5 and all(
            same_size(a, b) for a, b in zip(five.shape, (x.shape[0], hkv, h // hkv, x.shape[2], x.shape[3])))):
        return None
    return src, h // hkv
