#!/usr/bin/env python3
"""Probe: does the scale layout hold the int4 decode kernel back at M = 1? probe_src/int4_mma_scales.cu
is the shipped MMA-layout decode kernel (x staged per warp step) with three scale reads: as fxquant
stores them (sl0: [K / group, N] pairs, 64 bytes per row block and group), from a row-block-major copy
(sl1: [N / 16, K / group, 16], a row block's scales contiguous), as stored but once per scale group
instead of once per 64-k block (sl3), from a copy with rows g and g + 8 side by side (sl4: one 8-byte load
per lane and block instead of two 4-byte loads), from the row-block-major copy staged per thread block in
shared memory at the start (sl5), as stored but without allocating in L1 (sl6; sl7 also copies x past L1),
as stored with the kernel held to 40 registers (sl8: three 16-warp blocks per SM), one register pair per
scale group with the group (128) known at compile time (sl9; sl10 also held to 40 registers), and not at
all after group 0 (sl2: wrong output, timing only). A config "RTxWxU" is row blocks per thread block, warps, 64-k blocks per warp step.
Timed beside the shipped op and the Triton read-only kernel of probe_read_ceiling.py, linear.py's method
(CUDA-graph replay over rotated weight copies, medians, round-robin).

  python benchmarks/probe_int4_mma_scales.py --ms 1 --configs 1x16x2,2x8x2 --out probe.json
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
import probe_read_ceiling as RC  # noqa: E402
from fxquant.lowering.cuda import build  # noqa: E402


def tile_major(sz: torch.Tensor) -> torch.Tensor:
    """[G, N, 2] -> [N / 16, G, 16, 2]: each row block's scales and zeros for all of K in one run."""
    g, n, _ = sz.shape
    return sz.reshape(g, n // 16, 16, 2).permute(1, 0, 2, 3).contiguous()


def rows_paired(sz: torch.Tensor) -> torch.Tensor:
    """[G, N, 2] -> [G, N / 16, 8, 2, 2]: rows g and g + 8 of each row block side by side."""
    g, n, _ = sz.shape
    return sz.reshape(g, n // 16, 2, 8, 2).transpose(2, 3).contiguous()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--configs", default="1x16x2,2x4x2,2x8x2,1x16x4,1x8x4,2x4x4")
    ap.add_argument("--sls", default="0,9,10,2")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load()
    PM.load_probe(("int4_mma_scales.cu",))
    configs = [(c, *(int(v) for v in c.split("x"))) for c in args.configs.split(",")]
    op = torch.ops.fxquant_probe.int4_mma_scales_linear
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16 = LB.Layer("bf16", n, k)
        mma = LB.Layer("w4a16_g128_mma@cuda", n, k)
        nc = len(mma.copies)
        tiled = [tile_major(p[1]) for p in mma.copies]
        paired = [rows_paired(p[1]) for p in mma.copies]
        reads, read_buffers = RC.read_graphs(mma.bytes, nc)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = mma.fn(x, 0)().float()
            nb = LB.n_copies(len(bf16.copies), m)
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(nb)]), nb),
                      "mma": (LB.capture([mma.fn(x, i) for i in range(nc)]), nc), **reads}
            errs = {}
            for name, rt, w, u in configs:
                if (k // 64) % u:
                    continue
                for sl in (int(v) for v in args.sls.split(",")):
                    key = f"{name}/sl{sl}"
                    fns = [(lambda p=p, t=t, pr=pr, rt=rt, w=w, u=u, sl=sl: op(
                        x, p[0], t if sl in (1, 5) else pr if sl == 4 else p[1], mma.group, rt, w, u, sl))
                        for p, t, pr in zip(mma.copies, tiled, paired)]
                    out = fns[0]().float()
                    if sl != 2:
                        errs[key] = float((out - ref).norm() / ref.norm())
                        assert errs[key] < 1e-3, f"{key} {n}x{k} M={m}: rel err {errs[key]:.3g} against the shipped op"
                    graphs[key] = (LB.capture(fns), nc)
            us = RC.best_read(LB.time_graphs(graphs))
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": (bf16.bytes if key == "bf16" else mma.bytes) / t / 1e6,
                             **({"rel_err_vs_mma": errs[key]} if key in errs else {})})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {mma.bytes / t / 1e6:.2f}" for key, t in us.items()
                                                   if key != "bf16") + " TB/s", flush=True)
        del graphs, x, reads, read_buffers, bf16, mma, tiled, paired
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"\nweight TB/s (speedup over bf16) per shape ({args.shapes})")
    for key in dict.fromkeys(r["kernel"] for r in rows):
        if key == "bf16":
            continue
        for m in sorted({r["M"] for r in rows}):
            sel = [r for r in rows if r["kernel"] == key and r["M"] == m]
            print(f"{key:>14s} M={m:<2d} " + " / ".join(f"{r['TBps']:.2f} ({r['speedup']:.2f})" for r in sel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
