"""What fraction of the reachable read bandwidth the int4 decode kernel gets, per shape.

Issue 6 measures the M = 1 int4 kernel against the 1 GiB copy (3.0 TB/s on an H100). A kernel that
reads 8 MB cannot stream at that rate: it also pays the ramp-up and the tail of one short launch.
This probe times, at each shape's packed-weight byte count (weight + scales, rotated copies, CUDA
graph replay as in linear.py):
  read  -- a Triton kernel that only loads the bytes (best of a few block sizes): the ceiling for
           a kernel that reads this much and computes nothing;
  copy  -- torch's device copy of the same bytes (read + write);
  the fxquant op (w4a16 g128, C++ kernel) at M = 1 under each --env setting.

  python benchmarks/probe_read_ceiling.py --env FXQUANT_CXX_INT4_KERNEL=lean \
      --env FXQUANT_CXX_INT4_KERNEL=classic --out read_ceiling.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import linear as LB  # noqa: E402
import variants  # noqa: E402

BLOCKS = ((2048, 4), (4096, 4), (8192, 8), (16384, 8))  # (int32 elements per program, warps)


@triton.jit
def _read_kernel(src, dst, n, BLOCK: tl.constexpr):
    # Loads BLOCK int32 and stores one xor-reduction per program so the loads are not dead code.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n, other=0, cache_modifier=".cg")
    tl.store(dst + tl.program_id(0), tl.reduce(v, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_fn(src: torch.Tensor, dst: torch.Tensor, block: int, warps: int):
    n = src.numel()
    grid = (triton.cdiv(n, block),)
    return lambda: _read_kernel[grid](src, dst, n, BLOCK=block, num_warps=warps)


def read_graphs(nbytes: int, copies: int) -> tuple[dict, list]:
    """("tread{BLOCK}/{WARPS}" -> (graph, calls) for the read kernel at each of BLOCKS over `copies` random
    buffers of `nbytes`, rotated as an op's weight copies are; the buffers). A graph does not keep the
    memory it reads alive: hold the buffers for as long as the graphs replay."""
    words = (nbytes + 3) // 4
    srcs = [torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    sink = torch.empty(triton.cdiv(words, min(b for b, _ in BLOCKS)), dtype=torch.int32, device="cuda")
    graphs = {f"tread{b}/{w}": (LB.capture([read_fn(src, sink, b, w) for src in srcs]), copies) for b, w in BLOCKS}
    return graphs, [*srcs, sink]


def best_read(us: dict) -> dict:
    """time_graphs' result with the read_graphs keys replaced by the fastest of them, as "tread"."""
    reads = [key for key in us if key.startswith("tread")]
    return {key: t for key, t in us.items() if key not in reads} | {"tread": min(us[key] for key in reads)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="6144x4096,4096x4096,28672x4096,4096x14336")
    ap.add_argument("--scheme", default="w4a16_g128@cuda")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE[;...], one op setting per flag")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = variants.parse_settings(args.env) or [("default", [])]
    rows = []
    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        layer = LB.Layer(args.scheme, n, k)
        nbytes = layer.bytes
        words = (nbytes + 3) // 4
        c = len(layer.copies)
        srcs = [torch.randint(-2 ** 31, 2 ** 31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(c)]
        dsts = [torch.empty_like(s) for s in srcs]
        sink = torch.empty(triton.cdiv(words, min(b for b, _ in BLOCKS)), dtype=torch.int32, device="cuda")
        graphs = {f"read{b}/{w}": (LB.capture([read_fn(s, sink, b, w) for s in srcs]), c) for b, w in BLOCKS}
        graphs["copy"] = (LB.capture([(lambda s=s, d=d: d.copy_(s)) for s, d in zip(srcs, dsts)]), c)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for label, pairs in settings:
            with variants.environment(pairs):
                err = LB.rel_err(layer.fn(x, 0)(), layer.reference(x))
                assert err <= layer.tol, f"{args.scheme} {label} {spec}: rel err {err:.3g}"
                graphs[f"op:{label}"] = (LB.capture([layer.fn(x, i) for i in range(c)]), c)
        us = LB.time_graphs(graphs)
        read_key = min((key for key in us if key.startswith("read")), key=us.get)
        row = {"N": n, "K": k, "bytes": nbytes, "read_best": read_key, "us": us,
               "read_TBps": nbytes / us[read_key] / 1e6, "copy_read_TBps": nbytes / us["copy"] / 1e6}
        for label, _ in settings:
            t = us[f"op:{label}"]
            row[f"op:{label}"] = {"us": t, "TBps": nbytes / t / 1e6, "of_read": us[read_key] / t}
        rows.append(row)
        print(f"{spec}: {nbytes / 1e6:.1f} MB; read {row['read_TBps']:.2f} TB/s ({read_key}, {us[read_key]:.2f} us); "
              f"copy {row['copy_read_TBps']:.2f} TB/s of read; " + "; ".join(
                  f"{label} {row[f'op:{label}']['TBps']:.2f} TB/s = {100 * row[f'op:{label}']['of_read']:.0f}% of read"
                  for label, _ in settings), flush=True)
        del srcs, dsts, graphs, layer
        torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
