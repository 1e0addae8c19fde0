"""Quantization schemes. A config validates itself, says whether a weight fits, packs it
(once, at compile time) and names the `torch.ops.fxquant.*` op that consumes the packing.

Adding a scheme = a config here + an op in lowering/ops.py + its kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
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
    # Values for fields a saved config predates (fxquant.load): what that older fxquant did.
    saved_defaults: ClassVar[dict[str, Any]] = {}

    def check(self, n: int, k: int, dtype: torch.dtype) -> str | None:
        """Reason this [N, K] weight cannot use the scheme, or None if it can."""
        if n < 1 or k < 1:
            return f"empty weight [{n}, {k}]"
        return None

    def pack(self, w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple]:
        """[N, K] float weight -> (packed tensors, static op args)."""
        raise NotImplementedError

    def for_weight(self, n: int, k: int, dtype: torch.dtype, device: torch.device,
                   portable: bool = False) -> tuple[QuantConfig, str]:
        """The config one [N, K] weight on `device` is packed with, and a note on the choice ("" when
        nothing was chosen). A config with a choice left open ("auto") settles it here; `portable`
        asks for a packing whose fast kernels are Triton or ATen (export, embedded kernels)."""
        return self, ""

    @property
    def op(self) -> torch._ops.OpOverload:
        raise NotImplementedError

    def accepts(self, other: QuantConfig) -> bool:
        """`other` is this config, or this config with choices it leaves open ("auto") settled."""
        return type(other) is type(self) and all(
            getattr(self, f.name) in (getattr(other, f.name), "auto") for f in fields(self))

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
    """Group-wise int4 weights along K, asymmetric (float zero) or symmetric.

    layout "rows": two nibbles per byte along each weight row (numerics.pack_int4). "mma": the
    MMA-fragment blocks of numerics.pack_int4_mma (N % 16 == 0, K % 64 == 0, group_size >= 64), which
    the Hopper large-M GEMM reads without shuffling nibbles; its own op, int4_mma_weight_only_linear.
    "auto" (the default): "mma" for each weight that fits it when its kernels run (bfloat16 on an sm_90
    GPU, fxquant's C++ and CUTLASS libraries loaded) unless the graph gets Triton or ATen kernels
    (export, the backend's embed_kernels or templates); "rows" otherwise. Packed without that choice
    (`pack` called directly), "rows".
    """
    group_size: int = 128
    symmetric: bool = False
    layout: str = "auto"
    scheme: ClassVar[str] = "int4_weight_only"
    saved_defaults: ClassVar[dict[str, Any]] = {"layout": "rows"}  # files from before the field packed rows

    def __post_init__(self):
        _allowed(self, "group_size", self.group_size, (32, 64, 128, 256))
        _allowed(self, "symmetric", self.symmetric, (False, True))
        _allowed(self, "layout", self.layout, ("auto", *nq.INT4_LAYOUTS))
        if self.layout == "mma" and self.group_size < 64:
            raise ValueError(f"Int4WeightOnly(layout='mma') needs group_size >= 64 (one scale per 64-k block "
                             f"or more), got group_size={self.group_size}")

    def check(self, n, k, dtype):
        if k % self.group_size:
            return f"in_features={k} is not a multiple of group_size={self.group_size}"
        if self.layout == "mma" and (n % 16 or k % 64):
            return f"layout='mma' needs out_features % 16 == 0 and in_features % 64 == 0, got [{n}, {k}]"
        return super().check(n, k, dtype)

    def for_weight(self, n, k, dtype, device, portable=False):
        if self.layout != "auto":
            return self, ""
        if self.group_size < 64 or n % 16 or k % 64:
            why = f"group_size={self.group_size}" if self.group_size < 64 else f"[N, K]=[{n}, {k}]"
            return replace(self, layout="rows"), f"layout='rows' (auto: {why} does not fit 'mma')"
        if portable:
            return (replace(self, layout="rows"),
                    "layout='rows' (auto: for Triton / ATen kernels: export, embed_kernels, templates)")
        from .lowering.cuda import int4_mma_layout_unfit
        why = int4_mma_layout_unfit(device, dtype)
        if why is not None:
            return replace(self, layout="rows"), f"layout='rows' (auto: {why})"
        return replace(self, layout="mma"), "layout='mma' (auto)"

    @property
    def packed_layout(self) -> str:
        """The layout `pack` writes (numerics.INT4_LAYOUTS): "auto" unresolved packs "rows"."""
        return "rows" if self.layout == "auto" else self.layout

    def pack(self, w):
        q, scales_zeros = nq.quantize_int4_groupwise(w, self.group_size, self.symmetric)
        packed = nq.pack_int4_mma(q) if self.packed_layout == "mma" else nq.pack_int4(q)
        return (packed, scales_zeros), (self.group_size,)

    @property
    def op(self):
        if self.packed_layout == "mma":
            return torch.ops.fxquant.int4_mma_weight_only_linear.default
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
