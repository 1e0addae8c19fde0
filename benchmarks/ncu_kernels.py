"""Hardware counters of fxquant's decode kernels (and bf16 cuBLAS) under Nsight Compute.

Runs each (shape, M) once between cudaProfilerStart / Stop, after a warm-up outside that range,
so that `ncu --profile-from-start off` sees exactly one launch per point:

  ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
      --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
      python benchmarks/ncu_kernels.py --kinds int4,bf16 --ms 1,16,32

ncu flushes the caches before each profiled launch by default, so the weight comes from HBM as in
the rotated-copy benchmark. NVTX-free: the points run in the printed order, one kernel each (the
C++ int4 op launches one kernel at M <= 32 when x is contiguous bf16 and there is no bias).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering import cuda as cxx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default="int4,bf16", help="int4 (C++ int4 op, g128), int8 (C++ int8 op), bf16")
    ap.add_argument("--ms", default="1,16,32")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,28672x4096")
    args = ap.parse_args(argv)
    cxx.load(verbose=False)
    ops = torch.ops.fxquant
    points = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q4, sz = nq.quantize_int4_groupwise(w, 128)
        q4 = nq.pack_int4(q4)
        q8, s8 = nq.quantize_int8_per_channel(w)
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for kind in args.kinds.split(","):
                # (every tensor bound now: a closure would see the last shape's weights)
                fn = {"int4": lambda x=x, q=q4, s=sz: ops.cxx_int4_weight_only_linear(x, q, s, None, 128),
                      "int8": lambda x=x, q=q8, s=s8: ops.cxx_int8_weight_only_linear(x, q, s, None),
                      "bf16": lambda x=x, w=w: torch.nn.functional.linear(x, w)}[kind]
                fn()  # warm-up (library load, cuBLAS handle) outside the profiled range
                points.append((kind, n, k, m, fn))
    torch.cuda.synchronize()
    for i, (kind, n, k, m, _) in enumerate(points):
        print(f"point {i}: {kind} {n}x{k} M={m}", flush=True)
    torch.cuda.profiler.start()
    for *_, fn in points:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
