#!/usr/bin/env python3
"""Median µs per linear layer: bf16 cuBLAS F.linear vs every fxquant scheme, over M and N x K.

Timing: each measurement captures one CUDA graph that calls the layer once on each of several
weight copies (together >> the 50 MB L2, so weights stream from HBM as in a real model; M >= 512
uses 2 copies: compute-bound), and times graph replays with CUDA events; µs = median replay time
/ copies. For each (shape, M), bf16 and all schemes are replayed round-robin over several rounds
after a warm-up, so clock/power drift affects them alike. Every measured output
is checked against a torch reference of numerics.py's arithmetic (fp32) in the same run.

Peers: torchao's and gemlite's equivalents (PEERS below) join the same round-robin, with the same
weight (one quantized module built per weight copy, outside timing), when they are importable
(--peers auto, the default); an absent one prints "peer X unavailable: <reason>" and is skipped.
Their outputs are checked loosely against fp32 F.linear on their dequantized weight (or the
original one where that can't be had); their failures are recorded per point but do not make the
exit status non-zero. The --warm-only shards build and call them too (gemlite compiles/autotunes
on its first call per shape and M).

  python benchmarks/linear.py --out DIR                 # measure, print table, write JSON + PNG
  python benchmarks/linear.py --tune --out DIR          # autotune every (scheme, shape, M) first
  python benchmarks/linear.py --tune --triton-only ...  # the same, Triton kernels only (triton_op path)
  python benchmarks/linear.py --warm-only --shard 3/12  # compile only (run shards in parallel)
  python benchmarks/linear.py --peers none              # fxquant schemes only
  python benchmarks/linear.py --peers torchao,gemlite_w4a16_g128  # libraries and/or peer schemes

Kernel variants (M <= dispatch.CXX_MAX_M: 32 for int4, 16 for int8): "<scheme>@cuda" forces the CUDA C++ GEMV (lowering/cuda/) and
"<scheme>@triton" the best Triton choice, for the schemes in dispatch.CXX_SCHEMES and the fp8
dynamic ones; "fp8_row@scaled_mm" forces torch._scaled_mm; "w4a16_g128@cutlass", "w8a16@cutlass" and "fp8_wo@cutlass"
(M >= 128) force the CUTLASS wgmma GEMM with its 128 x 256 tile (Hopper), "@cutlass_128x128" and
"@cutlass_64x128" its other tiles, "@cutlass_streamk" / "@cutlass_streamk_128x128" the 128 x 256 / 128 x 128
tiles with stream-K, "@cutlass_streamk_128x64" / "_128x32" / "_128x16" / "_256x64" / "_256x32" the narrow
token tiles (M >= 17), "@cutlass_streamk_256x128" (M >= 128),
"@cutlass_ping_128x128" / "@cutlass_ping_64x256" ping-pong tiles; "w8a8_int8@cutlass_i8_<tokens>x<rows>"
(M >= 32; "_ping": ping-pong, "_streamk": stream-K, "_cl2": 2-CTA clusters) force a tile of the CUTLASS
int8 dynamic GEMM; "<weight-only scheme>@deq" (M >= 128) dequantizes, then calls cuBLAS (FXQUANT_DEQ_ROWS
sets its row chunk). "<scheme>@triton_op" (any scheme, every M) calls the scheme's triton_op
(lowering/triton/triton_ops.py): the Triton-only kernels that embed_kernels=True and
export(ops="triton") compile into the graph.
The plain scheme row is what the dispatcher picks.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxquant.lowering  # noqa: E402,F401  (registers the ops and their CUDA kernels)
from fxquant import configs as fc  # noqa: E402
from fxquant import numerics as nq  # noqa: E402
from fxquant.lowering.triton import dispatch as D  # noqa: E402
from fxquant.lowering.triton.triton_ops import triton_target  # noqa: E402
from fxquant.lowering.cuda.cutlass import I8_VARIANTS  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
# name -> (dispatch scheme, packing config)
SCHEMES = {
    "w4a16_g128": ("int4_wo", fc.Int4WeightOnly(group_size=128, layout="rows")),
    "w4a16_g128_mma": ("int4_mma", fc.Int4WeightOnly(group_size=128, layout="mma")),  # MMA-fragment layout
    "w8a16": ("int8_wo", fc.Int8WeightOnly()),
    "w8a8_int8": ("int8_dyn", fc.Int8DynamicActivationInt8Weight()),
    "fp8_row": ("fp8_dyn_row", fc.Float8DynamicActivationFloat8Weight("row")),
    "fp8_tensor": ("fp8_dyn_tensor", fc.Float8DynamicActivationFloat8Weight("tensor")),
    "fp8_wo": ("fp8_wo", fc.Float8WeightOnly()),
}
# name@variant: "cuda" (M <= CXX_MAX_M) and "scaled_mm" (fp8 dynamic) force that kind, "triton" the best Triton config
VARIANTS = {"cuda": D.KernelConfig("cxx", bn=0, bk=0), "scaled_mm": D.KernelConfig("scaled_mm", bn=0, bk=0),
            "cutlass": D.KernelConfig("cutlass", bn=128, bk=64, bm=256, warps=0), "triton": None, "triton_op": None,
            "deq": D.KernelConfig("deq", bn=64, bk=128, warps=4),  # weight-only: dequantize, then cuBLAS
            # the other CUTLASS tiles (bn x bm), for choosing table entries
            "cutlass_128x128": D.KernelConfig("cutlass", bn=128, bk=64, bm=128, warps=0),
            "cutlass_64x128": D.KernelConfig("cutlass", bn=64, bk=64, bm=128, warps=0),
            "cutlass_streamk": D.KernelConfig("cutlass", bn=128, bk=64, bm=256, warps=0, split_k=0),
            "cutlass_streamk_128x128": D.KernelConfig("cutlass", bn=128, bk=64, bm=128, warps=0, split_k=0),
            "cutlass_streamk_128x64": D.KernelConfig("cutlass", bn=128, bk=64, bm=64, warps=0, split_k=0),
            "cutlass_streamk_128x32": D.KernelConfig("cutlass", bn=128, bk=64, bm=32, warps=0, split_k=0),
            "cutlass_streamk_128x16": D.KernelConfig("cutlass", bn=128, bk=64, bm=16, warps=0, split_k=0),
            "cutlass_streamk_256x64": D.KernelConfig("cutlass", bn=256, bk=64, bm=64, warps=0, split_k=0),
            "cutlass_streamk_256x32": D.KernelConfig("cutlass", bn=256, bk=64, bm=32, warps=0, split_k=0),
            "cutlass_streamk_256x128": D.KernelConfig("cutlass", bn=256, bk=64, bm=128, warps=0, split_k=0),
            "cutlass_ping_128x128": D.KernelConfig("cutlass", bn=128, bk=64, bm=128, warps=4),
            "cutlass_ping_64x256": D.KernelConfig("cutlass", bn=64, bk=64, bm=256, warps=4)}
# the CUTLASS int8 dynamic GEMM's tiles, tokens x weight rows: "w8a8_int8@cutlass_i8_128x256" etc.
VARIANTS.update({f"cutlass_i8_{bm}x{bn}{'_ping' if w == 4 else ''}{'_streamk' if sk == 0 else ''}"
                 f"{'_cl2' if c == 2 else ''}": D.KernelConfig("cutlass", bn=bn, bk=128, bm=bm, warps=w, split_k=sk,
                                                              cluster=c)
                 for bn, bm, sk, w, c in I8_VARIANTS})
CUTLASS_MIN_M = 128  # the weight-only @cutlass rows' M range (large-M kernel)
CUTLASS_NARROW_MIN_M = 17  # ... and that of its narrow token tiles (fewer than 128 tokens, stream-K)
CUTLASS_I8_MIN_M = 32  # the int8 dynamic @cutlass_i8 rows' M range
DEFAULT_VARIANTS = ["w4a16_g128@cuda", "w4a16_g128@triton", "w8a16@cuda", "w8a16@triton"]
ROTATE_BYTES = 512e6  # weight bytes cycled through per graph replay (~10x L2)
TOL = 1e-2
# Peer name -> (library, fxquant equivalent, weight bits). torchao 0.17 configs / gemlite 0.6
# helpers: see _peer_builder.
PEERS = {
    "torchao_w4a16_g128": ("torchao", "w4a16_g128", 4),
    "torchao_w8a16": ("torchao", "w8a16", 8),
    "torchao_w8a8_int8": ("torchao", "w8a8_int8", 8),
    "torchao_fp8_row": ("torchao", "fp8_row", 8),
    "gemlite_w4a16_g128": ("gemlite", "w4a16_g128", 4),
    "gemlite_w8a16": ("gemlite", "w8a16", 8),
    "gemlite_w8a8_int8": ("gemlite", "w8a8_int8", 8),
    "gemlite_fp8_row": ("gemlite", "fp8_row", 8),
}
PEER_LIBS = ("torchao", "gemlite")
# Loose output checks of peers (weight bits -> max rel err): against F.linear on the peer's own
# dequantized weight, or, where that can't be had, on the original bf16 weight (4-bit g128
# quantization error alone is ~0.1 there).
PEER_TOL = {4: 0.1, 8: 0.05}
PEER_TOL_ORIG = {4: 0.15, 8: 0.05}


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- timing
def capture(fns) -> torch.cuda.CUDAGraph:
    """One graph calling every fn once (fns[i] uses weight copy i); fns[0] is warmed first."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fns[0]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def time_graphs(graphs: dict, rounds: int = 5, round_s: float = 0.01, warm_s: float = 0.05) -> dict:
    """graphs: key -> (graph, calls per replay). Replays them round-robin (so a clock or power
    drift hits every key alike, and the GPU never idles between them) after a warm-up that
    brings the clocks up. Returns key -> median µs per call."""
    est = {}
    for key, (g, _) in graphs.items():
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        est[key] = max(time.perf_counter() - t0, 1e-6)
    t_end = time.perf_counter() + warm_s
    while time.perf_counter() < t_end:
        for g, _ in graphs.values():
            g.replay()
        torch.cuda.synchronize()
    events = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, (g, _) in graphs.items():
            for _ in range(int(min(50, max(1, round_s / est[key])))):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                events[key].append((a, b))
    torch.cuda.synchronize()
    out = {}
    for key, evs in events.items():
        t = sorted(a.elapsed_time(b) for a, b in evs)
        out[key] = t[len(t) // 2] * 1e3 / graphs[key][1]
    return out


def eager_ms(fn) -> float:
    """One eager call's time in ms (CUDA events)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def ceilings() -> dict:
    """This run's ceilings: bf16 8192^3 matmul TFLOP/s and device-to-device copy TB/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.empty(2 ** 30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    r = {}
    for name, fn, work in (("bf16_mm_tflops", lambda: a @ b, 2 * 8192 ** 3 / 1e12),
                           ("copy_tbps", lambda: dst.copy_(src), 2 * 2 ** 30 / 1e12)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(10)]
        for x, y in ev:
            x.record()
            fn()
            y.record()
        torch.cuda.synchronize()
        t = sorted(x.elapsed_time(y) for x, y in ev)[5] / 1e3
        r[name] = round(work / t, 1 if name.startswith("bf16") else 3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return r


def n_copies(layer_copies: int, m: int) -> int:
    # Large M is compute-bound and re-reads each weight tile from L2 anyway: 2 copies suffice.
    return layer_copies if m < 512 else min(2, layer_copies)


# --------------------------------------------------------------------------- layers
def bench_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """The (N, K) bf16 weight every scheme and peer of a shape quantizes."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float32).mul_(0.02)
    return w.to(torch.bfloat16)


def rotation(nbytes: int) -> int:
    """Weight copies cycled through per replay: together about ROTATE_BYTES."""
    return max(2, min(64, math.ceil(ROTATE_BYTES / max(1, nbytes))))


class Layer:
    """One (shape, scheme): packed weight copies, the op call, and the fp32 reference."""

    peer = None  # library name for PeerLayer
    tol = TOL

    def __init__(self, name: str, n: int, k: int, seed: int = 0, copies: int | None = None):
        self.name, self.n, self.k = name, n, k
        name, _, self.variant = name.partition("@")
        w = bench_weight(n, k, seed)
        if name == "bf16":
            packed, self.static, self.scheme, self.group = (w,), (), None, 0
        else:
            self.scheme, cfg = SCHEMES[name]
            packed, self.static = cfg.pack(w)
            self.op = cfg.op
            self.group = self.static[0] if self.scheme in D.INT4 else 0
        self.bytes = sum(t.numel() * t.element_size() for t in packed)
        c = copies or rotation(self.bytes)
        self.copies = [packed] + [tuple(t.clone() for t in packed) for _ in range(c - 1)]
        if name != "bf16":  # what the backend does for each packed weight (CUTLASS's int4 arrays)
            for p in self.copies:
                fxquant.lowering.ops.prepare_args(self.op, (*p, None, *self.static))
        self.w_ref = w if name == "bf16" else None

    bias = None  # a bf16 [N] bias every call passes (variants.py --bias), or none

    def fn(self, x, i: int, cfg: D.KernelConfig | None = None):
        p, b = self.copies[i], self.bias
        if self.scheme is None:
            return lambda: F.linear(x, p[0], b)
        if self.variant == "triton_op" and cfg is None:  # what embed_kernels / export(ops="triton") run
            op = triton_target(self.op)
            return lambda: op(x, *p, b, *self.static)
        if cfg is None and self.variant:
            cfg = VARIANTS[self.variant] or D.get_config(self.scheme, x.shape[0], self.n, self.k, self.group,
                                                          x.dtype, x.device, allow_cxx=False,
                                                          allow_scaled_mm=False, allow_cutlass=False)
        if cfg is not None:
            return lambda: D.linear(self.scheme, x, p[0], p[1], b, self.group, cfg)
        return lambda: self.op(x, *p, b, *self.static)

    def reference(self, x):
        out = self._reference(x)
        return out if self.bias is None else out + self.bias.float()

    def _reference(self, x):
        p = self.copies[0]
        s = self.scheme
        if s is None:
            return F.linear(x.float(), p[0].float())
        if s == "int8_wo":
            return F.linear(x.float(), nq.dequantize_int8_per_channel(p[0], p[1], x.dtype).float())
        if s in D.INT4:
            layout = "mma" if s == "int4_mma" else "rows"
            return F.linear(x.float(), nq.dequantize_int4(p[0], p[1], self.group, x.dtype, layout).float())
        if s == "fp8_wo":
            return F.linear(x.float(), nq.dequantize_fp8_weight(p[0], p[1], x.dtype).float())
        if s == "int8_dyn":
            xq, xs = nq.quantize_int8_per_token(x)
        else:
            xq, xs = nq.quantize_fp8(x, s == "fp8_dyn_row")
        return (xq.float() @ p[0].float().t()) * xs * p[1].float().reshape(1, -1)


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- peers
def peer_error(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e)[:120]}"


def parse_peers(spec: str) -> list[str]:
    """--peers value -> requested peer schemes ('auto': all; items: libraries or peer names)."""
    spec = spec.strip().lower()
    if spec in ("", "none", "off"):
        return []
    if spec in ("auto", "all"):
        return list(PEERS)
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in PEER_LIBS:
            out += [p for p, v in PEERS.items() if v[0] == item and p not in out]
        elif item in PEERS:
            out += [item] if item not in out else []
        else:
            raise ValueError(f"unknown peer {item!r}: use auto, none, {', '.join(PEER_LIBS)} "
                             f"or one of {', '.join(PEERS)}")
    return out


def import_peers(requested: list[str]) -> tuple[list[str], dict]:
    """Imports the libraries of the requested peers. Returns (usable peer schemes, library ->
    version or 'unavailable: reason'); each unavailable library is reported in one line."""
    info = {}
    for lib in PEER_LIBS:
        if not any(PEERS[p][0] == lib for p in requested):
            continue
        prec = torch.get_float32_matmul_precision()
        try:
            if lib == "torchao":
                import torchao
                from torchao.quantization import quantize_  # noqa: F401
                info[lib] = torchao.__version__
            else:
                import gemlite
                from gemlite import helper  # noqa: F401
                info[lib] = gemlite.__version__
        except Exception as e:  # ImportError, or a CUDA/version check at import time
            msg = str(e).strip().splitlines()
            reason = f"{type(e).__name__}: {msg[0][:200] if msg else ''}"
            info[lib] = f"unavailable: {reason}"
            log(f"peer {lib} unavailable: {reason}")
        torch.set_float32_matmul_precision(prec)  # keep fp32 references full precision
    usable = [p for p in requested if not str(info.get(PEERS[p][0], "unavailable")).startswith("unavailable")]
    return usable, info


def _int4_g128_asym(w: torch.Tensor, g: int = 128):
    """Asymmetric min/max 4-bit groups for gemlite: W ~ (q - z) * s, s and z in bf16."""
    n, k = w.shape
    x = w.float().view(n, k // g, g)
    lo, hi = x.amin(-1), x.amax(-1)
    s = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16)
    z = (-lo / s.float()).to(torch.bfloat16)
    q = (x / s.float()[..., None] + z.float()[..., None]).round_().clamp_(0, 15)
    return q.to(torch.uint8).view(n, k), s, z


def _rowwise_dequant(w: torch.Tensor, fp8: bool) -> torch.Tensor:
    """gemlite's 8-bit weight quantization (per-row absmax in fp32), dequantized in fp32."""
    wf = w.float()
    dt = torch.float8_e4m3fn if fp8 else torch.int8
    mx = torch.finfo(dt).max if fp8 else torch.iinfo(dt).max
    s = (wf.abs().amax(1, keepdim=True) / mx).clamp_(min=1e-6)
    q = (wf / s).clamp_(-mx if fp8 else -mx - 1, mx)
    q = q.to(dt) if fp8 else q.round_()
    return q.float() * s


def _peer_builder(name: str):
    """bf16 (N, K) weight -> one quantized callable module (on the current CUDA device)."""
    if PEERS[name][0] == "torchao":
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int4WeightOnlyConfig,
                                          Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, PerRow, quantize_)
        # set_inductor_config=False everywhere: its default also calls
        # torch.set_float32_matmul_precision("high"), which would make the fp32 references TF32.
        if name == "torchao_w4a16_g128":
            try:
                from torchao.quantization.quantize_.workflows import Int4PackingFormat
                fmt = Int4PackingFormat.TILE_PACKED_TO_4D  # tinygemm; the default needs mslk
            except ImportError:
                fmt = "tile_packed_to_4d"
            cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt, set_inductor_config=False)
        elif name == "torchao_w8a16":
            cfg = Int8WeightOnlyConfig(set_inductor_config=False)
        elif name == "torchao_w8a8_int8":
            cfg = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
        else:
            cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)

        def build(w):
            n, k = w.shape
            lin = torch.nn.Linear(k, n, bias=False, device="meta", dtype=torch.bfloat16)
            lin.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
            seq = torch.nn.Sequential(lin)
            quantize_(seq, cfg)
            return seq[0]
        return build

    from gemlite import helper as H
    dev = f"cuda:{torch.cuda.current_device()}"
    if name == "gemlite_w4a16_g128":
        def build(w):
            q, s, z = _int4_g128_asym(w)
            return H.A16Wn(device=dev, dtype=torch.bfloat16).from_weights(q, s, z, W_nbits=4, group_size=128)
        return build
    proc = {"gemlite_w8a16": H.A16W8_INT8, "gemlite_w8a8_int8": H.A8W8_int8_dynamic,
            "gemlite_fp8_row": H.A8W8_fp8_dynamic}[name]

    def build(w):
        n, k = w.shape
        lin = torch.nn.Linear(k, n, bias=False, device="meta", dtype=torch.bfloat16)
        lin.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        return proc(device=dev, dtype=torch.bfloat16).from_linear(lin)
    return build


