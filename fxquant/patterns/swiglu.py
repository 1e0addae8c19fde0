"""`silu(gate) * up` (a gated MLP's activation, e.g. Llama's) as the input of a linear.

The down projection's input x is `mul(silu(gate), up)`, possibly flattened to 2-D by a view.
In the ATen graph Inductor hands us, silu is either `aten.silu` or its decomposition
`convert(div(c, add(exp(neg(c)), 1)))` with `c = convert(gate, float32)` (no converts in a
float32 model). `operands(x)` finds gate and up behind x, or returns None.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
prims = torch.ops.prims
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class SwiGLU(NamedTuple):
    gate: fx.Node
    up: fx.Node
    flatten: bool  # x is mul(...) viewed as [-1, I]


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _val(n: fx.Node):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _strip_convert(n, dtype: torch.dtype | None = None):
    """n's input if n is a dtype conversion (to `dtype`, if given), else n."""
    if _call(n, prims.convert_element_type.default) and (dtype is None or n.args[1] == dtype):
        return n.args[0]
    return n


def _same_value(a, b) -> bool:
    """a and b are one node, or the same float32 conversion of one node (an uncse'd graph)."""
    if a is b:
        return True
    return (_call(a, prims.convert_element_type.default) and _call(b, prims.convert_element_type.default)
            and a.args == b.args)


def _silu_input(n) -> fx.Node | None:
    """g if n computes silu(g) in g's dtype."""
    if _call(n, aten.silu.default):
        return n.args[0]
    inner = _strip_convert(n)
    if _call(inner, aten.mul.Tensor):  # c * sigmoid(c)
        a, b = inner.args
        for c, sig in ((a, b), (b, a)):
            if _call(sig, aten.sigmoid.default) and _same_value(sig.args[0], c):
                return _strip_convert(c, torch.float32)
        return None
    if not _call(inner, aten.div.Tensor):  # c / (exp(-c) + 1)
        return None
    c, den = inner.args
    if not _call(den, aten.add.Tensor) or den.args[1] != 1:
        return None
    e = den.args[0]
    if not (_call(e, aten.exp.default) and _call(e.args[0], aten.neg.default) and _same_value(e.args[0].args[0], c)):
        return None
    return _strip_convert(c, torch.float32)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    # statically_known_true: never adds a guard on a symbolic (batch / sequence) dim
    return a.dim() == b.dim() and all(statically_known_true(p == q) for p, q in zip(a.shape, b.shape))


def operands(x: fx.Node) -> SwiGLU | None:
    view = x if _call(x, *_VIEWS) else None
    flatten = view is not None
    if flatten:
        x = view.args[0]
    if flatten and len(view.users) != 1:  # the product is needed in full elsewhere: keep it
        return None
    if not _call(x, aten.mul.Tensor) or len(x.users) != 1:
        return None
    for s, up in (x.args, x.args[::-1]):
        gate = _silu_input(s)
        if gate is None or not isinstance(up, fx.Node):
            continue
        g, u, h = _val(gate), _val(up), _val(x)
        if g is None or u is None or h is None:
            return None
        if g.dtype != u.dtype or g.dtype != h.dtype or not _same_shape(g, u) or not _same_shape(g, h):
            return None
        v = _val(view)
        if flatten and (v is None or v.dim() != 2 or not statically_known_true(v.shape[-1] == g.shape[-1])):
            return None
        if flatten:
            gate, up = _unflattened(gate, up)
        return SwiGLU(gate, up, flatten)
    return None


def _unflattened(gate: fx.Node, up: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(gate, up) without the views that made them N-D, when both are views of 2-D tensors of one
    shape (the gate/up GEMM's [M, I] outputs): x is flattened to 2-D anyway, and Inductor would
    copy a strided N-D view (a slice of the fused gate/up output) before the op."""
    if not (_call(gate, *_VIEWS) and _call(up, *_VIEWS)):
        return gate, up
    g2, u2 = _val(gate.args[0]), _val(up.args[0])
    if g2 is None or u2 is None or g2.dim() != 2 or not _same_shape(g2, u2) or g2.dtype != u2.dtype:
        return gate, up
    if not statically_known_true(g2.shape[-1] == _val(gate).shape[-1]):  # rows must stay rows of I
        return gate, up
    return gate.args[0], up.args[0]
