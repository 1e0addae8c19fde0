"""Prefill attention on a masked K/V cache: an EXPERIMENT, not used by fxquant::gqa_attention and not
yet run on a GPU (benchmarks/attention.py --qlen 2048 measures it beside cuDNN; BENCHMARKS.md S19
has why it was written).

A static cache comes with a mask that allows each query only the keys up to its position. SDPA
(cuDNN) computes every (query, key) tile and masks afterwards; the decode kernel skips disallowed
tiles with a branch per tile, which keeps Triton from pipelining its loads (S19: 160 TFLOP/s).
Here a first small kernel reads the mask once and records, per query block, the first and last
key tile with any allowed entry; the attention kernel then loops over exactly that range with no
branch, so its K/V loads pipeline, and applies the mask tile inside the range.

One program per (batch row, query head, block of BLOCK_M query positions); the K/V head is
head // G, read from the cache as it is (no repeat).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import MASK_BOOL, MASK_FLOAT, MASK_NONE
from .common import INTERPRETED, eager


@triton.jit
def mask_bounds_kernel(mask_ptr, bounds_ptr, sm_b, sm_h, sm_l, sm_n, HM, LQ, LK, QB,
                       MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bounds[(bh_mask * QB + qb) * 2 + 0 / 1] = first / last key tile with an allowed entry
    (first > last: none)."""
    pid = tl.program_id(0)  # mask batch x mask head
    qb = tl.program_id(1)
    bm = (pid // HM).to(tl.int64)
    hm = pid % HM
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    first = LK + 0  # larger than any tile index (a runtime value: it is loop-carried)
    last = LK * 0 - 1
    for n0 in range(0, LK, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (n < LK)[None, :]
        ptrs = mask_ptr + bm * sm_b + hm * sm_h + rows[:, None] * sm_l + n[None, :] * sm_n
        if MASK == MASK_BOOL:
            allowed = tl.load(ptrs, mask=ok, other=0) != 0
        else:
            allowed = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634 > float("-inf")
        hit = tl.max(tl.max(allowed.to(tl.int32), axis=1), axis=0) > 0
        t = n0 // BLOCK_N
        first = tl.where(hit, tl.minimum(first, t), first)
        last = tl.where(hit, t, last)
    tl.store(bounds_ptr + (pid * QB + qb) * 2, first)
    tl.store(bounds_ptr + (pid * QB + qb) * 2 + 1, last)


@triton.jit
def prefill_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, bounds_ptr, out_ptr,
                             sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                             sm_b, sm_h, sm_l, sm_n, so_b, so_h, so_l,
                             H, HM, LQ, LK, QB, qk_scale,
                             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             MASK: tl.constexpr, MASK_BATCH: tl.constexpr, MASK_HEADS: tl.constexpr):
    bh = tl.program_id(0)
    qb = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kv = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=row_ok[:, None], other=0.0)
    if INTERPRETED:  # the interpreter's dot multiplies bf16 bit patterns as integers
        q = q.to(tl.float32)
    if MASK == MASK_NONE:
        first = 0
        last = tl.cdiv(LK, BLOCK_N) - 1
        bm = b * 0
        hm = h * 0
    else:
        if MASK_BATCH:
            bm = b
        else:
            bm = b * 0
        if MASK_HEADS:
            hm = h
        else:
            hm = h * 0
        first = tl.load(bounds_ptr + ((bm * HM + hm) * QB + qb) * 2)
        last = tl.load(bounds_ptr + ((bm * HM + hm) * QB + qb) * 2 + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for t in range(first, last + 1):
        n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < LK
        k = tl.load(k_ptr + b * sk_b + kv * sk_h + n[:, None] * sk_n + d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_ptr + b * sv_b + kv * sv_h + n[:, None] * sv_n + d[None, :], mask=n_ok[:, None], other=0.0)
        ok = row_ok[:, None] & n_ok[None, :]
        mptrs = mask_ptr + bm * sm_b + hm * sm_h + rows[:, None] * sm_l + n[None, :] * sm_n
        if MASK == MASK_BOOL:
            bias = tl.where(tl.load(mptrs, mask=ok, other=0) != 0, 0.0, float("-inf"))
        elif MASK == MASK_FLOAT:
            bias = tl.load(mptrs, mask=ok, other=float("-inf")).to(tl.float32)
        else:
            bias = tl.where(ok, 0.0, float("-inf"))
        if INTERPRETED:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = (tl.dot(q, tl.trans(k)) * qk_scale + bias) * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, *, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
                      num_stages: int | None = None) -> torch.Tensor:
    """out [B, H, Lq, D] = softmax(q k^T * scale + mask) v with k, v [B, H // G, Lk, D]; mask as for
    attention.gqa_decode_attention (`fits` decides the same way). Rows with no allowed key: zeros."""
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    out = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    QB = triton.cdiv(LQ, block_m)
    if mask is None:
        kind, mstr, hm, mb, mh, mptr = MASK_NONE, (0, 0, 0, 0), 1, False, False, q
        bounds = torch.empty(2, device=q.device, dtype=torch.int32)
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        mask = mask.expand(mask.shape[0], mask.shape[1], LQ, LK)
        mstr = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
        mb, mh, hm, mptr = mask.shape[0] != 1, mask.shape[1] != 1, mask.shape[1], mask
        bounds = torch.empty(mask.shape[0] * hm * QB * 2, device=q.device, dtype=torch.int32)
        eager(mask_bounds_kernel)[(mask.shape[0] * hm, QB)](
            mask, bounds, *mstr, hm, LQ, LK, QB, MASK=kind, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    eager(prefill_attention_kernel)[(B * H, QB)](
        q, k, v, mptr, bounds, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr, out.stride(0), out.stride(1), out.stride(2),
        H, hm, LQ, LK, QB, scale,
        G=H // HKV, D=D, BLOCK_M=block_m, BLOCK_N=block_n, MASK=kind, MASK_BATCH=mb, MASK_HEADS=mh,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}))
    return out