def _peer_ref_weight(name: str, w: torch.Tensor, mod) -> tuple[torch.Tensor, str]:
    """(weight for the reference F.linear, 'dequantized' | 'original')."""
    try:
        if name == "gemlite_w4a16_g128":
            q, s, z = _int4_g128_asym(w)
            n, k = w.shape
            zs = (-z.float() * s.float()).to(torch.bfloat16).float()  # gemlite's fma-mode zeros
            dq = q.float().view(n, k // 128, 128) * s.float()[..., None] + zs[..., None]
            return dq.view(n, k), "dequantized"
        if name.startswith("gemlite_"):
            return _rowwise_dequant(w, name == "gemlite_fp8_row"), "dequantized"
        if name == "torchao_w4a16_g128":  # Int4TilePackedTo4dTensor has no dequantize()
            from torchao.quantization.quant_primitives import (
                MappingType, _choose_qparams_affine_tinygemm, _dequantize_affine_tinygemm,
                _quantize_affine_tinygemm)
            bs = [1, 128]
            s, z = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, bs, torch.int32, 0, 15,
                                                   scale_dtype=w.dtype, zero_point_dtype=w.dtype)
            q = _quantize_affine_tinygemm(w, bs, s, z, torch.int32, 0, 15)
            return _dequantize_affine_tinygemm(q, bs, s, z, torch.int32, 0, 15,
                                               output_dtype=torch.bfloat16), "dequantized"
        wt = mod.weight
        for t in (wt, getattr(wt, "original_weight_tensor", None)):  # AQT / Float8Tensor / LAQT
            try:
                d = t.dequantize()
                if type(d) is torch.Tensor and d.shape == w.shape:
                    return d, "dequantized"
            except Exception:
                pass
    except Exception as e:
        log(f"peer {name}: no dequantized weight ({type(e).__name__}: {str(e)[:120]}); "
            f"checking against the original weight")
    return w, "original"


