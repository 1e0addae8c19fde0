"""fxquant: a torch.compile backend and FX passes that quantize a model's linear layers.

    import torch, fxquant
    qm = torch.compile(model, backend="fxquant", options={"config": fxquant.Int4WeightOnly()})
"""
from torch._dynamo.backends.registry import register_backend as _register_backend

from . import lowering  # noqa: F401  (registers torch.ops.fxquant.*)
from .api import backend, compile, quantize_graph  # noqa: A004
from .backend import Backend, registered_backend
from .configs import (Float8DynamicActivationFloat8Weight, Float8WeightOnly, Int4WeightOnly,
                      Int8DynamicActivationInt8Weight, Int8WeightOnly, QuantConfig)
# Imported eagerly: the function `export` must replace the submodule of the same name here.
from .export import export, export_program  # noqa: E402
from .persist import FormatError, QuantizedWeights, load, quantize_weights, save
from .numerics import sqnr
from .report import LinearRecord, format_report

__version__ = "0.1.0"

_register_backend(registered_backend, name="fxquant")

__all__ = ["Backend", "backend", "compile", "quantize_graph", "quantize_exported", "QuantConfig",
           "Int8WeightOnly", "Int4WeightOnly", "Int8DynamicActivationInt8Weight",
           "Float8DynamicActivationFloat8Weight", "Float8WeightOnly", "LinearRecord", "format_report", "sqnr",
           "export", "export_program", "quantize_weights", "QuantizedWeights", "save", "load", "FormatError"]


def quantize_exported(ep, config=None, **options):
    """Rewrite a torch.export ExportedProgram; see fxquant.export_pass."""
    from .export_pass import quantize_exported as _q
    return _q(ep, config, **options)
