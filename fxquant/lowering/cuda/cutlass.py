"""The CUTLASS int4 GEMM (csrc_cutlass/int4_wgmma.cu) as the dispatcher's kernel kind "cutlass":
which inputs it takes, its scale / zero arrays, and the call.

A KernelConfig of kind "cutlass" names the CUTLASS tile by bn (weight rows) x bm (tokens):
128 x 128 and 128 x 256 (cooperative: two consumer warpgroups share a tile), 64 x 128 (ping-pong).

Numerics: CUTLASS dequantizes q * scale + zero' with zero' = zero - 8 * scale rounded to bf16, so
with asymmetric quantization about half the weights land one bf16 step away from numerics.py's
(q - 8) * scale + zero: 4.4e-3 relative error on the weights in tests/test_cutlass_kind.py, next
to int4's own ~10 % (symmetric: zero' is exact and so are the weights). The GEMM stays within the
tests' 1e-2 bound against the reference (tests/gpu/test_gpu_cutlass.py).
"""
from __future__ import annotations

import functools

import torch

VARIANTS = {(128, 128): 0, (128, 256): 1, (64, 128): 2}  # (bn, bm) -> the library's variant number


def fits(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None,
         group: int, bn: int, bm: int) -> bool:
    """Hopper (sm_90, CUDA), bf16 x / scales / bias on x's device, a known tile, and what TMA and the
    kernel need: group a multiple of the 64-wide K tile, K % 32 (16-byte weight rows), N % 8
    (16-byte output rows), 16-byte aligned x and weight."""
    if not (x.is_cuda and torch.version.hip is None and x.dtype == torch.bfloat16
            and scales_zeros.dtype == torch.bfloat16 and (bn, bm) in VARIANTS):
        return False
    if _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return False
    K, N = x.shape[-1], qweight.shape[0]
    if (qweight.dtype != torch.uint8 or K != qweight.shape[1] * 2 or group % 64 or K % group or K % 32 or N % 8
            or N == 0 or x.numel() == 0):
        return False
    if any(t is not None and t.device != x.device for t in (qweight, scales_zeros, bias)):
        return False
    if bias is not None and bias.dtype != torch.bfloat16:
        return False
    return qweight.is_contiguous() and qweight.data_ptr() % 16 == 0 and x.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # asked once per GPU, not on every call


def scales_and_zeros(scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fxquant's [K / g, N, 2] (scale, zero) -> CUTLASS's scales and zeros, each [K / g, N]: CUTLASS
    computes q * scale + zero on the unsigned nibble, so its zero is zero - 8 * scale (rounded once)."""
    s = scales_zeros[..., 0]
    return s.contiguous(), torch.sub(scales_zeros[..., 1], s, alpha=8)


# The copies are made per call (two small kernels): a cache of them per packed scales tensor was
# tried and broke mode="reduce-overhead" (cudagraph trees run their warm-up inside the graph pool,
# and a cached tensor allocated there is an untracked live allocation: a RuntimeError).


def linear(x: torch.Tensor, qweight: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None,
           group: int, bn: int, bm: int) -> torch.Tensor:
    s, z = scales_and_zeros(scales_zeros)
    return torch.ops.fxquant.cutlass_int4_weight_only_linear(x, qweight, s, z, bias, group, VARIANTS[(bn, bm)])