class PeerLayer:
    """One (shape, peer scheme): a quantized module per weight copy, each built from the same bf16
    weight as the fxquant layers' (outside timing), called as module(x); a loose reference."""

    scheme, group, static = None, 0, ()

    def __init__(self, name: str, n: int, k: int, seed: int = 0, copies: int | None = None):
        self.name, self.n, self.k = name, n, k
        self.peer, self.equiv, bits = PEERS[name]
        w = bench_weight(n, k, seed)
        build = _peer_builder(name)
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        m0 = torch.cuda.memory_allocated()
        first = build(w)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - m0  # what the module holds
        self.bytes = grown if grown > 0 else n * k * bits // 8
        c = copies or rotation(self.bytes)
        self.copies = [first] + [build(w) for _ in range(c - 1)]
        torch.cuda.synchronize()
        self.build_s = time.perf_counter() - t0
        self.w_ref, self.ref = _peer_ref_weight(name, w, first)
        self.tol = (PEER_TOL if self.ref == "dequantized" else PEER_TOL_ORIG)[bits]

    def fn(self, x, i: int, cfg=None):
        mod = self.copies[i]
        return lambda: mod(x)

    def reference(self, x):
        return F.linear(x.float(), self.w_ref.float())


def make_layer(name: str, n: int, k: int, copies: int | None = None):
    return PeerLayer(name, n, k, copies=copies) if name in PEERS else Layer(name, n, k, copies=copies)


