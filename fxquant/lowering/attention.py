"""fxquant::gqa_attention: grouped-query attention on the K/V cache as it is.

    out [B, H, Lq, D] = softmax(q k_h^T * scale + mask) v_h,  k_h = k[:, h // G], v_h = v[:, h // G]

with q [B, H, Lq, D], k and v [B, H / G, Lk, D] (the cache, not repeated), mask None, bool (True:
the key takes part) or float (added), of rank 4 with batch dim 1 or B, head dim 1 or H, and query
and key dims Lq (or 1) and Lk (or 1). The output is contiguous in q's dtype. passes/gqa_attention.py
puts it where a model repeats its K/V heads before scaled_dot_product_attention.

Kernels: on CUDA, where they fit (kernel_dtypes_fit: q, k, v all bf16 or all fp16, head dim 16,
32, 64 or 128, no mask or a bool mask or a float one in q's dtype or float32; unit stride along
the head dim), up to 64 query positions the split-KV decode kernel of lowering/triton/attention.py;
beyond that, with a mask, the prefill kernel of lowering/triton/attention_prefill.py, which skips
the key tiles the mask allows nothing in (a causal cache mask: about half; on an H100 2.19x faster
than SDPA on repeated K/V at 2048 queries, 1.56x at 4 x 512, BENCHMARKS.md S20), as long as its
int32 offsets fit (a mask under 2**31 entries per batch row: attention_prefill.offsets_fit). Elsewhere, and on the
CPU, SDPA runs: from 16 K/V heads in all (B x Hkv) on the G query heads of each K/V head folded
into the query dim (the same rows, no copy of K/V); below that on K/V repeated per query head, as
the model wrote it (on an H100 the folded SDPA measured slower there, BENCHMARKS.md S18). Queries
longer than 64 positions with no mask, or where the kernels do not fit, take SDPA on repeated K/V.
A row no key is allowed for (every mask value -inf, or a finite value so negative that the scaled
score is -inf in float32, like finfo.min): zeros from the Triton kernel, whatever SDPA gives (NaN
or the mean of V) from SDPA.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

LIB = "fxquant"
MIN_KV_HEADS_FOLDED = 16  # SDPA (where the kernel does not run) is folded from this many K/V heads in all
# Longer queries (a prefill) take the prefill kernel: at 2048 queries the decode kernel measured
# 1.05x slower than SDPA on repeated K/V on an H100 (BENCHMARKS.md S19), the prefill kernel 2.19x faster (S20).
KERNEL_MAX_QUERY_LEN = 64


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"fxquant.gqa_attention: q, k, v must be [B, heads, len, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    torch._check(k.shape == v.shape, lambda: f"fxquant.gqa_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3],
                 lambda: f"fxquant.gqa_attention: q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch and D")
    torch._check(q.shape[1] % k.shape[1] == 0,
                 lambda: f"fxquant.gqa_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} K/V heads")
    torch._check(q.dtype == k.dtype == v.dtype and q.is_floating_point(),
                 lambda: f"fxquant.gqa_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None:
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        torch._check(mask.dim() == 4 and all(mask.shape[i] in (1, want[i]) for i in range(4)),
                     lambda: f"fxquant.gqa_attention: mask {tuple(mask.shape)} does not broadcast to {want}")
        torch._check(mask.dtype == torch.bool or mask.is_floating_point(),
                     lambda: f"fxquant.gqa_attention: mask must be bool or float, got {mask.dtype}")


def sdpa_folded(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with the G query heads of each K/V head as G x Lq query rows: [B, Hkv, G*Lq, D]."""
    B, H, LQ, D = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = H // hkv
    qf = q.unflatten(1, (hkv, g)).flatten(2, 3)
    mf = None
    if mask is not None:
        mask = mask.expand(mask.shape[0], mask.shape[1], LQ, lk)
        if mask.shape[1] == 1:
            mf = mask.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(2, 3)
        else:
            mf = mask.unflatten(1, (hkv, g)).flatten(2, 3)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=scale)
    return out.unflatten(2, (g, LQ)).flatten(1, 2).contiguous()


def kernel_dtypes_fit(q: torch.dtype, k: torch.dtype, v: torch.dtype, head_dim: int,
                      mask: torch.dtype | None) -> bool:
    """The Triton kernel's dtype and head-dim conditions (what a graph's example values can tell)."""
    return (q in (torch.bfloat16, torch.float16) and k == q and v == q and head_dim in (16, 32, 64, 128)
            and (mask is None or mask in (torch.bool, q, torch.float32)))


def repeat_kv(x: Tensor, g: int) -> Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * g, L, D], each K/V head g times in a row (transformers' repeat_kv)."""
    return x[:, :, None].expand(-1, -1, g, -1, -1).flatten(1, 2)


def sdpa_repeated(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA on K/V repeated per query head (what the model wrote before the pass)."""
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=mask,
                                          scale=scale).contiguous()


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    if q.shape[0] * k.shape[1] < MIN_KV_HEADS_FOLDED or q.shape[2] > KERNEL_MAX_QUERY_LEN:
        return sdpa_repeated(q, k, v, mask, scale)
    return sdpa_folded(q, k, v, mask, scale)


@torch.library.custom_op(f"{LIB}::gqa_attention", mutates_args=(), device_types="cpu")
def gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None) -> Tensor:
    _check(q, k, v, attn_mask)
    return _sdpa(q, k, v, attn_mask, _scale(q, scale))


@gqa_attention.register_fake
def _(q, k, v, attn_mask, scale):
    _check(q, k, v, attn_mask)
    return q.new_empty(q.shape)


def _cuda(q, k, v, attn_mask, scale):
    _check(q, k, v, attn_mask)
    from .triton import attention as kernels  # imports triton: first CUDA call only
    if kernels.fits(q, k, v, attn_mask):
        if q.shape[2] <= KERNEL_MAX_QUERY_LEN:
            return kernels.gqa_decode_attention(q, k, v, attn_mask, _scale(q, scale))
        from .triton import attention_prefill
        key = (q.device, q.dtype, attn_mask.dtype if attn_mask is not None else None)
        if attn_mask is not None and key not in _PREFILL_DOES_NOT_FIT and \
                attention_prefill.offsets_fit(q, k, v, attn_mask):  # its gain: the tiles it skips
            from triton.runtime.errors import OutOfResources
            try:
                return attention_prefill.prefill_attention(q, k, v, attn_mask, _scale(q, scale))
            except OutOfResources as exc:  # tiles chosen on an H100: more shared memory than some GPUs have
                _PREFILL_DOES_NOT_FIT.add(key)
                warnings.warn(f"fxquant.gqa_attention: the prefill kernel does not fit this GPU ({exc}); "
                              f"prefills with {key[1]} q and {key[2]} masks run SDPA on it", stacklevel=2)
    return _sdpa(q, k, v, attn_mask, _scale(q, scale))


_PREFILL_DOES_NOT_FIT: set = set()  # (device, q dtype, mask dtype) where the prefill kernel ran out of resources


def register_cuda() -> None:
    gqa_attention.register_kernel("cuda")(_cuda)
