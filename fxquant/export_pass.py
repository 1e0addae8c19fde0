"""fxquant's pass on a torch.export ExportedProgram: weights are lifted placeholders named by
the graph signature; packed weights become new constant-tensor inputs of the program."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec,
                                          TensorArgument)

from .configs import Int8WeightOnly, QuantConfig
from .passes import quantize as qpass
from .passes.constants import _ident
from .passes.rewrite import LayerFilter, RewriteContext
from .report import format_report


class ExportConstants:
    """Parameters (and constant tensors) of an ExportedProgram, seen through its placeholders."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs if isinstance(s.arg, TensorArgument)}
        self.new_specs: dict[str, InputSpec] = {}
        self.new_constants: dict[str, torch.Tensor] = {}

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        spec = self.specs.get(node.name) if node.op == "placeholder" else None
        if spec is None:
            return None
        if spec.kind == InputKind.PARAMETER:
            return self.ep.state_dict[spec.target]
        if spec.kind == InputKind.CONSTANT_TENSOR:
            return self.ep.constants[spec.target]
        return None  # buffers may be mutated; user inputs are activations

    def weight_name(self, node: fx.Node) -> str | None:
        spec = self.specs.get(node.name)
        return spec.target if spec is not None else None

    def add(self, graph: fx.Graph, tensor: torch.Tensor, hint: str) -> fx.Node:
        target = f"_fxquant_{_ident(hint)}_{len(self.new_constants)}"
        first_user = next(n for n in graph.find_nodes(op="placeholder")
                          if n.name not in self.specs or self.specs[n.name].kind == InputKind.USER_INPUT)
        with graph.inserting_before(first_user):
            node = graph.placeholder(target)
        self.new_specs[node.name] = InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(node.name), target)
        self.new_constants[target] = tensor
        return node


def quantize_exported(ep: ExportedProgram, config: QuantConfig | None = None, *, skip: Sequence[str] = (),
                      filter: LayerFilter | None = None, verbose: bool = False,  # noqa: A002
                      prepacked=None) -> ExportedProgram:
    """A new ExportedProgram in which every eligible linear is one `torch.ops.fxquant.*` node.

    The program is first decomposed to core ATen. Quantized weights leave its state_dict;
    the packed tensors are constant-tensor inputs. `.fxquant_report` lists every linear.
    `prepacked` (fxquant.load) supplies packed weights by parameter name instead of quantizing.
    Int4WeightOnly(layout="auto") packs "rows" here: the MMA-fragment layout has no fast Triton or
    ATen kernel for the package (an explicit layout="mma", or a prepacked one, is kept)."""
    from .backend import _prepacked_config
    config = _prepacked_config(config, prepacked)
    config = Int8WeightOnly() if config is None else config
    ep = ep.run_decompositions()
    gm = ep.graph_module
    consts = ExportConstants(ep)
    ctx = RewriteContext(config, consts, skip=skip, layer_filter=filter, prepacked=prepacked,
                         portable=True)  # an "auto" choice for AOTInductor's kernels
    records = qpass.run(gm.graph, ctx)

    state_dict = dict(ep.state_dict)
    constants = dict(ep.constants)
    constants.update(consts.new_constants)
    specs = {**consts.specs, **consts.new_specs}
    input_specs = []
    for node in list(gm.graph.find_nodes(op="placeholder")):
        spec = specs[node.name]
        if not node.users and spec.kind in (InputKind.PARAMETER, InputKind.CONSTANT_TENSOR) \
                and any(t is consts.tensor(node) for t, _ in ctx.quantized_weights.values()):
            gm.graph.erase_node(node)  # its weight now lives only in packed form
            (state_dict if spec.kind == InputKind.PARAMETER else constants).pop(spec.target, None)
            continue
        input_specs.append(spec)
    gm.recompile()
    signature = ExportGraphSignature(input_specs=input_specs, output_specs=_output_specs(ep, gm.graph))
    out = ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
                          range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
                          example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers)
    out.fxquant_report = records
    if verbose:
        print(format_report(records))
    return out


def _output_specs(ep: ExportedProgram, graph: fx.Graph) -> list:
    """The output specs renamed after the rewrite: a replaced linear may be a program output."""
    outs = graph.output_node().args[0]
    specs = []
    for spec, node in zip(ep.graph_signature.output_specs, outs):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node):
            spec = dataclasses.replace(spec, arg=TensorArgument(node.name))
        specs.append(spec)
    return specs
