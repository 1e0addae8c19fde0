"""Quantization schemes. A config validates itself, says whether a weight fits, packs it
(once, at compile time) and names the `torch.ops.fxquant.*` op that consumes the packing.

Adding a scheme = a config here + an op in lowering/ops.py + its kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from . import numerics as nq


def _allowed(cfg: object, field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{type(cfg).__name__}.{field}={value!r} is invalid; allowed values: "
                         f"{', '.join(repr(a) for a in allowed)}")


@dataclass(frozen=True)
class QuantConfig:
    """Base class: subclasses set `scheme` and implement `pack` and `op`."""
    scheme: ClassVar[str] = "base"

    def check(self, n: int, k: int, dtype: torch.dtype) -> str | None:
        """Reason this [N, K] weight cannot use the scheme, or None if it can."""
        if n < 1 or k < 1:
            return f"empty weight [{n}, {k}]"
        return None

    def pack(self, w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """[N, K] float weight -> (packed tensors, static op args)."""
        raise NotImplementedError

    @property
    def op(self) -> torch._ops.OpOverload:
        raise NotImplementedError

    def describe(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{self.scheme}({args})" if args else self.scheme


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """Per-output-channel symmetric int8 weights; activations stay in their float dtype."""
    scheme: ClassVar[str] = "int8_weight_only"

    def pack(self, w):
        q, scales = nq.quantize_int8_per_channel(w)
        return (q, scales), ()

    @property
    def op(self):
        return torch.ops.fxquant.int8_weight_only_linear.default


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """Group-wise int4 weights along K, asymmetric (float zero) or symmetric."""
    group_size: int = 128
    symmetric: bool = False
    scheme: ClassVar[str] = "int4_weight_only"

    def __post_init__(self):
        _allowed(self, "group_size", self.group_size, (32, 64, 128, 256))
        _allowed(self, "symmetric", self.symmetric, (False, True))

    def check(self, n, k, dtype):
        if k % self.group_size:
            return f"in_features={k} is not a multiple of group_size={self.group_size}"
        return super().check(n, k, dtype)

    def pack(self, w):
        q, scales_zeros = nq.quantize_int4_groupwise(w, self.group_size, self.symmetric)
        return (nq.pack_int4(q), scales_zeros), (self.group_size,)

    @property
    def op(self):
        return torch.ops.fxquant.int4_weight_only_linear.default


@dataclass(frozen=True)
class Int8DynamicActivationInt8Weight(QuantConfig):
    """Per-token dynamic symmetric int8 activations x per-channel int8 weights, int32 accumulate."""
    scheme: ClassVar[str] = "int8_dynamic"

    def pack(self, w):
        q, scales = nq.quantize_int8_weight_for_dynamic(w)
        return (q, scales), ()

    @property
    def op(self):
        return torch.ops.fxquant.int8_dynamic_linear.default


@dataclass(frozen=True)
class Float8DynamicActivationFloat8Weight(QuantConfig):
    """e4m3 weights and dynamically quantized e4m3 activations, scaled per row or per tensor."""
    granularity: str = "row"
    scheme: ClassVar[str] = "float8_dynamic"

    def __post_init__(self):
        _allowed(self, "granularity", self.granularity, ("row", "tensor"))

    def pack(self, w):
        q, scales = nq.quantize_fp8_weight(w, per_row=self.granularity == "row")
        return (q, scales), (self.granularity == "row",)

    @property
    def op(self):
        return torch.ops.fxquant.float8_dynamic_linear.default


@dataclass(frozen=True)
class Float8WeightOnly(QuantConfig):
    """Per-output-channel e4m3 weights; activations stay in their float dtype."""
    scheme: ClassVar[str] = "float8_weight_only"

    def pack(self, w):
        q, scales = nq.quantize_fp8_weight(w, per_row=True)
        return (q, scales), ()

    @property
    def op(self):
        return torch.ops.fxquant.float8_weight_only_linear.default


ALL_CONFIGS = (Int8WeightOnly, Int4WeightOnly, Int8DynamicActivationInt8Weight,
               Float8DynamicActivationFloat8Weight, Float8WeightOnly)
