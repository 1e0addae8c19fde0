"""Ops (schemas + fake kernels) and their CPU / Triton / CUDA kernels."""
from . import ops  # noqa: F401  (registers torch.ops.fxquant.*)
