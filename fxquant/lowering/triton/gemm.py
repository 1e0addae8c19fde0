"""Tensor-core tiled GEMM for every scheme, plus a weight dequantization kernel.

Weight-only schemes dequantize the weight tile in registers inside the main loop and feed it to
a bf16/fp16 `tl.dot`; W8A8 and FP8 feed int8 / e4m3 tiles straight to an int8 / fp8 `tl.dot`.
Scales and bias are applied in the epilogue. SWAP computes out^T = W x^T so that small M sits on
the MMA's narrow N side (the weight fills the wide M side), and so that the dequantized weight
is the register-sourced A operand. Split-K (split_k > 1, REDUCE_FIXUP): every split stores its
fp32 partial to a workspace and bumps a per-tile counter; the split that arrives last sums the
partials (in split order: deterministic) and writes the output, so the output needs no
zero-fill and no fp32 -> out copy kernel.
TMA (Hopper): x and the packed weight come in through tensor descriptors (the copy engine, no
per-thread address arithmetic; out-of-range rows and columns read as zero).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .common import (INTERPRETED, MAGIC_BITS, MAGIC_Q8, SC_ROW, SC_TENSOR, WK_INT4, WK_INT4_MMA, WK_INT8_MMA,
                     WK_FP8_MMA, WK_PLAIN)


@triton.jit
def weight_tile(w_ptr, w_desc, s_ptr, rn, n0, kt, N, K, WKIND: tl.constexpr, GROUP: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr, TMA: tl.constexpr):
    """Weight tile [BN, BK] (K-tile kt; rows n0.., wrapped into rn) in dtype DT. int4 is fully
    dequantized (scale, zero); int8/fp8 come back unscaled (their per-row scale is applied in the
    epilogue). TMA: the packed bytes are read through w_desc instead of w_ptr. WK_INT4_MMA gathers
    each weight's byte from the MMA-fragment layout (numerics.pack_int4_mma): correct anywhere, but
    byte loads (the CUDA kernels read that layout fast; these are its fallback)."""
    if WKIND == WK_INT4 or WKIND == WK_INT4_MMA:
        if WKIND == WK_INT4_MMA:
            k = kt * BK + tl.arange(0, BK)
            r2 = rn[:, None]
            byte = ((r2 // 16 * (K // 64) + k[None, :] // 64) * 512
                    + (((r2 % 8) * 4 + (k[None, :] % 8) // 2) * 4 + (k[None, :] % 64) // 16) * 4
                    + (k[None, :] % 2) * 2 + (k[None, :] % 16) // 8)
            p = tl.load(w_ptr + byte, mask=k[None, :] < K, other=0).to(tl.int32)
            shift = (r2 % 16 // 8 * 4).to(tl.int32)  # rows 8..15 of a block: the high nibble
            q = (((p >> shift) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
        else:
            if TMA:
                p = w_desc.load([n0, kt * (BK // 2)]).to(tl.int32)
            else:
                kh = kt * (BK // 2) + tl.arange(0, BK // 2)
                p = tl.load(w_ptr + rn[:, None] * (K // 2) + kh[None, :], mask=kh[None, :] < K // 2,
                            other=0).to(tl.int32)
            lo = ((p & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
            hi = ((p >> 4) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
            q = tl.reshape(tl.join(lo, hi), (BN, BK))  # byte j -> k = 2j (low), 2j + 1 (high)
        if BK <= GROUP:
            szp = s_ptr + ((kt * BK) // GROUP * N + rn) * 2
            w = q * tl.load(szp).to(tl.float32)[:, None] + tl.load(szp + 1).to(tl.float32)[:, None]
        else:
            NG: tl.constexpr = BK // GROUP
            g = kt * NG + tl.arange(0, NG)
            gm = g[None, :] < K // GROUP
            szp = s_ptr + (g[None, :] * N + rn[:, None]) * 2
            sc = tl.load(szp, mask=gm, other=0.0).to(tl.float32)
            zp = tl.load(szp + 1, mask=gm, other=0.0).to(tl.float32)
            w = tl.reshape(tl.reshape(q, (BN, NG, GROUP)) * sc[:, :, None] + zp[:, :, None], (BN, BK))
        return w.to(DT)
    elif WKIND == WK_PLAIN:  # already dequantized: a plain GEMM operand (no TMA for it)
        k = kt * BK + tl.arange(0, BK)
        return tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=k[None, :] < K, other=0.0).to(DT)
    elif TMA:
        w = w_desc.load([n0, kt * BK])
        if WKIND == WK_FP8_MMA or WKIND == WK_INT8_MMA:
            return w
        if INTERPRETED:  # the interpreter's int8 -> bf16 cast is wrong; go through fp32
            w = w.to(tl.float32)
        return w.to(DT)
    elif WKIND == WK_FP8_MMA and not INTERPRETED:
        # Loaded as e4m3 itself: a bitcast after the load would stop the pipelined shared-memory
        # tile from feeding wgmma directly (it took a register round trip and a second store).
        k = kt * BK + tl.arange(0, BK)
        return tl.load(w_ptr + rn[:, None] * K + k[None, :], mask=k[None, :] < K, other=0.0)
    else:
        k = kt * BK + tl.arange(0, BK)
        # Loaded as raw bytes so masked lanes are 0 (the interpreter has no fp8 `other`).
        w = tl.load(w_ptr.to(tl.pointer_type(tl.int8)) + rn[:, None] * K + k[None, :],
                    mask=k[None, :] < K, other=0)
        w = w.to(w_ptr.dtype.element_ty, bitcast=True)
        if INTERPRETED:  # the interpreter's int8 -> bf16 cast is wrong; go through fp32
            w = w.to(tl.float32)
        return w.to(DT)


@triton.jit
def tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Program pid's output tile in grouped order (GROUP_M row-tiles share each weight column-tile
    while it is in L2): (pid_m, pid_n, offs_m, offs_n, rm, rn); rm / rn are the offsets wrapped
    into range, so loads need no row mask (the store is masked)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsz
    pid_n = (pid % width) // gsz
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    return pid_m, pid_n, offs_m, offs_n, rm, rn


@triton.jit
def gemm_tiles(x_ptr, w_ptr, s_ptr, x_desc, w_desc, rm, rn, pid_m, pid_n, pid_k, split_k, N, K, stride_xm,
               stride_xk, WKIND: tl.constexpr, GROUP: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr,
               XK1: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP8_ACC: tl.constexpr,
               TMA: tl.constexpr):
    """The main loop: x rows rm (wrapped, so no row mask) times weight rows rn over the K-tiles
    pid_k, pid_k + split_k, ...; returns the raw accumulator, [BM, BN] ([BN, BM] if SWAP), int32
    for int8 x int8, else float32. Shared by gemm_kernel and the Inductor template (templates.py)."""
    offs_k = tl.arange(0, BK)
    if WKIND == WK_INT8_MMA:
        ACC: tl.constexpr = tl.int32
        DT: tl.constexpr = tl.int8
    elif WKIND == WK_FP8_MMA:
        ACC: tl.constexpr = tl.float32
        DT: tl.constexpr = tl.float8e4nv
    else:
        ACC: tl.constexpr = tl.float32
        DT: tl.constexpr = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BN, BM), ACC)
    else:
        acc = tl.zeros((BM, BN), ACC)

    for kt in range(pid_k, tl.cdiv(K, BK), split_k):
        k = kt * BK + offs_k
        # XK1: x's K stride is 1, stated at compile time so the x tile can be copied
        # asynchronously (pipelined) rather than loaded synchronously every iteration.
        xoff = rm[:, None] * stride_xm + (k[None, :] if XK1 else k[None, :] * stride_xk)
        if TMA:
            a = x_desc.load([pid_m * BM, kt * BK])
        elif WKIND == WK_FP8_MMA and not INTERPRETED:  # as e4m3: see weight_tile
            a = tl.load(x_ptr + xoff, mask=k[None, :] < K, other=0.0)
        elif WKIND == WK_INT8_MMA or WKIND == WK_FP8_MMA:  # 8-bit x: raw bytes, so masked lanes are 0
            a = tl.load(x_ptr.to(tl.pointer_type(tl.int8)) + xoff, mask=k[None, :] < K, other=0)
            a = a.to(DT, bitcast=True)
        else:
            a = tl.load(x_ptr + xoff, mask=k[None, :] < K, other=0.0)
        w = weight_tile(w_ptr, w_desc, s_ptr, rn, pid_n * BN, kt, N, K, WKIND, GROUP, BN, BK, DT, TMA)
        if INTERPRETED and DT == tl.bfloat16:
            # The interpreter's dot multiplies bf16 bit patterns as integers: go through fp32.
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:  # fp32 activations: full-precision dot, as the fp32 reference
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        elif WKIND == WK_FP8_MMA and FP8_ACC > 0:
            # Hopper's fp8 MMA adds into its accumulator with reduced precision; Triton's default
            # on sm_90 never promotes. FP8_ACC: promote to the fp32 accumulator every FP8_ACC
            # elements of K (<= BK).
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc, out_dtype=ACC, max_num_imprecise_acc=FP8_ACC)
            else:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=ACC, max_num_imprecise_acc=FP8_ACC)
        elif SWAP:
            acc = tl.dot(w, tl.trans(a), acc, out_dtype=ACC)
        else:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=ACC)

    return acc


@triton.jit
def scale_acc(acc, xs_ptr, s_ptr, mi, ni, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr):
    """The accumulator in float32 times the activation scales (rows mi) and the weight scales
    (columns ni), per row / per tensor / none."""
    out = tl.cast(acc, tl.float32)
    if XS_MODE == SC_ROW:
        out = out * tl.load(xs_ptr + mi)
    elif XS_MODE == SC_TENSOR:
        out = out * tl.load(xs_ptr)
    if WS_MODE == SC_ROW:
        out = out * tl.load(s_ptr + ni).to(tl.float32)
    elif WS_MODE == SC_TENSOR:
        out = out * tl.load(s_ptr).to(tl.float32)
    return out


REDUCE_NONE = tl.constexpr(0)
REDUCE_FIXUP = tl.constexpr(1)


@triton.jit(do_not_specialize=["M", "split_k"])
def gemm_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, x_desc, w_desc, M, N, K,
                stride_xm, stride_xk, stride_om, split_k,
                WKIND: tl.constexpr, XS_MODE: tl.constexpr, WS_MODE: tl.constexpr,
                GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
                SWAP: tl.constexpr, IEEE: tl.constexpr, XK1: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FP8_ACC: tl.constexpr,
                PDL: tl.constexpr, TMA: tl.constexpr):
    if PDL:  # launched with programmatic dependent launch: x comes from the kernel before
        gdc_wait()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n, offs_m, offs_n, rm, rn = tile_of(pid, M, N, BM, BN, GROUP_M)
    acc = gemm_tiles(x_ptr, w_ptr, s_ptr, x_desc, w_desc, rm, rn, pid_m, pid_n, pid_k, split_k, N, K, stride_xm,
                     stride_xk, WKIND, GROUP, SWAP, IEEE, XK1, BM, BN, BK, FP8_ACC, TMA)

    # Epilogue in the accumulator's orientation.
    if SWAP:
        mi = rm[None, :]
        ni = rn[:, None]
        om = offs_m[None, :]
        on = offs_n[:, None]
    else:
        mi = rm[:, None]
        ni = rn[None, :]
        om = offs_m[:, None]
        on = offs_n[None, :]
    out = scale_acc(acc, xs_ptr, s_ptr, mi, ni, XS_MODE, WS_MODE)
    mask = (om < M) & (on < N)
    ptrs = out_ptr + om.to(tl.int64) * stride_om + on
    if REDUCE == REDUCE_FIXUP:
        # ws [split_k, M, N] fp32. Barrier, then a gpu-scope acq_rel atomic: this program's
        # partial is visible before its arrival is counted (and the others' before we read them).
        wsp = ws_ptr + om.to(tl.int64) * N + on
        MN = tl.cast(M, tl.int64) * N  # not M.to(): torch 2.11 traces scalar args as Python ints
        tl.store(wsp + pid_k * MN, out, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            # Summed in split order whichever split arrived last: the output is bitwise the
            # same on every call. (Reading this program's own partial back from the workspace
            # instead of keeping `out` live gave wrong sums on H100 for int8 swapped TMA tiles;
            # cause not found, session 7.)
            total = tl.zeros_like(out)
            for s in range(0, split_k):
                if s == pid_k:
                    total += out
                else:
                    total += tl.load(wsp + s * MN, mask=mask, other=0.0, cache_modifier=".cg")
            out = total
            if HAS_BIAS:
                out = out + tl.load(b_ptr + ni).to(tl.float32)
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_BIAS:
            out = out + tl.load(b_ptr + ni).to(tl.float32)
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, N0, NR, WKIND: tl.constexpr, WS_MODE: tl.constexpr,
                   GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Packed weight rows N0 .. N0 + NR (of N) -> out[NR, K] in out's dtype, computed in fp32 exactly
    as numerics.dequantize_*. The row window lets a chunk read the whole weight's scales in place."""
    pid_n = tl.program_id(0)
    kt = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rn = (N0 + offs_n % NR).to(tl.int64)
    w = weight_tile(w_ptr, w_ptr, s_ptr, rn, N0 + pid_n * BN, kt, N, K, WKIND, GROUP, BN, BK, tl.float32, False)
    if WS_MODE == SC_ROW:
        w = w * tl.load(s_ptr + rn).to(tl.float32)[:, None]
    elif WS_MODE == SC_TENSOR:
        w = w * tl.load(s_ptr).to(tl.float32)
    k = kt * BK + tl.arange(0, BK)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + k[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < NR) & (k[None, :] < K))


@triton.jit
def scale_epilogue_kernel(acc_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, M, N, HAS_BIAS: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr):
    """out = acc (int32 [M, N], from torch._int_mm) * x scale per row * weight scale per column
    (+ bias), in fp32, cast to out's dtype: the int8 GEMM epilogue for the cuBLAS kernel."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm[:, None].to(tl.int64) * N + rn[None, :]
    out = tl.load(acc_ptr + off, mask=mask, other=0).to(tl.float32)
    out = out * tl.load(xs_ptr + rm, mask=rm < M, other=0.0)[:, None]
    out = out * tl.load(ws_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out = out + tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)
