"""Ops (schemas + fake kernels) and their CPU / Triton / CUDA kernels."""
from . import ops  # noqa: F401  (registers torch.ops.fxquant.*)
from . import attention  # noqa: F401  (torch.ops.fxquant.gqa_attention)

try:  # CUDA kernels; a no-op on CPU-only torch builds, and triton is imported only on first use.
    from .triton.register import register as _register_triton

    _register_triton()
except ImportError:  # pragma: no cover
    pass
