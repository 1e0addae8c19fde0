#!/usr/bin/env python3
"""The gated-MLP activation quantization alone: fxquant.swiglu_quantize (one Triton kernel) against
Inductor's fusion of the same ATen ops (what the backend compiled before; FXQUANT_SWIGLU_QUANT=0).

gate and up are the two halves of one [M, 2I] tensor (the fused gate/up GEMM's output). Medians of
triton.testing.do_bench_cudagraph (no launch overhead; at M >= 2048 gate and up are 4x the L2); GB/s
counts gate + up read once, q + scales written. --sweep also times launch shapes of the kernel
(one pass / two passes, warps, block, fast or precise silu math) at the largest M.

  python benchmarks/swiglu_quant.py --i 14336 --m 1,16,128,2048,8192 --sweep --out results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant  # noqa: E402,F401  (registers the ops and their CUDA kernels)
from fxquant import numerics as nq  # noqa: E402
from fxquant.inductor_choices import FxquantChoices  # noqa: E402
from fxquant.passes.act_quant import EXACT_DIVISION  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--i", type=int, default=14336, help="intermediate size (row length)")
    ap.add_argument("--m", default="1,16,128,2048,8192", help="token counts")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's launch variants")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton.testing
    from torch._inductor.virtualized import V
    import torch._inductor.config as inductor_config

    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"{'scheme':6} {'M':>6} | {'fxquant':>9} {'Inductor':>9} {'speedup':>7} | {'fxq GB/s':>8} | q differ")
    for fp8 in (False, True):
        def inductor_fn(g, u, fp8=fp8):
            h = F.silu(g) * u
            return nq.quantize_fp8(h, True) if fp8 else nq.quantize_int8_per_token(h)
        torch._dynamo.reset()
        patches = {EXACT_DIVISION: True} if hasattr(getattr(inductor_config, "eager_numerics", None),
                                                    "division_rounding") else {}
        with inductor_config.patch(patches), V.set_choices_handler(FxquantChoices()):
            compiled = torch.compile(inductor_fn, dynamic=False)
            for m in [int(v) for v in args.m.split(",")]:
                gu = torch.randn(m, 2 * args.i, device="cuda", dtype=dtype) * 3
                g, u = gu[:, :args.i], gu[:, args.i:]
                ours = lambda: torch.ops.fxquant.swiglu_quantize(g, u, fp8)  # noqa: E731
                theirs = lambda: compiled(g, u)  # noqa: E731
                q1, _ = ours()
                q2, _ = theirs()
                differ = float((q1.float() != q2.float()).float().mean())
                t1 = triton.testing.do_bench_cudagraph(ours, rep=100, return_mode="median")
                t2 = triton.testing.do_bench_cudagraph(theirs, rep=100, return_mode="median")
                nbytes = m * args.i * (2 * gu.element_size() + 1) + 4 * m
                row = dict(scheme="fp8" if fp8 else "int8", M=m, I=args.i, fxquant_us=t1 * 1e3,
                           inductor_us=t2 * 1e3, speedup=t2 / t1, fxquant_gbps=nbytes / (t1 * 1e-3) / 1e9,
                           q_differ_fraction=differ)
                rows.append(row)
                print(f"{row['scheme']:6} {m:6d} | {row['fxquant_us']:7.1f}us {row['inductor_us']:7.1f}us "
                      f"{row['speedup']:6.2f}x | {row['fxquant_gbps']:8.0f} | {differ:.2e}")
    if args.sweep:
        rows += sweep(max(int(v) for v in args.m.split(",")), args.i, dtype)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                            rows=rows), indent=1))


VARIANTS = (  # (name, quantize_swiglu keywords)
    ("1p w16 precise", dict(one_pass=True, warps=16, fast=False)),
    ("1p w16 fast", dict(one_pass=True, warps=16, fast=True)),
    ("1p w32 fast", dict(one_pass=True, warps=32, fast=True)),
    ("1p w8 fast", dict(one_pass=True, warps=8, fast=True)),
    ("2p b1024 w4 fast", dict(one_pass=False, block=1024, warps=4, fast=True)),
    ("2p b2048 w4 fast", dict(one_pass=False, block=2048, warps=4, fast=True)),
    ("2p b2048 w8 fast", dict(one_pass=False, block=2048, warps=8, fast=True)),
    ("2p b4096 w8 fast", dict(one_pass=False, block=4096, warps=8, fast=True)),
    ("2p b2048 w4 precise", dict(one_pass=False, block=2048, warps=4, fast=False)),
)


def sweep(m: int, i: int, dtype: torch.dtype) -> list[dict]:
    import triton.testing
    from fxquant.lowering.triton.act_quant import quantize_swiglu
    gu = torch.randn(m, 2 * i, device="cuda", dtype=dtype) * 3
    g, u = gu[:, :i], gu[:, i:]
    nbytes = m * i * (2 * gu.element_size() + 1) + 4 * m
    rows = []
    print(f"launch variants at M={m}, I={i}")
    for fp8 in (True, False):
        ref, _ = quantize_swiglu(g, u, fp8)
        for name, kw in VARIANTS:
            if kw.get("one_pass") and triton.next_power_of_2(i) > 16384:
                continue
            q, _ = quantize_swiglu(g, u, fp8, **kw)
            differ = float((q.float() != ref.float()).float().mean())
            t = triton.testing.do_bench_cudagraph(lambda: quantize_swiglu(g, u, fp8, **kw), rep=100,
                                                  return_mode="median")
            rows.append(dict(variant=name, scheme="fp8" if fp8 else "int8", M=m, I=i, us=t * 1e3,
                             gbps=nbytes / (t * 1e-3) / 1e9, q_differ_vs_default=differ))
            print(f"  {rows[-1]['scheme']:5} {name:22} {t * 1e3:7.1f}us {rows[-1]['gbps']:6.0f} GB/s  "
                  f"q differ {differ:.1e}")
    return rows


if __name__ == "__main__":
    main()
