#!/usr/bin/env python3
"""Probe: a persistent int4 decode kernel on the MMA-fragment layout (probe_src/int4_mma_stream.cu),
against the shipped decode kernel and bf16 at M <= 8, with two read-only ceilings timed in the same
rounds: the Triton read kernel of probe_read_ceiling.py (best block size) and the probe's own loop with
the arithmetic removed ("sread"). Each grid warp streams one contiguous run of 16 x 64 blocks with D
of them in flight in registers; a config "WxBxD" is W warps per block, B blocks per SM, D in flight.

It asks whether issue 6's M = 1 gap (the shipped kernel at 78-88 % of a read-only kernel on the same
bytes) is the shipped kernel's grid: short warps, a block barrier before each store, partial waves.

Same method as linear.py: CUDA-graph replay over rotated weight copies, medians, round-robin. Each
probe output is checked against the shipped op's. Prints speedup over bf16 and the packed TB/s.

  python benchmarks/probe_int4_mma_stream.py --ms 1 --configs 32x1x2,16x1x4,16x1x8 --out probe.json
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

SMEM_PER_SM = 227 * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--configs", default="32x1x2,16x2x2,16x1x4,8x2x4,16x1x8,8x2x8")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load()
    PM.load_probe(("int4_mma_stream.cu",))
    configs = [(c, *(int(v) for v in c.split("x"))) for c in args.configs.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    probe = torch.ops.fxquant_probe
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16 = LB.Layer("bf16", n, k)
        mma = LB.Layer("w4a16_g128_mma@cuda", n, k)
        nc = len(mma.copies)
        reads, read_buffers = RC.read_graphs(mma.bytes, nc)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = mma.fn(x, 0)().float()
            nb = LB.n_copies(len(bf16.copies), m)
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(nb)]), nb),
                      "mma": (LB.capture([mma.fn(x, i) for i in range(nc)]), nc), **reads}
            errs = {}
            for name, w, bps, d in configs:
                if bps * m * (k + 8) * 2 > SMEM_PER_SM - bps * 1024:
                    continue
                fns = [(lambda p=p, w=w, bps=bps, d=d: probe.int4_mma_stream_linear(x, p[0], p[1], mma.group, w, bps, d))
                       for p in mma.copies]
                out = fns[0]().float()
                errs[name] = float((out - ref).norm() / ref.norm())
                assert errs[name] < 1e-2, f"{name} {n}x{k} M={m}: rel err {errs[name]:.3g} against the shipped op"
                graphs[name] = (LB.capture(fns), nc)
                graphs["sread" + name] = (LB.capture(
                    [(lambda p=p, w=w, bps=bps, d=d: probe.int4_mma_stream_read(p[0], p[1], mma.group, w, bps, d))
                     for p in mma.copies]), nc)
            us = RC.best_read(LB.time_graphs(graphs))
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": (bf16.bytes if key == "bf16" else mma.bytes) / t / 1e6,
                             **({"rel_err_vs_mma": errs[key]} if key in errs else {})})
            print(f"{n}x{k} M={m}: " + "  ".join(
                f"{key} {mma.bytes / us[key] / 1e6:.2f}" for key in us if key != "bf16") + " TB/s"
                + (f"   max rel err vs mma {max(errs.values()):.1e}" if errs else ""), flush=True)
        del graphs, x, reads, read_buffers, bf16, mma
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"\nspeedup over bf16 (weight TB/s) per shape ({args.shapes})")
    keys = ["mma", "tread"] + [p + c[0] for c in configs for p in ("", "sread")]
    for key in keys:
        for m in ms:
            sel = [r for r in rows if r["kernel"] == key and r["M"] == m]
            if sel:
                print(f"{key:>14s} M={m:<2d} " + " / ".join(f"{r['speedup']:.2f} ({r['TBps']:.2f})" for r in sel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
