#!/usr/bin/env python3
"""Probe: where CUTLASS's int4 GEMM loses to bf16 at large M (issue 6's W4A16 M = 4096 target).

Times, in one round-robin per (shape, M), the same 128 x 256 cooperative CUTLASS mixed-input GEMM in
three forms, against bf16 cuBLAS:
  int4        the shipped op (nibbles unpacked, then (q * scale + zero') per group of k, in registers);
  int4_conv   the same weight in convert-only mode (nibbles unpacked to bf16, a per-row scale in the
              epilogue; benchmarks/probe_src/int4_convert_only.cu, built here: not fxquant's numbers);
  int8_conv   the shipped int8 weight-only op (int8 converted, per-row scale in the epilogue).
int4 against int4_conv is the cost of the group scale / zero; int4_conv against int8_conv the cost of
unpacking nibbles (and of the smaller weight tiles). Same method as linear.py: CUDA-graph replay
over rotated weight copies, medians.

  python benchmarks/probe_int4_modes.py --ms 2048,4096,8192 --out probe.json
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
from fxquant.lowering.cuda import build  # noqa: E402

TILE = 1  # mixed_input_gemm.cuh's variant 1: 128 (weight rows) x 256 (tokens), cooperative


def load_probe() -> None:
    """Builds (or loads from FXQUANT_CACHE_DIR) the convert-only probe op, with the CUTLASS library's flags."""
    from torch.utils import cpp_extension as ext
    include = build.cutlass_include_dir()
    out = build.cache_root() / "cxx" / "probe_int4_convert_only"
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    ext.load(name="fxquant_probe_int4_convert_only", build_directory=str(out),
             sources=[str(Path(__file__).resolve().parent / "probe_src" / "int4_convert_only.cu")],
             extra_include_paths=[str(build.CUTLASS_SRC), str(include), str(include.parent / "tools" / "util" / "include")],
             extra_cflags=["-O3"], extra_cuda_cflags=list(build._CUTLASS_FLAGS), extra_ldflags=list(build.LDFLAGS),
             with_cuda=True, is_python_module=False)
    torch.ops.load_library(str(out / "fxquant_probe_int4_convert_only.so"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="2048,4096,8192")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load_cutlass()
    load_probe()
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16, int4, int8 = LB.Layer("bf16", n, k), LB.Layer("w4a16_g128@cutlass", n, k), LB.Layer("w8a16@cutlass", n, k)
        ones = torch.ones(n, device="cuda", dtype=torch.bfloat16)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nc = LB.n_copies(len(int4.copies), m)
            conv = [(lambda p=p: torch.ops.fxquant_probe.int4_convert_only(x, p[0], ones, TILE)) for p in int4.copies[:nc]]
            assert torch.isfinite(conv[0]()).all()
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(LB.n_copies(len(bf16.copies), m))]),
                               LB.n_copies(len(bf16.copies), m)),
                      "int4": (LB.capture([int4.fn(x, i) for i in range(nc)]), nc),
                      "int4_conv": (LB.capture(conv), nc),
                      "int8_conv": (LB.capture([int8.fn(x, i) for i in range(LB.n_copies(len(int8.copies), m))]),
                                    LB.n_copies(len(int8.copies), m))}
            us = LB.time_graphs(graphs)
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {t:.1f} us ({us['bf16'] / t:.2f}x)" for key, t in us.items()),
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print("\nspeedup over bf16 per shape (" + args.shapes + ")")
    for key in ("int4", "int4_conv", "int8_conv"):
        for m in sorted({r["M"] for r in rows}):
            print(f"{key:>10s} M={m:<5d} " + " / ".join(f"{r['speedup']:.2f}" for r in rows
                                                      if r["kernel"] == key and r["M"] == m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