def _gemlite_cache_files(create: bool = False) -> tuple[Path, str]:
    """Where --warm-only shards leave gemlite's autotune choices for the measuring process."""
    try:
        root = D.cache_path().parent
    except Exception:
        root = Path(os.environ.get("FXQUANT_CACHE_DIR") or "/tmp/fxquant_cache")
    d = root / "gemlite"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_properties(torch.cuda.current_device()).name
    return d, "autotune_" + "".join(c if c.isalnum() else "_" for c in name)


def gemlite_save_autotune():
    try:
        import gemlite
        d, stem = _gemlite_cache_files(create=True)
        gemlite.cache_config(str(d / f"{stem}_{os.getpid()}.json"))
    except Exception as e:
        log(f"gemlite autotune cache not saved: {type(e).__name__}: {str(e)[:120]}")


def gemlite_load_autotune():
    try:
        import gemlite
        d, stem = _gemlite_cache_files()
        files = sorted(d.glob(f"{stem}_*.json")) if d.is_dir() else []
        n = sum(bool(gemlite.load_config(str(f), print_error=False)) for f in files)
        if files:
            log(f"gemlite: loaded {n}/{len(files)} autotune files from {d}")
    except Exception as e:
        log(f"gemlite autotune cache not loaded: {type(e).__name__}: {str(e)[:120]}")


