#!/usr/bin/env python3
"""Probe: the int4 decode kernel on the MMA-fragment layout with its weight bytes in flight held in
shared memory (cp.async, D stages per warp, no block barrier in the loop; probe_src/int4_mma_async.cu),
against the shipped decode kernels (LEAN on the row-major layout, the register-pipelined kernel on the
MMA layout) and bf16, at M <= 8. It asks whether the decode kernels are short of bytes in flight
(docs/int4-decode.md). A config "RTxWARPSxD" (16-row blocks per thread block, warps splitting K,
stages) with a trailing "s" also stages x in shared memory in the MMA's k order.

Same method as linear.py: CUDA-graph replay over rotated weight copies, medians, round-robin. Each probe
output is checked against the shipped mma-layout op's. Prints speedup over bf16 and the packed weight's TB/s.

  python benchmarks/probe_int4_mma_async.py --ms 1,4 --configs 1x16x4,1x16x8,2x8x4s --out probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear as LB  # noqa: E402
import probe_int4_modes as PM  # noqa: E402
from fxquant.lowering.cuda import build  # noqa: E402

SMEM = 227 * 1024


def smem_bytes(rt: int, w: int, d: int, xs: bool, m: int, k: int) -> int:
    static = min(16, 8192 // (rt * 128)) * rt * 16 * 8 * 4  # mma::reduce_store's slots
    return d * w * rt * 576 + (m * k * 2 if xs else 0) + static


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,4")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--configs", default="1x16x4,1x16x8,2x8x4,2x8x8,1x16x4s,2x8x8s,4x4x8")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load()
    PM.load_probe(("int4_mma_async.cu",))
    configs = []
    for c in args.configs.split(","):
        xs = c.endswith("s")
        rt, w, d = (int(v) for v in c.rstrip("s").split("x"))
        configs.append((c, rt, w, d, xs))
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16 = LB.Layer("bf16", n, k)
        lean = LB.Layer("w4a16_g128@cuda", n, k)
        mma = LB.Layer("w4a16_g128_mma@cuda", n, k)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nc = LB.n_copies(len(mma.copies), m)
            ref = mma.fn(x, 0)().float()
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(LB.n_copies(len(bf16.copies), m))]),
                               LB.n_copies(len(bf16.copies), m)),
                      "lean": (LB.capture([lean.fn(x, i) for i in range(LB.n_copies(len(lean.copies), m))]),
                               LB.n_copies(len(lean.copies), m)),
                      "mma": (LB.capture([mma.fn(x, i) for i in range(nc)]), nc)}
            errs = {}
            for name, rt, w, d, xs in configs:
                if smem_bytes(rt, w, d, xs, m, k) > SMEM or (xs and m * k * 2 > 64 * 1024):
                    continue
                fns = [(lambda p=p, rt=rt, w=w, d=d, xs=xs: torch.ops.fxquant_probe.int4_mma_async_linear(
                    x, p[0], p[1], mma.group, rt, w, d, xs)) for p in mma.copies[:nc]]
                out = fns[0]().float()
                errs[name] = float((out - ref).norm() / ref.norm())
                assert errs[name] < 1e-2, f"{name} {n}x{k} M={m}: rel err {errs[name]:.3g} against the shipped op"
                graphs[name] = (LB.capture(fns), nc)
            us = LB.time_graphs(graphs)
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": (bf16.bytes if key == "bf16" else mma.bytes) / t / 1e6,
                             **({"rel_err_vs_mma": errs[key]} if key in errs else {})})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {us['bf16'] / t:.2f}x" for key, t in us.items() if key != "bf16")
                  + (f"   max rel err vs mma {max(errs.values()):.1e}" if errs else ""), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"\nspeedup over bf16 (weight TB/s) per shape ({args.shapes})")
    for key in ["lean", "mma"] + [c[0] for c in configs]:
        for m in ms:
            sel = [r for r in rows if r["kernel"] == key and r["M"] == m]
            if sel:
                print(f"{key:>9s} M={m:<3d} " + " / ".join(f"{r['speedup']:.2f} ({r['TBps']:.2f})" for r in sel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
