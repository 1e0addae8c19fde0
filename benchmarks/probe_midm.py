"""Weight-only GEMM at mid M (128-1024): where does the time go?

A stand-alone experiment kernel (not the shipped one) with the weight in one of three forms, fed
through the same tile loop: bf16 (no dequantization at all: the loop's own ceiling), int8
(a convert), int4 g128 asymmetric (the shipped dequantization arithmetic). Each runs with the
weight as the MMA's register operand (SWAP) or as its shared-memory operand, with plain pointer
loads or Hopper TMA descriptor loads, over a list of tile shapes. Times are CUDA-graph replays
(linear.py's method) next to bf16 cuBLAS and the shipped fxquant op in the same round-robin.

  python benchmarks/probe_midm.py --shapes 4096x4096,28672x4096 --ms 256,512,1024 --out probe.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fxquant.lowering.triton.common import MAGIC_BITS, MAGIC_Q8  # noqa: E402

W_BF16, W_INT8, W_INT4 = 0, 1, 2
WNAMES = {W_BF16: "bf16", W_INT8: "int8", W_INT4: "int4"}


@triton.jit
def probe_kernel(x_ptr, w_ptr, sz_ptr, s_ptr, out_ptr, x_desc, w_desc, M, N, K,
                 WK: tl.constexpr, SWAP: tl.constexpr, TMA: tl.constexpr, GROUP: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
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
    if SWAP:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    for kt in range(0, tl.cdiv(K, BK)):
        if TMA:
            a = x_desc.load([pid_m * BM, kt * BK])
        else:
            k = kt * BK + tl.arange(0, BK)
            a = tl.load(x_ptr + rm[:, None] * K + k[None, :])
        if WK == 2:
            if TMA:
                p = w_desc.load([pid_n * BN, kt * (BK // 2)]).to(tl.int32)
            else:
                kh = kt * (BK // 2) + tl.arange(0, BK // 2)
                p = tl.load(w_ptr + rn[:, None] * (K // 2) + kh[None, :]).to(tl.int32)
            lo = ((p & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
            hi = ((p >> 4) | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC_Q8
            q = tl.reshape(tl.join(lo, hi), (BN, BK))
            szp = sz_ptr + ((kt * BK) // GROUP * N + rn) * 2
            w = (q * tl.load(szp).to(tl.float32)[:, None] + tl.load(szp + 1).to(tl.float32)[:, None]).to(tl.bfloat16)
        else:
            if TMA:
                w = w_desc.load([pid_n * BN, kt * BK])
            else:
                k = kt * BK + tl.arange(0, BK)
                w = tl.load(w_ptr + rn[:, None] * K + k[None, :])
            w = w.to(tl.bfloat16)
        if SWAP:
            acc = tl.dot(w, tl.trans(a), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if SWAP:
        mi = offs_m[None, :]
        ni = offs_n[:, None]
    else:
        mi = offs_m[:, None]
        ni = offs_n[None, :]
    out = acc
    if WK == 1:
        out = out * tl.load(s_ptr + (ni % N)).to(tl.float32)
    tl.store(out_ptr + mi.to(tl.int64) * N + ni, out.to(tl.bfloat16), mask=(mi < M) & (ni < N))


# (BM x-rows, BN weight-rows, BK, warps, stages)
CONFIGS = {
    False: [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
            (128, 64, 128, 4, 3), (256, 128, 64, 8, 3)],
    True: [(128, 64, 128, 4, 3), (256, 64, 64, 4, 3), (128, 128, 64, 8, 3), (256, 128, 64, 8, 3),
           (128, 128, 128, 8, 3), (128, 64, 64, 4, 4)],
}


class Weight:
    def __init__(self, n, k, wk, copies):
        g = torch.Generator(device="cuda").manual_seed(0)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.02)
        if wk == W_BF16:
            self.ref = w.to(torch.bfloat16)
            self.w = [self.ref.clone() for _ in range(copies)]
            self.sz = self.s = self.ref  # unused
        elif wk == W_INT8:
            s = w.abs().amax(1) / 127
            q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
            self.s = s.to(torch.bfloat16)
            self.ref = (q.float() * self.s.float()[:, None])
            self.w = [q.clone() for _ in range(copies)]
            self.sz = self.s
        else:
            gs = 128
            wg = w.view(n, k // gs, gs)
            lo, hi = wg.amin(-1), wg.amax(-1)
            sc = ((hi - lo) / 15).clamp_min(1e-8)
            u = torch.round((wg - lo[..., None]) / sc[..., None]).clamp(0, 15)  # 0..15
            sc_b = sc.to(torch.bfloat16)
            z = (lo + 8 * sc).to(torch.bfloat16)  # w = (u - 8) * s + z
            self.ref = ((u - 8) * sc_b.float()[..., None] + z.float()[..., None]).view(n, k)
            u8 = u.view(n, k).to(torch.uint8)
            packed = (u8[:, 0::2] | (u8[:, 1::2] << 4)).contiguous()
            self.sz = torch.stack([sc_b.t(), z.t()], -1).contiguous()  # [K/g, N, 2]
            self.w = [packed.clone() for _ in range(copies)]
            self.s = self.sz


def launch(x, wt: Weight, i, wk, swap, tma, cfg, out):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bk, warps, stages = cfg
    M, K = x.shape
    N = out.shape[1]
    w = wt.w[i]
    if tma:
        xd = TensorDescriptor.from_tensor(x, [bm, bk])
        wd = TensorDescriptor.from_tensor(w, [bn, bk // 2 if wk == W_INT4 else bk])
    else:
        xd = wd = None
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)

    def run():
        probe_kernel[grid](x, w, wt.sz, wt.s, out, xd, wd, M, N, K, WK=wk, SWAP=swap, TMA=tma,
                           GROUP=128, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps,
                           num_stages=stages)
    return run


def main(argv=None) -> int:
    import linear as LB
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,28672x4096")
    ap.add_argument("--ms", default="256,512,1024")
    ap.add_argument("--wks", default="0,1,2")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", default="", help="semicolon-separated keys (shape|M|variant) not to run")
    ap.add_argument("--trace", type=Path, default=None, help="file that names the variant being run")
    args = ap.parse_args(argv)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        copies = 2 if n * k >= 50e6 else 4
        weights = {wk: Weight(n, k, wk, copies) for wk in (int(v) for v in args.wks.split(","))}
        shipped = {"w4a16_g128": LB.Layer("w4a16_g128", n, k), "w8a16": LB.Layer("w8a16", n, k)}
        bf16 = LB.Layer("bf16", n, k)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if args.trace:
                args.trace.write_text(f"{shape}|{m}|shipped")
            graphs = {"cublas": (LB.capture([bf16.fn(x, i) for i in range(2)]), 2)}
            for name, layer in shipped.items():
                graphs["shipped_" + name] = (LB.capture([layer.fn(x, i) for i in range(2)]), 2)
            for g, _ in graphs.values():
                g.replay()
            torch.cuda.synchronize()
            errs = {}
            for wk, wt in weights.items():
                ref = x.float() @ wt.ref.float().t()
                for swap, tma in itertools.product((False, True), (False, True)):
                    for cfg in CONFIGS[swap]:
                        key = f"{WNAMES[wk]}|{'swap' if swap else 'plain'}|{'tma' if tma else 'ptr'}|{cfg}"
                        if f"{shape}|{m}|{key}" in args.skip.split(";"):
                            continue
                        if args.trace:  # a crash (illegal address) kills the process: name the culprit
                            args.trace.write_text(f"{shape}|{m}|{key}")
                        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                        try:
                            fns = [launch(x, wt, i, wk, swap, tma, cfg, out) for i in range(copies)]
                            fns[0]()
                            torch.cuda.synchronize()
                            errs[key] = ((out.float() - ref).norm() / ref.norm()).item()
                            graphs[key] = (LB.capture(fns), copies)
                            graphs[key][0].replay()
                            torch.cuda.synchronize()
                        except Exception as e:  # noqa: BLE001 - a config that cannot compile is a result
                            print(f"  {shape} M={m} {key}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            if args.trace:
                args.trace.write_text(f"{shape}|{m}|timing")
            us = LB.time_graphs(graphs)
            base = us["cublas"]
            for key, t in us.items():
                rows.append(dict(shape=shape, m=m, key=key, us=t, speedup=base / t, err=errs.get(key)))
            best = {}
            for key, t in us.items():
                fam = "|".join(key.split("|")[:3]) if "|" in key else key
                if fam not in best or t < best[fam][0]:
                    best[fam] = (t, key)
            print(f"== {shape} M={m}: cublas {base:.1f} us", flush=True)
            for fam, (t, key) in sorted(best.items(), key=lambda kv: kv[1][0]):
                e = errs.get(key)
                print(f"  {fam:22s} {base / t:5.2f}x {t:8.1f} us  {key.split('|')[-1] if '|' in key else ''}"
                      f"{'' if e is None else f'  err {e:.4f}'}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
