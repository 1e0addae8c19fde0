"""Prefill attention on a masked K/V cache: fxquant::gqa_attention's CUDA kernel beyond 64 query
positions when a mask is given (lowering/attention.py).

A static cache comes with a mask that allows each query only the keys up to its position. SDPA
(cuDNN) computes every (query, key) tile and masks afterwards. Here `mask_tiles_kernel` reads the
mask once, one program per tile, and flags each tile HIT (some entry allowed) and WHOLE (every
entry allowed, nothing added). The attention kernel derives its query block's bounds from its row
of flags and runs three loops: masked tiles before the first run of whole tiles, the run itself
(no mask load, no bounds check, no -inf guard), masked tiles after it. A causal mask: about half
the tiles are skipped and almost all of the rest are whole. On an H100 at 2048 queries: 109.7 us
against 240.0 for repeat_kv + SDPA with the mask (BENCHMARKS.md S20); a serial scan of the mask in
place of the tile flags cost a third of the time.

One program per (batch row, query head, block of BLOCK_M query positions), the last blocks (the
most keys) first; the K/V head is head // G, read from the cache as it is (no repeat).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import MASK_BOOL, MASK_FLOAT, MASK_NONE
from .common import INTERPRETED, eager


HIT, WHOLE = tl.constexpr(1), tl.constexpr(2)  # mask tile flags: some entry allowed; every entry allowed, nothing added


@triton.jit
def mask_tiles_kernel(mask_ptr, flags_ptr, sm_b, sm_h, sm_l, sm_n, HM, LQ, LK, QB, KT,
                      MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """flags[(mask batch x mask head, query block, key tile)]: HIT | WHOLE bits of that mask tile.
    One program per tile, so the whole mask is read once at full bandwidth."""
    pid = tl.program_id(0)  # mask batch x mask head
    qb = tl.program_id(1)
    t = tl.program_id(2)
    bm = (pid // HM).to(tl.int64)
    hm = pid % HM
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < LQ
    n_ok = n < LK
    ptrs = mask_ptr + bm * sm_b + hm * sm_h + rows[:, None] * sm_l + n[None, :] * sm_n
    ok = row_ok[:, None] & n_ok[None, :]
    if MASK == MASK_BOOL:
        allowed = tl.load(ptrs, mask=ok, other=0) != 0
        plain = allowed
    else:
        val = tl.load(ptrs, mask=ok, other=float("-inf")).to(tl.float32)
        allowed = val * 1.4426950408889634 > float("-inf")
        plain = val == 0.0
    hit = tl.max(tl.max(allowed.to(tl.int32), axis=1), axis=0) > 0
    # rows past LQ do not count; keys past LK do (such a tile needs its bounds checks)
    bad = (row_ok[:, None] & ~plain) | ~n_ok[None, :]
    whole = tl.max(tl.max(bad.to(tl.int32), axis=1), axis=0) == 0
    tl.store(flags_ptr + (pid * QB + qb).to(tl.int64) * KT + t, hit.to(tl.int8) * HIT + whole.to(tl.int8) * WHOLE)


@triton.jit
def _tile_bounds(flags_ptr, KT, KT_POW2: tl.constexpr):
    """From one query block's row of KT mask tile flags: the first and last tile with an allowed
    entry, and [lo, hi), the first run of whole tiles, within [first, last + 1] (lo == hi: none)."""
    idx = tl.arange(0, KT_POW2)
    f = tl.load(flags_ptr + idx, mask=idx < KT, other=0)
    hit = (f & HIT) != 0
    whole = (f & WHOLE) != 0
    first = tl.min(tl.where(hit, idx, KT), axis=0)
    last = tl.max(tl.where(hit, idx, -1), axis=0)
    lo = tl.min(tl.where(whole, idx, KT), axis=0)
    hi = tl.min(tl.where(~whole & (idx > lo), idx, KT), axis=0)
    lo = tl.minimum(lo, last + 1)  # no whole run: lo was KT, past every tile
    hi = tl.maximum(tl.minimum(hi, last + 1), lo)
    return first, last, lo, hi


@triton.jit
def _attend(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, lo, hi, sk_n, sv_n, sm_n, row_ok, n_base, LK, qk_scale,
            MASK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over key tiles lo..hi-1. MASKED False: every entry of these tiles is allowed
    with nothing added, so no mask load, no bounds and no -inf guard."""
    for t in range(lo, hi):
        n = t * BLOCK_N + n_base
        if MASKED:
            n_ok = n < LK
            k = tl.load(k_ptrs + t * BLOCK_N * sk_n, mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + t * BLOCK_N * sv_n, mask=n_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + t * BLOCK_N * sk_n)
            v = tl.load(v_ptrs + t * BLOCK_N * sv_n)
        if INTERPRETED:  # the interpreter's dot multiplies bf16 bit patterns as integers
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        if MASKED:
            ok = row_ok[:, None] & n_ok[None, :]
            if MASK == MASK_BOOL:
                keep = tl.load(m_ptrs + t * BLOCK_N * sm_n, mask=ok, other=0) != 0
                s = tl.where(keep, s, float("-inf"))
            elif MASK == MASK_FLOAT:
                s += tl.load(m_ptrs + t * BLOCK_N * sm_n, mask=ok, other=float("-inf")).to(tl.float32) * \
                    1.4426950408889634
            else:
                s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prefill_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, flags_ptr, out_ptr,
                             sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                             sm_b, sm_h, sm_l, sm_n, so_b, so_h, so_l,
                             H, HM, LQ, LK, QB, KT, qk_scale,
                             G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             KT_POW2: tl.constexpr, MASK: tl.constexpr, MASK_BATCH: tl.constexpr,
                             MASK_HEADS: tl.constexpr):
    bh = tl.program_id(0)
    qb = QB - 1 - tl.program_id(1)  # the last query blocks see the most keys: start them first
    b = (bh // H).to(tl.int64)
    h = bh % H
    kv = h // G
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    d = tl.arange(0, D)
    n_base = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows[:, None] * sq_l + d[None, :], mask=row_ok[:, None], other=0.0)
    if INTERPRETED:
        q = q.to(tl.float32)
    k_ptrs = k_ptr + b * sk_b + kv * sk_h + n_base[:, None] * sk_n + d[None, :]
    v_ptrs = v_ptr + b * sv_b + kv * sv_h + n_base[:, None] * sv_n + d[None, :]
    if MASK_BATCH:
        bm = b
    else:
        bm = b * 0
    if MASK_HEADS:
        hm = h
    else:
        hm = h * 0
    m_ptrs = mask_ptr + bm * sm_b + hm * sm_h + rows[:, None] * sm_l + n_base[None, :] * sm_n
    if MASK == MASK_NONE:  # every tile allowed; whole but for a partial last one
        first = 0
        last = tl.cdiv(LK, BLOCK_N) - 1
        full_lo = 0
        full_hi = LK // BLOCK_N
    else:
        first, last, full_lo, full_hi = _tile_bounds(flags_ptr + ((bm * HM + hm) * QB + qb) * KT, KT, KT_POW2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    scale2 = qk_scale * 1.4426950408889634
    # masked tiles before the full run, the full run, masked tiles after it
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, first, full_lo, sk_n, sv_n, sm_n, row_ok,
                            n_base, LK, scale2, MASK=MASK, BLOCK_N=BLOCK_N, MASKED=True)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, full_lo, full_hi, sk_n, sv_n, sm_n, row_ok,
                            n_base, LK, scale2, MASK=MASK, BLOCK_N=BLOCK_N, MASKED=False)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_ptrs, v_ptrs, m_ptrs, tl.maximum(full_hi, first), last + 1, sk_n,
                            sv_n, sm_n, row_ok, n_base, LK, scale2, MASK=MASK, BLOCK_N=BLOCK_N, MASKED=True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b * so_b + h * so_h + rows[:, None] * so_l + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def offsets_fit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                block_m: int = 128, block_n: int = 64) -> bool:
    """Whether every element offset within one batch row (of q, k, v, the output and the mask,
    tiles past the ends included) fits in int32, the kernels' index type below the batch dim.
    Past that (a mask of 2**31 entries per batch row: e.g. 32K queries over a 64K cache) the op
    runs SDPA."""
    LQ, LK = q.shape[2], k.shape[2]
    lq, lk = triton.cdiv(LQ, block_m) * block_m, triton.cdiv(max(LK, 1), block_n) * block_n

    def span(t: torch.Tensor, sizes: tuple[int, ...]) -> int:
        return sum((n - 1) * abs(t.stride(i + 1)) for i, n in enumerate(sizes))

    spans = [span(q, (q.shape[1], lq, q.shape[3])), q.shape[1] * lq * q.shape[3],
             span(k, (k.shape[1], lk, k.shape[3])), span(v, (v.shape[1], lk, v.shape[3]))]
    if mask is not None:
        m = mask.expand(mask.shape[0], mask.shape[1], LQ, LK)  # broadcast dims: stride 0
        spans.append(span(m, (m.shape[1], lq, lk)))
    return max(spans) < 2**31


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, *, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
                      num_stages: int = 3) -> torch.Tensor:
    """out [B, H, Lq, D] = softmax(q k^T * scale + mask) v with k, v [B, H // G, Lk, D]; mask as for
    attention.gqa_decode_attention (`fits` decides the same way). Rows with no allowed key: zeros.
    128 x 64 tiles, 8 warps, 3 stages: the fastest of ten tilings on an H100 at 512, 2048 and 4096
    queries (BENCHMARKS.md S20)."""
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    out = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if LK == 0:
        return out.zero_()  # no key: every row is empty
    QB, KT = triton.cdiv(LQ, block_m), triton.cdiv(LK, block_n)
    if mask is None:
        kind, mstr, hm, mb, mh, mptr = MASK_NONE, (0, 0, 0, 0), 1, False, False, q
        flags = torch.empty(1, device=q.device, dtype=torch.int8)
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        mask = mask.expand(mask.shape[0], mask.shape[1], LQ, LK)
        mstr = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
        mb, mh, hm, mptr = mask.shape[0] != 1, mask.shape[1] != 1, mask.shape[1], mask
        flags = torch.empty(mask.shape[0] * hm * QB * KT, device=q.device, dtype=torch.int8)
        eager(mask_tiles_kernel)[(mask.shape[0] * hm, QB, KT)](
            mask, flags, *mstr, hm, LQ, LK, QB, KT, MASK=kind, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    eager(prefill_attention_kernel)[(B * H, QB)](
        q, k, v, mptr, flags, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr, out.stride(0), out.stride(1), out.stride(2),
        H, hm, LQ, LK, QB, KT, scale,
        G=H // HKV, D=D, BLOCK_M=block_m, BLOCK_N=block_n, KT_POW2=triton.next_power_of_2(KT), MASK=kind,
        MASK_BATCH=mb, MASK_HEADS=mh, num_warps=num_warps, num_stages=num_stages)
    return out
