"""Inductor heuristics fxquant changes while it compiles a graph.

Persistent reductions up to a longer row: Inductor keeps a row-wise (INNER) reduction in
registers only up to 1024 elements, so a per-token activation quantization over a 4096-wide
hidden state (RMSNorm -> amax -> scale -> cast, fused by Inductor) reads its row twice: once for
the amax, once to quantize. Kept persistent it reads the row once. FXQUANT_PERSISTENT_RNUMEL sets
the longest such row (default 4096; 0 keeps Inductor's own rule). Measured on an H100, 8-layer
Llama-3-8B-shaped fp8-row prefill of 2048 tokens (BENCHMARKS.md S7): 4096 made the step 1.9 %
faster; 16384 made it 2.2 % slower, because the 14336-wide SiLU * up quantization kernel then
spills registers (+50 %).
"""
from __future__ import annotations

import os

import sympy
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint

DEFAULT_PERSISTENT_RNUMEL = 4096


def persistent_rnumel_limit() -> int:
    v = os.environ.get("FXQUANT_PERSISTENT_RNUMEL", "").strip()
    if not v:
        return DEFAULT_PERSISTENT_RNUMEL
    if not v.isdigit():
        raise ValueError(f"FXQUANT_PERSISTENT_RNUMEL={v!r}: expected a number of elements (0: Inductor's rule)")
    return int(v)


class FxquantChoices(InductorChoices):
    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        import torch._inductor.config as inductor_config
        limit = persistent_rnumel_limit()
        if not limit or cooperative_reduction or not inductor_config.triton.persistent_reductions:
            return False
        if features.get_reduction_hint() != ReductionHint.INNER:
            return False
        n = sympy.sympify(features.reduction_numel)
        return bool(n.is_Integer) and int(n) <= limit
