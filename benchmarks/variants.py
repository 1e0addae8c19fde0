"""Kernel-variant experiment: one fxquant scheme under several environment settings, timed
against bf16 cuBLAS in the same round-robin (same method as linear.py: CUDA-graph replay over
rotated weight copies, outputs checked against the fp32 reference).

Each setting is an environment assignment the kernels read at call (so at graph capture) time,
e.g. FXQUANT_CXX_INT4_VARIANT="RT,WARPS" (16-row tiles per block, warps per block) for the C++
int4 tensor-core kernel; a value the kernel does not accept exactly is ignored (its default runs):

  python benchmarks/variants.py --scheme w4a16_g128@cuda --ms 1,4,16,32 \
      --env FXQUANT_CXX_INT4_VARIANT=1,16 --env FXQUANT_CXX_INT4_VARIANT=2,8

Several assignments make one setting when joined with ';' (the setting's label is its value part),
e.g. --env "FXQUANT_CXX_INT4_KERNEL=rows;FXQUANT_CXX_INT4_ROWS=2,8,0".

Prints one table (speedup over bf16; '!' marks an output out of tolerance; the weight bytes read
per call over the time, TB/s) and writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear as LB  # noqa: E402


def parse_settings(specs: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """--env values -> (label, [(name, value), ...]) per setting; the label is the values joined
    with ';'. ValueError names a spec that is not NAME=VALUE[;NAME=VALUE...]."""
    settings = []
    for spec in specs:
        pairs = [tuple(a.split("=", 1)) for a in spec.split(";")]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ValueError(f"--env {spec!r}: expected NAME=VALUE[;NAME=VALUE...]")
        settings.append((";".join(v for _, v in pairs), pairs))
    return settings


@contextlib.contextmanager
def environment(pairs: list[tuple[str, str]]):
    """The process environment with `pairs` set inside the block, restored after it."""
    saved = {name: os.environ.get(name) for name, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w4a16_g128@cuda", help="a linear.py scheme name (variants allowed)")
    ap.add_argument("--env", action="append", required=True,
                    help="NAME=VALUE[;NAME2=VALUE2...], one setting per flag")
    ap.add_argument("--ms", default="1,2,4,8,16,32")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    ap.add_argument("--bias", action="store_true", help="every call (bf16's too) adds a bf16 bias")
    args = ap.parse_args(argv)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    try:
        settings = parse_settings(args.env)
    except ValueError as e:
        ap.error(str(e))
    rows = []
    for n, k in shapes:
        bf16, layer = LB.Layer("bf16", n, k), LB.Layer(args.scheme, n, k)
        if args.bias:
            bf16.bias = layer.bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nc = LB.n_copies(len(layer.copies), m)
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(LB.n_copies(len(bf16.copies), m))]),
                               LB.n_copies(len(bf16.copies), m))}
            errs = {}
            for value, pairs in settings:
                with environment(pairs):
                    errs[value] = LB.rel_err(layer.fn(x, 0)(), layer.reference(x))
                    graphs[value] = (LB.capture([layer.fn(x, i) for i in range(nc)]), nc)
            us = LB.time_graphs(graphs)
            for key, t in us.items():
                nbytes = bf16.bytes if key == "bf16" else layer.bytes  # weight bytes read per call
                rows.append({"N": n, "K": k, "M": m, "setting": key, "us": t, "speedup": us["bf16"] / t,
                             "TBps": nbytes / t / 1e6,
                             "rel_err": errs.get(key), "ok": key == "bf16" or errs[key] <= layer.tol})
            print(f"{n}x{k} M={m}: " + "  ".join(
                f"{key} {us['bf16'] / t:.2f}x{'' if key == 'bf16' or errs[key] <= layer.tol else '!'}"
                for key, t in us.items() if key != "bf16"), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"scheme": args.scheme, "bias": args.bias, "device": torch.cuda.get_device_name(),
                                        "torch": torch.__version__, "rows": rows}, indent=1))
    # Summary: per setting, speedup per (shape) for each M.
    print(f"\n{args.scheme}: speedup over bf16 per shape ({', '.join(f'{n}x{k}' for n, k in shapes)})")
    for value, _ in settings:
        for m in ms:
            sp = [r["speedup"] for r in rows if r["setting"] == value and r["M"] == m]
            bad = any(not r["ok"] for r in rows if r["setting"] == value and r["M"] == m)
            tbs = [r["TBps"] for r in rows if r["setting"] == value and r["M"] == m]
            print(f"{value:>12s} M={m:<5d} " + " / ".join(f"{v:.2f}" for v in sp) + (" !" if bad else "")
                  + "   weight TB/s " + " / ".join(f"{v:.2f}" for v in tbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