# --------------------------------------------------------------------------- phases
def variant_runs(name: str, m: int) -> bool:
    """Whether row `name` is measured at M = m: a C++ variant of a CXX_SCHEMES scheme only within
    the C++ kernels' M range; other variants (fp8's scaled_mm / triton) and plain rows always."""
    base, _, variant = name.partition("@")
    scheme = SCHEMES[base][0] if base in SCHEMES else None
    if variant == "triton_op":
        return True
    if variant.startswith("cutlass_i8"):
        return m >= CUTLASS_I8_MIN_M
    if variant.startswith("cutlass") or variant == "deq":  # the narrow token tiles from M = 17
        narrow = variant.startswith("cutlass") and variant in VARIANTS and VARIANTS[variant].bm < 128
        return m >= (CUTLASS_NARROW_MIN_M if narrow else CUTLASS_MIN_M)
    return not variant or scheme not in D.CXX_MAX_M or m <= D.CXX_MAX_M[scheme]


def units(args):
    """(scheme name, M) pairs; each pair loops over the shapes (sharding unit for --warm-only)."""
    us = [(s, m) for s in list(args.schemes) + list(args.peer_schemes) for m in args.ms
          if variant_runs(s, m)]
    if args.shard:
        i, n = (int(v) for v in args.shard.split("/"))
        us = [u for j, u in enumerate(us) if j % n == i]
    return us


