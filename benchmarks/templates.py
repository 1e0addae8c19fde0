"""The `templates` backend option measured: a linear with bias, then SiLU and a residual add
(`silu(x W^T + b) + r`), compiled per M (static shapes), on CUDA.

Per scheme and M it times, as medians of triton.testing.do_bench with CUDA-graph replay:
  bf16          Inductor's own compile of the bf16 block (the baseline);
  op            fxquant, templates off: the op (dispatcher) and a separate Inductor kernel for
                the SiLU and the add;
  template      templates="always": the Inductor template with the SiLU and the add in its epilogue;
  benchmarked   templates=True: Inductor picks the op or the template by its own benchmark.
It also reports each variant's compile time, and the SQNR of each against the op.
The weights are constants of the compiled graph, so they are not rotated: at M >= 256 the time is
dominated by the GEMM's arithmetic, not by reading the weight, so L2 residency flatters less than
at decode sizes (stated, not measured).

  python benchmarks/templates.py --ms 256,2048 --n 4096 --k 4096 --out templates.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton

import fxquant
from fxquant.numerics import sqnr

SCHEMES = {
    "int8_wo": fxquant.Int8WeightOnly,
    "int4_g128": lambda: fxquant.Int4WeightOnly(group_size=128, layout="rows"),  # templates exist for rows only
    "fp8_wo": fxquant.Float8WeightOnly,
    "w8a8_int8": fxquant.Int8DynamicActivationInt8Weight,
    "fp8_row": lambda: fxquant.Float8DynamicActivationFloat8Weight(granularity="row"),
}
VARIANTS = {"op": False, "template": "always", "benchmarked": True}


class Block(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.fc = torch.nn.Linear(k, n)

    def forward(self, x, r):
        return torch.nn.functional.silu(self.fc(x)) + r


def _time(f, *args) -> float:
    """Median µs of CUDA-graph replays of f(*args)."""
    f(*args)
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(lambda: f(*args), rep=50, return_mode="median") * 1e3


def _compile(model, x, r, backend, options):
    torch._dynamo.reset()
    t0 = time.perf_counter()
    f = torch.compile(model, backend=backend, options=options, dynamic=False)
    with torch.no_grad():
        out = f(x, r)
    torch.cuda.synchronize()
    return f, out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="256,2048")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Block(args.k, args.n).to(torch.bfloat16).cuda().eval()
    rows = []
    for m in [int(v) for v in args.ms.split(",")]:
        x = torch.randn(1, m, args.k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, m, args.n, device="cuda", dtype=torch.bfloat16)
        f, _, ct = _compile(model, x, r, "inductor", None)
        with torch.no_grad():
            base = _time(f, x, r)
        rows.append(dict(scheme="bf16", variant="bf16", M=m, us=base, speedup=1.0, compile_s=ct, sqnr=None))
        for name in args.schemes.split(","):
            ref = None
            for variant, templates in VARIANTS.items():
                f, out, ct = _compile(model, x, r, "fxquant", {"config": SCHEMES[name](), "templates": templates})
                with torch.no_grad():
                    us = _time(f, x, r)
                ref = out.float() if ref is None else ref
                q = sqnr(ref, out.float())
                rows.append(dict(scheme=name, variant=variant, M=m, us=us, speedup=base / us, compile_s=ct,
                                 sqnr=None if variant == "op" else q))
                print(f"{name:10s} M={m:5d} {variant:11s} {us:8.1f} us  {base / us:5.2f}x bf16  "
                      f"compile {ct:5.1f} s" + ("" if variant == "op" else f"  SQNR vs op {q:.1f} dB"), flush=True)
    dev = torch.cuda.get_device_name()
    print(f"\n{dev}, torch {torch.__version__}, triton {triton.__version__}; N={args.n} K={args.k}; "
          f"speedup over Inductor bf16 (op / template / benchmarked)")
    for m in sorted({r["M"] for r in rows}):
        for name in args.schemes.split(","):
            v = {r["variant"]: r for r in rows if r["M"] == m and r["scheme"] == name}
            print(f"  {name:10s} M={m:5d}  " + " / ".join(f"{v[k]['speedup']:.2f}" for k in VARIANTS))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__, n=args.n, k=args.k,
                           rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
