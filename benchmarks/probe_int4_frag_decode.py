#!/usr/bin/env python3
"""Probe: the int4 decode kernel's arithmetic on the reordered weight layout (docs/int4-decode.md, "One
int4 layout for both ends"), against the shipped C++ kernel (LEAN) and bf16, at M <= 8.

The weight copies are reordered once with CUTLASS's atom, 16 bytes per thread
(probe_src/int4_shuffled.cu: int4_reorder(q, 4)). They are then read by probe_src/int4_frag_decode.cu
under several block shapes, RT x WARPS x U (16-row blocks per thread block, warps splitting K, 64-k
blocks loaded per warp step).
Same method as linear.py: CUDA-graph replay over rotated weight copies, medians. Each probe output is
checked against the shipped op's. Prints speedup over bf16 and the packed weight's TB/s.

  python benchmarks/probe_int4_frag_decode.py --ms 1,4,8 --blocks 1x16x1,1x16x2 --out probe.json
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,4,8")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--blocks", default="1x16x1,1x8x1,2x8x1,2x4x1,4x4x1",
                    help="RTxWARPSxU: 16-row blocks per thread block, warps splitting K, 64-k blocks per warp step")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load()
    PM.load_probe(("int4_shuffled.cu", "int4_frag_decode.cu"))
    blocks = [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16, lean = LB.Layer("bf16", n, k), LB.Layer("w4a16_g128@cuda", n, k)
        frag = [(torch.ops.fxquant_probe.int4_reorder(p[0], 4), p[1]) for p in lean.copies]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nc = LB.n_copies(len(lean.copies), m)
            ref = lean.fn(x, 0)().float()
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(LB.n_copies(len(bf16.copies), m))]),
                               LB.n_copies(len(bf16.copies), m)),
                      "lean": (LB.capture([lean.fn(x, i) for i in range(nc)]), nc)}
            errs = {}
            for rt, w, u in blocks:
                fns = [(lambda q=q, rt=rt, w=w, u=u:
                        torch.ops.fxquant_probe.int4_frag_linear(x, q[0], q[1], lean.group, rt, w, u)) for q in frag[:nc]]
                errs[f"{rt}x{w}x{u}"] = float((fns[0]().float() - ref).norm() / ref.norm())
                graphs[f"{rt}x{w}x{u}"] = (LB.capture(fns), nc)
            us = LB.time_graphs(graphs)
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": (bf16.bytes if key == "bf16" else lean.bytes) / t / 1e6,
                             **({"rel_err_vs_lean": errs[key]} if key in errs else {})})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {us['bf16'] / t:.2f}x" for key, t in us.items() if key != "bf16")
                  + f"   max rel err vs lean {max(errs.values()):.1e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"\nspeedup over bf16 (weight TB/s) per shape ({args.shapes})")
    for key in ["lean"] + [f"{rt}x{w}x{u}" for rt, w, u in blocks]:
        for m in ms:
            sel = [r for r in rows if r["kernel"] == key and r["M"] == m]
            print(f"{key:>8s} M={m:<3d} " + " / ".join(f"{r['speedup']:.2f} ({r['TBps']:.2f})" for r in sel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
