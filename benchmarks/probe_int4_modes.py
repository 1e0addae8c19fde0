#!/usr/bin/env python3
"""Probe: where CUTLASS's int4 GEMM loses to bf16 at large M (issue 6's W4A16 M = 4096 target).

Times, in one round-robin per (shape, M), the same 128 x 256 cooperative CUTLASS mixed-input GEMM in
five forms, against bf16 cuBLAS:
  int4        the shipped op (nibbles unpacked, then (q * scale + zero') per group of k, in registers);
  int4_conv   the same weight in convert-only mode (nibbles unpacked to bf16, a per-row scale in the
              epilogue; benchmarks/probe_src/int4_convert_only.cu, built here: not fxquant's numbers);
  int4_shufA  the shipped op's math on a copy of the weight reordered at setup as CUTLASS's example 55
              recommends (benchmarks/probe_src/int4_shuffled.cu: each thread's nibbles contiguous, one
              wide shared-memory load and CUTLASS's LOP3 conversion; checked against int4's output),
              A = 1 or 4 MMA k-steps per thread's contiguous run (4 or 16 bytes);
  int8_conv   the shipped int8 weight-only op (int8 converted, per-row scale in the epilogue).
int4 against int4_conv is the cost of the group scale / zero; int4_conv against int8_conv the cost of
unpacking nibbles (and of the smaller weight tiles). Same method as linear.py: CUDA-graph replay
over rotated weight copies, medians.

  python benchmarks/probe_int4_modes.py --ms 2048,4096,8192 --out probe.json
  (FXQ_PROBE_INCLUDES=dir1:dir2 adds include directories to the probe's build)
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
from fxquant.lowering.cuda import build, cutlass  # noqa: E402

TILE = 1  # mixed_input_gemm.cuh's variant 1: 128 (weight rows) x 256 (tokens), cooperative
ATOMS = (1, 4)  # int4_shuffled.cu's reorderings: MMA k-steps per thread's contiguous run of nibbles


def load_probe(names: tuple[str, ...] | None = None) -> None:
    """Builds (or loads from FXQUANT_CACHE_DIR) the probe ops of probe_src/ (`names`: those .cu files only;
    default all), with the CUTLASS library's flags."""
    from torch.utils import cpp_extension as ext
    include = build.cutlass_include_dir()
    src = Path(__file__).resolve().parent / "probe_src"
    files = sorted(src.glob("*.cu")) if names is None else [src / n for n in names]
    lib = "fxquant_probe_" + "_".join(f.stem for f in files)
    out = build.cache_root() / "cxx" / lib
    out.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0a"
    ext.load(name=lib, build_directory=str(out), sources=[str(f) for f in files],
             extra_include_paths=[str(build.CUTLASS_SRC), str(build.SRC), str(include),
                                  str(include.parent / "tools" / "util" / "include"),
                                  # CUTLASS's reorder helper includes curand_kernel.h: a toolkit without it
                                  # can take the headers of the nvidia-curand wheel from here
                                  *filter(None, os.environ.get("FXQ_PROBE_INCLUDES", "").split(":"))],
             extra_cflags=["-O3"], extra_cuda_cflags=list(build._CUTLASS_FLAGS), extra_ldflags=list(build.LDFLAGS),
             with_cuda=True, is_python_module=False)
    torch.ops.load_library(str(out / f"{lib}.so"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="2048,4096,8192")
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    build.load_cutlass()
    load_probe(("int4_convert_only.cu", "int4_shuffled.cu"))
    rows = []
    for n, k in (tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")):
        bf16, int4, int8 = LB.Layer("bf16", n, k), LB.Layer("w4a16_g128@cutlass", n, k), LB.Layer("w8a16@cutlass", n, k)
        ones = torch.ones(n, device="cuda", dtype=torch.bfloat16)
        # the reordered weight copies and their scale / zero' arrays, made once (setup, not timed)
        ms = [int(v) for v in args.ms.split(",")]
        top = max(LB.n_copies(len(int4.copies), m) for m in ms)
        arrays = [cutlass.scales_and_zeros(p[1]) for p in int4.copies[:top]]
        shuf = {a: [(torch.ops.fxquant_probe.int4_reorder(p[0], a), *arrays[i]) for i, p in enumerate(int4.copies[:top])]
                for a in ATOMS}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            nc = LB.n_copies(len(int4.copies), m)
            conv = [(lambda p=p: torch.ops.fxquant_probe.int4_convert_only(x, p[0], ones, TILE)) for p in int4.copies[:nc]]
            assert torch.isfinite(conv[0]()).all()
            sh = {a: [(lambda q=q, a=a: torch.ops.fxquant_probe.int4_shuffled_linear(x, q[0], q[1], q[2], int4.group, a))
                      for q in shuf[a][:nc]] for a in ATOMS}
            ref = int4.fn(x, 0)()
            err = {a: float((sh[a][0]().float() - ref.float()).norm() / ref.float().norm()) for a in ATOMS}
            graphs = {"bf16": (LB.capture([bf16.fn(x, i) for i in range(LB.n_copies(len(bf16.copies), m))]),
                               LB.n_copies(len(bf16.copies), m)),
                      "int4": (LB.capture([int4.fn(x, i) for i in range(nc)]), nc),
                      "int4_conv": (LB.capture(conv), nc),
                      **{f"int4_shuf{a}": (LB.capture(sh[a]), nc) for a in ATOMS},
                      "int8_conv": (LB.capture([int8.fn(x, i) for i in range(LB.n_copies(len(int8.copies), m))]),
                                    LB.n_copies(len(int8.copies), m))}
            us = LB.time_graphs(graphs)
            for key, t in us.items():
                rows.append({"N": n, "K": k, "M": m, "kernel": key, "us": t, "speedup": us["bf16"] / t,
                             **({"rel_err_vs_int4": err[int(key[9:])]} if key.startswith("int4_shuf") else {})})
            print(f"{n}x{k} M={m}: " + "  ".join(f"{key} {t:.1f} us ({us['bf16'] / t:.2f}x)" for key, t in us.items())
                  + "".join(f"  [int4_shuf{a} vs int4: rel err {e:.1e}]" for a, e in err.items()), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    print("\nspeedup over bf16 per shape (" + args.shapes + ")")
    for key in ("int4", "int4_conv", *(f"int4_shuf{a}" for a in ATOMS), "int8_conv"):
        for m in sorted({r["M"] for r in rows}):
            print(f"{key:>10s} M={m:<5d} " + " / ".join(f"{r['speedup']:.2f}" for r in rows
                                                      if r["kernel"] == key and r["M"] == m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
