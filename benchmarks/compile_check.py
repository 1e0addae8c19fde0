#!/usr/bin/env python3
"""Compile the kernel variants the launchers would launch, for sm_90, on a machine with no GPU.

Records each launch that dispatch.linear makes (on small CPU tensors; nothing runs), compiles it
with Triton's NVIDIA backend, and reports registers / local memory (cuobjdump -res-usage) and the matrix
instructions in the SASS and the asynchronous (pipelined) copies in the PTX (HGMMA/QGMMA/IGMMA = Hopper wgmma; HMMA/IMMA = mma.sync).

  python benchmarks/compile_check.py [--schemes int4_wo,...] [--ms 1,16,4096] [--all-candidates]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.triton import act_quant as AQ  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402

_TY = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8",
       torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv", torch.int32: "i32"}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class Recorder:
    def __init__(self, fn, sink):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.sink.append((self.fn, args, kw))
        return launch


def compile_launch(fn, args, kw, arch: int = 90):
    names = fn.arg_names
    sig, const, attrs = {}, {}, {}
    opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    dns = {"M", "split_k"}  # the launchers' do_not_specialize args
    for i, name in enumerate(names):
        v = args[i] if i < len(args) else kw[name]
        if name in kw or i in fn.constexprs or v is None:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, TensorDescriptor):  # a TMA config's host descriptor
            sig[name] = f"tensordesc<{_TY[v.base.dtype]}[{','.join(str(b) for b in v.block_shape)}]>"
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name not in dns and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def inspect_kernel(k) -> str:
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                             text=True).stdout
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                              text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    ptx = k.asm["ptx"]
    cp_async = ptx.count("cp.async.ca") + ptx.count("cp.async.cg")
    mma = {m: sass.count(m) for m in ("HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA", "QMMA") if m in sass}
    over = " OVER-SMEM-LIMIT" if k.metadata.shared > 232448 else ""  # H100/H200: 227 KB per block
    return (f"regs={regs.group(1) if regs else '?'} local={local.group(1) if local else '?'}{over} "
            f"smem={k.metadata.shared} cp.async={cp_async} mma={mma}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default=",".join(D.SCHEMES))
    ap.add_argument("--ms", default="1,2,16,64,256,4096")
    ap.add_argument("--nk", default="4096x4096")
    ap.add_argument("--all-candidates", action="store_true")
    args = ap.parse_args()
    n, k = (int(v) for v in args.nk.split("x"))
    D._DEV_CACHE[0] = ("h100", 132, (9, 0))  # no GPU here: pretend, for the config lookup
    sink: list = []
    for mod, name in ((D, "gemm_kernel"), (D, "gemv_kernel"), (D, "dequant_kernel"), (D, "scale_epilogue_kernel"),
                      (AQ, "act_quant_kernel")):
        setattr(mod, name, Recorder(getattr(mod, name), sink))
    D.quantize_activations = lambda x2, fp8, per_row=True, pdl=False: AQ.quantize_activations(x2, fp8, per_row)
    torch.mm = lambda *a, **kw: None  # the deq path's cuBLAS call
    seen, failures = set(), 0
    for scheme in args.schemes.split(","):
        w = torch.randn(n, k)
        if scheme == "int4_wo":
            q, sz = nq.quantize_int4_groupwise(w, 128)
            packed, group = (nq.pack_int4(q), sz.bfloat16()), 128
        elif scheme in ("int8_wo", "int8_dyn"):
            q, s = nq.quantize_int8_per_channel(w, torch.bfloat16 if scheme == "int8_wo" else torch.float32)
            packed, group = (q, s), 0
        else:
            q, s = nq.quantize_fp8_weight(w, per_row=scheme != "fp8_dyn_tensor")
            packed, group = (q, s), 0
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            cfgs = D.candidate_configs(scheme, m, group) if args.all_candidates else [
                D.get_config(scheme, m, n, k, group, x.dtype, torch.device("cuda", 0))]
            for cfg in cfgs:
                sink.clear()
                D.linear(scheme, x, *packed, None, group, cfg)
                for fn, a, kw in list(sink):
                    key = (fn.__name__, repr(sorted((kk, str(vv)) for kk, vv in kw.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    tag = f"{scheme:14s} M={m:<5d} {fn.__name__:16s} {cfg.kind:4s} " + \
                        " ".join(f"{kk}={vv}" for kk, vv in kw.items() if kk in (
                            "BM", "BN", "BK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP", "num_warps", "num_stages"))
                    try:
                        print(tag, "|", inspect_kernel(compile_launch(fn, a, dict(kw))), flush=True)
                    except Exception as e:
                        failures += 1
                        print(tag, "| FAILED", type(e).__name__, str(e)[:800], flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
