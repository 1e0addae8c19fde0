"""GEMV / skinny-M kernel (M <= 16): streams the packed weight once, CUDA-core FMAs.

One program owns BLOCK_N output columns for all (<= BLOCK_M) rows and walks the whole of K, so
there is no split-K reduction and one launch per linear. Decode is bandwidth-bound: the tile
shape only has to keep enough bytes in flight per SM.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .act_quant import act_scale, quantize_values
from .common import (AQ_FP8_ROW, AQ_FP8_TENSOR, AQ_INT8_ROW, AQ_NONE, MAGIC_BITS, MAGIC_Q8, SC_ROW, SC_TENSOR,
                     WK_INT4)


@triton.jit
def _int4_tile(w32, s_ptr, rn, offs_g, offs_w, g0, N, K, n_groups, GROUP: tl.constexpr, WPG: tl.constexpr):
    """Words [BLOCK_N, groups, words per group] and fp32 scales / zeros [BLOCK_N, groups] of one K-tile."""
    g = g0 + offs_g
    gm = g < n_groups
    words = tl.load(w32 + rn[:, None, None] * (K // 8) + g[None, :, None] * WPG + offs_w[None, None, :],
                    mask=gm[None, :, None], other=0)
    szp = s_ptr + (g[None, :] * N + rn[:, None]) * 2
    sc = tl.load(szp, mask=gm[None, :], other=0.0).to(tl.float32)
    zp = tl.load(szp + 1, mask=gm[None, :], other=0.0).to(tl.float32)
    return words, sc, zp


@triton.jit(do_not_specialize=["M"])
def gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_om,
                WKIND: tl.constexpr, AQ: tl.constexpr, WS_MODE: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, XK1: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AMAX_BK: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped so weight loads need no mask; the store is masked
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    if AQ != AQ_NONE:
        # Per-token (or per-tensor) activation scale, computed by every program: x is tiny here.
        # AMAX_BK >= K in the common case: one round trip to L2 before the weight loop.
        amax = tl.zeros((BLOCK_M,), tl.float32)
        offs_ka = tl.arange(0, AMAX_BK)
        for k0 in range(0, K, AMAX_BK):
            k = k0 + offs_ka
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xt), 1))
        if AQ == AQ_FP8_TENSOR:
            amax = tl.zeros_like(amax) + tl.max(amax, 0)
        xscale = act_scale(amax, AQ != AQ_INT8_ROW)

    if WKIND == WK_INT4:
        # Each row as int32 words of 8 nibbles (nibble i of word w is k = 8w + i), unpacked to a
        # [BLOCK_N, groups, words, 8] tile so the activations load as one contiguous vector:
        # a per-nibble loop would gather x with stride 8 (8x the L1 traffic of the weight).
        NG: tl.constexpr = BLOCK_K // GROUP
        WPG: tl.constexpr = GROUP // 8
        w32 = w_ptr.to(tl.pointer_type(tl.int32))
        offs_g = tl.arange(0, NG)
        offs_w = tl.arange(0, WPG)
        shifts = tl.arange(0, 8) * 4
        n_groups = K // GROUP
        # Software prefetch: the next K-tile's words and scales are loaded before this tile's
        # FMAs, so each program keeps two tiles of weight bytes in flight.
        words, sc, zp = _int4_tile(w32, s_ptr, rn, offs_g, offs_w, 0, N, K, n_groups, GROUP, WPG)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // GROUP + offs_g
            words_n, sc_n, zp_n = _int4_tile(w32, s_ptr, rn, offs_g, offs_w, (k0 + BLOCK_K) // GROUP, N, K,
                                             n_groups, GROUP, WPG)
            q = ((words[:, :, :, None] >> shifts[None, None, None, :]) & 0xF) | MAGIC_BITS
            q = q.to(tl.float32, bitcast=True) - MAGIC_Q8  # q - 8, exact
            kx = (g[:, None, None] * GROUP + offs_w[None, :, None] * 8 + tl.arange(0, 8)[None, None, :])
            for m in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + m * stride_xm + (kx if XK1 else kx * stride_xk),
                             mask=g[:, None, None] < tl.where(m < M, n_groups, 0), other=0.0).to(tl.float32)
                t = tl.sum(tl.sum(q * xm[None, :, :, :], 3), 2)  # [BLOCK_N, NG]
                xsum = tl.sum(tl.sum(xm, 2), 1)  # [NG]
                # sum_k ((q-8)*s + z) * x = s * sum (q-8) x + z * sum x, per group
                part = tl.sum(t * sc + zp * xsum[None, :], 1)
                acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
            words, sc, zp = words_n, sc_n, zp_n
    else:
        w8 = w_ptr.to(tl.pointer_type(tl.int8))  # raw bytes: masked lanes are exactly 0
        wb = tl.load(w8 + rn[:, None] * K + offs_k[None, :], mask=offs_k[None, :] < K, other=0)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            kn = k + BLOCK_K
            wb_n = tl.load(w8 + rn[:, None] * K + kn[None, :], mask=kn[None, :] < K, other=0)  # prefetch
            w = wb.to(w_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                xm = tl.load(x_ptr + m * stride_xm + (k if XK1 else k * stride_xk),
                             mask=k < tl.where(m < M, K, 0), other=0.0).to(tl.float32)
                if AQ != AQ_NONE:
                    sm = tl.sum(tl.where(offs_m == m, xscale, 0.0), 0)
                    xm = quantize_values(xm, sm, AQ >= AQ_FP8_ROW).to(tl.float32)
                part = tl.sum(w * xm[None, :], 1)
                acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
            wb = wb_n

    if AQ != AQ_NONE:
        acc = acc * xscale[:, None]
    if WS_MODE == SC_ROW:
        acc = acc * tl.load(s_ptr + rn).to(tl.float32)[None, :]
    elif WS_MODE == SC_TENSOR:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
