"""Grouped-query decode attention reading the K/V cache in place (the kernels of fxquant::gqa_attention).

One program takes one (batch row, K/V head), one slice of the keys and up to 64 query rows: the
rows are the G query heads that share that K/V head times the Lq query positions (row r: head
kv*G + r // Lq, position r % Lq), so each K/V tile is read once for all of them (once per 64 rows
beyond that), with no repeated copy of the cache. Key slices ("splits") keep the GPU busy when batch x K/V heads alone are too few programs
(decode at batch 1: 8 programs for a Llama-3-8B shape); each split keeps a running max, a running
sum and an unnormalised output (flash-decoding), and a second kernel combines the splits. With one
split the first kernel normalises and stores the output itself.

Key tiles whose mask allows no query row are skipped before K and V are loaded: a static cache
masks every position past the current length, so early decode steps read only what is filled.
A row that no key is allowed for gets zeros (the math formula would give NaN).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..attention import kernel_dtypes_fit
from .common import INTERPRETED, eager

LOG2E = 1.4426950408889634

MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)   # True: the key takes part (SDPA's convention)
MASK_FLOAT = tl.constexpr(2)  # added to the scaled scores (-inf: left out)

MAX_ROWS = 64  # query rows per program (held in registers); more rows take more programs


@triton.jit
def gqa_decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                      sm_b, sm_h, sm_l, sm_n, so_b, so_h, so_l,
                      HKV, LQ, LK, keys_per_split, splits, qk_scale,
                      G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      MASK: tl.constexpr, MASK_HEADS: tl.constexpr, SPLIT: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    rb = tl.program_id(2)  # block of BLOCK_R query rows
    b = (bh // HKV).to(tl.int64)  # batch offsets can pass 2**31 elements (a large cache)
    kv = bh % HKV
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    head = kv * G + r // LQ
    pos = r % LQ
    row_ok = r < G * LQ
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + pos[:, None] * sq_l + d[None, :],
                mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, LK)
    if MASK_HEADS:
        mrow = head
    else:
        mrow = r * 0
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        ok = row_ok[:, None] & n_ok[None, :]
        if MASK == MASK_BOOL:
            allowed = tl.load(mask_ptr + b * sm_b + mrow[:, None] * sm_h + pos[:, None] * sm_l + n[None, :] * sm_n,
                              mask=ok, other=0) != 0
            bias = tl.where(allowed, 0.0, float("-inf"))
        elif MASK == MASK_FLOAT:
            bias = tl.load(mask_ptr + b * sm_b + mrow[:, None] * sm_h + pos[:, None] * sm_l + n[None, :] * sm_n,
                           mask=ok, other=float("-inf")).to(tl.float32)
            # as the math below sees it: a finfo.min "mask" value becomes -inf there, so it is skipped too
            allowed = bias * 1.4426950408889634 > float("-inf")
        else:
            allowed = ok
            bias = tl.where(ok, 0.0, float("-inf"))
        if tl.max(tl.max(allowed.to(tl.int32), axis=1), axis=0) > 0:  # else: nothing to read in this tile
            k = tl.load(k_ptr + b * sk_b + kv * sk_h + n[:, None] * sk_n + d[None, :], mask=n_ok[:, None], other=0.0)
            v = tl.load(v_ptr + b * sv_b + kv * sv_h + n[:, None] * sv_n + d[None, :], mask=n_ok[:, None], other=0.0)
            # log2 domain: exp2(s * log2e) = exp(s); the mask is added before the change of base
            if INTERPRETED:  # the interpreter's dot multiplies bf16 bit patterns as integers
                q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
            s = (tl.dot(q, tl.trans(k)) * qk_scale + bias) * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2 finite
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # p rounded to the cache dtype, as flash kernels do
            m_i = m_new

    if SPLIT:
        base = (bh * tl.num_programs(2) + rb) * splits + split
        i = tl.arange(0, BLOCK_R)
        tl.store(part_ptr + (base * BLOCK_R + i[:, None]) * D + d[None, :], acc)
        tl.store(stat_ptr + (base * 2) * BLOCK_R + i, m_i)
        tl.store(stat_ptr + (base * 2 + 1) * BLOCK_R + i, l_i)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * so_b + head[:, None] * so_h + pos[:, None] * so_l + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def gqa_combine_kernel(part_ptr, stat_ptr, out_ptr, so_b, so_h, so_l, HKV, LQ, splits,
                       G: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr):
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kv = bh % HKV
    i = tl.arange(0, BLOCK_R)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for s in range(0, splits):
        base = (bh * tl.num_programs(1) + rb) * splits + s
        m_s = tl.load(stat_ptr + (base * 2) * BLOCK_R + i)
        l_s = tl.load(stat_ptr + (base * 2 + 1) * BLOCK_R + i)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        beta = tl.exp2(m_s - m_use)
        part = tl.load(part_ptr + (base * BLOCK_R + i[:, None]) * D + d[None, :])
        acc = acc * alpha[:, None] + part * beta[:, None]
        l_sum = l_sum * alpha + l_s * beta
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    r = rb * BLOCK_R + i
    head = kv * G + r // LQ
    pos = r % LQ
    tl.store(out_ptr + b * so_b + head[:, None] * so_h + pos[:, None] * so_l + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(r < G * LQ)[:, None])


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether these kernels take the call (else the op runs SDPA)."""
    return (kernel_dtypes_fit(q.dtype, k.dtype, v.dtype, q.shape[-1], None if mask is None else mask.dtype)
            and q.shape[1] % k.shape[1] == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(bh: int, lk: int, block_n: int, device: torch.device) -> int:
    """Key slices per (batch, K/V head, row block) of `bh` in all: about two programs per SM, whole
    key tiles each."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms = 4  # the interpreter: a few splits, so tests cover the combine kernel
    tiles = triton.cdiv(max(lk, 1), block_n)
    return max(1, min(tiles, triton.cdiv(2 * sms, bh)))


def gqa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, *, splits: int | None = None, block_n: int = 64, block_r: int | None = None,
                         num_warps: int = 4, num_stages: int | None = None, split_factor: float = 1.0) -> torch.Tensor:
    """out [B, H, Lq, D] = softmax(q k^T * scale + mask) v with k, v [B, H // G, Lk, D] (see module
    docstring). `mask`: None, bool (True: attend) or float (added), broadcastable to
    [B, H, Lq, Lk] with its batch dim 1 or B and its head dim 1 or H. Caller checks `fits`.
    block_n 64: on an H100 (BENCHMARKS.md S19) 1.13-1.31x faster than 32 and 1.38-1.86x faster
    than 16 at batch 1 / 8 / 32 with 384 and 2304 cache positions. block_r (query rows per program,
    a power of two >= 16), num_warps, num_stages, split_factor (times the automatic split count): for
    experiments (benchmarks/attention.py)."""
    B, H, LQ, D = q.shape
    HKV, LK = k.shape[1], k.shape[2]
    G = H // HKV
    out = torch.empty((B, H, LQ, D), device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    block_r = block_r or min(MAX_ROWS, max(16, triton.next_power_of_2(G * LQ)))
    RB = triton.cdiv(G * LQ, block_r)
    S = splits or max(1, int(_splits(B * HKV * RB, LK, block_n, q.device) * split_factor))
    keys_per_split = max(block_n, triton.cdiv(triton.cdiv(LK, S), block_n) * block_n)
    S = max(1, triton.cdiv(LK, keys_per_split))
    if mask is None:
        kind, mstr, mheads, mptr = MASK_NONE, (0, 0, 0, 0), False, q
    else:
        kind = MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT
        mask = mask.expand(mask.shape[0], mask.shape[1], LQ, LK)
        mstr = tuple(0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
        mheads, mptr = mask.shape[1] != 1, mask
    if S > 1:
        part = torch.empty((B * HKV * RB * S * block_r * D,), device=q.device, dtype=torch.float32)
        stat = torch.empty((B * HKV * RB * S * 2 * block_r,), device=q.device, dtype=torch.float32)
    else:
        part = stat = out  # not touched
    eager(gqa_decode_kernel)[(B * HKV, S, RB)](
        q, k, v, mptr, out, part, stat,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *mstr, out.stride(0), out.stride(1), out.stride(2),
        HKV, LQ, LK, keys_per_split, S, scale,
        G=G, D=D, BLOCK_R=block_r, BLOCK_N=block_n, MASK=kind, MASK_HEADS=mheads, SPLIT=S > 1, num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}))
    if S > 1:
        eager(gqa_combine_kernel)[(B * HKV, RB)](
            part, stat, out, out.stride(0), out.stride(1), out.stride(2), HKV, LQ, S,
            G=G, D=D, BLOCK_R=block_r, num_warps=4)
    return out
