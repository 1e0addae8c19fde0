"""Where a graph keeps its constant weights, and how new constants are added to it.

The same rewrite runs on three kinds of graph: an ATen GraphModule with `get_attr` weights,
the AOT graph Inductor builds from a Dynamo capture (weights are placeholders whose example
inputs are the module's real parameters), and a torch.export program (weights are lifted
placeholders named by its graph signature).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import fx


class GetAttrConstants:
    """Weights are `get_attr` nodes of the GraphModule."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._count = 0

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        obj = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, torch.Tensor) else None

    def weight_name(self, node: fx.Node) -> str | None:
        return str(node.target) if node.op == "get_attr" else None

    def add(self, graph: fx.Graph, tensor: torch.Tensor, hint: str) -> fx.Node:
        name = f"_fxquant_{_ident(hint)}_{self._count}"
        self._count += 1
        self.gm.register_buffer(name, tensor)
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            node = graph.get_attr(name)
        return node


class PlaceholderConstants(GetAttrConstants):
    """AOT graph of a Dynamo capture: placeholder i is `example_inputs[i]`; parameters are
    treated as constants. New constants are get_attr nodes, which Inductor embeds."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[object], names: Sequence[str | None]):
        super().__init__(gm)
        self._index = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
        if len(self._index) != len(example_inputs):
            raise RuntimeError(f"fxquant: the AOT graph has {len(self._index)} inputs but Dynamo gave "
                               f"{len(example_inputs)}; cannot tell which inputs are weights")
        self.example_inputs = example_inputs
        self.names = names
        self.read: set[int] = set()  # inputs read as constants: the compiled graph is only valid for them

    def tensor(self, node):
        i = self._index.get(node)
        if i is None:
            return super().tensor(node)
        t = self.example_inputs[i]
        if not isinstance(t, torch.nn.Parameter):
            return None
        self.read.add(i)
        return t

    def weight_name(self, node):
        i = self._index.get(node)
        return self.names[i] if i is not None else super().weight_name(node)


def _ident(s: str) -> str:
    return re.sub(r"\W", "_", s)[-60:] or "w"


def dynamo_source_to_fqn(source_name: str) -> str:
    """L['self']._modules['layers']._modules['0']._parameters['weight'] -> layers.0.weight.

    The frame's local the module was reached from is dropped: `self`, or the model passed through a
    wrapper's `*args` / `**kwargs` (L['args'][0]..., L['kwargs']['self']...: transformers 5.24 wraps
    LlamaForCausalLM.forward so). Plain module paths (torch.export's nn_module_stack:
    'layers.0.q_proj') pass through."""
    if source_name[:2] not in ("L[", "G["):
        return re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", source_name).lstrip(".")
    parts = re.findall(r"\[['\"]?([^'\"\]]+)['\"]?\]|\.(\w+)", source_name)
    names = [a or b for a, b in parts]
    drop = 2 if len(names) > 2 and names[0] in ("args", "kwargs") else 1
    names = names[drop:]
    names = [n for n in names if n not in ("_modules", "_parameters", "_buffers")]
    return ".".join(names) or source_name


def module_path_from_stack(node: fx.Node) -> str | None:
    """Innermost nn.Module path of a node (from Dynamo's nn_module_stack), e.g. 'layers.0.q_proj'."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _ = list(stack.values())[-1]
    return dynamo_source_to_fqn(path)
