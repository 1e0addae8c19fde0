#!/usr/bin/env python3
"""Probe: the CUTLASS mixed-input W4A16 GEMM (fxquant/lowering/cuda/csrc/int4_wgmma.cu) against
bf16 cuBLAS and fxquant's current int4 dispatcher, at large M, on the issue-3 shapes.

It ran (BENCHMARKS.md S8) against the standalone version of the kernel in commit 80c66a9
(`fxquant/lowering/cuda/csrc/int4_wgmma.cu` there: extern "C" entry points, signed nibbles, so the
weight is passed as q ^ 8). The op library's version since then (csrc_cutlass/) takes unsigned
nibbles and is measured by `linear.py --schemes w4a16_g128@cutlass`; to re-run this probe, build
that commit's file. It is built beforehand as a plain shared library (no torch) and loaded with ctypes:

  nvcc -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -DNDEBUG \\
      -I$CUTLASS/include -I$CUTLASS/tools/util/include -Xcompiler -fPIC -shared \\
      -o build/libfxq_int4_wgmma.so fxquant/lowering/cuda/csrc/int4_wgmma.cu
  python benchmarks/probe_wgmma.py --lib build/libfxq_int4_wgmma.so --out probe.json

Each timing is triton.testing.do_bench_cudagraph over a call that runs the GEMM on every one of
several weight copies (> 50 MB in all, so the weight is not L2-resident); medians, per GEMM.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant  # noqa: E402,F401
from fxquant import numerics as nq  # noqa: E402

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
VARIANTS = {0: "coop 128x128", 1: "coop 128x256", 2: "pingpong 64x128"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--ms", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import triton.testing
    lib = ctypes.CDLL(args.lib)
    lib.fxq_int4_wgmma.restype = ctypes.c_int
    lib.fxq_int4_wgmma.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4 + \
        [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fxq_int4_wgmma_workspace.restype = ctypes.c_size_t
    lib.fxq_int4_wgmma_workspace.argtypes = [ctypes.c_int] * 5
    g = args.group
    rows = []
    print(f"{'N x K':>12} {'M':>5} | {'bf16':>8} | {'fxquant now':>11} | " +
          " | ".join(f"{v:>15}" for v in VARIANTS.values()) + " | rel err")
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k) / k ** 0.5
        q, sz = nq.quantize_int4_groupwise(w, g)
        packed = nq.pack_int4(q)
        w_deq = nq.dequantize_int4(packed, sz, g, torch.bfloat16).cuda()
        copies = max(2, -(-64 * 2**20 // (n * k // 2)))  # > 64 MB of packed weight
        pk = [packed.cuda().clone() for _ in range(copies)]
        wq = [(p ^ 0x88) for p in pk]  # signed nibbles: q - 8
        szc = sz.to(torch.bfloat16).cuda()
        scale, zero = szc[..., 0].contiguous(), szc[..., 1].contiguous()  # [K / g, N]
        wb = [w_deq.clone() for _ in range(max(2, -(-64 * 2**20 // (n * k * 2))))]
        for m in [int(v) for v in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = (x.float() @ w_deq.float().t())
            row = dict(N=n, K=k, M=m)

            def bench(fn, per):
                return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3 / per
            row["bf16_us"] = bench(lambda: [F.linear(x, wi) for wi in wb], len(wb))
            row["fxquant_us"] = bench(lambda: [torch.ops.fxquant.int4_weight_only_linear(x, p, szc, None, g)
                                               for p in pk], len(pk))
            for v in VARIANTS:
                ws_bytes = lib.fxq_int4_wgmma_workspace(v, m, n, k, g)
                ws = torch.empty(max(ws_bytes, 1), device="cuda", dtype=torch.uint8)

                def call(p, v=v, ws=ws, ws_bytes=ws_bytes):
                    rc = lib.fxq_int4_wgmma(v, p.data_ptr(), x.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                                            out.data_ptr(), m, n, k, g, ws.data_ptr(), ws_bytes,
                                            torch.cuda.current_stream().cuda_stream)
                    if rc:
                        raise RuntimeError(f"fxq_int4_wgmma variant {v}: status {rc}")
                try:
                    call(wq[0])
                    torch.cuda.synchronize()
                    err = float((out.float() - ref).norm() / ref.norm())
                    row[f"v{v}_err"] = err
                    row[f"v{v}_us"] = bench(lambda: [call(p) for p in wq], len(wq))
                except Exception as e:  # noqa: BLE001
                    row[f"v{v}_error"] = str(e)[:200]
            rows.append(row)
            cells = []
            for v in VARIANTS:
                cells.append(f"{row[f'v{v}_us']:6.1f}us {row['bf16_us'] / row[f'v{v}_us']:5.2f}x" if f"v{v}_us" in row
                             else f"{row.get(f'v{v}_error', '?')[:15]:>15}")
            errs = " ".join(f"{row[f'v{v}_err']:.1e}" for v in VARIANTS if f"v{v}_err" in row)
            print(f"{n:6d}x{k:<5d} {m:5d} | {row['bf16_us']:6.1f}us | {row['fxquant_us']:6.1f}us "
                  f"{row['bf16_us'] / row['fxquant_us']:4.2f}x | " + " | ".join(cells) + f" | {errs}", flush=True)
        del pk, wq, wb
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows),
                                       indent=1))


if __name__ == "__main__":
    main()
