"""Repeat kernel configs many times on the GPU: is each output always the same, and right?

A compiler race (a missing barrier) shows up as an output that differs between identical calls.
Takes the shipped table's exact-shape entries for the given schemes and M range (plus any
--extra configs), runs each REPS times on one fixed random x, and counts outputs that differ
bitwise from the first call and outputs out of tolerance against numerics.py.

  python benchmarks/stress_configs.py --schemes int4_wo,int8_wo --ms 64,128,256,512,1024 --reps 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxquant.lowering.triton import dispatch as D  # noqa: E402

import linear as LB  # noqa: E402

NAMES = {"int4_wo": "w4a16_g128", "int8_wo": "w8a16", "int8_dyn": "w8a8_int8", "fp8_dyn_row": "fp8_row"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="int4_wo,int8_wo,int8_dyn,fp8_dyn_row")
    ap.add_argument("--ms", default="64,128,256,512,1024")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--extra", action="append", default=[],
                    help="scheme|NxK|M|config-json: a config outside the table to stress too")
    args = ap.parse_args(argv)
    ms = {int(m) for m in args.ms.split(",")}
    table = json.loads(D._SHIPPED_PATH.read_text())[D._device_info(torch.device("cuda"))[0]]
    jobs = []
    for key, e in sorted(table.items()):
        parts = key.split("|")
        if len(parts) != 5 or parts[0] not in args.schemes.split(","):
            continue
        m = int(parts[4][1:])
        if m in ms and e["kind"] == "gemm":
            n, k = (int(v) for v in parts[2].split("x"))
            jobs.append((parts[0], n, k, m, D.KernelConfig.from_json(e)))
    for spec in args.extra:
        scheme, nk, m, cfg = spec.split("|", 3)
        n, k = (int(v) for v in nk.split("x"))
        jobs.append((scheme, n, k, int(m), D.KernelConfig(**json.loads(cfg))))
    bad = 0
    layers = {}
    for scheme, n, k, m, cfg in jobs:
        if (scheme, n, k) not in layers:
            layers.clear()
            torch.cuda.empty_cache()
            layers[(scheme, n, k)] = LB.Layer(NAMES[scheme], n, k, copies=1)
        L = layers[(scheme, n, k)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = L.reference(x)
        fn = L.fn(x, 0, cfg)
        first = fn().clone()
        diff = wrong = 0
        worst = LB.rel_err(first, ref)
        for _ in range(args.reps):
            out = fn()
            if not torch.equal(out, first):
                diff += 1
                e = LB.rel_err(out, ref)
                worst = max(worst, e)
                wrong += not e <= L.tol
        wrong += not LB.rel_err(first, ref) <= L.tol
        torch.cuda.synchronize()
        flag = "BAD" if diff or wrong else "ok"
        bad += flag == "BAD"
        print(f"{flag:3s} {scheme:11s} {n:5d}x{k:<5d} M={m:<5d} differ {diff:3d}/{args.reps} wrong {wrong:3d} "
              f"worst err {worst:.2e}  {cfg}", flush=True)
    print(f"stress: {len(jobs)} configs, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
