#!/usr/bin/env python3
"""The gated-MLP activation quantization alone: fxquant.swiglu_quantize (one Triton kernel) against
Inductor's fusion of the same ATen ops (what the backend compiled before; FXQUANT_SWIGLU_QUANT=0).

gate and up are the two halves of one [M, 2I] tensor (the fused gate/up GEMM's output). Medians of
triton.testing.do_bench (L2 flushed between runs); GB/s counts gate + up read once, q + scales written.

  python benchmarks/swiglu_quant.py --i 14336 --m 1,16,128,2048,8192 --out results.json
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
                t1 = triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median")
                t2 = triton.testing.do_bench(theirs, warmup=25, rep=200, return_mode="median")
                nbytes = m * args.i * (2 * gu.element_size() + 1) + 4 * m
                row = dict(scheme="fp8" if fp8 else "int8", M=m, I=args.i, fxquant_us=t1 * 1e3,
                           inductor_us=t2 * 1e3, speedup=t2 / t1, fxquant_gbps=nbytes / (t1 * 1e-3) / 1e9,
                           q_differ_fraction=differ)
                rows.append(row)
                print(f"{row['scheme']:6} {m:6d} | {row['fxquant_us']:7.1f}us {row['inductor_us']:7.1f}us "
                      f"{row['speedup']:6.2f}x | {row['fxquant_gbps']:8.0f} | {differ:.2e}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                            rows=rows), indent=1))


if __name__ == "__main__":
    main()
