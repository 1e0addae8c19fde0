"""GEMV / skinny-M kernel (M <= 16): streams the packed weight once, CUDA-core FMAs.

One program owns BLOCK_N output columns for all (<= BLOCK_M) rows and walks the whole of K, so
there is no split-K reduction (dynamic schemes quantize x in a kernel before). Decode is bandwidth-bound: the tile
shape only has to keep enough bytes in flight per SM.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .common import MAGIC_BITS, MAGIC_Q8, SC_NONE, SC_ROW, SC_TENSOR, WK_INT4


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
def gemv_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_om,
                WKIND: tl.constexpr, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr, GROUP: tl.constexpr,
                HAS_BIAS: tl.constexpr, XK1: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """XS_MODE != SC_NONE: x holds already-quantized int8 / e4m3 activations with scales xs.
    (Dynamic schemes used to quantize x inside every program: on the H100 that GEMV took
    18.7 µs at M = 1 on 4096x4096 against 9.7 µs for the same int8 weight without it.)
    PDL: launched with programmatic dependent launch after that quantization kernel: the first
    weight tile is requested before waiting for x (int8 / fp8 weights only)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)  # wrapped so weight loads need no mask; the store is masked
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    if WKIND == WK_INT4:
        # View each row as int32 words of 8 nibbles; tile [BLOCK_N, groups, words per group].
        # (Unpacking to a [.., words, 8] tile so x loads contiguously measured 2x slower on
        # the H100: the 4-D reductions cost more than x's strided loads, which hit L1.)
        NG: tl.constexpr = BLOCK_K // GROUP
        WPG: tl.constexpr = GROUP // 8
        w32 = w_ptr.to(tl.pointer_type(tl.int32))
        offs_g = tl.arange(0, NG)
        offs_w = tl.arange(0, WPG)
        n_groups = K // GROUP
        # Software prefetch: the next K-tile's words and scales are loaded before this tile's
        # FMAs, so each program keeps two tiles of weight bytes in flight.
        words, sc, zp = _int4_tile(w32, s_ptr, rn, offs_g, offs_w, 0, N, K, n_groups, GROUP, WPG)
        for k0 in range(0, K, BLOCK_K):
            g = k0 // GROUP + offs_g
            words_n, sc_n, zp_n = _int4_tile(w32, s_ptr, rn, offs_g, offs_w, (k0 + BLOCK_K) // GROUP, N, K,
                                             n_groups, GROUP, WPG)
            kb = g[:, None] * GROUP + offs_w[None, :] * 8
            for m in tl.static_range(BLOCK_M):
                t = tl.zeros((BLOCK_N, NG, WPG), tl.float32)
                xsum = tl.zeros((NG, WPG), tl.float32)
                for i in tl.static_range(8):
                    xi = tl.load(x_ptr + m * stride_xm + (kb + i) * stride_xk,
                                 mask=g[:, None] < tl.where(m < M, n_groups, 0), other=0.0).to(tl.float32)
                    qi = (((words >> (4 * i)) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
                    t += qi * xi[None, :, :]
                    xsum += xi
                # sum_k ((q-8)*s + z) * x = s * sum (q-8) x + z * sum x, per group
                part = tl.sum(tl.sum(t, 2) * sc + zp * tl.sum(xsum, 1)[None, :], 1)
                acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
            words, sc, zp = words_n, sc_n, zp_n
    else:
        w8 = w_ptr.to(tl.pointer_type(tl.int8))  # raw bytes: masked lanes are exactly 0
        wb = tl.load(w8 + rn[:, None] * K + offs_k[None, :], mask=offs_k[None, :] < K, other=0)
        if PDL:
            gdc_wait()  # x and its scales come from the kernel before
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            kn = k + BLOCK_K
            wb_n = tl.load(w8 + rn[:, None] * K + kn[None, :], mask=kn[None, :] < K, other=0)  # prefetch
            w = wb.to(w_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                xoff = m * stride_xm + (k if XK1 else k * stride_xk)
                xmask = k < tl.where(m < M, K, 0)
                if XS_MODE == SC_NONE:
                    xm = tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
                else:  # 8-bit x: raw bytes, so masked lanes are exactly 0
                    xm = tl.load(x_ptr.to(tl.pointer_type(tl.int8)) + xoff, mask=xmask, other=0)
                    xm = xm.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
                part = tl.sum(w * xm[None, :], 1)
                acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
            wb = wb_n

    if XS_MODE == SC_ROW:
        acc = acc * tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    elif XS_MODE == SC_TENSOR:
        acc = acc * tl.load(xs_ptr)
    if WS_MODE == SC_ROW:
        acc = acc * tl.load(s_ptr + rn).to(tl.float32)[None, :]
    elif WS_MODE == SC_TENSOR:
        acc = acc * tl.load(s_ptr).to(tl.float32)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
