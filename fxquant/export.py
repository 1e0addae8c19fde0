"""AOTInductor packages of quantized models that load without fxquant.

    fxquant.export(model, (x,), fxquant.Int4WeightOnly(), "model.pt2",
                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    # any process, fxquant not installed:
    m = torch._inductor.aoti_load_package("model.pt2"); y = m(x)

Pipeline: torch.export -> fxquant.quantize_exported (packs weights, one fxquant op per linear)
-> each fxquant op decomposed into plain ATen ops (lowering/decompose.py) -> AOTInductor.
The packed tensors are the package's constants; their dequantization is code in the package that
runs per call (Inductor does not fold it into float constants: AOTI's runtime constant folding is
off by default, and the package-size test guards it).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch.export import ExportedProgram

from .configs import QuantConfig
from .export_pass import quantize_exported
from .lowering.decompose import fxquant_decompositions
from .passes.rewrite import LayerFilter


def decompose_fxquant_ops(ep: ExportedProgram) -> ExportedProgram:
    """`ep` with every `torch.ops.fxquant.*` node replaced by its ATen decomposition."""
    table = torch.export.default_decompositions()
    table.update(fxquant_decompositions())
    out = ep.run_decompositions(table)
    left = sorted({str(n.target) for n in out.graph.nodes
                   if n.op == "call_function" and getattr(n.target, "namespace", None) == "fxquant"})
    if left:  # a new op without a decomposition: the package would need fxquant to load
        raise RuntimeError(f"fxquant.export: no ATen decomposition for {left}; add one in "
                           f"fxquant/lowering/decompose.py")
    return out


def export_program(model: torch.nn.Module, example_inputs: Sequence[Any], config: QuantConfig | None = None,
                   dynamic_shapes: Any = None, *, example_kwargs: dict[str, Any] | None = None,
                   skip: Sequence[str] = (), filter: LayerFilter | None = None,  # noqa: A002
                   verbose: bool = False, prepacked: Any = None, strict: bool = False) -> ExportedProgram:
    """The quantized, fxquant-free ExportedProgram that `export` hands to AOTInductor.

    Its `.fxquant_report` lists every linear. `prepacked` (fxquant.load) skips quantization."""
    ep = torch.export.export(model, tuple(example_inputs), kwargs=example_kwargs,
                             dynamic_shapes=dynamic_shapes, strict=strict)
    qep = quantize_exported(ep, config, skip=skip, filter=filter, verbose=verbose, prepacked=prepacked)
    out = decompose_fxquant_ops(qep)
    out.fxquant_report = qep.fxquant_report
    return out


def export(model: torch.nn.Module, example_inputs: Sequence[Any], config: QuantConfig | None,
           path: str | os.PathLike, dynamic_shapes: Any = None, *,
           inductor_configs: dict[str, Any] | None = None, **options: Any) -> str:
    """Quantize `model` and compile it into an AOTInductor package at `path` (a `.pt2` file).

    `dynamic_shapes` is torch.export's (e.g. `({0: Dim("batch"), 1: Dim("seq")},)`). `options`:
    `skip`, `filter`, `verbose`, `prepacked`, `example_kwargs`, `strict` (see `export_program`).
    Load the package with `torch._inductor.aoti_load_package(path)`; that needs torch only."""
    path = os.fspath(path)
    if not path.endswith(".pt2"):
        raise ValueError(f"fxquant.export: the package path must end in '.pt2', got {path!r}")
    program = export_program(model, example_inputs, config, dynamic_shapes, **options)
    return torch._inductor.aoti_compile_and_package(program, package_path=path,
                                                    inductor_configs=dict(inductor_configs or {}))
