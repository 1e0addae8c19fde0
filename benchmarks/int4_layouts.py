#!/usr/bin/env python3
"""int4 weight-only in both layouts side by side (Int4WeightOnly(layout="rows") and layout="mma"), against
bf16 in the same round-robin, on the GPU: the whole op (the dispatcher's choice) at every M, plus the MMA
layout's decode block shapes (FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT="RT,WARPS,U") at M <= 16 and both
layouts' CUTLASS tiles at M >= 128.

Same method as linear.py: CUDA-graph replay over rotated weight copies (about 512 MB per replay at
M < 512), medians, every output checked against the fp32 reference (rel. Frobenius error <= 1e-2).
Prints speedup over bf16 (and the packed weight's TB/s at M <= 16).

  python benchmarks/int4_layouts.py --ms 1,16,4096 --decode 1,16,2;2,8,2 --out int4_layouts.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear as LB  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

TILES = {"128x256": D.KernelConfig("cutlass", bn=128, bk=64, bm=256),
         "64x128": D.KernelConfig("cutlass", bn=64, bk=64, bm=128),
         "ping_64x256": D.KernelConfig("cutlass", bn=64, bk=64, bm=256, warps=4)}
ENV = "FXQUANT_CXX_INT4_MMA_LAYOUT_VARIANT"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,4,16,64,256,1024,4096")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--decode", default="", help="';'-separated RT,WARPS,U decode block shapes to time at M <= 16")
    ap.add_argument("--tiles", action="store_true", help="time every CUTLASS tile of both layouts at M >= 128")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    decode = [d for d in args.decode.split(";") if d]
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        layers = {name: LB.Layer(name, n, k) for name in ("bf16", "w4a16_g128", "w4a16_g128_mma")}
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            fns = {"bf16": (layers["bf16"], None), "rows": (layers["w4a16_g128"], None),
                   "mma": (layers["w4a16_g128_mma"], None)}
            if args.tiles and m >= 128:
                for t, cfg in TILES.items():
                    fns[f"rows@{t}"] = (layers["w4a16_g128"], cfg)
                    fns[f"mma@{t}"] = (layers["w4a16_g128_mma"], cfg)
            graphs, errs = {}, {}
            for key, (L, cfg) in fns.items():
                nc = LB.n_copies(len(L.copies), m)
                calls = [L.fn(x, i, cfg) for i in range(nc)]
                if L.scheme is not None:
                    errs[key] = LB.rel_err(calls[0](), L.reference(x))
                graphs[key] = (LB.capture(calls), nc)
            L = layers["w4a16_g128_mma"]
            for d in decode if m <= 16 else ():
                os.environ[ENV] = d  # read at each call: the capture keeps this shape
                nc = LB.n_copies(len(L.copies), m)
                calls = [L.fn(x, i) for i in range(nc)]
                errs[f"mma@{d}"] = LB.rel_err(calls[0](), L.reference(x))
                graphs[f"mma@{d}"] = (LB.capture(calls), nc)
            os.environ.pop(ENV, None)
            us = LB.time_graphs(graphs)
            bad = {key: e for key, e in errs.items() if not e <= LB.TOL}
            for key, t in us.items():
                nbytes = layers["bf16" if key == "bf16" else "w4a16_g128"].bytes
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": nbytes / t / 1e6, "rel_err": errs.get(key)})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {us['bf16'] / t:.2f}x" for key, t in us.items() if key != "bf16")
                  + (f"   WRONG {bad}" if bad else ""), flush=True)
            if bad:
                return 1
    keys = list(dict.fromkeys(r["kernel"] for r in rows if r["kernel"] != "bf16"))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print(f"\nspeedup over bf16 per shape ({args.shapes}); TB/s of the packed weight at M <= 16")
    for key in keys:
        for m in (int(v) for v in args.ms.split(",")):
            sel = [r for r in rows if r["kernel"] == key and r["M"] == m]
            if sel:
                print(f"{key:>16s} M={m:<5d} " + " / ".join(
                    f"{r['speedup']:.2f}" + (f" ({r['TBps']:.2f})" if m <= 16 else "") for r in sel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