def warm(args):
    """Compile every kernel variant the tune/measure phases will use (no timing)."""
    layers: dict = {}
    for name, m in units(args):
        for n, k in args.shapes:
            key = (name, n, k)
            if key not in layers:
                try:
                    layers[key] = make_layer(name, n, k, copies=1)
                except Exception as e:
                    if name not in PEERS:
                        raise
                    layers[key] = None
                    log(f"warm {name} {n}x{k}: build {peer_error(e)}")
            L = layers[key]
            if L is None:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cands = tune_candidates(args, L.scheme, m, L.group) if args.tune and not L.peer else []
            for cfg in cands + [None]:
                try:
                    L.fn(x, 0, cfg)()
                except Exception as e:  # reported again (and counted) by the tune phase
                    log(f"warm {name} {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.synchronize()
    if any(PEERS[p][0] == "gemlite" for p in args.peer_schemes):
        gemlite_save_autotune()
    log("warm done")


def tune_candidates(args, scheme: str, m: int, group: int) -> list:
    """The tuner's candidates; --triton-only: its Triton GEMMs/GEMVs only, without TMA (as
    lowering/triton/triton_ops.py launches them)."""
    cands = D.candidate_configs(scheme, m, group)
    if not args.triton_only:
        return cands
    return list(dict.fromkeys(dataclasses.replace(c, tma=False) for c in cands
                              if c.kind in ("gemm", "gemv", "deqgemm")))


def tune(args, out_dir: Path) -> dict:
    """Time every candidate per (scheme, shape, M); best per shape + best per M-bucket overall."""
    dev = D._device_info(torch.device("cuda"))[0]
    exact: dict = {}
    fallback: dict = {}  # key -> best Triton config where the best is the CUDA C++ kernel
    per_bucket: dict = {}  # (scheme, group, m) -> {cfg: [time / best time per shape]}
    log_rows = []
    t_end = time.time() + args.tune_budget
    for name in args.schemes:
        if args.triton_only and name.endswith("@triton_op"):
            pass  # tuned (Triton kernels only) for its triton_op rows
        elif name == "fp8_tensor" or "@" in name:  # fp8_tensor: fp8_row's kernels; variants: fixed
            continue
        for n, k in args.shapes:
            L = Layer(name, n, k)
            for m in args.ms:
                if time.time() > t_end:
                    log(f"tune budget spent: {name} {n}x{k} M={m} keeps its default config")
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                nc = n_copies(len(L.copies), m)
                graphs = {}
                ref = L.reference(x)
                for cfg in tune_candidates(args, L.scheme, m, L.group):
                    try:
                        err = rel_err(L.fn(x, 0, cfg)(), ref)
                        if not err <= L.tol:  # a miscompiled tile shape must not win (NaN too)
                            log(f"tune {name} {n}x{k} M={m} {cfg}: wrong output, rel err {err:.3g}: rejected")
                            continue
                        graphs[cfg] = (capture([L.fn(x, i, cfg) for i in range(nc)]), nc)
                    except Exception as e:
                        log(f"tune {name} {n}x{k} M={m} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                res = time_graphs(graphs, rounds=args.tune_rounds, round_s=args.tune_round_s,
                                  warm_s=0.02) if graphs else {}
                del graphs
                if not res:
                    continue
                best = min(res, key=res.get)
                key = D.config_key(L.scheme, torch.bfloat16, n, k, L.group, m)
                exact[key] = best
                triton = {c: t for c, t in res.items() if c.kind not in D.CONDITIONAL_KINDS}
                if best.kind in D.CONDITIONAL_KINDS and triton:  # where the library or its condition is missing
                    fallback[key] = min(triton, key=triton.get)
                b = per_bucket.setdefault((L.scheme, L.group, m), {})
                for cfg, t in res.items():
                    b.setdefault(cfg, []).append(t / res[best])
                log_rows.append({"scheme": name, "N": n, "K": k, "M": m,
                                 "times_us": {repr(c): t for c, t in res.items()}, "best": repr(best)})
                log(f"tune {name:11s} {n:5d}x{k:<5d} M={m:<5d} best {res[best]:8.1f} us  {best}")
            del L
            torch.cuda.empty_cache()
    generic = {}
    for (scheme, group, m), d in per_bucket.items():
        full = {c: v for c, v in d.items() if len(v) == max(len(v) for v in d.values())}

        def score(c):
            return sum(math.log(t) for t in full[c])
        best = min(full, key=score)
        generic[D.bucket_key(scheme, group, m)] = best
        triton = [c for c in full if c.kind not in D.CONDITIONAL_KINDS]
        if best.kind in D.CONDITIONAL_KINDS and triton:
            fallback[D.bucket_key(scheme, group, m)] = min(triton, key=score)
    if args.triton_only:  # kept apart from the dispatcher's own choices
        exact = {D.TRITON_ONLY + key: c for key, c in exact.items()}
        generic = {D.TRITON_ONLY + key: c for key, c in generic.items()}
        fallback = {}
    D.save_tuned(dev, {**exact, **generic})
    shipped = {dev: {key: {**c.to_json(), **({"fallback": fallback[key].to_json()} if key in fallback else {})}
                     for key, c in sorted({**exact, **generic}.items())}}
    (out_dir / "tuned_configs.json").write_text(json.dumps(shipped, indent=1, sort_keys=True))
    (out_dir / "tune_log.json").write_text(json.dumps(log_rows))
    return shipped


def measure(args, save=lambda rows: None) -> list[dict]:
    """Per shape and M: bf16 and every scheme captured, then timed round-robin together."""
    rows = []
    names = ["bf16"] + list(args.schemes)
    width = max(len(s) for s in names + list(args.peer_schemes))
    for n, k in args.shapes:
        layers = {name: Layer(name, n, k) for name in names}
        build_err = {}
        for name in args.peer_schemes:  # a peer that can't be built is recorded and skipped
            try:
                layers[name] = PeerLayer(name, n, k)
                log(f"{n:5d}x{k:<5d} {name:{width}s} built {len(layers[name].copies)} copies "
                    f"in {layers[name].build_s:.1f} s")
            except Exception as e:
                build_err[name] = peer_error(e)
                log(f"{n:5d}x{k:<5d} {name:{width}s} build {build_err[name]}")
                torch.cuda.empty_cache()
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            graphs, recs = {}, {}
            for name, L in layers.items():
                if not variant_runs(name, m):
                    continue
                nc = n_copies(len(L.copies), m)
                row = {"N": n, "K": k, "M": m, "scheme": name, "copies": nc, "weight_bytes": L.bytes}
                if L.peer:
                    row.update(peer=L.peer, tol=L.tol, ref=L.ref)
                try:
                    out = L.fn(x, 0)()
                    row["rel_err"] = rel_err(out, L.reference(x))
                    row["ok"] = row["rel_err"] <= L.tol
                    del out
                    if L.peer:  # some peers take ~1000x bf16's time at some M: don't replay those
                        t = eager_ms(L.fn(x, 0))
                        if t * nc > args.peer_slow_ms:
                            row.update(us=t * 1e3, timing="eager, once (over --peer-slow-ms per replay)")
                            recs[name] = row
                            continue
                    graphs[name] = (capture([L.fn(x, i) for i in range(nc)]), nc)
                    if L.scheme is not None:
                        row["config"] = repr(VARIANTS[L.variant] if VARIANTS.get(L.variant) else
                                             D.get_config(L.scheme, m, n, k, L.group, x.dtype, x.device,
                                                          allow_cxx=L.variant != "triton",
                                                          allow_scaled_mm=L.variant != "triton",
                                                          allow_cutlass=L.variant != "triton"))
                except Exception as e:
                    row["error"] = peer_error(e) if L.peer else f"{type(e).__name__}: {str(e)[:300]}"
                    row["ok"] = False
                recs[name] = row
            for name, err in build_err.items():
                recs[name] = {"N": n, "K": k, "M": m, "scheme": name, "peer": PEERS[name][0],
                              "error": err, "ok": False}
            times = time_graphs(graphs, rounds=args.rounds, round_s=args.budget / max(1, args.rounds))
            del graphs
            for name, row in recs.items():
                if name in times:
                    row["us"] = times[name]
                if "us" in row and "us" in recs["bf16"]:
                    row["speedup"] = recs["bf16"]["us"] / row["us"]
                    row["TBps"] = layers[name].bytes / row["us"] / 1e6
                    row["TFLOPs"] = 2 * m * n * k / row["us"] / 1e6
                rows.append(row)
                log(f"{n:5d}x{k:<5d} {name:{width}s} M={m:<5d} "
                    + (f"{row['us']:9.1f} us  x{row.get('speedup', float('nan')):5.2f}  "
                       f"err {row['rel_err']:.1e}" if "us" in row else row.get("error", "")))
        del layers
        torch.cuda.empty_cache()
        save(rows)  # partial results survive a timeout
    return rows


def table(rows, schemes, shapes, ms, peers=()) -> str:
    """Speedup vs bf16 per scheme and M (columns: shapes); peers below the fxquant schemes.
    '!': out of tolerance; 'failed': the point raised (see the JSON's "error")."""
    idx = {(r["scheme"], r["N"], r["K"], r["M"]): r for r in rows}
    w = max(len(s) for s in ["scheme", "bf16"] + list(schemes) + list(peers))
    head = f"{'scheme':{w}s} {'M':>5s} | " + " | ".join(f"{n}x{k:>5}" for n, k in shapes)
    lines = [head, "-" * len(head)]
    for name in ["bf16"] + list(schemes) + list(peers):
        if name == (list(peers) or [None])[0]:
            lines.append("-" * len(head))
        for m in ms:
            if "@" in name and not variant_runs(name, m):
                continue
            cells = []
            for n, k in shapes:
                r = idx.get((name, n, k, m), {})
                if "us" not in r:
                    cells.append(f"{'failed' if 'error' in r else 'n/a':>10s}")
                elif name == "bf16":
                    cells.append(f"{r['us']:8.1f}us")
                else:
                    flag = ("" if r.get("ok") else "!") + ("~" if "timing" in r else "")
                    v = r.get("speedup", float("nan"))
                    cells.append(f"{v:{9 - len(flag)}.{3 if v < 0.1 else 2}f}x{flag}".rjust(10))
            lines.append(f"{name:{w}s} {m:5d} | " + " | ".join(cells))
    if any("timing" in r for r in rows):
        lines.append("~: timed eagerly once, not in the CUDA-graph round-robin (over --peer-slow-ms)")
    return "\n".join(lines)


def plot(rows, schemes, shapes, path: Path, peers=()) -> bool:
    """Speedup vs M per shape: fxquant solid, torchao dashed, gemlite dotted; a peer takes the
    colour of its fxquant equivalent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), sharey=True)
    axes = axes if len(shapes) > 1 else [axes]
    colour = {s: f"C{i % 10}" for i, s in enumerate(list(SCHEMES) + [s for s in schemes if s not in SCHEMES])}
    style = {None: ("-", "o"), "torchao": ("--", "s"), "gemlite": (":", "^"), "cuda": ((0, (5, 1)), "D"),
             "triton": ((0, (1, 1)), "x"), "cutlass": ((0, (3, 1, 1, 1)), "P")}
    for ax, (n, k) in zip(axes, shapes):
        for name in list(schemes) + list(peers):
            lib, equiv = (PEERS[name][0], PEERS[name][1]) if name in PEERS else (None, name)
            if "@" in name:
                equiv, _, lib = name.partition("@")
            pts = sorted((r["M"], r["speedup"]) for r in rows
                         if r["scheme"] == name and r["N"] == n and r["K"] == k and "speedup" in r)
            if pts:
                ls, mk = style.get(lib, ("-.", "x"))
                ax.plot(*zip(*pts), ls=ls, marker=mk, ms=4 if lib else 5, color=colour.get(equiv),
                        label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"N x K = {n} x {k}")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("speedup vs bf16 cuBLAS")
    axes[-1].legend(fontsize=7 if peers else 8, ncol=2 if peers else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="out/bench")
    ap.add_argument("--schemes", default=",".join(list(SCHEMES) + DEFAULT_VARIANTS),
                    help="fxquant schemes, and <scheme>@cuda / <scheme>@triton kernel variants (M <= dispatch.CXX_MAX_M)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--budget", type=float, default=0.05, help="seconds of replays per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds per (shape, M)")
    ap.add_argument("--tune", action="store_true", help="autotune (and cache) before measuring")
    ap.add_argument("--triton-only", action="store_true",
                    help="with --tune: tune the Triton kernels alone, for the triton_op path (\"triton|\" keys)")
    ap.add_argument("--tune-budget", type=float, default=200.0, help="seconds of tuning at most")
    ap.add_argument("--tune-rounds", type=int, default=2, help="round-robin rounds per tuned point")
    ap.add_argument("--tune-round-s", type=float, default=0.003,
                    help="seconds of replays per candidate and round (short rounds can rank large-M "
                         "tiles unlike the measurement: see BENCHMARKS.md S6)")
    ap.add_argument("--warm-only", action="store_true", help="compile only (with --tune: candidates too)")
    ap.add_argument("--shard", default="", help="i/n: this process's share of --warm-only work")
    ap.add_argument("--peers", default="auto",
                    help="peer schemes measured beside fxquant's, where importable: auto (all), none,\n"
                         "or a comma list of libraries (torchao, gemlite) and/or peer names:\n"
                         + ", ".join(PEERS))
    ap.add_argument("--peer-slow-ms", type=float, default=100.0,
                    help="a peer point whose graph replay (one call per weight copy) would take longer\n"
                         "is timed by one eager call instead (flagged '~')")
    args = ap.parse_args(argv)
    args.schemes = [s for s in args.schemes.split(",") if s]
    for name in args.schemes:
        base, _, variant = name.partition("@")
        if base not in SCHEMES:
            ap.error(f"unknown scheme {base!r}; known: {', '.join(SCHEMES)}")
        allowed = {"cuda": D.CXX_SCHEMES, "triton": D.CXX_SCHEMES + ("fp8_dyn_row", "fp8_dyn_tensor", "int8_dyn"),
                   "scaled_mm": ("fp8_dyn_row", "fp8_dyn_tensor", "int8_dyn"), "triton_op": D.SCHEMES}
        allowed.update({v: ("int8_dyn",) if v.startswith("cutlass_i8") else ("int4_wo", "int4_mma", "int8_wo", "fp8_wo")
                        for v in VARIANTS if v.startswith("cutlass")})
        if variant and SCHEMES[base][0] not in allowed.get(variant, ()):
            ap.error(f"{name}: variant @{variant} does not apply to {base}")
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.ms = [int(m) for m in args.ms.split(",")]
    if args.triton_only and not args.tune:
        ap.error("--triton-only tunes: give --tune too")
    try:
        requested = parse_peers(args.peers)
    except ValueError as e:
        ap.error(str(e))
    args.peer_schemes, peer_info = import_peers(requested)
    if args.warm_only:
        warm(args)
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton
    p = torch.cuda.get_device_properties(0)
    meta = {"device": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat(), "rotate_bytes": ROTATE_BYTES,
            "method": "CUDA-graph replay over rotated weight copies, median of replays",
            "peers": peer_info, "peer_schemes": args.peer_schemes}
    meta["ceilings_before"] = ceilings()
    log(json.dumps(meta))
    log(f"ceilings before: {meta['ceilings_before']}")
    t0 = time.time()
    if args.tune:
        tune(args, out_dir)
        log(f"tuning took {time.time() - t0:.0f} s")
    t1 = time.time()
    if any(PEERS[p][0] == "gemlite" for p in args.peer_schemes):
        gemlite_load_autotune()  # what the --warm-only shards chose, if they ran

    def save(rows):
        (out_dir / "linear.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    rows = measure(args, save)
    meta["measure_s"] = round(time.time() - t1, 1)
    meta["ceilings_after"] = ceilings()
    log(f"ceilings after: {meta['ceilings_after']}")
    save(rows)
    plot(rows, args.schemes, args.shapes, out_dir / "linear.png", args.peer_schemes)
    txt = table(rows, args.schemes, args.shapes, args.ms, args.peer_schemes)
    (out_dir / "linear_table.txt").write_text(txt + "\n")
    bad = [r for r in rows if not r.get("ok") and "peer" not in r]
    peer_bad = [r for r in rows if not r.get("ok") and "peer" in r]
    log(txt)
    log(f"{len(rows)} measurements, {len(bad)} failed or out of tolerance ({TOL}); "
        f"measure phase {meta['measure_s']} s")
    if args.peer_schemes:
        log(f"peers: {len(peer_bad)} of {sum('peer' in r for r in rows)} points failed or out of "
            f"their tolerance (not counted in the exit status)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
